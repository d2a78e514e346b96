"""Checkpoint directories: safetensors weights, JSON metadata, atomic writes.

    weights/<run>/
      config.json            spec, tokenizer description, run config, step, metrics, version
      model.safetensors      canonical names; the spec again in __metadata__ (JSON string)
      optimizer.safetensors  AdamW moments `exp_avg/<name>`, `exp_avg_sq/<name>`; step (training)
      tokenizer.json         the vocabulary
      metrics.jsonl          one JSON line per log/eval event (training)

Framework-neutral: the backends read and write the tensors themselves (safetensors.torch,
mx.load / mx.save_safetensors), this module handles the directory, the JSON files and header
validation. Headers are read without loading a tensor and without executing anything.

Lean I/O (`TensorFile`, `write_tensors`): a model is read tensor by tensor, or a tensor by ranges
of rows, with plain reads into buffers the caller allocates at the precision it computes in; and
a file is written tensor by tensor. Nothing is memory-mapped (a mapped file's touched pages
count as the process's memory until the whole mapping goes), so loading or converting a model
never holds a second full copy of its weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from polygpt import __version__, faults
from polygpt.errors import PolygptError
from polygpt.spec import ModelSpec

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
FLOAT_DTYPES = ("F32", "F16", "BF16")
# bytes per element of the safetensors dtypes polygpt reads and writes
ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
# Files that belong to a run rather than to one snapshot; carried into every new snapshot.
_CARRIED = (METRICS_FILE,)


@dataclass
class Checkpoint:
    path: Path
    spec: ModelSpec
    tokenizer: dict
    config: dict = field(default_factory=dict)

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def optimizer_file(self) -> Path:
        return self.path / OPTIMIZER_FILE

    @property
    def step(self) -> int:
        return int(self.config.get("step") or 0)  # type checked by read_checkpoint


def model_metadata(spec: ModelSpec, **extra: str) -> dict[str, str]:
    """safetensors metadata values must be strings, so the spec goes in as a JSON string."""
    return {"format": "polygpt", "polygpt_version": __version__, "spec": spec.to_json(), **extra}


def read_json(p: Path) -> dict:
    """A JSON object from a file; anything else is a one-line PolygptError."""
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise PolygptError(f"{p} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolygptError(f"cannot read {p}: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit int, [[[[...
        raise PolygptError(f"{p} is not valid JSON: {str(e) or type(e).__name__}") from None
    if not isinstance(d, dict):
        raise PolygptError(f"{p} must hold a JSON object")
    return d


def read_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """(name -> (dtype, shape), metadata) of a safetensors file; catches truncation/corruption."""
    if not path.exists():
        raise PolygptError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {}
            for k in f.keys():
                sl = f.get_slice(k)
                tensors[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    except (SafetensorError, OSError, ValueError) as e:
        raise PolygptError(f"{path} is not a valid safetensors file ({e})") from None
    return tensors, meta


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in a safetensors file."""

    name: str
    dtype: str  # safetensors code: "F32", "BF16", "U32", ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (index along the first axis); a 0-d tensor is one row."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


