"""Datasets: text -> token ids -> uint16 files, and NumPy batch sampling.

NumPy lives here (token data only). Batches are drawn from a seeded `numpy.random.Generator`
in the backend-neutral training loop, so torch and MLX see the very same batches and a resumed
run continues the same stream (the generator state is saved in the checkpoint).
"""

from __future__ import annotations

import hashlib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polygpt import tokenizer as tok
from polygpt import weights
from polygpt.errors import PolygptError

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9


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
    """GPT-2 BPE through tiktoken (ids < 50257 fit in uint16, as nanoGPT stores them)."""
    t = tok.TiktokenTokenizer("gpt2")
    ids = np.array(t.encode(text), dtype=np.uint16)
    n = int(len(ids) * TRAIN_FRACTION)
    return _write(out_dir, t, ids[:n], ids[n:])


def _write(out_dir, t, train: np.ndarray, val: np.ndarray) -> PreparedData:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train.bin", train), ("val.bin", val)):
        with weights.atomic_file(out / name) as tmp:
            arr.tofile(tmp)
    weights.write_json(out / "tokenizer.json", t.to_dict(), indent=None)
    return PreparedData(out, len(train), len(val), t.vocab_size)


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
    return np.memmap(p, dtype=np.uint16, mode="r")


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
