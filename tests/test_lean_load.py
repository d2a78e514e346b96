"""Loading a checkpoint holds its weights once: no second full copy at any precision.

Each backend reads the file tensor by tensor into the compute precision (torch: a model built on
the meta device, plain reads, int8/int4 matrices built a few rows at a time; MLX: the lazy mx.load
evaluated one tensor at a time), so what a load holds beyond the finished model is about one
tensor, never the file's weights in full. Measured three ways: torch's live tensor bytes (every
storage an op creates, until it is freed), MLX's own peak memory, and — on Linux — the whole
process's peak RSS around a load in a fresh interpreter. Beside them: every precision reads the
other backend's checkpoint and scores the perplexity the writer's fp32 model does, within the
logit tolerances the precision tests hold (test_quantize.LOGIT_TOL).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from polygpt import checkpoints, data, evaluate, inference, modelfile, tensorfile
from polygpt.backends import get_backend
from polygpt.errors import PolygptError
from polygpt.spec import ModelSpec

from .conftest import requires
from .test_quantize import LOGIT_TOL, PRECISIONS

CASES = [
    pytest.param(b, p, marks=requires(b), id=f"{b}-{p}") for b, ps in PRECISIONS.items() for p in ps
]
TORCH_LOADING = "polygpt.backends.torch_backend.loading"
# no tensor above 1/8 of the file, so "about one tensor" and "a second copy" are far apart
SMALL = ModelSpec(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=True)


def _save(spec: ModelSpec, path: Path) -> Path:
    be = get_backend("torch", "cpu")
    be.save_model(be.init_model(spec, 0), path, modelfile.metadata(spec))
    return path


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    return _save(SMALL, tmp_path_factory.mktemp("lean") / "small.safetensors")


def _largest_tensor(path: Path) -> int:
    with tensorfile.TensorFile(path) as f:
        return max(e.nbytes for e in f.entries.values())


# -- counted inside the process --------------------------------------------------------------
class LiveBytes:
    """Bytes of live torch storages created by ops while active, and their peak: every output
    of every op (TorchDispatchMode), counted once per storage until the storage is freed."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and not t.is_meta:
                        counter.add(t if t.is_mkldnn else t.untyped_storage())
                return out

        self.mode, self.live, self.peak, self.seen = Mode(), 0, 0, set()

    def add(self, storage) -> None:
        """A storage, or an opaque tensor (oneDNN's packed weights have no storage)."""
        opaque = not hasattr(storage, "data_ptr") or getattr(storage, "is_mkldnn", False)
        key, n = (id(storage), storage.nbytes) if opaque else (storage.data_ptr(), storage.nbytes())
        if key in self.seen or n == 0:
            return
        self.seen.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self.seen.discard(key)
        self.live -= n

    def __enter__(self) -> LiveBytes:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


@requires("torch")
@pytest.mark.parametrize("precision", PRECISIONS["torch"])
def test_torch_load_allocates_the_model_once(small_file, precision, monkeypatch):
    be = get_backend("torch", "cpu")
    be.load_model(
        modelfile.check(small_file, SMALL), precision
    )  # first use of a precision imports its modules
    # chunks far smaller than a matrix, as at GPT-2 scale: int8/int4 quantize a chunk at a time
    monkeypatch.setattr(importlib.import_module(TORCH_LOADING), "CHUNK_BYTES", 32 << 10)
    with LiveBytes() as counted:
        model = be.load_model(modelfile.check(small_file, SMALL), precision)
    held = be.model_bytes(model)
    # beyond the model: one tensor of the file in flight, never a float copy of a matrix
    # (int4 from a float file: plus that matrix's 4-bit groups, an eighth of it, while
    # they are repacked for torch's kernel)
    allowed = held + _largest_tensor(small_file) * (1.125 if precision == "int4" else 1)
    assert counted.peak <= allowed, (
        f"{precision}: load allocated {counted.peak:,} bytes at its peak; the model holds "
        f"{held:,} and one file tensor {_largest_tensor(small_file):,}"
    )
    assert counted.peak >= 0.5 * held  # the counter saw the weights being made


@requires("mlx")
@pytest.mark.parametrize("precision", PRECISIONS["mlx"])
def test_mlx_load_allocates_the_model_once(small_file, precision):
    import mlx.core as mx

    be = get_backend("mlx", "cpu")
    be.load_model(modelfile.check(small_file, SMALL), precision)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    model = be.load_model(modelfile.check(small_file, SMALL), precision)
    peak = mx.get_peak_memory() - base
    held = be.model_bytes(model)
    # one file tensor in flight plus what it becomes (quantized: packed weights and scales)
    allowed = held + 2 * _largest_tensor(small_file)
    assert held <= peak <= allowed, (
        f"{precision}: MLX peak {peak:,} bytes during the load; the model holds {held:,}"
    )


