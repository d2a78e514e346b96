"""Datasets: text -> token ids -> uint16 files, and NumPy batch sampling.

Any corpus (`prepare_text`) is read in chunks, so one bigger than memory streams through: a first
pass checks the UTF-8 (and collects a character vocabulary), a second tokenizes. BPE chunks are
cut only where GPT-2's pre-tokenizer splits anyway (a non-space followed by a space or newline),
so the ids equal those of encoding each file whole.

NumPy lives here (token data only). Batches are drawn from a seeded `numpy.random.Generator`
in the backend-neutral training loop, so torch and MLX see the very same batches and a resumed
run continues the same stream (the generator state is saved in the checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polygpt import atomic, jsonfile
from polygpt import tokenizer as tok
from polygpt.errors import PolygptError

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9
CHUNK_BYTES = 1 << 22  # text read (and tokenized) per step by prepare_text
_BPE_PIECE = 1 << 18  # characters per piece handed to tiktoken's thread pool
TOKENIZERS = ("gpt2", "char")


@dataclass
class PreparedData:
    dir: Path
    train_tokens: int
    val_tokens: int
    vocab_size: int


def _download(url: str, expected_sha256: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            raw = r.read()
    except OSError as e:
        raise PolygptError(f"could not download {url}: {e}; pass --input FILE instead") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_sha256:
        raise PolygptError(f"downloaded file has sha256 {digest}, expected {expected_sha256}")
    return raw.decode("utf-8")


def read_text(path: str | Path) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolygptError(f"input file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolygptError(f"cannot read {p} as UTF-8 text: {e}") from None


def prepare_char(text: str, out_dir: str | Path) -> PreparedData:
    """Character-level data: vocabulary of the distinct characters, 90/10 train/val split."""
    if len(text) < 2:
        raise PolygptError("input text is empty")
    t = tok.CharTokenizer.from_text(text)
    ids = np.array(t.encode(text), dtype=np.uint16)
    n = int(len(ids) * TRAIN_FRACTION)
    return _write(out_dir, t, ids[:n], ids[n:])


def prepare_bpe(text: str, out_dir: str | Path) -> PreparedData:
    """GPT-2 BPE, split as nanoGPT's data/shakespeare/prepare.py does: the *text* 90/10 by
    characters, then each part encoded with encode_ordinary (ids < 50257 fit in uint16)."""
    t = tok.TiktokenTokenizer("gpt2")
    n = int(len(text) * TRAIN_FRACTION)
    train, val = (np.array(t.encode(part), dtype=np.uint16) for part in (text[:n], text[n:]))
    return _write(out_dir, t, train, val)


def token_dtype(vocab_size: int) -> type:
    """uint16 as nanoGPT stores GPT-2 ids; uint32 only for a vocabulary that needs it."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _write(out_dir, t, train: np.ndarray, val: np.ndarray) -> PreparedData:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train.bin", train), ("val.bin", val)):
        with atomic.atomic_file(out / name) as tmp:
            arr.tofile(tmp)
    _write_tokenizer(out, t)
    return PreparedData(out, len(train), len(val), t.vocab_size)


def _write_tokenizer(out: Path, t) -> None:
    jsonfile.write_json(out / "tokenizer.json", t.to_dict(), indent=None)


def prepare_shakespeare(
    out_dir: str | Path, input_path: str | Path | None = None, level: str = "char"
) -> PreparedData:
    text = read_text(input_path) if input_path else _download(SHAKESPEARE_URL, SHAKESPEARE_SHA256)
    return prepare_char(text, out_dir) if level == "char" else prepare_bpe(text, out_dir)


def load_split(data_dir: str | Path, split: str) -> np.ndarray:
    """Memory-map one split's uint16 token file."""
    p = Path(data_dir) / f"{split}.bin"
    if not p.exists():
        raise PolygptError(f"no prepared data at {p}: run `polygpt prepare shakespeare-char` first")
    t = Path(data_dir) / "tokenizer.json"
    vocab = json.loads(t.read_text()).get("vocab_size", 0) if t.exists() else 0
    return np.memmap(p, dtype=token_dtype(vocab), mode="r")


# -- any corpus, streamed -------------------------------------------------------------------


