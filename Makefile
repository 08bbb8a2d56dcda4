# Two commands from a fresh clone: `make demo` and `make test`. Both set themselves up.
PYTHON   ?= python3
VENV     ?= .venv
# torch: 2.13.0 is what CI pins (a CPU wheel on CI's disk). On a CUDA machine pick the
# build that matches your driver, e.g. `make install TORCH_SPEC=torch==2.5.1`.
TORCH_SPEC ?= torch==2.13.0
# spconv flavour extra: cu120 (default), cu126, or cpu.
SPCONV   ?= cu120
PY       := $(VENV)/bin/python
# the stamp names the spconv flavour; torch is installed once (another TORCH_SPEC later: `make
# clean` first, or `$(VENV)/bin/pip install` it), so a plain `make test` never replaces a CUDA pick
STAMP    := $(VENV)/.installed-$(SPCONV)

.PHONY: install test lint demo clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(SPCONV),test]"
	@touch $@

test: install lint
	NUMBA_CACHE_DIR=$(CURDIR)/.cache/numba $(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check sparse_ad tools tests

demo: install
	$(VENV)/bin/sparse-ad demo --config configs/demo.yaml --run-dir runs/demo

clean:
	rm -rf $(VENV) .cache runs/demo
