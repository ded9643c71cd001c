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

# uv installs the pinned stack in 88 s on the 2-core machines, pip in 263 s (pip unpacks and
# byte-compiles on one core). uv reads no pip configuration, so scripts/pip_sources.py hands it
# the mirrors, wheel folders and constraints pip is set up with; best match across indexes, as
# pip does. If uv cannot be had or fails, pip installs it all as before.
# Byte-compile at install (never skip it): these machines set PYTHONDONTWRITEBYTECODE=1, so a
# module not compiled at install is compiled again in every process that imports it (tried
# with pip --no-compile: 17 minutes in, the suite had finished fewer than 10 of its 698 tests).
UV_VERSION := 0.13.8

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	{ $(BIN)/pip install -q uv==$(UV_VERSION) && \
	  $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode --index-strategy unsafe-best-match \
	    $$($(BIN)/python scripts/pip_sources.py) -e '.[dev]'; } || \
	  { echo "setup: uv failed; installing with pip" >&2; $(BIN)/pip install -q -e '.[dev]'; }
	$(BIN)/pip check
	touch $@

demo: setup
	bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf demo runs
