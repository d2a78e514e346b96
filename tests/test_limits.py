"""Machine ceilings for bench fractions, and the --quick preset."""

import pytest

from polygpt.bench import limits
from polygpt.bench import run as bench
from polygpt.spec import ModelSpec

GPT2 = ModelSpec(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)


def test_ceilings_are_measured():
    bw = limits.read_bandwidth(nbytes=16 << 20, repeats=1)
    assert 1e8 < bw < 1e13  # bytes/s, between a floppy and an HBM stack
    assert limits.matmul_flops(n=256, repeats=1) > 1e7


def test_bounds_at_gpt2_small():
    # 2 FLOPs per weight (wte counted once, as the head; wpe excluded) + causal attention
    per_tok = limits.prefill_flops_per_token(GPT2, 1024)
    assert per_tok == pytest.approx(2 * (124_439_808 - 1024 * 768) + 2 * 12 * 1024 * 768)
    assert limits.decode_bound(497.8e6, 22.0) == pytest.approx(44.2, abs=0.1)  # the 45


def test_quick_preset():
    q = bench.quick(bench.BenchConfig(checkpoint="x"))
    assert q.batch_sizes == [1] and q.train_steps == 0 and not q.nocache and q.new_tokens == 32
