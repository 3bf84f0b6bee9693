#!/usr/bin/env bash
# Stage what one chapter's gpu run carries to the offline GPU machine, within the 64 MiB a device call carries:
# .whl/ (the wheels its image lacks: chapter 02 adds reasoning-gym's) and .data/ (the corpus its gpu profile reads,
# its `corpus` parameter as the gpu profile resolves it, plus the GPT-2 BPE that tokenizes it; empty for chapters that read none).
#
#   bash scripts/device-stage.sh 05_moe_routing     # then carry=[".whl", ".data"] and scripts/gpu-box.sh
set -euo pipefail
ch=${1:?usage: device-stage.sh CHAPTER (e.g. 05_moe_routing)}
root=$(git rev-parse --show-toplevel)
cd "$root"
data=${REPRO_DATA_DIR:-$root/../shared/data}
[ -f "chapters/$ch/claims.yaml" ] || { echo "device-stage: no chapter $ch under chapters/" >&2; exit 1; }
if [ "$ch" = 02_grpo ]; then bash scripts/ch02-wheels.sh; else bash ../shared/tools/device-wheels.sh; fi
corpus=$(PYTHONPATH="$root/src" python3 -c '
import sys
from repro_utils.claims import load_chapter
from repro_utils.profiles import resolve
print(resolve(load_chapter(sys.argv[1]).parameters, {"profile": "gpu"}, cuda=True).get("corpus") or "")
' "chapters/$ch")
rm -rf --one-file-system .data
mkdir .data
if [ -n "$corpus" ]; then
  for d in "$corpus" tiktoken; do
    [ -d "$data/$d" ] || { echo "device-stage: $data/$d is missing (set REPRO_DATA_DIR)" >&2; exit 1; }
    cp -r "$data/$d" .data/
  done
fi
kib=$(du -sk .whl .data | awk '{s += $1} END {print s}')
echo "$ch: .whl $(du -sh .whl | cut -f1), .data $(du -sh .data | cut -f1) (${corpus:-no corpus}); carry=[\".whl\", \".data\"]"
[ "$kib" -le $((64 * 1024)) ] || { echo "device-stage: $kib KiB is over the 64 MiB a device call carries" >&2; exit 1; }
