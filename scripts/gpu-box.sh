#!/usr/bin/env bash
# Run chapters on a GPU machine that already has torch, triton and transformers but lacks the
# course's other packages and the network (as the course's lent H100 does). From the repo root:
#
#   bash ../shared/tools/device-wheels.sh          # once, on a machine with the network: writes .whl/
#   mkdir -p .data && cp -r "${REPRO_DATA_DIR:?set it to ../shared/data}"/. .data/   # the offline corpus and GPT-2 BPE
#   (the ${...:?} stops the copy when the variable is unset: "$REPRO_DATA_DIR"/* would then copy the whole root
#   file system; and .whl/ plus all of .data/ exceed the 64 MiB a device call carries: copy only the corpus a
#   chapter reads, e.g. corpus-xl and tiktoken, and make .data/ an empty folder for chapters that read none)
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
