#!/usr/bin/env bash
# Run chapters on a GPU machine that already has torch, triton and transformers but lacks the
# course's other packages and the network (as the course's lent H100 does). From the repo root:
#
#   bash scripts/device-stage.sh CHAPTER            # .whl/ and .data/ for that chapter, within the 64 MiB a call carries
#   (it copies only the corpus the chapter's gpu profile reads, and the GPT-2 BPE; never "$REPRO_DATA_DIR"/*, which
#   with the variable unset is the whole root file system)
#   REPRO_COMMIT=$(git rev-parse HEAD) bash scripts/gpu-box.sh OUT CHAPTER [CHAPTER ...] [-- -p key=value ...]
#
# Each chapter's executed notebook and ledger land in OUT/<chapter>/; bring that folder back and
# `repro publish CHAPTER OUT/<chapter>` makes it the committed run.
set -uo pipefail
out=$1; shift
chapters=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do chapters+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site:$PWD/src REPRO_DATA_DIR=$PWD/.data TIKTOKEN_CACHE_DIR=$PWD/.data/tiktoken \
       PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 REPRO_CACHE_DIR=/tmp/repro-cache
python3 -m ipykernel install --user --name python3 >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
rc=0
for ch in "${chapters[@]}"; do
  python3 -m repro_utils.cli run "$ch" --profile gpu --out "$out/$ch" --verbose "$@" || rc=1
done
exit $rc
