#!/usr/bin/env bash
# polygpt serve beside llama.cpp's llama-server on the same GPT-2 weights, same clients.
#
#   scripts/bench_serving.sh CHECKPOINT GGUF_DIR       (a polygpt GPT-2 BPE checkpoint, and the
#                                                       GGUF files scripts/bench_llamacpp.sh wrote)
#
# One server at a time, each measured by `polygpt bench-serve` (1 client and CLIENTS at once,
# alternating over ROUNDS rounds of DURATION seconds, MAX_TOKENS tokens a request):
# llama-server f32 and q8_0 (CLIENTS slots of the full context, THREADS threads, through --url),
# then polygpt serve in torch fp32, torch int8 and MLX fp32. llama-server comes from the build
# that scripts/bench_llamacpp.sh made. STAGGER=1 passes --stagger (clients spread out rather
# than in lockstep). Results: one JSON per server and log.txt (with the load average before
# each) in OUT.
set -euo pipefail
CKPT=${1:?usage: bench_serving.sh CHECKPOINT GGUF_DIR}
GGUF=${2:?usage: bench_serving.sh CHECKPOINT GGUF_DIR}
OUT=${OUT:-weights/serving-bench}
CLIENTS=${CLIENTS:-16}
DURATION=${DURATION:-30}
ROUNDS=${ROUNDS:-2}
MAX_TOKENS=${MAX_TOKENS:-48}
THREADS=${THREADS:-2}
PORT=${PORT:-8090}
POLYGPT=${POLYGPT:-.venv/bin/polygpt}
SERVER=${POLYGPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/polygpt}/llama.cpp-11434/build/bin/llama-server
[ -x "$SERVER" ] || { echo "no $SERVER: run scripts/bench_llamacpp.sh first" >&2; exit 1; }
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
bench() { # NAME ARGS...: one bench-serve run, its table in the log and its JSON in OUT
    local name=$1
    shift
    echo "== $name (load $(cut -d' ' -f1 /proc/loadavg))" | tee -a "$LOG"
    "$POLYGPT" bench-serve "$CKPT" --clients "$CLIENTS" --duration "$DURATION" --rounds "$ROUNDS" \
        --max-tokens "$MAX_TOKENS" ${STAGGER:+--stagger} --json "$OUT/serve-$name.json" "$@" 2>&1 |
        tee -a "$LOG"
}
for quant in f32 q8_0; do
    "$SERVER" -m "$GGUF/model-$quant.gguf" --port "$PORT" -np "$CLIENTS" -c $((CLIENTS * 1024)) \
        -t "$THREADS" >"$OUT/llama-server-$quant.log" 2>&1 &
    pid=$!
    for _ in $(seq 120); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
        sleep 0.5
    done
    bench "llama-$quant" --url "http://127.0.0.1:$PORT/v1" || true
    kill "$pid"
    wait "$pid" || true
done
bench torch-fp32 --backends torch -d cpu
bench torch-int8 --backends torch -d cpu -p int8
bench mlx --backends mlx -d cpu
