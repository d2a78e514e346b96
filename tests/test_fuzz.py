"""Fuzzing every file polygpt reads (hypothesis): safetensors headers, config.json,
tokenizer.json, metrics.jsonl, run-config and sweep TOML, random and mutated from valid ones.

Each load must succeed or raise PolygptError with a one-line message: never another
exception, never a hang (a 20 s alarm per example), never a huge allocation (the address space
is capped at 2 GiB above what the process already maps). Derandomized: the same examples on
every run, about seven hundred in all (POLYGPT_FUZZ_SCALE explores more).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from polygpt import checkpoints, config, metrics_log, modelfile, sweep, tensorfile  # noqa: E402
from polygpt import tokenizer as tok  # noqa: E402
from polygpt.backends import available_backends, get_backend  # noqa: E402
from polygpt.errors import PolygptError  # noqa: E402
from polygpt.spec import ModelSpec  # noqa: E402

from .conftest import ROOT  # noqa: E402

STATM = Path("/proc/self/statm")  # pages mapped by this process (Linux)
SPEC = ModelSpec(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
CHARS = ["\n", " ", "a", "b", "c"]


# POLYGPT_FUZZ_SCALE=20 explores 20x as many examples, random ones (not in CI)
SCALE = int(os.environ.get("POLYGPT_FUZZ_SCALE", "1"))


def fuzz(n: int):
    return settings(
        max_examples=n * SCALE,
        derandomize=SCALE == 1,
        database=None,
        deadline=None,  # wall time under load is no test: the alarm below catches hangs
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@contextmanager
def bounded(seconds: int = 20, extra_bytes: int = 2 << 30):
    """A hang raises TimeoutError; an allocation past the cap fails (MemoryError)."""

    def alarm(*_):
        raise TimeoutError(f"a load took over {seconds} s")

    old_handler = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if STATM.exists():  # Linux; macOS does not enforce RLIMIT_AS anyway
        cap = int(STATM.read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE") + extra_bytes
        resource.setrlimit(
            resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(hard, cap), hard)
        )
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, old_handler)


def loads_or_says_why(fn, *args):
    """Run a loader: success, or a PolygptError of one non-empty line; anything else fails."""
    with bounded():
        try:
            return fn(*args)
        except PolygptError as e:
            msg = str(e)
            assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
            return None


# ---- strategies -------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _dump(v) -> str:
    return json.dumps(v, allow_nan=True)


def _deep(n: int) -> str:
    return "[" * n + "]" * n


@st.composite
def mutated(draw, value):
    """`value` (a JSON tree) with a few nodes replaced by arbitrary JSON or deleted."""
    value = json.loads(json.dumps(value))
    for _ in range(draw(st.integers(1, 3))):
        node, path = value, []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            k = draw(st.sampled_from(keys))
            path.append(k)
            node = node[k]
        if not path:
            continue
        parent = value
        for k in path[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return value


@st.composite
def byte_mutations(draw, raw: bytes):
    """Flip, overwrite, insert, delete bytes; or cut the file short."""
    b = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate", "length"]))
        i = draw(st.integers(0, max(0, len(b) - 1)))
        if op == "set" and b:
            b[i] = draw(st.integers(0, 255))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del b[i:]
        elif op == "length" and len(b) >= 8:  # the header length: small, huge or 2^64 - 1
            b[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(b)


# ---- fixtures: one valid file of each kind ----------------------------------------------------
@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    """A valid checkpoint of SPEC, written with safetensors (no backend needed)."""
    import numpy as np
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("valid") / "ck"
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in SPEC.param_shapes().items()}
    checkpoints.write(
        d,
        config={
            "polygpt_version": "0",
            "spec": SPEC.to_dict(),
            "step": 3,
            "precision": "fp32",
            "backend": "torch",
            "device": "cpu",
            "metrics": {"train_loss": 1.5, "val_loss": 1.6, "val_ppl": 4.9},
            "run": config.RunConfig().to_dict(),
            "train_state": {"rng": {"bit_generator": "PCG64"}},
        },
        tokenizer={"type": "char", "vocab_size": 5, "chars": CHARS},
        save_model=lambda p: save_file(tensors, str(p), metadata=modelfile.metadata(SPEC)),
    )
    for step in (1, 2, 3):
        metrics_log.append(d, {"event": "train", "step": step, "loss": 2.0, "lr": 1e-3})
    metrics_log.append(d, {"event": "eval", "step": 3, "train_loss": 1.5, "val_loss": 1.6})
    return d


def _copy(valid: Path, dst: Path) -> Path:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(valid, dst)
    return dst


# ---- safetensors ------------------------------------------------------------------------------
def _load_model_file(path: Path, backends=()):
    tensorfile.read_header(path)
    checked = modelfile.check(path, SPEC)
    for name in backends:
        get_backend(name, "cpu").load_model(checked)


HOSTILE_METADATA = [
    _deep(100_000),
    '{"bits": 1e400, "group_size": 64}',
    '{"bits": 4, "group_size": 64, "mode": "affine"}',  # declared, but no tensor is quantized
    json.dumps({**SPEC.to_dict(), "n_layer": 10**12}),
]
tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(
            st.sampled_from(["F32", "F16", "BF16", "U32", "I64", "F64", "BOOL", "U8"]),
            st.text(max_size=4),
        ),
        "shape": st.lists(st.integers(-1, 2**64), max_size=4),
        "data_offsets": st.lists(st.integers(-1, 2**64), max_size=3),
    }
)
headers = st.dictionaries(
    st.one_of(st.sampled_from(list(SPEC.param_shapes())), st.text(max_size=6)),
    st.one_of(tensor_entries, json_values),
    max_size=4,
).flatmap(
    lambda h: st.one_of(
        st.just(h),
        st.builds(
            lambda m: {**h, "__metadata__": m},
            st.one_of(
                json_values,
                st.dictionaries(
                    st.sampled_from(["spec", "quantization", "format", "step"]),
                    st.one_of(
                        st.text(max_size=20),
                        st.just(SPEC.to_json()),
                        json_values.map(_dump),
                        st.sampled_from(HOSTILE_METADATA),
                    ),
                ),
            ),
        ),
    )
)


@fuzz(100)
@given(
    data=st.one_of(st.binary(max_size=200), headers.map(_dump).map(str.encode)),
    tail=st.binary(max_size=64),
)
def test_fuzz_safetensors_headers(tmp_path, data, tail):
    """Random files, and well-framed files whose header is arbitrary JSON."""
    f = tmp_path / "model.safetensors"
    framed = struct.pack("<Q", len(data)) + data + tail
    for raw in (data, framed):
        f.write_bytes(raw)
        loads_or_says_why(_load_model_file, f)


@fuzz(100)
@given(data=st.data())
def test_fuzz_mutated_model_file(tmp_path, valid, data):
    """A valid model file with its header JSON or its bytes mutated, loaded by every backend."""
    raw = (valid / checkpoints.MODEL_FILE).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    kind = data.draw(st.sampled_from(["header", "metadata", "bytes"]))
    if kind == "bytes":
        raw = data.draw(byte_mutations(raw))
    else:
        if kind == "header":
            header = data.draw(mutated(header))
        else:  # metadata values are strings that polygpt parses: spec, quantization
            key = data.draw(st.sampled_from(["spec", "quantization", "step", "format"]))
            header["__metadata__"][key] = data.draw(
                st.one_of(st.sampled_from(HOSTILE_METADATA), json_values.map(_dump))
            )
        new = _dump(header).encode()
        raw = struct.pack("<Q", len(new)) + new + raw[8 + n :]
    f = tmp_path / "model.safetensors"
    f.write_bytes(raw)
    loads_or_says_why(_load_model_file, f, available_backends())


# ---- config.json ------------------------------------------------------------------------------
def _load_checkpoint(path: Path):
    from polygpt.cli import views
    from polygpt.train import config_for_resume

    ck = checkpoints.read(path)
    (ck.step, ck.spec.num_params(), ck.model_file, ck.optimizer_file)
    views.checkpoint_lines(path)
    config_for_resume(path, [])


@fuzz(150)
@given(data=st.data())
def test_fuzz_config_json(tmp_path, valid, data):
    d = _copy(valid, tmp_path / "ck")
    good = json.loads((d / checkpoints.CONFIG_FILE).read_text())
    kind = data.draw(st.sampled_from(["mutated", "mutated", "json", "bytes"]))
    if kind == "mutated":
        text = _dump(data.draw(mutated(good)))
    elif kind == "json":
        text = _dump(data.draw(json_values))
    else:
        text = data.draw(
            st.one_of(
                st.binary(max_size=80).map(lambda b: b.decode("latin-1")), st.just(_deep(100_000))
            )
        )
    (d / checkpoints.CONFIG_FILE).write_text(
        text, encoding="latin-1" if kind == "bytes" else "utf-8"
    )
    loads_or_says_why(_load_checkpoint, d)


# ---- tokenizer.json ---------------------------------------------------------------------------
def _load_tokenizer(path: Path):
    t = tok.load(path)
    ids = t.encode("abc \n")
    t.decode(ids)
    t.decode(list(range(t.vocab_size)))


@fuzz(100)
@given(data=st.data())
def test_fuzz_tokenizer_json(tmp_path, data):
    good = {"type": "char", "vocab_size": 5, "chars": CHARS}
    f = tmp_path / "tokenizer.json"
    kind = data.draw(st.sampled_from(["mutated", "mutated", "json", "bytes"]))
    if kind == "bytes":
        f.write_bytes(
            data.draw(st.one_of(st.binary(max_size=80), st.just(_deep(100_000).encode())))
        )
    else:
        v = data.draw(mutated(good)) if kind == "mutated" else data.draw(json_values)
        f.write_text(_dump(v))
    loads_or_says_why(_load_tokenizer, f)


# ---- metrics.jsonl ----------------------------------------------------------------------------
def _load_metrics(d: Path):
    rows = metrics_log.read(d)
    assert all(isinstance(r, dict) for r in rows)
    metrics_log.trim(d, 2)
    assert all(r["step"] <= 2 for r in metrics_log.read(d))


def _plot(d: Path, out: Path):
    from polygpt import plot

    plot.plot([d], out, "loss")


@fuzz(100)
@given(data=st.data())
def test_fuzz_metrics_jsonl(tmp_path, valid, data):
    d = _copy(valid, tmp_path / "ck")
    good = (d / checkpoints.METRICS_FILE).read_text().splitlines()
    line = st.one_of(
        st.sampled_from(good),
        st.sampled_from(good).flatmap(lambda g: st.integers(0, len(g)).map(lambda i: g[:i])),
        st.sampled_from(good).map(json.loads).flatmap(mutated).map(_dump),
        json_values.map(_dump),
        st.text(max_size=20),
        st.just(_deep(100_000)),
        st.just("1" * 5000),
    )
    lines = data.draw(st.lists(line, max_size=6))
    raw = "\n".join(lines).encode()
    if data.draw(st.booleans()):
        raw = data.draw(byte_mutations(raw)) if raw else raw
    (d / checkpoints.METRICS_FILE).write_bytes(raw)
    loads_or_says_why(_load_metrics, d)


@fuzz(20)
@given(data=st.data())
def test_fuzz_metrics_into_a_plot(tmp_path, valid, data):
    """The one reader that uses each row's fields: `polygpt plot --kind loss`."""
    pytest.importorskip("matplotlib")
    d = _copy(valid, tmp_path / "ck")
    good = [json.loads(x) for x in (d / checkpoints.METRICS_FILE).read_text().splitlines()]
    rows = data.draw(
        st.lists(st.one_of(st.sampled_from(good).flatmap(mutated), json_values), max_size=5)
    )
    (d / checkpoints.METRICS_FILE).write_text("".join(_dump(r) + "\n" for r in rows))
    loads_or_says_why(_plot, d, tmp_path / "plot.png")


