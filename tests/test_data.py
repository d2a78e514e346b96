import numpy as np
import pytest

from polygpt import data
from polygpt.errors import PolygptError


def test_shakespeare_split_sizes(char_data):
    train = data.load_split(char_data, "train")
    val = data.load_split(char_data, "val")
    assert len(train) == 1_003_854 and len(val) == 111_540
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
