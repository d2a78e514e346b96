"""The sampling rules on hand-built distributions (as mlx-lm's and nanochat's tests do): exact
filters, exact inverse-CDF draws at the boundaries, and seeded, batch-independent streams."""

from __future__ import annotations

import numpy as np
import pytest

from polygpt.sampling import (
    RowStreams,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    categorical,
    make_sampler,
    softmax,
)

NEG_INF = -np.inf


def logits_of(probs) -> np.ndarray:
    """Logits whose softmax is `probs` (zeros become -inf)."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p)[None, :]


def kept(logits: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(np.isfinite(logits[0]))]


def test_temperature_scales_logits():
    x = np.array([[1.0, 2.0, -4.0]])
    np.testing.assert_array_equal(apply_temperature(x, 0.5), [[2.0, 4.0, -8.0]])
    p_hot, p_cold = softmax(apply_temperature(x, 2.0)), softmax(apply_temperature(x, 0.5))
    assert p_cold[0, 1] > softmax(x)[0, 1] > p_hot[0, 1]  # colder is peakier


def test_top_k_keeps_the_k_largest_in_place():
    x = np.array([[0.1, 3.0, -1.0, 2.0, 0.5]])
    assert kept(apply_top_k(x, 2)) == [1, 3]
    assert kept(apply_top_k(x, 1)) == [1]
    np.testing.assert_array_equal(apply_top_k(x, 2)[0, [1, 3]], [3.0, 2.0])  # values untouched
    assert kept(apply_top_k(x, 0)) == kept(apply_top_k(x, 5)) == [0, 1, 2, 3, 4]  # off


def test_top_k_keeps_ties_at_the_kth_value():
    x = np.array([[1.0, 2.0, 2.0, 0.0]])
    assert kept(apply_top_k(x, 2)) == [1, 2]
    assert kept(apply_top_k(np.array([[2.0, 1.0, 1.0, 0.0]]), 2)) == [0, 1, 2]


def test_top_k_is_per_row():
    x = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    out = apply_top_k(x, 1)
    assert np.isfinite(out).tolist() == [[False, False, True], [True, False, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = logits_of([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (0), 0.05 (2)
    assert kept(apply_top_p(x, 0.5)) == [1]  # 0.5 alone reaches 0.5
    assert kept(apply_top_p(x, 0.79)) == [1, 3]
    assert kept(apply_top_p(x, 0.81)) == [0, 1, 3]
    assert kept(apply_top_p(x, 0.99)) == [0, 1, 2, 3]
    assert kept(apply_top_p(x, 1.0)) == [0, 1, 2, 3]  # off


def test_top_p_always_keeps_the_most_likely_token():
    x = logits_of([0.1, 0.6, 0.3])
    assert kept(apply_top_p(x, 1e-9)) == [1]


def test_categorical_inverse_cdf_boundaries():
    x = logits_of([0.25, 0.25, 0.5])  # CDF 0.25, 0.5, 1.0
    draw = lambda u: int(categorical(x, np.array([u]))[0])  # noqa: E731
    assert [draw(u) for u in (0.0, 0.2499, 0.2501, 0.4999, 0.5001, 0.9999)] == [0, 0, 1, 1, 2, 2]


def test_categorical_never_draws_a_filtered_token():
    x = logits_of([0.0, 0.5, 0.0, 0.5, 0.0])  # only 1 and 3 possible
    draws = categorical(np.repeat(x, 1001, 0), np.linspace(0.0, 1.0, 1001, endpoint=False))
    assert set(draws.tolist()) == {1, 3}


def test_categorical_frequencies_match_the_distribution():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    u = RowStreams(0, 1, chunk=20_000).next  # one stream, 20k draws
    draws = np.array([categorical(logits_of(probs), u())[0] for _ in range(20_000)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.015)


def test_greedy_is_argmax_with_the_first_index_on_ties():
    greedy = make_sampler(temperature=0.0)
    x = np.array([[0.0, 5.0, 1.0, 5.0], [3.0, 2.0, 1.0, 0.0]])
    assert greedy(x, None).tolist() == [1, 0]


def test_sampler_composes_temperature_top_k_top_p():
    x = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    # top-k 3 leaves {1, 3, 4}; renormalized 0.4/0.85, 0.3/0.85, 0.15/0.85; top-p 0.8 drops 4
    s = make_sampler(temperature=1.0, top_k=3, top_p=0.8)
    draws = {int(s(x, np.array([u]))[0]) for u in np.linspace(0, 0.999, 200)}
    assert draws == {1, 3}
    # top-k 1 samples the argmax whatever the uniform, like greedy
    s1 = make_sampler(temperature=1.3, top_k=1)
    assert {int(s1(x, np.array([u]))[0]) for u in (0.0, 0.5, 0.99)} == {1}


def test_unfiltered_fast_path_draws_like_the_general_path():
    """make_sampler has a one-copy path when no filter is on; it must pick the same tokens."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 65)).astype(np.float32) * 3
    u = rng.random(64)
    fast = make_sampler(0.7)(x, u)
    general = categorical(
        apply_top_p(apply_top_k(apply_temperature(x.astype(np.float64), 0.7), 0), 1.0), u
    )
    np.testing.assert_array_equal(fast, general)


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}]
)
def test_sampler_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        make_sampler(**kwargs)


def test_row_streams_are_seeded_and_chunk_independent():
    a = RowStreams(7, 3, chunk=256)
    b = RowStreams(7, 3, chunk=5)  # refills every 5 steps: same numbers
    seq_a = np.stack([a.next() for _ in range(12)])
    seq_b = np.stack([b.next() for _ in range(12)])
    np.testing.assert_array_equal(seq_a, seq_b)
    assert not np.array_equal(seq_a, np.stack([RowStreams(8, 3).next() for _ in range(12)]))
    assert ((seq_a >= 0) & (seq_a < 1)).all()


def test_row_streams_do_not_depend_on_the_batch():
    """Row 2 of a batch of 4 draws what stream 2 draws alone (so batched == one by one)."""
    batch = RowStreams(3, 4)
    alone = RowStreams(3, [2])
    for _ in range(300):  # across a chunk boundary
        assert batch.next()[2] == alone.next()[0]
    rows = np.stack([RowStreams(3, 4).next() for _ in range(1)])[0]
    assert len(set(rows.tolist())) == 4  # rows are different streams


def test_sample_rows_equals_each_row_s_own_sampler():
    """Rows with their own settings in one call pick what make_sampler picks for each alone."""
    from polygpt.sampling import sample_rows

    rng = np.random.default_rng(3)
    settings = [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.3, 0, 1.0), (0.9, 5, 1.0), (0.9, 5, 0.7),
                (1.0, 0, 0.5), (0.8, 0, 1.0), (0.9, 5, 0.7)]  # fmt: skip
    temp, k, p = (np.array(x) for x in zip(*settings))
    for _ in range(50):
        logits = rng.normal(0, 3, (len(settings), 40)).astype(np.float32)
        u = rng.random(len(settings))
        got = sample_rows(logits, temp, k.astype(np.int64), p, u)
        for b, s in enumerate(settings):
            assert got[b] == make_sampler(*s)(logits[b : b + 1], u[b : b + 1])[0], (b, s)