def test_torch_int8_load_equals_quantizing_the_fp32_model(small_file):
    """Quantized a few rows at a time while loading == quantizing the whole fp32 model in
    memory, to the last bit of the logits."""
    pytest.importorskip("torch")
    be = get_backend("torch", "cpu")
    x = np.arange(40)[None] % SMALL.vocab_size
    streamed = be.logits(be.load_model(modelfile.check(small_file, SMALL), "int8"), x)
    whole = be.logits(
        be.set_precision(be.load_model(modelfile.check(small_file, SMALL), "fp32"), "int8"), x
    )
    assert np.array_equal(streamed, whole)


@pytest.fixture(scope="module")
def small_bf16_file(small_file) -> Path:
    be = get_backend("torch", "cpu")
    path = small_file.with_name("small-bf16.safetensors")
    be.save_model(
        be.load_model(modelfile.check(small_file, SMALL), "bf16"), path, modelfile.metadata(SMALL)
    )
    return path


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_each_precision_loads_as_casting_the_fp32_model(
    small_file, small_bf16_file, backend, monkeypatch
):
    """The streamed cast or quantization of each tensor gives the model that casting or
    quantizing the loaded fp32 model gives, exactly; and reading a tensor in chunks of rows
    (4 kB here, so every tensor is chunked) changes nothing, from an fp32 or a bf16 file."""
    pytest.importorskip(backend)
    loading = importlib.import_module(f"polygpt.backends.{backend}_backend.loading")
    be = get_backend(backend, "cpu")
    x = np.arange(40)[None] % SMALL.vocab_size
    for p in PRECISIONS[backend]:
        streamed = be.logits(be.load_model(modelfile.check(small_file, SMALL), p), x)
        whole = be.logits(
            be.set_precision(be.load_model(modelfile.check(small_file, SMALL), "fp32"), p), x
        )
        assert np.array_equal(streamed, whole), p
    for path in (small_file, small_bf16_file):
        for p in PRECISIONS[backend]:
            monkeypatch.setattr(loading, "CHUNK_BYTES", 1 << 40)
            one = be.logits(be.load_model(modelfile.check(path, SMALL), p), x)
            monkeypatch.setattr(loading, "CHUNK_BYTES", 4096)
            chunked = be.logits(be.load_model(modelfile.check(path, SMALL), p), x)
            assert np.array_equal(one, chunked), (path.name, p)


# -- the whole process, on Linux -------------------------------------------------------------
_CHILD = """
import gc, json, sys
from pathlib import Path
import numpy as np
from polygpt import modelfile
from polygpt.backends import get_backend
from polygpt.spec import ModelSpec

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

backend, precision, path, warm, spec, warm_spec = sys.argv[1:]
be = get_backend(backend, "cpu")
x = np.array([[1, 2, 3, 4]])
m = be.load_model(modelfile.check(warm, ModelSpec.from_json(warm_spec)), precision)  # first use
be.logits(m, x)
del m
gc.collect()
base = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
m = be.load_model(modelfile.check(path, ModelSpec.from_json(spec)), precision)
be.logits(m, x)  # weights mapped lazily would only become resident here
print(json.dumps({"extra": status("VmHWM") - base, "model": be.model_bytes(m)}))
"""
# ~60 MB of fp32 weights, so a few MB of runtime noise is small beside a second copy
PROCESS = ModelSpec(vocab_size=2048, block_size=128, n_layer=8, n_head=8, n_embd=384, bias=True)
WARM = ModelSpec(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=64)


