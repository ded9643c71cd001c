# Two commands on a fresh machine:  `make demo`  (set up + run the main job on embedded
# defaults)  and  `make test`  (set up + run the tests).  Setup is idempotent.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE=1
export NO_ALBUMENTATIONS_UPDATE=1
export RAY_USAGE_STATS_ENABLED=0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# pip byte-compiles at install; keep it (no --no-compile): these machines set
# PYTHONDONTWRITEBYTECODE=1, so a module not compiled at install is compiled again in every
# process that imports it (tried: 17 minutes in, the suite had finished fewer than 10 of its
# 698 tests; it otherwise ends in 17 minutes).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip check
	touch $@

demo: setup
	bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf demo runs
