"""The measurements behind choices in polygpt's code, each in seconds, written to one JSON file.

    .venv/bin/python scripts/bench_choices.py choices [--only NAME,...] [--out FILE.json]
    .venv/bin/python scripts/bench_choices.py profile [--out FILE.json]
    .venv/bin/python scripts/bench_choices.py mlx-vs-torch [--steps 60] [--out FILE.json]

`choices`: one row per choice in the code (`--list` names them). Each runs in its own process
(so one framework's BLAS or threads never leak into another's timing), with fixed sizes and
seeds, the compared variants interleaved (A B A B ...) and medians reported. A measurement that
cannot run here is a skipped row with the reason.

`profile`: torch.profiler over training steps and evaluation forwards of the reference model
(configs/shakespeare_char.toml) in fp32 and bf16 autocast, self time grouped by op kind
(matmuls, attention, GELU, casts, the rest), and the evaluation forward's time per 12x64 batch
by how many batches one forward stacks.

`mlx-vs-torch`: the reference config's training step and one evaluation (the training loop's
estimate_loss) in MLX fp32, torch fp32 and torch bf16, rounds interleaved; and MLX's evaluation
forward compiled, eager and stacked.

Every results file records the command, the CPU (model name and the vector flags that decide
kernels), the framework versions, the date and the 1-minute load average before and after each
measurement. This is a benchmark, not product code: it imports torch and MLX directly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu, load1, versions  # noqa: E402  (scripts/machine.py)

CONFIG = ROOT / "configs" / "shakespeare_char.toml"


class Skip(Exception):
    """A measurement that cannot run on this machine (the message says why)."""


# ---- environment ------------------------------------------------------------------------------


def header(command: str) -> dict:
    return {
        "command": command,
        "cpu": cpu(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": load1(),
    }


# ---- timing helpers ---------------------------------------------------------------------------


def alternating(names, rounds: int):
    """(round, name) for `rounds` rounds over `names`, the order reversed every other round,
    so that a drift in the machine's speed hits every variant alike."""
    names = list(names)
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            yield r, n


def interleaved(fns: dict, rounds: int, reps: int, warm: int = 1) -> dict[str, float]:
    """Median ms per call of each function: `rounds` rounds, each function `reps` calls per
    round in turn (`alternating`), after `warm` untimed calls."""
    for f in fns.values():
        for _ in range(warm):
            f()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _, n in alternating(fns, rounds):
        f = fns[n]
        for _ in range(reps):
            t = time.perf_counter()
            f()
            samples[n].append(time.perf_counter() - t)
    return {n: round(1e3 * statistics.median(s), 4) for n, s in samples.items()}


def child(code: str, env: dict | None = None, timeout: float = 120) -> dict:
    """Run `code` in a fresh Python; its last stdout line is JSON."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for k, v in list(full_env.items()):
        if v is None:
            del full_env[k]
    p = subprocess.run(
        [sys.executable, "-c", code],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if p.returncode:
        raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed")
    return json.loads(p.stdout.strip().splitlines()[-1])


class spinner:  # noqa: N801 (a context manager)
    """One busy process holding a core, as another user's job would."""

    def __enter__(self):
        self.p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()


def reference(overrides=()):
    from polygpt import config, data

    cfg = config.load(CONFIG, list(overrides))
    tok = data.load_tokenizer(cfg.data.dir)
    return cfg, cfg.model.to_spec(tok.vocab_size), data.load_split(cfg.data.dir, "train")


def batches(arr, spec, tc, n: int, seed: int = 0):
    import numpy as np

    from polygpt import data

    rng = np.random.default_rng(seed)
    return [data.get_batch(arr, spec.block_size, tc.batch_size, rng) for _ in range(n)]


def torch_train(dtype="fp32", threads=0, compile_=False, seed=1337):
    """The reference model on polygpt's torch backend, with its optimizer and a step function."""
    from polygpt import config
    from polygpt.backends import get_backend

    cfg, spec, arr = reference()
    tc = config.TrainConfig(
        **{**cfg.train.__dict__, "dtype": dtype, "threads": threads, "compile": compile_}
    )
    be = get_backend("torch", "cpu")
    model = be.init_model(spec, seed)
    opt = be.make_optimizer(model, tc)
    bs = batches(arr, spec, tc, 16)
    state = {"i": 0}

    def step():
        state["i"] += 1
        loss = be.train_step(model, opt, [bs[state["i"] % 16]], tc.lr, tc.grad_clip, dtype)
        return float(loss)

    return be, model, spec, tc, step


# ---- the measurements -------------------------------------------------------------------------

_MATMUL = """
import json, os, statistics, time
from polygpt import blas
blas.preload_openblas()
import mlx.core as mx
mx.set_default_device(mx.cpu)
a = mx.random.normal((768, 512), key=mx.random.key(0))
b = mx.random.normal((512, 384), key=mx.random.key(1))
mx.eval(a, b)
mx.eval(a @ b)
ts = []
for _ in range({reps}):
    t = time.perf_counter()
    mx.eval(a @ b)
    ts.append(time.perf_counter() - t)
print(json.dumps(dict(ms=1e3 * statistics.median(ts), blas=blas.blas_in_use(),
                      core=blas.openblas_core())))
"""


