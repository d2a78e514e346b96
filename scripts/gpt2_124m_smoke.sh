#!/usr/bin/env bash
# GPT-2 124M end to end on this machine, in both backends, with each command's peak RSS:
# prepare (GPT-2 BPE), train 2 steps at the real shape (block 1024), sample, evaluate, and
# load each backend's checkpoint in the other, then `bench --quick`.
# Usage: scripts/gpt2_124m_smoke.sh WORKDIR [INPUT]
# Takes ~20-30 minutes on 2 cores; run it under `flock /work/heavy.lock` on a shared machine.
set -euo pipefail
W=${1:?usage: gpt2_124m_smoke.sh WORKDIR [input.txt]}
INPUT=${2:-../shared/data/tinyshakespeare/input.txt}
POLYGPT=${POLYGPT:-polygpt}
mkdir -p "$W"
run() {  # run a command, then print its peak RSS and wall time
    local label=$1
    shift
    /usr/bin/time -f "$label: peak RSS %M KiB, %e s" "$@" 2> >(grep -v '^\s*$' >&2)
}
run prepare $POLYGPT prepare shakespeare --input "$INPUT" --out "$W/data"
for B in torch mlx; do
    run "train $B" $POLYGPT train configs/gpt2-124m.toml --backend "$B" --out "$W/$B" -q \
        "data.dir='$W/data'" max_iters=2 batch_size=1 grad_accum=1 eval_iters=1 eval_interval=2 \
        warmup_iters=0 log_interval=1 --overwrite
done
for B in torch mlx; do
    for C in torch mlx; do
        run "sample $C-trained with $B" $POLYGPT sample "$W/$C" --backend "$B" --temperature 0 \
            -n 32 --prompt "ROMEO:"
        echo
    done
    run "eval $B" $POLYGPT eval "$W/torch" --backend "$B" --max-tokens 4096 --data "$W/data"
done
run "bench --quick" $POLYGPT bench "$W/torch" --quick --out "$W/bench" --data "$W/data"
[ -x /tmp/g124_extra.sh ] && /tmp/g124_extra.sh "$W"
