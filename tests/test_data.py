import numpy as np
import pytest

from polygpt import data
from polygpt.errors import PolygptError


def test_shakespeare_split_sizes(char_data):
    train = data.load_split(char_data, "train")
    val = data.load_split(char_data, "val")
    assert len(train) == 180_906 and len(val) == 20_101  # 90% / 10% of the slice
    tok = data.load_tokenizer(char_data)
    assert tok.vocab_size == 65
    assert train.dtype == np.uint16 and int(train.max()) < 65
    assert tok.decode(train[:10].tolist()) == "First Citi"


def test_batches_are_seeded_and_shifted(char_data):
    arr = data.load_split(char_data, "train")
    x1, y1 = data.get_batch(arr, 16, 4, np.random.default_rng(7))
    x2, y2 = data.get_batch(arr, 16, 4, np.random.default_rng(7))
    assert x1.shape == (4, 16) and np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert np.array_equal(x1[:, 1:], y1[:, :-1])


def test_unknown_character_is_a_clear_error(char_data):
    tok = data.load_tokenizer(char_data)
    with pytest.raises(PolygptError, match="not in the model's vocabulary"):
        tok.encode("hello \u00e9")


def test_missing_input_and_data(tmp_path):
    with pytest.raises(PolygptError, match="not found"):
        data.prepare_shakespeare(tmp_path / "d", tmp_path / "nope.txt")
    with pytest.raises(PolygptError, match="polygpt prepare"):
        data.load_split(tmp_path, "train")


def _bpe_or_skip():
    pytest.importorskip("tiktoken")
    from polygpt import tokenizer as tk

    try:
        return tk.TiktokenTokenizer("gpt2")
    except PolygptError as e:
        pytest.skip(str(e))


def test_bpe_shakespeare_is_nanogpts_split(shakespeare_text, tmp_path):
    enc = _bpe_or_skip()
    res = data.prepare_bpe(shakespeare_text, tmp_path)
    # nanoGPT's split (its README: 301,966 / 36,059 on the whole corpus), here of the slice
    assert (res.train_tokens, res.val_tokens) == (55_133, 5_984)
    val_text = shakespeare_text[int(len(shakespeare_text) * 0.9) :]
    assert data.load_split(tmp_path, "val").tolist() == enc.encode(val_text)


def test_prepare_text_streams_in_chunks_like_one_shot(shakespeare_text, tmp_path):
    """Chunks 50x smaller than the corpus give the ids of encoding it whole (plus EOT)."""
    enc = _bpe_or_skip()
    src = tmp_path / "in.txt"
    src.write_text(shakespeare_text, encoding="utf-8")
    res = data.prepare_text([src], tmp_path / "d", "gpt2", chunk_bytes=20_000)
    ids = np.concatenate([data.load_split(tmp_path / "d", s) for s in ("train", "val")])
    assert ids.tolist() == enc.encode(shakespeare_text) + [50256]
    assert res.val_tokens / len(ids) == pytest.approx(0.1, abs=0.01)  # 10% of the bytes
    ch = data.prepare_text([src], tmp_path / "c", "char", val_fraction=0.1, chunk_bytes=7_777)
    assert (ch.train_tokens, ch.val_tokens, ch.vocab_size) == (180_906, 20_101, 65)


def test_prepare_text_several_files_and_bad_utf8(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("héllo wörld\n" * 50, encoding="utf-8")
    b.write_bytes(b"fine text\n" * 10 + b"caf\xe9\n")
    with pytest.raises(PolygptError, match=r"b\.txt: not UTF-8 text at byte 103"):
        data.prepare_text([a, b], tmp_path / "out", "char")
    assert not (tmp_path / "out" / "train.bin").exists()
    b.write_text("fine text\n" * 10, encoding="utf-8")
    # tiny chunks cut the two-byte characters: they are completed by the next read
    res = data.prepare_text([a, b], tmp_path / "out", "char", val_fraction=0.2, chunk_bytes=5)
    tok = data.load_tokenizer(tmp_path / "out")
    text = tok.decode(
        np.concatenate([data.load_split(tmp_path / "out", s) for s in ("train", "val")]).tolist()
    )
    assert text == "héllo wörld\n" * 50 + "fine text\n" * 10
    # val starts at the first character at or after byte 640 of the 800
    first_val = next(i for i in range(len(text)) if len(text[:i].encode()) >= 640)
    assert res.val_tokens == len(text) - first_val
    with pytest.raises(PolygptError, match="not found"):
        data.prepare_text([tmp_path / "nope.txt"], tmp_path / "out", "char")
    with pytest.raises(PolygptError, match="val-fraction"):
        data.prepare_text([a], tmp_path / "out", "char", val_fraction=1.0)


def test_prepare_text_cli(tmp_path):
    from click.testing import CliRunner

    from polygpt.cli import main

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff")
    r = CliRunner().invoke(main, ["prepare", "text", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "not UTF-8 text at byte 3" in r.output, r.output
    good = tmp_path / "good.txt"
    good.write_text("to be or not to be\n" * 20)
    r = CliRunner().invoke(
        main, ["prepare", "text", str(good), "--tokenizer", "char", "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 0 and "vocab 8" in r.output, r.output
