"""The built-in procedurally generated tasks, selected by name (the trainer's ``data.synthetic_task``).

* ``arith`` — :mod:`cipo.data.synthetic`: terse column-wise sums for the tiny model warm-started in code;
  knobs :class:`cipo.data.synthetic.Difficulty`.
* ``chat_arith`` — :mod:`cipo.data.chat_arith`: chat-style arithmetic, word and comparison questions for a small
  real instruct model; knobs :class:`cipo.data.chat_arith.ChatArithDifficulty`.

``data.synthetic_difficulty`` holds the selected task's knobs (a mapping; empty = the task's defaults).
"""

from __future__ import annotations

from typing import Any

SYNTHETIC_TASKS = ("arith", "chat_arith")


def _check_task(task: str) -> None:
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"data.synthetic_task must be one of {list(SYNTHETIC_TASKS)}; got {task!r}")


def check_difficulty(task: str, difficulty: dict | None) -> None:
    """Validate ``difficulty`` (the knobs mapping) for ``task``; raises ValueError/TypeError naming the bad knob."""
    _check_task(task)
    if task == "chat_arith":
        from .chat_arith import ChatArithDifficulty

        ChatArithDifficulty.coerce(difficulty or None)
    else:
        from .synthetic import Difficulty

        Difficulty.coerce(difficulty or None)


def make_task_splits(task: str, n_train: int, n_test: int, seed: int = 0, difficulty: dict | None = None
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and held-out rows (verl layout, disjoint by problem) of the named task."""
    _check_task(task)
    if task == "chat_arith":
        from . import chat_arith

        return chat_arith.make_splits(n_train, n_test, seed=seed, difficulty=difficulty or None)
    from . import synthetic

    return synthetic.make_splits(n_train, n_test, seed=seed, difficulty=difficulty or None)
