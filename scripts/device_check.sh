#!/usr/bin/env bash
# What polygpt does on a CUDA GPU, in one run of at most ~8 minutes, from a fresh checkout:
#
#   1. install: a venv (.venv-device) with torch's default Linux wheel (a CUDA build), polygpt
#      (bpe extra; GPT-2's vocabulary file from the mlx-whisper wheel, as the Makefile installs
#      it), transformers (to make a random GPT-2 124M), and MLX's CUDA build where pip
#      has one (skipped, with the reason, where not). DEVICE_CHECK_PYTHON=/path/to/python uses
#      an environment that already has them instead (no install, no network).
#   2. parity on the GPU: a random GPT-2 124M (transformers' init, converted), logits of torch
#      cuda fp32/fp16/bf16 and of MLX gpu fp32/bf16 against torch CPU fp32, max |diff|.
#   3. `polygpt bench --quick` at 124M: torch cuda fp32/fp16/bf16 and MLX gpu.
#   4. 124M training on cuda (bf16 autocast, torch.compile, batch 8 x 1024): tokens/s and the
#      model-FLOPs utilization against the GPU's dense bf16 peak (a table of known GPUs).
#
# Prints one table (also written to $DIR/table.md). DEVICE_CHECK_DIR sets the working directory
# [/tmp/polygpt-device-check]; DEVICE_CHECK_DRY=1 runs the same steps on the CPU at a tiny size
# (checks the script on a machine without a GPU; its figures mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${DEVICE_CHECK_DIR:-/tmp/polygpt-device-check}
DRY=${DEVICE_CHECK_DRY:-0}
mkdir -p "$DIR"
ROWS="$DIR/rows.tsv"
: >"$ROWS"
row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$ROWS"; }
log() { echo "[device_check $(date +%T)] $*" >&2; }
START=$SECONDS

# -- 1. install ----------------------------------------------------------------------------------
if [ -n "${DEVICE_CHECK_PYTHON:-}" ]; then
    PY=$DEVICE_CHECK_PYTHON
elif [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=.venv-device/bin/python
    if [ ! -x "$PY" ]; then
        log "installing into .venv-device"
        python3 -m venv .venv-device || { echo "cannot create a venv" >&2; exit 1; }
        timeout 300 $PY -m pip install -q torch transformers -e ".[bpe]" >"$DIR/install.log" 2>&1 &&
            timeout 60 $PY -m pip install -q --no-deps mlx-whisper==0.4.3 >>"$DIR/install.log" 2>&1 ||
            { tail -5 "$DIR/install.log" >&2; echo "install failed (see $DIR/install.log)" >&2; exit 1; }
        timeout 120 $PY -m pip install -q "mlx[cuda]" >>"$DIR/install.log" 2>&1 ||
            log "no MLX CUDA build installed (see $DIR/install.log): MLX rows are skipped"
    fi
fi
row install "$($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -1)" \
    "$($PY -c 'import mlx.core as mx; print("mlx", mx.__version__)' 2>/dev/null || echo 'mlx: not installed')" \
    "$((SECONDS - START)) s"
DEV=cuda
if [ "$DRY" = 1 ]; then
    DEV=cpu
elif ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "torch sees no CUDA device here (DEVICE_CHECK_DRY=1 checks the script on the CPU)" >&2
    exit 1
fi
MLXDEV=gpu
[ "$DRY" = 1 ] && MLXDEV=cpu

# -- 2. a random GPT-2 124M (tiny in a dry run), converted ----------------------------------------
log "making a random GPT-2 and converting it"
timeout 300 $PY - "$DIR" "$DRY" <<'EOF' || row model "could not make the random GPT-2" "" FAIL
import sys
import torch
import transformers
from polygpt import convert
out, dry = sys.argv[1], sys.argv[2] == "1"
torch.manual_seed(0)
shape = dict(n_layer=2, n_head=2, n_embd=64) if dry else {}
transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).save_pretrained(f"{out}/hf")
convert.from_hf(f"{out}/hf", f"{out}/gpt2")
EOF
CK=$DIR/gpt2

# -- parity on the device ------------------------------------------------------------------------
log "parity"
timeout 240 $PY - "$CK" "$DEV" "$MLXDEV" "$ROWS" <<'EOF'
import sys
import numpy as np
from polygpt import checkpoints
from polygpt.backends import available_backends, get_backend
ck, dev, mlxdev, rows = sys.argv[1:]
ckpt = checkpoints.read(ck)
spec = ckpt.spec
x = np.random.default_rng(0).integers(0, spec.vocab_size, (2, min(256, spec.block_size)))
cpu = get_backend("torch", "cpu")
ref = cpu.logits(cpu.load_model(ckpt.model, "fp32"), x)
# max |logit - CPU fp32 logit|: fp32 allows TF32 matmuls; half precisions their rounding
TOL = {"fp32": 5e-3, "fp16": 5e-2, "bf16": 0.5}
with open(rows, "a") as out:
    for backend, device, precisions in [("torch", dev, TOL), ("mlx", mlxdev, ("fp32", "bf16"))]:
        for p in precisions:
            name = f"{backend}/{device}/{p}"
            if backend not in available_backends():
                out.write(f"parity\t{name}\t{backend} not installed\tskipped\n")
                continue
            try:
                be = get_backend(backend, device)
                d = float(np.abs(be.logits(be.load_model(ckpt.model, p), x) - ref).max())
                ok = "ok" if d <= TOL[p] else "FAIL"
                out.write(f"parity\t{name}\tmax abs logit diff vs torch cpu fp32 {d:.2e}\t{ok}\n")
            except Exception as e:  # noqa: BLE001 - one row per failure, the table goes on
                msg = (str(e).splitlines() or [type(e).__name__])[0][:100]
                out.write(f"parity\t{name}\t{msg}\tFAIL\n")
