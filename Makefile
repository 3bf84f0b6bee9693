# The README's two commands: `make book` (the main job) and `make test` (what CI runs).
PY ?= python3
# Offline data for the chapters: $REPRO_DATA_DIR if set, else ../shared/data beside the checkout if present.
REPRO_DATA_DIR ?= $(wildcard $(abspath $(CURDIR)/../shared/data))
export REPRO_DATA_DIR
export PYTHONUNBUFFERED = 1

.PHONY: install book test lint

install:
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null

# Execute every chapter (auto profile: gpu with CUDA, smoke without), regenerate the scoreboard, build the HTML.
book: install
	repro book --profile auto

lint:
	$(PY) -m ruff check .

# Unit tests, `repro check`, the smoke run of every chapter through papermill, and the HTML build (-W).
# pytest's exit code 5 means "no tests collected": reported, not a failure; every other failure stays one.
test: install lint
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc
