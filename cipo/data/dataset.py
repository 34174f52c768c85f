"""Load RL prompt datasets in verl's column layout from JSONL or parquet.

Each row needs:

* ``prompt`` — a chat message list ``[{"role": "user", "content": "..."}, ...]`` or a plain string;
* ``reward_model`` — a mapping with ``ground_truth`` (a string, a number, or a list of strings);
* ``data_source`` — a string naming the task (selects the verifier); may be filled by ``default_data_source``.

Other columns (``extra_info``, ``ability``, ...) are kept as they are. A malformed row raises
:class:`DatasetError` naming the file and the row (``line N`` in JSONL, counted from 1 including blank lines;
``row N`` in parquet, counted from 0 as pandas/pyarrow do).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


class DatasetError(ValueError):
    """A dataset file or one of its rows is malformed; the message names the file and the row."""


def _fail(path: Path, where: str, msg: str) -> DatasetError:
    return DatasetError(f"{path}: {where}: {msg}")


def validate_row(row: Any, path: Path, where: str, default_data_source: str | None, as_chat: bool) -> dict:
    """Check one row and return it normalised (string prompts become one user message when ``as_chat``;
    numeric ground truths become strings). ``where`` is e.g. ``"line 3"``; errors are :class:`DatasetError`."""
    if not isinstance(row, dict):
        raise _fail(path, where, f"expected an object with columns prompt/reward_model/data_source, got "
                                 f"{type(row).__name__}")
    out = dict(row)
    if "prompt" not in row or row["prompt"] is None:
        raise _fail(path, where, f"missing column 'prompt' (columns present: {sorted(row)})")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise _fail(path, where, "'prompt' is an empty string")
        out["prompt"] = [{"role": "user", "content": prompt}] if as_chat else prompt
    elif isinstance(prompt, list):
        if not prompt:
            raise _fail(path, where, "'prompt' is an empty message list")
        msgs = []
        for j, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise _fail(path, where, f"'prompt[{j}]' must be an object with string 'role' and 'content', "
                                         f"got {m!r:.80}")
            msgs.append({"role": m["role"], "content": m["content"]})
        out["prompt"] = msgs
    else:
        raise _fail(path, where, f"'prompt' must be a chat message list or a string, got {type(prompt).__name__}")

    rm = row.get("reward_model")
    if rm is None:
        raise _fail(path, where, f"missing column 'reward_model' (columns present: {sorted(row)})")
    if not isinstance(rm, dict):
        raise _fail(path, where, f"'reward_model' must be an object with 'ground_truth', got {type(rm).__name__}")
    if "ground_truth" not in rm or rm["ground_truth"] is None:
        raise _fail(path, where, f"missing 'reward_model.ground_truth' (keys present: {sorted(rm)})")
    gt = rm["ground_truth"]
    if isinstance(gt, bool) or not isinstance(gt, (str, int, float, list)):
        raise _fail(path, where, f"'reward_model.ground_truth' must be a string, a number or a list of strings, "
                                 f"got {type(gt).__name__}")
    if isinstance(gt, list) and not all(isinstance(g, str) for g in gt):
        raise _fail(path, where, "'reward_model.ground_truth' list must hold strings only")
    out["reward_model"] = dict(rm, ground_truth=gt if isinstance(gt, (str, list)) else _num_str(gt))

    ds = row.get("data_source", default_data_source)
    if ds is None:
        raise _fail(path, where, "missing column 'data_source' (or pass default_data_source=...)")
    if not isinstance(ds, str) or not ds:
        raise _fail(path, where, f"'data_source' must be a non-empty string, got {ds!r:.80}")
    out["data_source"] = ds
    return out


def _num_str(x: int | float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def load_jsonl(path: str | os.PathLike, default_data_source: str | None = None, as_chat: bool = True) -> list[dict]:
    """Rows of a JSONL file (one JSON object per line; blank lines skipped)."""
    path = Path(path)
    rows = []
    with path.open("rb") as f:  # bytes: a non-UTF-8 line is reported with its number, not as a bare decode error
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _fail(path, f"line {lineno}", f"not UTF-8 (byte {raw[exc.start]:#04x} at column "
                                                    f"{exc.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _fail(path, f"line {lineno}", f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            rows.append(validate_row(obj, path, f"line {lineno}", default_data_source, as_chat))
    return rows


def load_parquet(path: str | os.PathLike, default_data_source: str | None = None, as_chat: bool = True) -> list[dict]:
    """Rows of a parquet file (needs pyarrow)."""
    path = Path(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or convert the file to JSONL)") from None
    table = pq.read_table(path)
    return [
        validate_row(obj, path, f"row {i}", default_data_source, as_chat) for i, obj in enumerate(table.to_pylist())
    ]


def load_dataset(
    path: str | os.PathLike, default_data_source: str | None = None, as_chat: bool = True, limit: int | None = None
) -> list[dict]:
    """Load a verl-layout dataset from ``.jsonl`` / ``.ndjson`` or ``.parquet`` / ``.pq``.

    Args:
        default_data_source: used for rows without ``data_source`` (otherwise such rows are an error).
        as_chat: turn string prompts into ``[{"role": "user", "content": prompt}]``.
        limit: keep only the first ``limit`` rows.
    Raises:
        FileNotFoundError, DatasetError (malformed file or row; names the file and row), ImportError (parquet
        without pyarrow).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = load_jsonl(path, default_data_source, as_chat)
    elif suffix in PARQUET_SUFFIXES:
        rows = load_parquet(path, default_data_source, as_chat)
    else:
        raise DatasetError(f"{path}: unsupported dataset format {suffix!r}; use one of "
                           f"{JSONL_SUFFIXES + PARQUET_SUFFIXES}")
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows[:limit] if limit is not None else rows


def chat_prompt_ids(tokenizer, prompt: Sequence[dict] | str) -> list[int]:
    """Token ids of a row's prompt rendered with the tokenizer's chat template, assistant turn opened
    (``add_generation_prompt=True``), no extra special tokens. A plain string is one user message."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def save_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSONL (creating parent directories). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
