"""verl-layout dataset loading: normalisation, and errors that name the file and the row."""

import json
import sys

import pytest

from cipo.data.dataset import DatasetError, load_dataset, save_jsonl
from cipo.data.synthetic import make_dataset

GOOD = {"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2"}, "data_source": "t"}


def write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_roundtrip_synthetic(tmp_path):
    rows = make_dataset(20, seed=0)
    path = save_jsonl(rows, tmp_path / "sub" / "train.jsonl")
    assert load_dataset(path) == rows
    assert load_dataset(path, limit=5) == rows[:5]


def test_normalisation(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        {"prompt": "2+2?", "reward_model": {"ground_truth": 4}, "data_source": "t", "extra_info": {"k": 1}},
        "",
        {"prompt": "3.0?", "reward_model": {"ground_truth": 3.0, "style": "rule"}},
    ])
    rows = load_dataset(path, default_data_source="fallback")
    assert rows[0]["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert rows[0]["reward_model"]["ground_truth"] == "4" and rows[0]["extra_info"] == {"k": 1}
    assert rows[1]["reward_model"] == {"ground_truth": "3", "style": "rule"}
    assert rows[1]["data_source"] == "fallback"
    assert load_dataset(path, default_data_source="f", as_chat=False)[0]["prompt"] == "2+2?"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "line 3: invalid JSON"),
        ([1, 2], "line 3: expected an object"),
        ({"reward_model": {"ground_truth": "1"}, "data_source": "t"}, "line 3: missing column 'prompt'"),
        ({"prompt": 5, "reward_model": {"ground_truth": "1"}, "data_source": "t"}, "line 3: 'prompt' must be"),
        ({"prompt": [], "reward_model": {"ground_truth": "1"}, "data_source": "t"}, "line 3: 'prompt' is an empty"),
        ({"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}, "data_source": "t"},
         r"line 3: 'prompt\[0\]' must be"),
        ({"prompt": "p", "data_source": "t"}, "line 3: missing column 'reward_model'"),
        ({"prompt": "p", "reward_model": "1", "data_source": "t"}, "line 3: 'reward_model' must be"),
        ({"prompt": "p", "reward_model": {"style": "rule"}, "data_source": "t"},
         "line 3: missing 'reward_model.ground_truth'"),
        ({"prompt": "p", "reward_model": {"ground_truth": {"a": 1}}, "data_source": "t"},
         "line 3: 'reward_model.ground_truth' must be"),
        ({"prompt": "p", "reward_model": {"ground_truth": True}, "data_source": "t"}, "ground_truth' must be"),
        ({"prompt": "p", "reward_model": {"ground_truth": "1"}}, "line 3: missing column 'data_source'"),
        ({"prompt": "p", "reward_model": {"ground_truth": "1"}, "data_source": 3}, "line 3: 'data_source' must"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DatasetError, match=message) as err:
        load_dataset(path)
    assert str(path) in str(err.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unsupported dataset format"):
        load_dataset(tmp_path / "d.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_dataset(tmp_path / "empty.jsonl")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_dataset(path)


def test_parquet_roundtrip_and_row_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = make_dataset(10, seed=0)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert load_dataset(tmp_path / "d.parquet") == rows
    bad = [dict(GOOD), dict(GOOD, reward_model={"ground_truth": None})]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DatasetError, match=r"bad.parquet: row 1: missing 'reward_model.ground_truth'"):
        load_dataset(tmp_path / "bad.parquet")