# ---- TOML: run configs and sweep files --------------------------------------------------------
toml_values = st.one_of(
    st.sampled_from(
        [
            '"x"',
            "1",
            "-1",
            "0",
            "1e400",
            "nan",
            "true",
            "[1, 2]",
            '["a", 1]',
            "{a = 1}",
            '"/dev/zero"',
            '"configs/shakespeare_char.toml"',
            '""',
            "[[1]]",
            "1979-05-27",
        ]
    ),
    st.text(max_size=10),
)


@st.composite
def toml_mutations(draw, text: str):
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        op = draw(st.sampled_from(["value", "value", "delete", "dup", "header", "junk"]))
        if op == "value" and lines and "=" in lines[i]:
            lines[i] = lines[i].split("=", 1)[0] + "= " + draw(toml_values)
        elif op == "delete" and lines:
            del lines[i]
        elif op == "dup" and lines:
            lines.insert(i, lines[i])
        elif op == "header":
            lines.insert(
                i,
                draw(
                    st.sampled_from(
                        [
                            "[sweep]",
                            "[[run]]",
                            "[model]",
                            "[x]",
                            "run = 3",
                            "sweep = 1",
                            "[train.out]",
                        ]
                    )
                ),
            )
        else:
            lines.insert(i, draw(st.text(max_size=12)))
    return "\n".join(lines)