def _read_utf8(path: Path, chunk_bytes: int) -> Iterator[tuple[str, int]]:
    """Decode a UTF-8 file chunk by chunk: yields (text, bytes it came from). Text is taken
    byte for byte (no newline translation). A bad byte is a PolygptError naming its offset."""
    offset, pending = 0, b""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; errors become one-line messages
    except FileNotFoundError:
        raise PolygptError(f"input file not found: {path}") from None
    except OSError as e:
        raise PolygptError(f"cannot read {path}: {e.strerror}") from None
    with f:
        while True:
            raw = f.read(chunk_bytes)
            buf = pending + raw
            if not buf:
                return
            try:
                text, pending = buf.decode("utf-8"), b""
            except UnicodeDecodeError as e:
                # a character cut by the chunk boundary is completed by the next read
                cut = raw and e.end == len(buf) and e.reason == "unexpected end of data"
                if not cut:
                    raise PolygptError(
                        f"{path}: not UTF-8 text at byte {offset + e.start} ({e.reason})"
                    ) from None
                text, pending = buf[: e.start].decode("utf-8"), buf[e.start :]
            used = len(buf) - len(pending)
            offset += used
            yield text, used


def _is_cut(text: str, i: int) -> bool:
    """GPT-2's pre-tokenizer ends a piece before text[i] (whitespace after a non-space)."""
    return 0 < i < len(text) and text[i] in " \n" and not text[i - 1].isspace()


def _last_cut(text: str, end: int | None = None) -> int:
    """The last BPE-safe split point of text[:end], 0 if none."""
    i = len(text) if end is None else end
    while True:
        i = max(text.rfind(" ", 0, i), text.rfind("\n", 0, i))
        if i <= 0:
            return 0
        if _is_cut(text, i):
            return i


def _next_cut(text: str, start: int) -> int | None:
    """The first BPE-safe split point at or after `start`, None if none."""
    i = start
    while i < len(text):
        if _is_cut(text, i):
            return i
        i += 1
    return None


class _Encoder:
    """Text -> ids for prepare_text: vectorised for characters, tiktoken's thread pool for BPE."""

    def __init__(self, t: tok.Tokenizer):
        self.t = t
        self.bpe = isinstance(t, tok.TiktokenTokenizer)
        if not self.bpe:
            self.codepoints = np.array([ord(c) for c in t.chars], dtype=np.uint32)  # sorted

    def __call__(self, text: str) -> np.ndarray:
        if not self.bpe:
            cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
            return np.searchsorted(self.codepoints, cps)
        pieces, i = [], 0
        while len(text) - i > _BPE_PIECE:
            j = _last_cut(text, i + _BPE_PIECE)
            if j <= i:
                break  # no safe split in this window: encode the rest as one piece
            pieces.append(text[i:j])
            i = j
        pieces.append(text[i:])
        ids = [x for ids in self.t.encode_batch(pieces) for x in ids]
        return np.array(ids, dtype=np.int64)

    def split_at(self, text: str, start: int) -> int | None:
        return _next_cut(text, start) if self.bpe else start

    def safe_end(self, text: str) -> int:
        return _last_cut(text) if self.bpe else len(text)


def prepare_text(
    paths: list[str | Path],
    out_dir: str | Path,
    tokenizer: str = "gpt2",
    val_fraction: float = 1 - TRAIN_FRACTION,
    chunk_bytes: int = CHUNK_BYTES,
    on_progress: Callable[[int, int], None] | None = None,
) -> PreparedData:
    """Tokenize text files (in order) into train.bin / val.bin / tokenizer.json.

    The last `val_fraction` of the corpus's bytes is the validation split (cut at the first
    token boundary after that mark, like nanoGPT's split of the text before encoding). With
    GPT-2 BPE each file ends with <|endoftext|>, as nanoGPT's openwebtext documents do.
    `on_progress(bytes_done, bytes_total)` is called as the files stream (two passes)."""
    files = _inputs(paths, tokenizer, val_fraction)
    total = sum(p.stat().st_size for p in files)
    advance = _progress(2 * total, on_progress)
    t = _vocabulary(files, tokenizer, chunk_bytes, advance)
    enc = _Encoder(t)
    eot = [t.eot] if enc.bpe else []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mark = int(total * (1 - val_fraction))  # corpus byte offset where val starts

    def encode(splits: _Splits) -> None:
        _encode(files, enc, eot, mark, chunk_bytes, splits, advance)

    counts = _write_splits(out, token_dtype(t.vocab_size), encode, val_fraction)
    _write_tokenizer(out, t)
    return PreparedData(out, counts["train"], counts["val"], t.vocab_size)


