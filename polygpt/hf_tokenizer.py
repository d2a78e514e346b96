"""polygpt's tokenizers as Hugging Face `tokenizer.json` files (for `convert --to hf`).

Built offline with the `tokenizers` library from what polygpt ships, so that
`transformers.AutoTokenizer` (and what reads HF directories: lm-eval, mlx-lm, llama.cpp's
converter) encodes and decodes exactly as polygpt does:

- char level: a WordLevel model over the characters, every character its own pre-token, tokens
  joined back with nothing between them (`Fuse`); a character outside the vocabulary is an
  error, as in polygpt.
- GPT-2 BPE: byte-level BPE with GPT-2's pre-tokenizing regex (`ByteLevel(use_regex=True)` is
  tiktoken's r50k pattern), the vocabulary from the checksummed gpt2.tiktoken (ids = ranks),
  and the merges recovered from the ranks the way transformers' TikTokenConverter does.
  `<|endoftext|>` is a special token, as in GPT-2's own tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

from polygpt import tokenizer as tok
from polygpt.errors import PolygptError

UNK = "<unk>"  # WordLevel needs a name for unknown input; it is not in the vocabulary


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise PolygptError(
            "writing a Hugging Face tokenizer needs tokenizers: pip install 'polygpt[hf]'"
        ) from None
    return tokenizers


def char_tokenizer(chars: list[str]):
    """A tokenizers.Tokenizer that maps each character to its index in `chars`."""
    tk = _tokenizers()
    from tokenizers import decoders, models, pre_tokenizers

    t = tk.Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=UNK))
    # every character (newlines too) is a pre-token of its own
    t.pre_tokenizer = pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return t


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges from tiktoken ranks: each multi-byte token is made from every split of it
    into two lower-ranked tokens, ordered by the token's rank (then the halves' ranks), so the
    lowest-ranked pair merges first, as tiktoken merges."""
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = [
            (a, b) for a, b in pairs if ranks.get(a, rank) < rank and ranks.get(b, rank) < rank
        ]
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges.extend((rank, a, b) for a, b in pairs)
    merges.sort(key=lambda m: m[0])
    return [(a, b) for _, a, b in merges]


def gpt2_tokenizer():
    """GPT-2's byte-level BPE as a tokenizers.Tokenizer, from polygpt's local vocabulary."""
    tk = _tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, processors

    ranks = tok._gpt2_ranks()
    table = tok.byte_chars()

    def spell(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {spell(t): r for t, r in ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in _merges(ranks)]
    t = tk.Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    t.post_processor = processors.ByteLevel(trim_offsets=False)
    t.add_special_tokens([tk.AddedToken("<|endoftext|>", special=True, normalized=False)])
    return t


def write(out: Path, tokenizer: dict, block_size: int) -> None:
    """tokenizer.json and tokenizer_config.json for polygpt's tokenizer description."""
    kind = tokenizer.get("type")
    if kind == "char":
        t = char_tokenizer(tokenizer["chars"])
        special = {}
    elif kind == "tiktoken":
        t = gpt2_tokenizer()
        eot = "<|endoftext|>"
        # split_special_tokens: "<|endoftext|>" in a text is text (tiktoken's encode_ordinary,
        # what polygpt encodes with); the token itself stays the end-of-text id
        special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
        special["split_special_tokens"] = True
    else:
        raise PolygptError(f"no Hugging Face tokenizer for a {kind!r} tokenizer")
    t.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
