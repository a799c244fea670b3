# One command each: `make serve` runs the server, `make test` runs the tests.
# Both install what they need first (torch, if missing, then dstp and its extras).
PY ?= python3
TP ?= 2
# A CPU build here; on a GPU machine install your CUDA torch first and this is skipped.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint serve bench gpu-check step-shape

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@$(PY) -m pip install -q -e ".[test]"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install lint
	$(PY) -m pytest -q

serve: install
	deepspeed --num_gpus $(TP) launch/serve.py $(ARGS)

# Benchmarks vs HF and DeepSpeed AutoTP at TP=2 (see benchmarks/README.md).
# `make bench ARGS=--small` for a quick check; results in runs/bench/latest.
bench: install
	$(PY) benchmarks/run.py $(ARGS)

# A batch-8 decode step's shape (issue 22's table): ops per decoder layer, ops outside the
# layers, host readbacks per step, for dstp's CPU kernels and plain PyTorch (benchmarks/step_shape.py).
step-shape: install
	$(PY) benchmarks/step_shape.py $(ARGS)

# dstp on one CUDA GPU: correctness against HF, the server, a speed line (benchmarks/gpu_check.py).
# Without CUDA every check is skipped; `make gpu-check ARGS="--device cpu --quick"` runs on CPU.
gpu-check: install
	$(PY) benchmarks/gpu_check.py $(ARGS)