def _load_sweep(path: Path):
    sw = sweep.load_sweep(path)
    for run in sw.runs:
        sweep.run_config(sw, run)
        sweep.fingerprint(sweep.run_config(sw, run))


@fuzz(120)
@given(data=st.data())
def test_fuzz_toml(tmp_path, data):
    run_cfg = (ROOT / "configs" / "shakespeare_char.toml").read_text()
    sweep_file = (
        '[sweep]\nname = "s"\nout = "w"\nresults = "r"\nsample_tokens = 10\n'
        f'[[run]]\nname = "a"\nconfig = "{tmp_path / "c.toml"}"\n'
        'overrides = ["max_iters=5"]\nbackend = "torch"\n'
    )
    (tmp_path / "c.toml").write_text(run_cfg)
    f = tmp_path / "x.toml"
    which = data.draw(st.sampled_from(["config", "sweep"]))
    kind = data.draw(st.sampled_from(["mutated", "mutated", "mutated", "bytes"]))
    if kind == "bytes":
        f.write_bytes(data.draw(st.binary(max_size=80)))
    else:
        f.write_text(data.draw(toml_mutations(run_cfg if which == "config" else sweep_file)))
    if which == "config":
        loads_or_says_why(config.load, f, [])
    else:
        loads_or_says_why(_load_sweep, f)
