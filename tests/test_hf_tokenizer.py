"""`convert --to hf` writes a tokenizer that transformers' AutoTokenizer loads and that encodes
exactly as polygpt's own: char level (every character of the corpus slice) and GPT-2 BPE (a
sample with Unicode, whitespace runs, contractions and the end-of-text string as text)."""

from __future__ import annotations

import json

import pytest

from polygpt import checkpoints, convert, hf_tokenizer
from polygpt import tokenizer as tok

from .conftest import requires

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@requires("torch")
def test_char_export_encodes_every_character_as_polygpt(random_ckpt, tmp_path, shakespeare_text):
    out = convert.to_hf(random_ckpt, tmp_path / "hf")
    ours = tok.from_dict(checkpoints.read(random_ckpt).tokenizer)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf.encode(shakespeare_text)
    assert ids == ours.encode(shakespeare_text)
    assert hf.decode(ids) == shakespeare_text
    assert [hf.encode(c) for c in ours.chars] == [[i] for i in range(ours.vocab_size)]
    assert hf.model_max_length == 32
    with pytest.raises(Exception, match="(?i)unk"):  # not in the vocabulary: an error, as ours
        hf.encode("café")
    assert (
        json.loads((out / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"]
        is False
    )


def test_gpt2_bpe_export_encodes_as_polygpt(tmp_path, shakespeare_text):
    try:
        ours = tok.TiktokenTokenizer()
    except Exception as e:  # tiktoken or the vocabulary file missing
        pytest.skip(str(e))
    hf_tokenizer.write(tmp_path, ours.to_dict(), 1024)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    sample = shakespeare_text[:20000] + (
        " héllo wörld 🙂 日本語  \n\n  tabs\t\there  it's we'LL 12345 3.14 a<|endoftext|>b  "
    )
    ids = hf.encode(sample)
    assert ids == ours.encode(sample)
    assert hf.decode(ids) == sample
    assert hf.eos_token_id == tok.GPT2_EOT and len(hf) == tok.GPT2_EOT + 1
