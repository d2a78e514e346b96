"""The slot cache's row operations in every installed backend: prefill_rows, decode_rows and
copy_rows on ragged rows give the logits of each row run alone (a full forward over the row's
tokens), and torch and MLX give the same logits."""

from __future__ import annotations

import numpy as np
import pytest

from polygpt import modelfile
from polygpt.backends import get_backend
from polygpt.spec import ModelSpec

from .conftest import backends_under_test, requires


def _installed() -> list[str]:
    return [p.values[0] for p in backends_under_test() if not p.marks[0].args[0]]


SPEC = ModelSpec(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """One set of weights for every backend (saved by the first installed one)."""
    be = get_backend(_installed()[0], "cpu")
    path = tmp_path_factory.mktemp("slots") / "model.safetensors"
    be.save_model(be.init_model(SPEC, 3), path, modelfile.metadata(SPEC))
    return path


def _script(be, model):
    """Ragged prefills, decodes over prefix and scattered rows, a continued prefill, copies
    and a reset: every op's logits checked against the full forward of the row's tokens.
    Returns every logits array, for the cross-backend comparison."""
    rng = np.random.default_rng(0)
    cache = be.slot_cache(model, 4)
    hist: dict[int, list[int]] = {}
    seen, worst = [], 0.0

    def check(rows, logits):
        nonlocal worst
        seen.append(logits)
        for i, r in enumerate(rows):
            full = be.logits(model, np.array([hist[r]]))[0, -1]
            worst = max(worst, float(np.abs(full - logits[i]).max()))

    prompts = {2: rng.integers(0, 50, 3), 0: rng.integers(0, 50, 1), 1: rng.integers(0, 50, 6)}
    for r, p in prompts.items():
        hist[r] = p.tolist()
    check(list(prompts), be.prefill_rows(cache, list(prompts), list(prompts.values())))
    for step in range(8):
        rows = [0, 1, 2] if step % 2 else [2, 0]  # rows 0..n-1, and rows anywhere
        toks = rng.integers(0, 50, len(rows))
        for r, t in zip(rows, toks):
            hist[r].append(int(t))
        check(rows, be.decode_rows(cache, rows, toks))
    assert cache.lengths[:3].tolist() == [len(hist[r]) for r in range(3)]
    starts = [len(hist[0]), len(hist[2])]  # a continued prefill: attends to cached columns
    hist[0] += [1, 2, 3]
    hist[2] += [4]
    check([0, 2], be.prefill_rows(cache, [0, 2], [[1, 2, 3], [4]], starts=starts))
    be.copy_rows(cache, [2], [3])  # row 3 takes row 2's keys, values and length
    hist[3] = list(hist[2])
    for step in range(3):
        hist[1], hist[3] = hist[1] + [7], hist[3] + [8 + step]
        hist[0], hist[2] = hist[0] + [7], hist[2] + [7]
        check([0, 1, 2, 3], be.decode_rows(cache, [0, 1, 2, 3], [7, 7, 7, 8 + step]))
    cache.reset([0])
    hist[0] = [5, 6]
    check([0], be.prefill_rows(cache, [0], [[5, 6]]))
    hist[0].append(9)
    check([0], be.decode_rows(cache, [0], [9]))  # rows 0..0, one length: the view path
    return worst, seen


@pytest.mark.parametrize("backend", backends_under_test())
def test_row_ops_equal_each_row_alone(backend, weights_file):
    be = get_backend(backend, "cpu")
    worst, _ = _script(be, be.load_model(modelfile.check(weights_file, SPEC)))
    assert worst <= 1e-5, f"slot cache vs full forward: max |diff| {worst:.3g}"


def test_row_ops_agree_across_backends(weights_file):
    names = _installed()
    if len(names) < 2:
        pytest.skip("needs torch and MLX")
    runs = []
    for name in names:
        be = get_backend(name, "cpu")
        runs.append(_script(be, be.load_model(modelfile.check(weights_file, SPEC)))[1])
    worst = max(float(np.abs(a - b).max()) for a, b in zip(*runs))
    assert worst <= 1e-4, f"torch vs MLX logits: max |diff| {worst:.3g}"


@requires("mlx")
def test_a_repeated_small_prefill_runs_compiled_and_equals_the_eager_one(weights_file):
    """MLX compiles a small fresh prefill once its shape has come HOT_PREFILLS times, its tokens
    padded to a power-of-two width: logits and the rows' keys equal the eager call's, and no
    other row is touched."""
    from polygpt.backends.mlx_backend import decode

    be = get_backend("mlx", "cpu")
    model = be.load_model(modelfile.check(weights_file, SPEC))
    cache = be.slot_cache(model, 4)
    rows, prompts = [1, 3], [[4, 5, 6], [7]]  # widths 3 and 1: padded to 4
    be.prefill_rows(cache, [0, 2], [[9] * 5, [8] * 2])  # rows the prefills must leave alone

    def run():
        cache.lengths[rows] = 0
        logits = be.prefill_rows(cache, rows, prompts)
        keys = [np.array(k) for k in cache.keys]
        return logits, keys

    decode._SEEN.clear()
    eager = run()
    for _ in range(decode.HOT_PREFILLS):
        got = run()
    assert ("prefill", 4) in decode._steps(model)  # the compiled graph ran
    assert np.abs(got[0] - eager[0]).max() <= 1e-6
    for k_eager, k_got in zip(eager[1], got[1]):
        for r, n in ((1, 3), (3, 1), (0, 5), (2, 2)):  # each row's own columns
            assert np.abs(k_got[r, :, :n] - k_eager[r, :, :n]).max() <= 1e-6
    assert cache.lengths.tolist() == [5, 3, 2, 1]


@pytest.mark.parametrize("backend", backends_under_test())
def test_row_ops_reject_what_does_not_fit(backend, weights_file):
    be = get_backend(backend, "cpu")
    cache = be.slot_cache(be.load_model(modelfile.check(weights_file, SPEC)), 2)
    with pytest.raises(ValueError, match="exceed the block"):
        be.prefill_rows(cache, [0], [list(range(17))])
    with pytest.raises(ValueError, match="rows must be"):
        be.decode_rows(cache, [2], [1])
    be.prefill_rows(cache, [1], [list(range(16))])
    with pytest.raises(ValueError, match="full"):
        be.decode_rows(cache, [1], [1])
    with pytest.raises(ValueError, match="past a row's length"):
        be.prefill_rows(cache, [0], [[1]], starts=[3])
    assert cache.lengths.tolist() == [0, 16]  # a refused op changes nothing


def _bare_cache(max_rows: int, lengths):
    from polygpt.backends import slots

    cache = slots.SlotCache(None, SPEC, max_rows, [], [])
    cache.lengths[:] = lengths
    return cache


def test_decode_plan_mask_is_each_rows_columns():
    """The plan's mask (computed once, in NumPy, for both backends): row i attends to columns
    0..length[i] (its new token's included); equally long rows need none."""
    from polygpt.backends import slots

    plan = slots.plan_decode(_bare_cache(3, [4, 1, 2]), range(3), [7, 8, 9])
    assert not plan.uniform and plan.width == 5 and plan.mask.shape == (3, 1, 1, 5)
    want = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(plan.mask[:, 0, 0], want)
    np.testing.assert_array_equal(plan.batch, [0, 1, 2])
    assert slots.plan_decode(_bare_cache(2, [3, 3]), range(2), [1, 2]).mask is None


def test_continuing_prefill_plan_scatters_real_tokens_only():
    """A prefill that continues rows: its mask lets token j of row i see columns up to
    start_i + j, and its scatter writes each real token (never padding) at its column."""
    from polygpt.backends import slots

    cache = _bare_cache(4, [0, 2, 0, 1])
    plan = slots.plan_prefill(cache, [3, 1], [[5, 6], [7]], starts=[1, 2])
    assert not plan.fresh and plan.keys == 3 and plan.mask.shape == (2, 1, 2, 3)
    np.testing.assert_array_equal(plan.mask[0, 0], [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(plan.mask[1, 0, 0], [1, 1, 1])
    sc = plan.scatter
    np.testing.assert_array_equal(sc.batch, [0, 0, 1])  # row 1's padding is not written
    np.testing.assert_array_equal(sc.token, [0, 1, 0])
    np.testing.assert_array_equal(sc.rows, [3, 3, 1])
    np.testing.assert_array_equal(sc.cols, [1, 2, 2])
    fresh = slots.plan_prefill(cache, [0], [[1, 2]])
    assert fresh.fresh and fresh.mask is None and fresh.scatter is None


@pytest.mark.parametrize("backend", backends_under_test())
def test_storage_grows_with_the_rows(backend, weights_file, monkeypatch):
    """The K/V arrays start GROW_COLUMNS wide and grow by as many as the longest row needs,
    up to the block; every op across the growth keeps the full forward's logits."""
    from polygpt.backends import slots

    monkeypatch.setattr(slots, "GROW_COLUMNS", 4)
    be = get_backend(backend, "cpu")
    model = be.load_model(modelfile.check(weights_file, SPEC))
    worst, _ = _script(be, model)  # ragged rows, copies, a continued prefill, across growths
    assert worst <= 1e-5, f"slot cache vs full forward: max |diff| {worst:.3g}"
    cache = be.slot_cache(model, 2)
    assert cache.capacity == 4
    seq = np.random.default_rng(3).integers(0, SPEC.vocab_size, SPEC.block_size)
    be.prefill_rows(cache, [0], [seq[:3]])
    capacities = []
    for n in range(3, SPEC.block_size):  # one row: the compiled / view path at each capacity
        got = be.decode_rows(cache, [0], [seq[n]])[0]
        full = be.logits(model, seq[None, : n + 1])[0, -1]
        np.testing.assert_allclose(got, full, rtol=0, atol=1e-5)
        capacities.append(cache.capacity)
    assert capacities[0] == 4 and capacities[-1] == SPEC.block_size
    assert sorted(set(capacities)) == [4, 8, 12, 16]
