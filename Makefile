# One virtual environment per checkout; every target sets it up itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCHREC := torchrec==1.8.0
RUN ?= runs/demo
# pyproject extras: cpu,dev (default) or gpu,dev (CUDA torch + fbgemm-gpu; deploy/gpu_check.sh)
EXTRAS ?= cpu,dev

.PHONY: setup system-deps demo test test-fast test-gpu gpu-check bench bench-data bench-kernel bench-train clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	# torchrec pins the CUDA fbgemm-gpu; its real needs are in pyproject's dependencies.
	$(BIN)/pip install -q --no-deps $(TORCHREC)
	# the CPU op of our fused optimizer, compiled now rather than inside the first training run
	$(BIN)/python -m trainer.optim.build_ext
	touch $(STAMP)

setup: $(STAMP)

# Debian's prometheus package: the real server + promtool the metrics tests start (needs root / apt)
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

demo: $(STAMP)
	$(BIN)/tailrec demo --out $(RUN)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests

# in-process tests only: no torchrun, torchx, scrapes or kill runs (a few minutes on 2 cores)
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests -m "not dist and not ops"

# GPU lane: CUDA-only tests (they skip without a device); gpu-check = these + the GPU kernel bench
test-gpu: $(STAMP)
	$(BIN)/python -m pytest tests -m gpu

gpu-check: $(STAMP)
	PY=$(BIN)/python bash deploy/gpu_check.sh

bench-data: $(STAMP)
	$(BIN)/tailrec bench data

bench-kernel: $(STAMP)
	$(BIN)/tailrec bench kernel

bench-train: $(STAMP)
	$(BIN)/tailrec bench train

clean:
	rm -rf $(VENV) runs build *.egg-info