def _inputs(paths: list[str | Path], tokenizer: str, val_fraction: float) -> list[Path]:
    if tokenizer not in TOKENIZERS:
        raise PolygptError(f"unknown tokenizer {tokenizer!r} (choose from {', '.join(TOKENIZERS)})")
    if not 0 < val_fraction < 1:
        raise PolygptError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if not paths:
        raise PolygptError("no input files")
    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise PolygptError(f"input file not found: {p}")
    return files


def _progress(total: int, on_progress: Callable[[int, int], None] | None) -> Callable[[int], None]:
    """`advance(n)`: n more bytes of `total` streamed, told to on_progress."""
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_progress:
            on_progress(done, total)

    return advance


def _vocabulary(files: list[Path], tokenizer: str, chunk_bytes: int, advance) -> tok.Tokenizer:
    """Pass 1: every byte is valid UTF-8 (before anything is written); the character
    vocabulary."""
    chars: set[str] = set()
    for p in files:
        for text, n in _read_utf8(p, chunk_bytes):
            if tokenizer == "char":
                chars.update(text)
            advance(n)
    if tokenizer == "char" and len(chars) < 2:
        raise PolygptError("input text is empty")
    return (
        tok.TiktokenTokenizer("gpt2") if tokenizer == "gpt2" else tok.CharTokenizer(sorted(chars))
    )


class _Splits:
    """train.bin and val.bin being written: tokens go to `split`, train until the mark."""

    def __init__(self, files: dict, dtype) -> None:
        self.files, self.dtype, self.split = files, dtype, "train"
        self.counts = {"train": 0, "val": 0}

    def emit(self, ids) -> None:
        np.asarray(ids).astype(self.dtype).tofile(self.files[self.split])
        self.counts[self.split] += len(ids)


def _write_splits(out: Path, dtype, encode: Callable[[_Splits], None], val_fraction: float):
    """train.bin and val.bin as `encode` fills them, renamed into place only when both hold
    tokens; the token counts."""
    tmp = {s: out / f".{s}.bin.tmp" for s in ("train", "val")}
    try:
        with open(tmp["train"], "wb") as ft, open(tmp["val"], "wb") as fv:
            splits = _Splits({"train": ft, "val": fv}, dtype)
            encode(splits)
        counts = splits.counts
        if counts["val"] == 0 or counts["train"] == 0:
            raise PolygptError(
                f"the corpus is too small for a {val_fraction:g} validation split "
                f"({counts['train']} train / {counts['val']} val tokens)"
            )
        for s in ("train", "val"):
            os.replace(tmp[s], out / f"{s}.bin")
    finally:
        for f in tmp.values():
            f.unlink(missing_ok=True)
    return counts


def _encode(files, enc: _Encoder, eot: list, mark: int, chunk_bytes: int, splits: _Splits, advance):
    """Pass 2: the files' tokens, in order, train's up to the first token boundary after byte
    `mark` of the corpus and val's after it; each file ends with `eot`."""
    pos = 0
    for p in files:
        buf = ""
        for text, n in _read_utf8(p, chunk_bytes):
            buf += text
            pos += n
            if splits.split == "train" and pos >= mark:
                raw = buf.encode("utf-8")  # the chars after the mark (a cut one dropped)
                past = raw[max(0, len(raw) - (pos - mark)) :].decode("utf-8", "ignore")
                k = enc.split_at(buf, len(buf) - len(past))
                if k is not None:
                    splits.emit(enc(buf[:k]))
                    buf, splits.split = buf[k:], "val"
            k = enc.safe_end(buf)
            splits.emit(enc(buf[:k]))
            buf = buf[k:]
            advance(n)
        splits.emit(np.concatenate([enc(buf), eot]) if buf or eot else [])
        if splits.split == "train" and pos >= mark:
            splits.split = "val"


def load_tokenizer(data_dir: str | Path) -> tok.Tokenizer:
    p = Path(data_dir) / "tokenizer.json"
    if not p.exists():
        raise PolygptError(f"no tokenizer at {p}: run `polygpt prepare shakespeare-char` first")
    return tok.load(p)


def get_batch(
    data: np.ndarray, block_size: int, batch_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random windows (x, y) with y shifted by one; int32 ids, shape (B, T)."""
    if len(data) <= block_size:
        raise PolygptError(f"split has {len(data)} tokens, needs more than block_size={block_size}")
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    chunk = data[ix[:, None] + np.arange(block_size + 1)].astype(np.int32)  # (B, T+1)
    return chunk[:, :-1], chunk[:, 1:]
