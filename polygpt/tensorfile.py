"""safetensors files read and written without a framework and without a memory map.

A header is read without loading a tensor and without executing anything. A model is read
tensor by tensor, or a tensor by ranges of rows, with plain reads into buffers the caller
allocates at the precision it computes in (`TensorFile`); a file is written tensor by tensor
(`write_tensors`). Nothing is memory-mapped (a mapped file's touched pages count as the
process's memory until the whole mapping goes), so loading or converting a model never holds a
second full copy of its weights.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from polygpt.errors import PolygptError

FLOAT_DTYPES = ("F32", "F16", "BF16")
# bytes per element of the safetensors dtypes polygpt reads and writes
ITEMSIZE = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


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
