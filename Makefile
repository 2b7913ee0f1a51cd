# Quick start targets. `make clm` is the main job; `make test` is what CI runs.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
RUN_DIR ?= runs/clm
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-test clm dynamic routers test bench clean-run

# torch==2.13.0 is the CPU build on this machine's disk; on a GPU machine install a CUDA
# build of torch first (see README) and `pip install -e .` keeps it.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e .

install-test: install
	$(PIP) install -q -e ".[test]"

clm: install
	$(PYTHON) run_clm.py --run-dir $(RUN_DIR)

dynamic: install
	$(PYTHON) clm_dynamic_experts.py --run-dir $(RUN_DIR)

# The routers study: every training-free router, 3 seeds, 2 domain sets (~70 min on 2 cores).
# MERGEKIT_MOE=PATH (a mergekit-moe executable of its own venv) adds the real mergekit's six rows (~+60 min).
MERGEKIT_MOE ?=
routers: install
	$(PYTHON) clm_routers_study.py --run-root runs/routers --report-dir reproduction/clm \
	    $(if $(MERGEKIT_MOE),--peers mergekit --mergekit-moe $(MERGEKIT_MOE))

test: install-test
	$(PYTHON) -m pytest tests

bench: install
	$(PYTHON) bench/moe_throughput.py

clean-run:
	rm -rf $(RUN_DIR)
