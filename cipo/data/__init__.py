"""Datasets: the synthetic verifiable task and a verl-layout JSONL/parquet loader."""

from cipo.data.dataset import DatasetError, chat_prompt_ids, load_dataset, load_jsonl, load_parquet, save_jsonl
from cipo.data.synthetic import (
    DATA_SOURCE,
    Difficulty,
    corrupt_solution,
    make_dataset,
    make_splits,
    score,
    solution_for,
)

__all__ = [
    "DATA_SOURCE",
    "DatasetError",
    "chat_prompt_ids",
    "Difficulty",
    "corrupt_solution",
    "load_dataset",
    "load_jsonl",
    "load_parquet",
    "make_dataset",
    "make_splits",
    "save_jsonl",
    "score",
    "solution_for",
]