def _need_mlx_openblas():
    import importlib.util

    from polygpt import blas

    if importlib.util.find_spec("mlx") is None:
        raise Skip("MLX is not installed")
    if blas.find_openblas() is None:
        raise Skip("no system OpenBLAS (or not Linux)")


def m_mlx_openblas() -> dict:
    """MLX on Linux: the system OpenBLAS loaded before MLX, against the wheel's bundled BLAS."""
    _need_mlx_openblas()
    runs: dict[str, list] = {"openblas": [], "bundled": []}
    envs = {"openblas": {}, "bundled": {"POLYGPT_NO_BLAS_FIX": "1"}}
    for _, k in alternating(runs, 3):
        runs[k].append(child(_MATMUL.format(reps=5 if k == "bundled" else 30), envs[k]))
    ms = {k: round(statistics.median(x["ms"] for x in v), 2) for k, v in runs.items()}
    return {
        "figures": {
            "matmul": "768x512 @ 512x384 float32, mx.matmul on the CPU",
            "bundled_blas_ms": ms["bundled"],
            "openblas_ms": ms["openblas"],
            "openblas_speedup": round(ms["bundled"] / ms["openblas"], 1),
            "openblas_library": runs["openblas"][0]["blas"],
            "bundled_library": runs["bundled"][0]["blas"],
        },
        "summary": f"bundled BLAS {ms['bundled']:.1f} ms, OpenBLAS {ms['openblas']:.2f} ms "
        f"({ms['bundled'] / ms['openblas']:.0f}x)",
    }


def m_openblas_core() -> dict:
    """OpenBLAS's kernels named from the CPU flags, against its generic Prescott fallback."""
    _need_mlx_openblas()
    from polygpt import blas

    named = blas.coretype_from_cpu_flags()
    if named is None:
        raise Skip("not an x86-64 CPU with AVX: no core to name")
    runs: dict[str, list] = {"named": [], "prescott": []}
    envs = {"named": {"OPENBLAS_CORETYPE": None}, "prescott": {"OPENBLAS_CORETYPE": "Prescott"}}
    for _, k in alternating(runs, 3):
        runs[k].append(child(_MATMUL.format(reps=30), envs[k]))
    ms = {k: round(statistics.median(x["ms"] for x in v), 3) for k, v in runs.items()}
    return {
        "figures": {
            "matmul": "768x512 @ 512x384 float32, mx.matmul on the CPU over OpenBLAS",
            "named_core": runs["named"][0]["core"],
            "named_ms": ms["named"],
            "prescott_core": runs["prescott"][0]["core"],
            "prescott_ms": ms["prescott"],
            "named_speedup": round(ms["prescott"] / ms["named"], 1),
        },
        "summary": f"{runs['named'][0]['core']} {ms['named']:.2f} ms, "
        f"{runs['prescott'][0]['core']} {ms['prescott']:.2f} ms "
        f"({ms['prescott'] / ms['named']:.1f}x)",
    }


def m_int8_error() -> dict:
    """Group-wise affine int8/int4 (the shared quantized format) against per-tensor int8."""
    import torch

    from polygpt.backends.torch_backend import quantize

    torch.manual_seed(0)
    be, model, spec, tc, step = torch_train("fp32", threads=0)
    n_steps = 300
    for _ in range(n_steps):
        step()
    errs: dict[str, list[float]] = {"per_tensor_int8": [], "group64_int8": [], "group64_int4": []}
    for _, w in model.named_parameters():
        if w.dim() != 2 or w.shape[1] % 64:
            continue
        w = w.detach().float()
        norm = w.norm()
        s = w.abs().max() / 127  # per-tensor symmetric int8
        errs["per_tensor_int8"].append(
            float((torch.round(w / s).clamp(-127, 127) * s - w).norm() / norm)
        )
        for bits in (8, 4):
            packed, scales, biases = quantize.affine_quantize(w, bits, 64)
            q = _unpack(packed, bits, w.shape)
            g = q.reshape(w.shape[0], -1, 64) * scales[..., None] + biases[..., None]
            errs[f"group64_int{bits}"].append(float((g.reshape(w.shape) - w).norm() / norm))
    med = {k: statistics.median(v) for k, v in errs.items()}
    ratio = med["per_tensor_int8"] / med["group64_int8"]
    return {
        "figures": {
            "weights": f"the reference model's {len(errs['per_tensor_int8'])} matrices after "
            f"{n_steps} training steps (fp32, seed 1337)",
            "error": "relative Frobenius error |dequant(q(W)) - W| / |W|, median over matrices",
            **{k: round(v, 6) for k, v in med.items()},
            "per_tensor_over_group_int8": round(ratio, 1),
        },
        "summary": f"int8 per-tensor {med['per_tensor_int8']:.2e}, "
        f"group-64 {med['group64_int8']:.2e} ({ratio:.1f}x lower); "
        f"group-64 int4 {med['group64_int4']:.2e}",
    }


def _unpack(packed, bits: int, shape):
    import torch

    b = packed.contiguous().view(torch.uint8)
    if bits == 8:
        return b.reshape(shape).float()
    lo, hi = b & 0xF, b >> 4
    return torch.stack([lo, hi], -1).reshape(shape).float()