class TensorFile:
    """A safetensors file read tensor by tensor with plain reads, no memory map: each read
    fills a buffer the caller owns (any writable buffer: a torch tensor's bytes, a bytearray),
    so the process holds exactly what the caller keeps. `with TensorFile(path) as f:`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise PolygptError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            self.entries, self.metadata = self._index()
        except BaseException:
            self._f.close()
            raise

    def _index(self) -> tuple[dict[str, TensorEntry], dict[str, str]]:
        bad = f"{self.path} is not a valid safetensors file"
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise PolygptError(f"{bad} (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise PolygptError(f"{bad} (header of {n} bytes)")
        try:
            header = json.loads(self._f.read(n))
        except (ValueError, RecursionError):
            raise PolygptError(f"{bad} (its header is not JSON)") from None
        if not isinstance(header, dict):
            raise PolygptError(f"{bad} (its header is not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        entries = {}
        for name, d in header.items():
            try:
                dtype, shape, (a, b) = d["dtype"], tuple(d["shape"]), d["data_offsets"]
                ok = dtype in ITEMSIZE and all(isinstance(x, int) and x >= 0 for x in shape)
                ok = ok and 0 <= a <= b and b - a == math.prod(shape) * ITEMSIZE[dtype]
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok or 8 + n + b > size:
                raise PolygptError(f"{bad} (tensor {name!r}: bad dtype, shape or offsets)")
            entries[name] = TensorEntry(name, dtype, shape, 8 + n + a, b - a)
        return entries, meta

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def read_rows(self, name: str, out, start: int = 0, stop: int | None = None) -> None:
        """Fill `out` (a writable buffer of exactly that many bytes) with rows [start, stop) of
        tensor `name` (all of it by default)."""
        e = self.entries[name]
        stop = (e.shape[0] if e.shape else 1) if stop is None else stop
        view = memoryview(out).cast("B")
        want = (stop - start) * e.row_bytes
        if view.nbytes != want:
            raise ValueError(f"{name}: rows {start}:{stop} are {want} bytes, buffer {view.nbytes}")
        self._f.seek(e.offset + start * e.row_bytes)
        done = 0
        while done < want:
            got = self._f.readinto(view[done:])
            if not got:
                raise PolygptError(f"{self.path} ends inside tensor {name!r} (truncated?)")
            done += got


def row_chunks(entry: TensorEntry, max_bytes: int) -> Iterator[tuple[int, int]]:
    """[start, stop) row ranges of `entry`, each at most max_bytes (and at least one row)."""
    rows = entry.shape[0] if entry.shape else 1
    step = max(1, max_bytes // max(1, entry.row_bytes))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def write_tensors(
    path: str | Path,
    tensors: Iterable[tuple[str, str, tuple[int, ...]]],
    data: Callable[[str], object],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file tensor by tensor: `tensors` lists (name, dtype, shape) in file
    order, and `data(name)` returns that tensor's bytes (any buffer), asked for one at a time
    while the file is written, so only one tensor needs to exist at once."""
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in tensors:
        n = ITEMSIZE[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, _, _ in tensors:
            buf = memoryview(data(name)).cast("B")
            want = header[name]["data_offsets"]  # type: ignore[index]
            if buf.nbytes != want[1] - want[0]:
                raise ValueError(f"{name}: got {buf.nbytes} bytes, expected {want[1] - want[0]}")
            f.write(buf)


@dataclass(frozen=True)
class Quantization:
    """Affine group quantization, MLX's format (`mx.quantize`, mode "affine"), which both
    backends read: each group of `group_size` consecutive inputs of a weight row is stored as
    q in [0, 2^bits) with one scale and one bias, w = scale * q + bias; q values are packed low
    bits first into little-endian uint32 words. A quantized `<prefix>.weight` (out, in) becomes

        <prefix>.weight  U32   (out, in * bits / 32)
        <prefix>.scales  float (out, in / group_size)
        <prefix>.biases  float (out, in / group_size)

    and the file's metadata holds `quantization` = this object as JSON. Biases of Linear layers
    and LayerNorm parameters stay float."""

    bits: int
    group_size: int
    mode: str = "affine"

    BITS = (4, 8)
    GROUP_SIZES = (32, 64, 128)

    def __post_init__(self) -> None:
        if self.bits not in self.BITS or self.group_size not in self.GROUP_SIZES:
            raise PolygptError(
                f"unsupported quantization: {self.bits} bits, group size {self.group_size} "
                f"(bits {self.BITS}, group sizes {self.GROUP_SIZES})"
            )
        if self.mode != "affine":
            raise PolygptError(f"unsupported quantization mode {self.mode!r} (affine)")

    @classmethod
    def from_json(cls, text: str) -> Quantization:
        try:
            d = json.loads(text)
            return cls(int(d["bits"]), int(d["group_size"]), str(d.get("mode", "affine")))
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError) as e:
            raise PolygptError(f"bad quantization metadata {_short(text)}: {e!r:.80}") from None

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def precision(self) -> str:
        return f"int{self.bits}"

    def packed_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[0], shape[1] * self.bits // 32)

    def group_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[0], shape[1] // self.group_size)


def quantizable(spec: ModelSpec, group_size: int) -> list[str]:
    """The weights a quantized checkpoint stores quantized: every 2-D one (Linear layers and
    both embeddings, as `mlx.nn.quantize` does) whose input size is a multiple of group_size."""
    return [n for n, s in spec.param_shapes().items() if len(s) == 2 and s[1] % group_size == 0]


def default_group_size(spec: ModelSpec) -> int:
    """MLX's default 64 where n_embd allows it, else 32 (every weight's input is C or 4C)."""
    for g in (64, 32):
        if spec.n_embd % g == 0:
            return g
    raise PolygptError(f"n_embd {spec.n_embd} is not a multiple of 32: cannot group-quantize")


def model_quantization(path: Path) -> Quantization | None:
    """The quantization a model file declares in its metadata, or None (a float file)."""
    _, meta = read_header(path)
    q = meta.get("quantization")
    return Quantization.from_json(q) if q else None


