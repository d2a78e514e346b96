"""Tokenizers: character level (the reference experiment) and GPT-2 BPE through tiktoken.

A tokenizer is described by a small JSON dict (stored as tokenizer.json next to the data and in
every checkpoint), so a checkpoint carries everything needed to turn text into ids and back.
"""

from __future__ import annotations

import json
from pathlib import Path

from polygpt.errors import PolygptError


class CharTokenizer:
    kind = "char"

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


class TiktokenTokenizer:
    kind = "tiktoken"

    def __init__(self, name: str = "gpt2"):
        try:
            import tiktoken
        except ImportError:
            raise PolygptError(
                "the GPT-2 BPE tokenizer needs tiktoken: pip install 'polygpt[bpe]'"
            ) from None
        self.name = name
        self.enc = tiktoken.get_encoding(name)

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

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