@pytest.fixture(scope="module")
def process_files(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("lean-rss")
    return _save(PROCESS, root / "model.safetensors"), _save(WARM, root / "warm.safetensors")


def _can_measure_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
@pytest.mark.parametrize("backend,precision", CASES)
def test_load_peak_rss_holds_the_weights_once(process_files, backend, precision):
    """A fresh interpreter's peak RSS across one load (and a forward) grows by the loaded
    model and a few MB, far from the fp32 file a second time (what loading through a full
    fp32 state dict costs: ~1.0x the file on top of the model)."""
    if not _can_measure_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    path, warm = process_files
    args = [str(path), str(warm), PROCESS.to_json(), WARM.to_json()]
    d = _run_child(_CHILD, backend, precision, *args)
    file_bytes = path.stat().st_size
    over = d["extra"] - d["model"]
    assert over <= 0.15 * file_bytes, (
        f"{backend} {precision}: peak RSS grew {d['extra']:,} bytes for a model of "
        f"{d['model']:,} ({over:,} over it; the file is {file_bytes:,})"
    )


_CONVERT_CHILD = """
import json, sys
from pathlib import Path
from polygpt import convert

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

ckpt, out = map(Path, sys.argv[1:])
convert.to_hf(ckpt, out / "warm-hf")  # imports, first use
peaks = {}
for what, run in [
    ("to_hf", lambda: convert.to_hf(ckpt, out / "hf")),
    ("from_hf", lambda: convert.from_hf(out / "hf", out / "back", tokenizer_dir=ckpt)),
]:
    base = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    run()
    peaks[what] = status("VmHWM") - base
print(json.dumps(peaks))
"""


@requires("torch")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def _run_child(code: str, *args: str) -> dict:
    """Run `code` in a fresh Python process; its last stdout line, as JSON. A fixed mmap
    threshold: the figure is what the load holds, not glibc's heap heuristics."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_conversion_streams_tensor_by_tensor(process_files, tmp_path, char_data):
    """polygpt -> Hugging Face GPT-2 -> polygpt: each direction's peak RSS grows by about one
    tensor (transposed on the way), not by the weights."""
    if not _can_measure_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    path, _ = process_files
    ckpt = tmp_path / "ckpt"
    tokenizer = json.loads((char_data / checkpoints.TOKENIZER_FILE).read_text())
    checkpoints.write(
        ckpt,
        config={"spec": PROCESS.to_dict(), "step": 0},
        tokenizer=tokenizer,
        save_model=lambda p: p.write_bytes(path.read_bytes()),
    )
    peaks = _run_child(_CONVERT_CHILD, str(ckpt), str(tmp_path))
    file_bytes = path.stat().st_size
    for what, grew in peaks.items():
        assert grew <= 0.15 * file_bytes, f"{what}: peak RSS +{grew:,} for a {file_bytes:,} file"
    a = get_backend("torch", "cpu").load_model(modelfile.check(path, PROCESS))
    b = get_backend("torch", "cpu").load_model(
        modelfile.check(tmp_path / "back" / checkpoints.MODEL_FILE, PROCESS)
    )
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert x.equal(y), n


# -- the other backend's checkpoint, every precision -----------------------------------------
@pytest.fixture(scope="module")
def written_by(tiny_ckpt, tmp_path_factory):
    """The tiny trained model's checkpoint as each backend writes it (torch trained it; MLX
    loads it and saves its own file)."""
    out = {"torch": tiny_ckpt}
    try:
        be = get_backend("mlx", "cpu")
    except (PolygptError, ImportError):
        return out
    ckpt = checkpoints.read(tiny_ckpt)
    d = tmp_path_factory.mktemp("mlx-written") / "tiny"
    model = be.load_model(ckpt.model, "fp32")
    checkpoints.write(
        d,
        config={**ckpt.config, "backend": "mlx"},
        tokenizer=ckpt.tokenizer,
        save_model=lambda p: be.save_model(model, p, modelfile.metadata(ckpt.spec)),
    )
    out["mlx"] = d
    return out


@requires("torch", "mlx")
@pytest.mark.parametrize("reader,precision", [c.values for c in CASES])
def test_each_precision_reads_the_other_backends_checkpoint(
    written_by, char_data, reader, precision
):
    writer = "mlx" if reader == "torch" else "torch"
    ckpt = written_by[writer]
    tokens = data.load_split(char_data, "val")[:2000]
    ref = inference.load(ckpt, backend=writer, device="cpu", precision="fp32")
    lm = inference.load(ckpt, backend=reader, device="cpu", precision=precision)
    block = lm.spec.block_size
    want = evaluate.perplexity(ref.backend, ref.model, tokens, block).perplexity
    got = evaluate.perplexity(lm.backend, lm.model, tokens, block).perplexity
    if precision == "fp32":  # the cross-backend contract: 3 decimals
        assert abs(got - want) < 1e-3, f"{reader} fp32 {got:.6f} vs {writer} fp32 {want:.6f}"
    else:  # logits within LOGIT_TOL move each token's NLL by at most twice that
        bound = 2 * LOGIT_TOL[precision]
        assert abs(math.log(got / want)) <= bound, (
            f"{reader} {precision} perplexity {got:.4f} vs {writer} fp32 {want:.4f} "
            f"(|log ratio| {abs(math.log(got / want)):.3g} > {bound})"
        )