def check_model_file(path: Path, spec: ModelSpec) -> str:
    """Names, shapes and dtypes of a checkpoint against the spec, float or quantized (see
    Quantization); returns its precision: the float dtype ("F32", "F16", "BF16"), or "int8" /
    "int4" for a quantized file."""
    tensors, meta = read_header(path)
    quant = Quantization.from_json(meta["quantization"]) if meta.get("quantization") else None
    expected = spec.param_shapes()
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise PolygptError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    seen, dtypes, n_quantized = set(expected), set(), 0
    for name, shape in expected.items():
        dtype, got = tensors[name]
        if quant is not None and dtype == "U32":
            _check_quantized(path, tensors, name, shape, quant, dtypes)
            seen.update({name[: -len("weight")] + "scales", name[: -len("weight")] + "biases"})
            n_quantized += 1
            continue
        if dtype not in FLOAT_DTYPES:
            raise PolygptError(f"{path}: {name} has dtype {dtype}, expected one of {FLOAT_DTYPES}")
        if got != shape:
            raise PolygptError(f"{path}: {name} has shape {list(got)}, the spec says {list(shape)}")
        dtypes.add(dtype)
    extra = [n for n in tensors if n not in seen]
    if extra:
        raise PolygptError(f"{path}: unexpected tensor {extra[0]!r} for this spec")
    if len(dtypes) > 1:
        raise PolygptError(f"{path}: mixed dtypes {sorted(dtypes)}")
    if quant is not None:
        if not n_quantized:
            raise PolygptError(f"{path}: declares {quant.precision} but holds no quantized tensor")
        return quant.precision
    return dtypes.pop()


def _check_quantized(path, tensors, name, shape, quant: Quantization, dtypes: set) -> None:
    if not name.endswith(".weight") or len(shape) != 2:
        raise PolygptError(f"{path}: {name} is quantized, but only 2-D weights can be")
    if shape[1] % quant.group_size:
        raise PolygptError(
            f"{path}: {name} is quantized, but its {shape[1]} inputs are not a multiple of "
            f"group size {quant.group_size}"
        )
    got = tensors[name][1]
    if got != quant.packed_shape(shape):
        raise PolygptError(
            f"{path}: {name} has packed shape {list(got)}, expected "
            f"{list(quant.packed_shape(shape))} for {quant.bits}-bit weights of {list(shape)}"
        )
    prefix = name[: -len("weight")]
    for part in ("scales", "biases"):
        key = prefix + part
        if key not in tensors:
            raise PolygptError(f"{path}: quantized {name} has no {key!r}")
        dtype, s = tensors[key]
        if dtype not in FLOAT_DTYPES:
            raise PolygptError(f"{path}: {key} has dtype {dtype}, expected one of {FLOAT_DTYPES}")
        if s != quant.group_shape(shape):
            raise PolygptError(
                f"{path}: {key} has shape {list(s)}, expected {list(quant.group_shape(shape))}"
            )
        dtypes.add(dtype)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint directory's JSON files (tensors are loaded by a backend)."""
    p = Path(path)
    old = p.parent / f".{p.name}.old"
    if not p.exists() and old.is_dir():
        p = old  # a writer was killed between its two renames: this is the checkpoint (recover)
    if not p.is_dir():
        raise PolygptError(f"checkpoint directory {p} does not exist")
    cfg = read_json(p / CONFIG_FILE)
    if "spec" not in cfg or not isinstance(cfg["spec"], dict):
        raise PolygptError(f"{p / CONFIG_FILE} has no 'spec' object")
    spec = ModelSpec.from_dict(cfg["spec"])
    _check_config_types(p / CONFIG_FILE, cfg)
    tokenizer = read_json(p / TOKENIZER_FILE)
    if not (p / MODEL_FILE).exists():
        raise PolygptError(f"{p / MODEL_FILE} is missing")
    return Checkpoint(path=p, spec=spec, tokenizer=tokenizer, config=cfg)


# config.json fields other modules read, and the type each must have when present
_CONFIG_TYPES = {
    "step": int,
    "precision": str,
    "backend": str,
    "device": str,
    "metrics": dict,
    "run": dict,
    "train_state": dict,
}


