# `make demo` and `make test` each create .venv and install the project when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo lint bench gpu-check results-tables clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,plot,slurm,timm]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(VENV)/bin/domadapt sweep --dataset styledigits --preset styledigits --tasks all \
	    --methods source-only,dann --norms bn,bin --seeds 0 --multidomain \
	    --out runs/styledigits-demo --results results/styledigits
	$(VENV)/bin/domadapt compare runs/styledigits-demo

lint: $(STAMP)
	$(VENV)/bin/ruff check domadapt cli tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_bin.py

# On a CUDA machine (<= ~10 min): the CUDA tests, the GPU benchmark (fp32, bf16; both layouts)
# and a 200-iteration DANN + BIN run with AMP, all written to benchmarks/gpu/<device>/.
# Elsewhere it prints one line and succeeds.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

# Rebuild every committed table and report under results/ from the committed run records.
results-tables: $(STAMP)
	bash results/regenerate.sh

clean:
	rm -rf $(VENV) runs