def m_torch_gelu() -> dict:
    """torch model: tanh GELU's forward as x·sigmoid(2z) (five passes)."""
    import torch
    import torch.nn.functional as F

    from polygpt.backends.torch_backend.model import _gelu_tanh

    x = torch.randn(768, 512, generator=torch.Generator().manual_seed(0))
    ref = F.gelu(x, approximate="tanh")
    diff = float((_gelu_tanh(x.clone()) - ref).abs().max())
    with torch.no_grad():
        ms = interleaved(
            {
                "aten_tanh_gelu": lambda: F.gelu(x, approximate="tanh"),
                "five_passes": lambda: _gelu_tanh(x),
                "erf_gelu": lambda: F.gelu(x),
            },
            rounds=6,
            reps=50,
            warm=5,
        )
    return {
        "figures": {
            "input": "768x512 float32, forward, no grad",
            "threads": torch.get_num_threads(),
            **{f"{k}_ms": v for k, v in ms.items()},
            "max_abs_diff_to_aten": diff,
        },
        "summary": f"ATen tanh {ms['aten_tanh_gelu']:.3f} ms, x·sigmoid(2z) "
        f"{ms['five_passes']:.3f} ms, erf {ms['erf_gelu']:.3f} ms",
    }


def m_inductor_exp() -> dict:
    """torch model under torch.compile: the tanh GELU written with exp, not tanh."""
    import math

    import torch

    k = math.sqrt(2 / math.pi)

    def f_exp(x):
        return x / (1.0 + torch.exp(-2 * k * (x + 0.044715 * x * x * x)))

    def f_tanh(x):
        return 0.5 * x * (1.0 + torch.tanh(k * (x + 0.044715 * x * x * x)))

    x = torch.randn(768, 512, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
        try:
            ce, ct = torch.compile(f_exp, dynamic=False), torch.compile(f_tanh, dynamic=False)
            with torch.no_grad():
                ce(x), ct(x)
        except Exception as e:  # noqa: BLE001 - no C++ compiler, ...
            raise Skip(f"torch.compile failed: {type(e).__name__}") from e
        diff = float((ce(x) - ct(x)).abs().max())
        with torch.no_grad():
            ms = interleaved({"exp": lambda: ce(x), "tanh": lambda: ct(x)}, 6, 50, warm=5)
    return {
        "figures": {
            "input": "768x512 float32, forward, inductor (CPU), no grad",
            "threads": torch.get_num_threads(),
            "exp_ms": ms["exp"],
            "tanh_ms": ms["tanh"],
            "tanh_over_exp": round(ms["tanh"] / ms["exp"], 2),
            "max_abs_diff": diff,
        },
        "summary": f"exp {ms['exp']:.3f} ms, tanh {ms['tanh']:.3f} ms "
        f"({ms['tanh'] / ms['exp']:.1f}x)",
    }


_RSS = """
import json, os, sys
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
import torch
r0, d0 = rss(), "torch._dynamo" in sys.modules
torch.empty(64, 64, device="{device}").normal_()
print(json.dumps(dict(before=r0, after=rss(), dynamo_before=d0,
                      dynamo_after="torch._dynamo" in sys.modules)))
"""


def m_meta_normal_rss() -> dict:
    """torch loading: no parameter fills while building a model that a checkpoint will fill."""
    runs: dict[str, list] = {"meta": [], "cpu": []}
    for _, dev in alternating(runs, 3):
        runs[dev].append(child(_RSS.format(device=dev)))
    d = {
        k: round(statistics.median(x["after"] - x["before"] for x in v), 1) for k, v in runs.items()
    }
    return {
        "figures": {
            "what": "resident memory added by the first normal_() after `import torch`",
            "meta_normal_mb": d["meta"],
            "cpu_normal_mb": d["cpu"],
            "meta_imports_dynamo": runs["meta"][0]["dynamo_after"],
            "cpu_imports_dynamo": runs["cpu"][0]["dynamo_after"],
        },
        "summary": f"meta normal_ +{d['meta']:.0f} MB RSS (imports torch._dynamo: "
        f"{runs['meta'][0]['dynamo_after']}), CPU normal_ +{d['cpu']:.0f} MB",
    }


def _mlx():
    _need_mlx_openblas()
    from polygpt.backends import get_backend

    be = get_backend("mlx", "cpu")  # preloads OpenBLAS, as `polygpt --backend mlx` does
    import mlx.core as mx

    return be, mx


def mlx_train(be, act=None, seed=1337):
    from polygpt import config

    cfg, spec, arr = reference()
    tc = config.TrainConfig(**{**cfg.train.__dict__, "dtype": "fp32"})
    model = be.init_model(spec, seed)
    if act is not None:
        for _, m in model.named_modules():
            if hasattr(m, "act"):
                m.act = act
    opt = be.make_optimizer(model, tc)
    bs = batches(arr, spec, tc, 16)
    state = {"i": 0}

    def step():
        state["i"] += 1
        return float(be.train_step(model, opt, [bs[state["i"] % 16]], tc.lr, tc.grad_clip, "fp32"))

    return model, step


def m_mlx_elementwise() -> dict:
    """MLX model: the tanh GELU without tanh on MLX's CPU."""
    be, mx = _mlx()
    import mlx.nn as nn

    from polygpt.backends.mlx_backend.model import gelu_tanh

    n = 1 << 20
    x = mx.random.normal((n,), key=mx.random.key(0))
    mx.eval(x)
    ms = interleaved(
        {
            "exp": lambda: mx.eval(mx.exp(x)),
            "tanh": lambda: mx.eval(mx.tanh(x)),
            "multiply_add": lambda: mx.eval(x * x + x),
            "nn_gelu_approx": lambda: mx.eval(nn.gelu_approx(x)),
            "polygpt_gelu_tanh": lambda: mx.eval(gelu_tanh(x)),
        },
        rounds=4,
        reps=10,
        warm=2,
    )
    ns = {k: round(1e6 * v / n, 2) for k, v in ms.items()}
    _, poly = mlx_train(be)
    _, approx = mlx_train(be, act=nn.gelu_approx)
    steps = interleaved({"polygpt_gelu": poly, "nn_gelu_approx": approx}, 6, 5, warm=3)
    share = (steps["nn_gelu_approx"] - steps["polygpt_gelu"]) / steps["nn_gelu_approx"]
    return {
        "figures": {
            "input": f"{n} float32 on the CPU, one op evaluated",
            **{f"{k}_ns_per_scalar": v for k, v in ns.items()},
            "step": "the reference model's MLX training step (fp32, compiled), 12x64",
            "step_ms_polygpt_gelu": steps["polygpt_gelu"],
            "step_ms_nn_gelu_approx": steps["nn_gelu_approx"],
            "step_share_saved": round(share, 3),
        },
        "summary": f"exp {ns['exp']} ns, tanh {ns['tanh']} ns, x*x+x {ns['multiply_add']} ns "
        f"per scalar; step {steps['nn_gelu_approx']:.1f} ms with nn.gelu_approx, "
        f"{steps['polygpt_gelu']:.1f} ms with polygpt's ({100 * share:.0f}% of the step)",
    }


def _mlx_decode_setup(be, seed=1337):
    import numpy as np

    cfg, spec, arr = reference()
    model = be.init_model(spec, seed)
    cache = be.slot_cache(model, 1)
    prompt = [int(t) for t in arr[:8]]
    return model, cache, prompt, np.array([0])


def _decode_run(be, cache, prompt, rows, n_tokens: int) -> list[float]:
    """Prefill the prompt, then n_tokens decode steps; each step's seconds."""
    import numpy as np

    be.prefill_rows(cache, [0], [prompt])
    tok, ts = np.array([prompt[-1]]), []
    for _ in range(n_tokens):
        t = time.perf_counter()
        logits = be.decode_rows(cache, rows, tok)
        tok = np.asarray(logits).argmax(-1)
        ts.append(time.perf_counter() - t)
    return ts


def m_mlx_decode_compiled() -> dict:
    """MLX decode: the decode step under mx.compile, against the same step eager."""
    be, mx = _mlx()
    _, cache, prompt, rows = _mlx_decode_setup(be)
    per: dict[str, list[float]] = {"compiled": [], "eager": []}
    _decode_run(be, cache, prompt, rows, 8)  # trace
    for _, k in alternating(per, 6):
        (mx.enable_compile if k == "compiled" else mx.disable_compile)()
        per[k] += _decode_run(be, cache, prompt, rows, 48)[2:]
    mx.enable_compile()
    ms = {k: round(1e3 * statistics.median(v), 3) for k, v in per.items()}
    return {
        "figures": {
            "model": "the reference model (0.8M), batch 1, 8-token prompt, 48 decode steps",
            "compiled_ms_per_token": ms["compiled"],
            "eager_ms_per_token": ms["eager"],
            "eager_over_compiled": round(ms["eager"] / ms["compiled"], 2),
        },
        "summary": f"compiled {ms['compiled']:.2f} ms/token, eager {ms['eager']:.2f} ms/token "
        f"({ms['eager'] / ms['compiled']:.1f}x)",
    }


def m_mlx_prefill_compiled() -> dict:
    """MLX prefill: a small fresh prefill whose shape recurs, compiled against eager."""
    import numpy as np

    be, mx = _mlx()
    _, spec, arr = reference()
    cache = be.slot_cache(be.init_model(spec, 1337), 16)
    shapes = {"1x1": 1, "4x1": 4}  # one-token prompts, as a server admits its arrivals

    def run(rows: int) -> float:
        cache.lengths[:] = 0
        t = time.perf_counter()
        be.prefill_rows(cache, list(range(rows)), [[int(arr[i])] for i in range(rows)])
        return time.perf_counter() - t

    for n in shapes.values():
        for _ in range(5):
            run(n)  # past HOT_PREFILLS: the compiled graph is traced
    per: dict[str, list[float]] = {f"{s}_{k}": [] for s in shapes for k in ("compiled", "eager")}
    for _, key in alternating(per, 6):
        shape, kind = key.split("_")
        (mx.enable_compile if kind == "compiled" else mx.disable_compile)()
        per[key] += [run(shapes[shape]) for _ in range(40)][5:]
    mx.enable_compile()
    ms = {k: round(1e3 * float(np.median(v)), 3) for k, v in per.items()}
    return {
        "figures": {
            "model": "the reference model (0.8M), a fresh prefill of 1 and of 4 one-token rows",
            **{f"{k}_ms": v for k, v in ms.items()},
        },
        "summary": "; ".join(
            f"{s} rows x tokens: compiled {ms[s + '_compiled']:.2f} ms, eager "
            f"{ms[s + '_eager']:.2f} ms"
            for s in shapes
        ),
    }


def m_mlx_trace_cost() -> dict:
    """MLX decode: compiled steps kept across caches (a trace costs many tokens)."""
    be, mx = _mlx()
    firsts, steady = [], []
    for seed in range(5):
        _, cache, prompt, rows = _mlx_decode_setup(be, seed)  # a new model: a new trace
        ts = _decode_run(be, cache, prompt, rows, 24)
        firsts.append(ts[0])
        steady.append(statistics.median(ts[4:]))
    first, tok = 1e3 * statistics.median(firsts), 1e3 * statistics.median(steady)
    return {
        "figures": {
            "model": "the reference model (0.8M), batch 1, a new model (so a new trace) each time",
            "first_step_ms": round(first, 2),
            "step_ms": round(tok, 3),
            "trace_ms": round(first - tok, 2),
            "trace_in_tokens": round((first - tok) / tok),
        },
        "summary": f"first step {first:.1f} ms against {tok:.2f} ms a token: a trace costs "
        f"about {(first - tok) / tok:.0f} tokens",
    }


def m_thread_tuner() -> dict:
    """torch training: a thread tuner (1 thread or all, by timing real steps)."""
    import torch

    n = torch.get_num_threads()
    if n < 2:
        raise Skip("one CPU thread: nothing to choose")
    steps = {1: torch_train("fp32", threads=1)[4], n: torch_train("fp32", threads=n)[4]}
    return idle_and_busy(
        n, steps.get, "step", "the reference model's torch training step, fp32, 12x64", 5, 1
    )


def idle_and_busy(n: int, fn_at, key: str, what: str, reps: int, digits: int) -> dict:
    """`fn_at(k)` (a call to time on k threads) on 1 and on n threads, interleaved, idle and
    then with a second process spinning on one core."""
    import torch

    def at(k):
        f = fn_at(k)

        def g():
            torch.set_num_threads(k)
            f()

        return g

    fns = {"1_thread": at(1), f"{n}_threads": at(n)}
    idle = interleaved(fns, 4, reps, warm=3)
    with spinner():
        busy = interleaved(fns, 4, reps, warm=1)

    def line(ms):
        return f"1 thread {ms['1_thread']:.{digits}f} ms, {n} {ms[f'{n}_threads']:.{digits}f} ms"

    return {
        "figures": {
            key: what,
            "idle_ms": idle,
            "one_core_busy_ms": busy,
            "busy": "a second process spinning on one core",
        },
        "summary": f"idle: {line(idle)}; one core busy: {line(busy)}",
    }


def m_inductor_cache() -> dict:
    """torch training: inductor's cache kept under the user's cache directory."""
    code = (
        "import json, sys, time\n"
        f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        "import bench_choices as b\n"
        "import torch\n"
        "_, _, _, _, c = b.torch_train('fp32', threads=torch.get_num_threads(), compile_=True)\n"
        "t = time.perf_counter(); c(); first = time.perf_counter() - t\n"
        "_, _, _, _, e = b.torch_train('fp32', threads=torch.get_num_threads())\n"
        "ms = b.interleaved({'compiled': c, 'eager': e}, 4, 10, warm=3)\n"
        "print(json.dumps(dict(first_s=first, **ms)))\n"
    )
    with tempfile.TemporaryDirectory() as d:
        env = {"TORCHINDUCTOR_CACHE_DIR": d}
        try:
            cold = child(code, env, timeout=240)
            warm = child(code, env, timeout=240)
        except RuntimeError as e:
            raise Skip(f"torch.compile failed: {e}") from e
    return {
        "figures": {
            "step": "the reference model's torch training step, fp32, train.compile = true",
            "first_step_empty_cache_s": round(cold["first_s"], 2),
            "first_step_warm_cache_s": round(warm["first_s"], 2),
            "compiled_step_ms": statistics.median([cold["compiled"], warm["compiled"]]),
            "eager_step_ms": statistics.median([cold["eager"], warm["eager"]]),
        },
        "summary": f"first compiled step {cold['first_s']:.1f} s on an empty cache, "
        f"{warm['first_s']:.1f} s on a warm one; then {cold['compiled']:.1f} ms a step "
        f"against eager {cold['eager']:.1f} ms",
    }


def m_threads_auto() -> dict:
    """`polygpt bench --threads auto`: leave the cores other processes hold alone."""
    import torch

    from polygpt.backends import get_backend

    n = torch.get_num_threads()
    if n < 2:
        raise Skip("one CPU thread: nothing to choose")
    cfg, spec, arr = reference()
    be = get_backend("torch", "cpu")
    model = be.init_model(spec, 1337)
    x, y = batches(arr, spec, cfg.train, 1)[0]
    what = "the reference model's forward and loss, fp32, one 12x64 batch"
    return idle_and_busy(n, lambda k: lambda: be.eval_loss(model, x, y), "forward", what, 10, 2)


# name -> (the choice in the code it backs, function)
MEASUREMENTS = {
    "mlx-openblas": (
        "MLX on Linux: load the system OpenBLAS before MLX (polygpt/blas.py)",
        m_mlx_openblas,
    ),
    "openblas-core": (
        "MLX on Linux: name OpenBLAS's core from the CPU flags (polygpt/blas.py)",
        m_openblas_core,
    ),
    "int8-error": (
        "int8/int4 checkpoints: MLX's group-wise affine format (polygpt/quantize.py)",
        m_int8_error,
    ),
    "torch-gelu": (
        "torch model: tanh GELU's forward as x·sigmoid(2z) (torch_backend/model.py)",
        m_torch_gelu,
    ),
    "inductor-exp": (
        "torch model: exp, not tanh, under torch.compile (torch_backend/model.py)",
        m_inductor_exp,
    ),
    "meta-normal-rss": (
        "torch loading: skip parameter fills while building a model to load",
        m_meta_normal_rss,
    ),
    "mlx-elementwise": (
        "MLX model: the tanh GELU without tanh on MLX's CPU (mlx_backend/model.py)",
        m_mlx_elementwise,
    ),
    "mlx-decode-compiled": (
        "MLX decode: the decode step compiled (mlx_backend/decode.py)",
        m_mlx_decode_compiled,
    ),
    "mlx-prefill-compiled": (
        "MLX prefill: a small prefill whose shape recurs, compiled (mlx_backend/decode.py)",
        m_mlx_prefill_compiled,
    ),
    "mlx-trace-cost": (
        "MLX decode: compiled steps kept across caches (mlx_backend/decode.py)",
        m_mlx_trace_cost,
    ),
    "thread-tuner": (
        "torch training: a thread tuner (torch_backend/threads.py)",
        m_thread_tuner,
    ),
    "inductor-cache": (
        "torch training: inductor's cache under the user's cache directory "
        "(torch_backend/backend.py)",
        m_inductor_cache,
    ),
    "threads-auto": (
        "`polygpt bench --threads auto`: leave busy cores alone (polygpt/bench/run.py)",
        m_threads_auto,
    ),
}


def run_one(name: str) -> dict:
    backs, fn = MEASUREMENTS[name]
    row = {"name": name, "backs": backs, "date": header("")["date"], "load_before": load1()}
    t = time.perf_counter()
    try:
        row.update(fn())
    except Skip as e:
        row["skipped"] = str(e)
    row["seconds"] = round(time.perf_counter() - t, 1)
    row["load_after"] = load1()
    return row


def cmd_choices(a, command: str) -> dict:
    if a.child:  # one measurement, in this process
        print(json.dumps(run_one(a.child)))
        return {}
    names = a.only.split(",") if a.only else list(MEASUREMENTS)
    for n in names:
        if n not in MEASUREMENTS:
            sys.exit(f"unknown measurement {n!r}; --list names them")
    run = header(command)
    doc = {"cpu": run.pop("cpu"), "versions": run.pop("versions"), "runs": [run]}
    prev = {}
    if a.out and a.out.exists() and a.only:  # --only updates those rows of an existing file
        old = json.loads(a.out.read_text())
        prev = {r["name"]: r for r in old.get("measurements", [])}
        doc["runs"] = old.get("runs", []) + [run]
    rows = []
    for n in names:
        script = str(Path(__file__).resolve())
        p = subprocess.run(
            [sys.executable, script, "choices", "--child", n],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if p.returncode:
            row = {"name": n, "backs": MEASUREMENTS[n][0], "error": p.stderr.strip()[-500:]}
        else:
            row = json.loads(p.stdout.strip().splitlines()[-1])
        row["command"] = f"{command.split(' --only')[0].split(' --out')[0]} --only {n}"
        rows.append(row)
        print(f"{n:<20} {row.get('summary') or row.get('skipped') or row.get('error')}", flush=True)
    merged = {**prev, **{r["name"]: r for r in rows}}
    doc["measurements"] = [merged[n] for n in MEASUREMENTS if n in merged]
    run["load_after"] = load1()
    return doc


# ---- profile: where a training step's time goes ------------------------------------------------

KINDS = ("matmuls", "attention", "GELU", "casts", "the rest")
_ATTENTION = ("scaled_dot_product", "flash_attention", "aten::bmm", "aten::baddbmm", "softmax")


def classify(ev) -> str:
    chain, e = [], ev
    while e is not None:
        chain.append(e.name)
        e = e.cpu_parent
    name = ev.name
    if any("gelu" in c.lower() for c in chain):
        return "GELU"
    if name in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear"):
        return "matmuls"
    if any(k in name for k in _ATTENTION):
        return "attention"
    if any(c in ("aten::_to_copy", "aten::to") for c in chain):
        return "casts"
    if any(any(k in c for k in _ATTENTION) for c in chain[1:]):
        return "attention"
    return "the rest"


def profile_phase(fn, n: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        wall = time.perf_counter() - t
    kinds = dict.fromkeys(KINDS, 0.0)
    mm_calls, mm_flops, mm_us = 0, 0.0, 0.0
    for ev in prof.events():
        if ev.device_type.name != "CPU":
            continue
        k = classify(ev)
        kinds[k] += ev.self_cpu_time_total
        if ev.name in ("aten::mm", "aten::addmm"):
            mm_calls += 1
            mm_flops += ev.flops or 0
            mm_us += ev.self_cpu_time_total
    total = sum(kinds.values())
    return {
        "wall_ms": round(1e3 * wall / n, 2),
        "self_ms": {k: round(v / 1e3 / n, 2) for k, v in kinds.items()},
        "self_total_ms": round(total / 1e3 / n, 2),
        "matmul_calls": mm_calls // n,
        "matmul_gflop": round(mm_flops / 1e9 / n, 3),
        "matmul_gflop_s": round(mm_flops / mm_us / 1e3, 1) if mm_us else None,
    }


def gemm_peak(dtype) -> float:
    import torch

    a = torch.randn(1536, 1536).to(dtype)
    b = torch.randn(1536, 1536).to(dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return round(2 * 1536**3 / best / 1e9, 1)


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def cmd_profile(a, command: str) -> dict:
    import numpy as np
    import torch

    from polygpt.backends.torch_backend import model as tmodel

    # label the GELU (its fp32 forward is five unnamed elementwise ops) for the profiler
    plain_gelu = tmodel.gelu

    def labelled_gelu(x, approximate):
        with torch.profiler.record_function("polygpt.gelu"):
            return plain_gelu(x, approximate)

    tmodel.gelu = labelled_gelu
    doc = header(command)
    n = torch.get_num_threads()
    doc["threads"] = n
    doc["gemm_peak_gflop_s"] = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    doc["config"] = "configs/shakespeare_char.toml (4 layers, 128 wide, block 64, batch 12)"
    phases = {}
    for dtype in ("fp32", "bf16"):
        be, model, spec, tc, step = torch_train(dtype, threads=n)
        for _ in range(5):
            step()
        phases[f"{dtype} step"] = profile_phase(step, a.steps)
        B, T = tc.batch_size, spec.block_size
        group = max(1, be.eval_positions(dtype) // (B * T))
        _, _, arr = reference()
        val = batches(arr, spec, tc, group, seed=1)
        x = np.concatenate([b[0] for b in val])
        y = np.concatenate([b[1] for b in val])
        fwd = lambda be=be, m=model, x=x, y=y, d=dtype: be.eval_loss(m, x, y, d)  # noqa: E731
        for _ in range(3):
            fwd()
        p = profile_phase(fwd, a.evals)
        scale = 1 / group  # per 12x64 batch
        p = {
            **p,
            "batches_per_forward": group,
            "wall_ms": round(p["wall_ms"] * scale, 2),
            "self_ms": {k: round(v * scale, 2) for k, v in p["self_ms"].items()},
            "self_total_ms": round(p["self_total_ms"] * scale, 2),
            "matmul_gflop": round(p["matmul_gflop"] * scale, 3),
        }
        phases[f"{dtype} eval forward"] = p
        print(f"{dtype}: step {phases[f'{dtype} step']}\n  eval {p}", flush=True)
    doc["phases"] = phases
    doc["note"] = (
        "self CPU time per training step (12x64) and per 12x64 batch of evaluation forward; "
        "the evaluation forward stacks the batches the backend's eval_positions asks for"
    )
    # the evaluation forward's time per 12x64 batch by batches per forward, interleaved
    tmodel.gelu = plain_gelu
    grouping = {}
    for dtype in ("fp32", "bf16"):
        be, model, spec, tc, _ = torch_train(dtype, threads=n)
        _, _, arr = reference()
        val = batches(arr, spec, tc, 10, seed=1)
        fns = {}
        for g in (1, 2, 4, 10):
            x = np.concatenate([b[0] for b in val[:g]])
            y = np.concatenate([b[1] for b in val[:g]])
            fns[str(g)] = lambda be=be, m=model, x=x, y=y, d=dtype: be.eval_loss(m, x, y, d)
        ms = interleaved(fns, 4, 5, warm=2)
        grouping[dtype] = {g: round(v / int(g), 2) for g, v in ms.items()}
        print(f"{dtype} eval ms per batch by batches per forward: {grouping[dtype]}", flush=True)
    doc["eval_ms_per_batch_by_stack"] = grouping
    doc["attention_bf16"] = attention_ab(n)
    print(f"bf16 attention forward+backward: {doc['attention_bf16']}", flush=True)
    doc["load_after"] = load1()
    return doc


def attention_ab(threads: int) -> dict:
    """bf16 attention forward+backward at the reference shapes: SDPA against the three batched
    ops the torch model runs for bf16 on the CPU."""
    import torch
    import torch.nn.functional as F

    from polygpt.backends.torch_backend.model import _causal_attention

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(12, 4, 64, 32, generator=g).bfloat16().requires_grad_() for _ in range(3)
    )
    go = torch.randn(12, 4, 64, 32, generator=g).bfloat16()

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(go)

    def batched():
        _causal_attention(q, k, v, 0.0).backward(go)

    ms = interleaved({"sdpa": sdpa, "batched_ops": batched}, 6, 20, warm=3)
    return {
        "shape": "q, k, v 12x4x64x32 bf16, causal, forward + backward, one layer",
        **{f"{k}_ms": v for k, v in ms.items()},
    }


# ---- MLX against torch on the same config -------------------------------------------------------


def cmd_mlx_vs_torch(a, command: str) -> dict:
    import numpy as np

    from polygpt import config
    from polygpt.backends import get_backend
    from polygpt.train import estimate_loss

    cfg, spec, arr = reference()
    from polygpt import data

    val = data.load_split(cfg.data.dir, "val")
    splits = {"train": arr, "val": val}
    doc = header(command)
    sides = {}
    # torch first: its first matmul must bind its own BLAS before MLX's OpenBLAS goes global
    for label, bname, dtype in (
        ("torch fp32", "torch", "fp32"),
        ("torch bf16", "torch", "bf16"),
        ("MLX fp32", "mlx", "fp32"),
    ):
        tc = config.TrainConfig(**{**cfg.train.__dict__, "dtype": dtype})
        be = get_backend(bname, "cpu")
        model = be.init_model(spec, tc.seed)
        opt = be.make_optimizer(model, tc)
        bs = batches(arr, spec, tc, 16)
        for i in range(5):
            float(be.train_step(model, opt, [bs[i]], tc.lr, tc.grad_clip, dtype))
        sides[label] = (be, model, opt, tc, bs, dtype)
    steps = {k: [] for k in sides}
    evals = {k: [] for k in sides}
    for r, k in alternating(sides, a.rounds):
        be, model, opt, tc, bs, dtype = sides[k]
        ts = []
        for i in range(a.steps):
            t = time.perf_counter()
            float(be.train_step(model, opt, [bs[i % 16]], tc.lr, tc.grad_clip, dtype))
            ts.append(time.perf_counter() - t)
        steps[k].append(round(1e3 * statistics.median(ts), 2))
        t = time.perf_counter()
        estimate_loss(
            be, model, splits, spec.block_size, tc.batch_size, a.eval_iters, tc.seed,
            spec.vocab_size, dtype,
        )  # fmt: skip
        per_batch = (time.perf_counter() - t) / (2 * a.eval_iters)
        evals[k].append(round(1e3 * per_batch, 2))
        print(f"round {r} {k}: step {steps[k][-1]} ms, eval {evals[k][-1]} ms/batch", flush=True)
    full = 2 * cfg.train.eval_iters
    doc["training"] = {
        "config": "configs/shakespeare_char.toml, 12x64 batches",
        "steps_per_round": a.steps,
        "eval_iters_per_split": a.eval_iters,
        "rows": [
            {
                "side": k,
                "threads": _threads(sides[k][0], sides[k][2]),
                "step_ms": steps[k],
                "eval_ms_per_batch": evals[k],
                f"evaluation_s_at_{full}_batches": [round(e * full / 1e3, 2) for e in evals[k]],
            }
            for k in sides
        ],
    }
    # MLX's evaluation forward: compiled against eager, one batch against ten stacked
    be, model, *_ = sides["MLX fp32"]
    import mlx.core as mx

    val_b = batches(val, spec, cfg.train, 10, seed=1)
    x1, y1 = val_b[0]
    x10 = np.concatenate([b[0] for b in val_b])
    y10 = np.concatenate([b[1] for b in val_b])

    def run(x, y, compiled):
        def f():
            (mx.enable_compile if compiled else mx.disable_compile)()
            be.eval_loss(model, x, y)

        return f

    ms = interleaved(
        {
            "compiled_1": run(x1, y1, True),
            "eager_1": run(x1, y1, False),
            "compiled_10": run(x10, y10, True),
            "eager_10": run(x10, y10, False),
        },
        4,
        5,
        warm=2,
    )
    mx.enable_compile()
    doc["mlx_eval_forward_ms_per_batch"] = {
        k: round(v / int(k.split("_")[1]), 2) for k, v in ms.items()
    }
    print(f"MLX eval forward ms per 12x64 batch: {doc['mlx_eval_forward_ms_per_batch']}")
    doc["load_after"] = load1()
    return doc


def _threads(be, opt):
    """The CPU threads a side ran on: torch's tuner's choice, MLX's BLAS threads."""
    if be.name == "torch":
        import torch

        t = getattr(opt, "threads", None)
        return f"tuner: {t.chosen} (checks {t.history})" if t else torch.get_num_threads()
    return be.describe().get("threads", "")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("choices", help="the micro-measurements behind choices in the code")
    c.add_argument("--only", default="", help="comma list of measurement names")
    c.add_argument("--list", action="store_true", help="name the measurements and exit")
    c.add_argument("--child", default="", help=argparse.SUPPRESS)
    p = sub.add_parser("profile", help="torch.profiler over the reference model's step and eval")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--evals", type=int, default=10)
    m = sub.add_parser("mlx-vs-torch", help="training step and evaluation, MLX against torch")
    m.add_argument("--steps", type=int, default=60, help="timed steps per side and round")
    m.add_argument("--rounds", type=int, default=2)
    m.add_argument("--eval-iters", type=int, default=10, help="batches per split")
    for s in (c, p, m):
        s.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    if a.cmd == "choices" and a.list:
        for n, (backs, _) in MEASUREMENTS.items():
            print(f"{n:<20} {backs}")
        return
    argv_ = sys.argv[1:] if argv is None else argv
    command = " ".join(["scripts/bench_choices.py", *argv_])
    fn = {"choices": cmd_choices, "profile": cmd_profile, "mlx-vs-torch": cmd_mlx_vs_torch}
    doc = fn[a.cmd](a, command)
    if doc and a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