EOF

# -- 3. bench --quick ----------------------------------------------------------------------------
log "bench --quick"
DATA=$DIR/data
if [ ! -f "$DATA/train.bin" ]; then
    INPUT=../shared/data/tinyshakespeare/input.txt
    if [ -f "$INPUT" ]; then
        $PY -m polygpt prepare shakespeare --input "$INPUT" --out "$DATA" >/dev/null 2>&1
    else  # any text serves for speed: the repository's own docs
        cat README.md docs/*.md >"$DIR/text.txt"
        $PY -m polygpt prepare text "$DIR/text.txt" --out "$DATA" >/dev/null 2>&1
    fi
fi
for spec in "torch $DEV fp32,fp16,bf16" "mlx $MLXDEV fp32,bf16"; do
    set -- $spec
    timeout 200 $PY -m polygpt bench "$CK" --quick --backends "$1" --devices "$2" \
        --precisions "$3" --data "$DATA" --ppl-tokens 2000 -o "$DIR/bench-$1" \
        >"$DIR/bench-$1.log" 2>&1 || row bench "$1/$2" "failed or timed out (see $DIR/bench-$1.log)" FAIL
done
$PY - "$DIR" "$ROWS" <<'EOF'
import json, sys
from pathlib import Path
d, rows = Path(sys.argv[1]), sys.argv[2]
with open(rows, "a") as out:
    for f in sorted(d.glob("bench-*/results.json")):
        for r in json.loads(f.read_text())["results"]:
            name = f"{r['backend']}/{r['device']}/{r['precision']}"
            if r["status"] != "ok":
                out.write(f"bench\t{name}\t{(r.get('reason') or '')[:100]}\t{r['status']}\n")
                continue
            dec = (r.get("decode_kv") or {}).get("b1", {}).get("median")
            pre = (r.get("prefill") or {}).get("b1", {}).get("median")
            rss = (r.get("memory") or {}).get("peak_rss_mb")
            ppl = (r.get("ppl") or {}).get("perplexity")
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            out.write(
                f"bench\t{name}\tdecode b1 {fmt(dec, ',.1f')} tok/s, prefill b1 {fmt(pre, ',.0f')} "
                f"tok/s, size {fmt(r.get('size_mb'), ',.0f')} MB, peak RSS {fmt(rss, ',.0f')} MB, "
                f"ppl {fmt(ppl, '.1f')}\tok\n"
            )
EOF

# -- 4. training tokens/s and MFU ----------------------------------------------------------------
log "training"
timeout 240 $PY - "$DIR" "$DEV" "$DRY" "$ROWS" <<'EOF' || row train "torch/$DEV" "failed or timed out" FAIL
import sys
from pathlib import Path
from polygpt import config
from polygpt.train import train
d, dev, dry, rows = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4]
# dense bf16 tensor-core peaks (FLOP/s) of common GPUs, from their data sheets
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
         "A10": 125e12, "4090": 165e12, "V100": 125e12, "T4": 65e12}
shape = ["n_layer=2", "n_head=2", "n_embd=64", "block_size=128"] if dry else []
steps = 5 if dry else 30
cfg = config.load(Path("configs/gpt2-124m.toml"), [
    *shape, f"data.dir={str(d / 'data')!r}", f"train.out={str(d / 'train')!r}",
    "train.backend='torch'", f"device={dev!r}", "dtype='bf16'", f"compile={str(not dry).lower()}",
    "batch_size=8", "grad_accum=1", f"max_iters={steps}", "warmup_iters=0",
    f"eval_interval={steps}", "eval_iters=1", "log_interval=5", "save_checkpoints=false",
])
res = train(cfg, overwrite=True)
spec = cfg.model.to_spec()
name = "cpu"
if dev == "cuda":
    import torch
    name = torch.cuda.get_device_name()
peak = next((v for k, v in PEAKS.items() if k in name), None)
mfu = ""
if peak:
    util = res.tokens_per_s * spec.flops_per_token() / peak
    mfu = f", MFU {100 * util:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16"
with open(rows, "a") as out:
    out.write(f"train\ttorch/{dev}/bf16 {name}\t{res.tokens_per_s:,.0f} tokens/s{mfu}\tok\n")
EOF

# -- the table -----------------------------------------------------------------------------------
{
    echo "| check | what | result | status |"
    echo "|---|---|---|---|"
    awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$ROWS"
    echo
    echo "total $((SECONDS - START)) s"
} | tee "$DIR/table.md"