def _check_config_types(path: Path, cfg: dict) -> None:
    for key, typ in _CONFIG_TYPES.items():
        if key not in cfg:
            continue
        v = cfg[key]
        if not isinstance(v, typ) or isinstance(v, bool) or (typ is int and v < 0):
            what = "a non-negative integer" if typ is int else f"a JSON {typ.__name__}"
            raise PolygptError(f"{path}: {key!r} must be {what}, got {_short(v)}")


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def write_checkpoint(
    out: str | Path,
    *,
    config: dict,
    tokenizer: dict,
    save_model: Callable[[Path], None],
    save_optimizer: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (see `atomic_directory`); run files
    (metrics.jsonl) are carried over from the directory being replaced.

    A failed write (disk full, no permission, a file size limit) is one PolygptError that
    says so and what `out` still holds: the previous checkpoint, untouched."""
    try:
        with atomic_directory(out, carry=_CARRIED) as tmp:
            save_model(tmp / MODEL_FILE)
            faults.point("model", tmp / MODEL_FILE)
            if save_optimizer is not None:
                save_optimizer(tmp / OPTIMIZER_FILE)
                faults.point("optimizer", tmp / OPTIMIZER_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
            faults.point("config", tmp / CONFIG_FILE)
            (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer, ensure_ascii=False))
    except (OSError, SafetensorError, RuntimeError) as e:
        # how the writers report a failed write: Python, safetensors, mlx respectively
        step = config.get("step")
        what = f"the step {step} checkpoint to {out}" if step is not None else f"{out}"
        raise PolygptError(_failed_write(out, what, e)) from None
    return Path(out)


def _failed_write(out: str | Path, what: str, e: BaseException) -> str:
    reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
    reason = reason.strip().splitlines()[0]
    try:
        prev = f"{out} still holds its step {read_checkpoint(out).step} checkpoint, unchanged"
    except PolygptError:
        prev = f"no checkpoint was saved in {out}"
    return f"could not write {what} ({reason}): {prev}"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is fsynced and renamed over
    `path` (readers see the old file or the new one, never half of one); on an exception it
    is removed and `path` is untouched."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: object, indent: int | None = 2) -> None:
    """Write `obj` as JSON atomically (see atomic_file)."""
    with atomic_file(path) as tmp:
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
        tmp.write_text(text + ("\n" if indent else ""), encoding="utf-8")


@contextmanager
def atomic_directory(out: str | Path, carry: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; on success it replaces `out`.

    The old directory is moved aside and the new one renamed into place, so a crash at any
    point leaves a complete directory (the old one, or the new one; `recover` puts the old one
    back if the crash fell between the two renames) and never a half-written file. On an
    exception the temporary is removed and `out` is untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        for name in carry:
            if (out / name).exists() and not (tmp / name).exists():
                shutil.copy2(out / name, tmp / name)
        _fsync_dir(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            faults.point("swap")
            os.replace(tmp, out)
            faults.point("swapped")
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover(out)  # a failure between the two renames: the old directory goes back
        raise


def _fsync_dir(d: Path) -> None:
    for f in d.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def recover(out: str | Path) -> None:
    """If a crash happened between the two renames of write_checkpoint, put the old one back."""
    out = Path(out)
    old = out.parent / f".{out.name}.old"
    if not out.exists() and old.exists():
        os.replace(old, out)


def append_metrics(out: str | Path, record: dict) -> None:
    p = Path(out) / METRICS_FILE
    try:
        with open(p, "a") as f:
            start = f.tell()
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise PolygptError(_failed_write(out, f"to {p}", e)) from None
    faults.point("metrics", p, start)


def read_metrics(out: str | Path) -> list[dict]:
    p = Path(out) / METRICS_FILE
    if not p.exists():
        return []
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise PolygptError(f"cannot read {p}: {e.strerror}") from None
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut short by a crash, or not ours
            if isinstance(row, dict):
                rows.append(row)
    return rows


def trim_metrics(out: str | Path, step: int) -> None:
    """Keep the records of steps up to `step` (the checkpoint a run resumes from): a killed
    run appended records past its last checkpoint, and maybe half a line, that the resumed run
    writes again."""
    p = Path(out) / METRICS_FILE
    if not p.exists():
        return
    keep = [r for r in read_metrics(out) if isinstance(r.get("step"), int) and r["step"] <= step]
    tmp = p.with_name(f".{METRICS_FILE}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, p)


def clean_stale(out: str | Path) -> list[Path]:
    """Remove what a killed writer of `out` left beside it: temporary directories, an old
    directory already replaced, and a metrics.jsonl that no checkpoint belongs to (a run killed
    before its first). Call it only while holding the run lock (rundir.run_lock): a live
    writer's temporary directory looks the same. Returns what was removed."""
    out = Path(out)
    recover(out)
    removed = []
    if out.parent.is_dir():
        stale = list(out.parent.glob(f".{out.name}.tmp-*"))
        old = out.parent / f".{out.name}.old"
        if out.exists() and old.exists():
            stale.append(old)
        for d in stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    orphan = out / METRICS_FILE
    if orphan.exists() and not (out / CONFIG_FILE).exists():
        orphan.unlink()
        removed.append(orphan)
    return removed


def dir_size(path: str | Path) -> dict[str, int]:
    p = Path(path)
    return {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()}
