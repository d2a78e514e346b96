"""The torch train step's speed machinery: the CPU thread tuner, the compile fallback.

The tuner is driven by a fake clock (its decisions, not the machine's speed, are under test);
the compile fallback by a torch.compile that fails the way a missing C++ compiler does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polygpt import config, data  # noqa: E402
from polygpt.backends import get_backend  # noqa: E402
from polygpt.backends.torch_backend import threads as tb  # noqa: E402

from .conftest import ROOT, TINY  # noqa: E402


class FakeClock:
    """perf_counter() that advances by the step time of the current thread count."""

    def __init__(self, seconds_per_step: dict[int, float]):
        self.per_step = seconds_per_step
        self.now = 0.0
        self.started = False

    def __call__(self) -> float:
        if self.started:  # the call after a step: the step took per_step[threads]
            self.now += self.per_step[torch.get_num_threads()]
        self.started = not self.started
        return self.now


def _drive(tuner: tb.ThreadTuner, steps: int) -> list[int]:
    used = []
    for _ in range(steps):
        tuner.before()
        used.append(torch.get_num_threads())
        tuner.after()
    return used


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    "per_step, chosen",
    [
        ({1: 0.10, 2: 3.00}, 1),  # busy machine: 2 threads wait at every barrier
        ({1: 0.10, 2: 0.06}, 2),  # idle machine: 2 threads are faster
        ({1: 0.10, 2: 0.095}, 1),  # within 10%: keep what it has (no flip-flopping)
    ],
)
def test_thread_tuner_keeps_the_faster_count(monkeypatch, restore_threads, per_step, chosen):
    monkeypatch.setattr(tb.time, "perf_counter", FakeClock(per_step))
    tuner = tb.ThreadTuner([1, 2])
    assert torch.get_num_threads() == 1  # starts safe, before the first step
    used = _drive(tuner, 20)
    assert used[: tb.WARMUP_STEPS] == [1] * tb.WARMUP_STEPS
    assert tuner.chosen == chosen and tuner.history[0][1] == chosen
    assert used[-1] == chosen
    # a decisive difference ends the check after one timed step per count (plus warm-ups)
    n_probe = tuner.history[0][0] - tb.WARMUP_STEPS
    assert n_probe == (4 if per_step[2] > 2 * per_step[1] else 2 + 2 * tb.PROBE_STEPS)


def test_thread_tuner_checks_again(monkeypatch, restore_threads):
    clock = FakeClock({1: 0.10, 2: 0.06})
    monkeypatch.setattr(tb.time, "perf_counter", clock)
    monkeypatch.setattr(tb, "RETUNE_EVERY", 10)
    tuner = tb.ThreadTuner([1, 2])
    _drive(tuner, 20)
    assert tuner.chosen == 2
    clock.per_step = {1: 0.10, 2: 2.0}  # the machine got busy
    _drive(tuner, 30)
    assert tuner.chosen == 1 and len(tuner.history) >= 2


def test_fixed_threads_and_omp_env_disable_the_tuner(monkeypatch, restore_threads):
    assert tb.make_thread_tuner("cpu", 1) is None and torch.get_num_threads() == 1
    assert tb.make_thread_tuner("cuda", 0) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert tb.make_thread_tuner("cpu", 0) is None


def _setup(char_data, tmp_path, *extra):
    cfg = config.load(
        ROOT / "configs" / "shakespeare_char.toml",
        [*TINY, f"data.dir={str(char_data)!r}", f"out={str(tmp_path)!r}", "threads=1", *extra],
    )
    be = get_backend("torch", "cpu")
    spec = cfg.model.to_spec(65)
    model = be.init_model(spec, 0)
    arr = data.load_split(char_data, "train")
    rng = np.random.default_rng(0)
    batches = [[data.get_batch(arr, spec.block_size, 8, rng)] for _ in range(3)]
    return cfg, be, model, batches


def test_compile_failure_falls_back_to_eager_with_one_warning(
    monkeypatch, char_data, tmp_path, restore_threads
):
    cfg, be, model, batches = _setup(char_data, tmp_path, "compile=true")
    ref_model = be.init_model(model.spec, 0)
    ref_opt = be.make_optimizer(ref_model, dataclasses.replace(cfg.train, compile=False))

    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    opt = be.make_optimizer(model, cfg.train)
    assert opt.compiled
    with pytest.warns(RuntimeWarning, match="torch.compile failed, training eagerly"):
        first = be.train_step(model, opt, batches[0], 1e-3, 1.0)
    assert not opt.compiled and "InvalidCxxCompiler" in opt.compile_error
    losses = [float(first)] + [float(be.train_step(model, opt, b, 1e-3, 1.0)) for b in batches[1:]]
    ref = [float(be.train_step(ref_model, ref_opt, b, 1e-3, 1.0)) for b in batches]
    assert losses == ref  # the failed attempt left no gradients behind


def test_errors_are_not_swallowed_once_eager(char_data, tmp_path, restore_threads):
    cfg, be, model, batches = _setup(char_data, tmp_path)
    opt = be.make_optimizer(model, cfg.train)
    x, y = batches[0][0]
    with pytest.raises(Exception):  # noqa: B017 - a token id out of range is an indexing error
        be.train_step(model, opt, [(x, y + 1000)], 1e-3, 1.0)


@pytest.mark.parametrize("pays", [True, False])
def test_the_tuner_starts_where_a_quick_probe_says(monkeypatch, restore_threads, pays):
    """An idle machine starts (and evaluates at step 0) on all threads, a busy one on one."""
    monkeypatch.setattr(tb, "DEFAULT_THREADS", 2)
    monkeypatch.setattr(tb, "parallel_pays", lambda n: pays)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    tuner = tb.make_thread_tuner("cpu", 0)
    assert tuner.chosen == (2 if pays else 1) and torch.get_num_threads() == tuner.chosen
    # a compiled step keeps the count it is compiled at: no tuner, the probe's choice applied
    torch.set_num_threads(2 if not pays else 1)
    assert tb.make_thread_tuner("cpu", 0, compiled=True) is None
    assert torch.get_num_threads() == (2 if pays else 1)


def test_the_probe_restores_the_thread_count(restore_threads):
    torch.set_num_threads(1)
    assert isinstance(tb.parallel_pays(2, rounds=2), bool)
    assert torch.get_num_threads() == 1


def test_inductor_cache_is_kept_under_the_user_cache_directory(monkeypatch, tmp_path):
    from polygpt.backends.torch_backend import backend as tbk

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(tbk.sys, "platform", "linux")
    tbk._persistent_inductor_cache()
    assert tbk.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "polygpt" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")  # the user's choice wins
    tbk._persistent_inductor_cache()
    assert tbk.os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"
