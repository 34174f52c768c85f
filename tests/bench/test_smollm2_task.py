"""The correction prompt of the SmolLM2 task benchmark (``bench/smollm2_task.py``); no model needed."""

from __future__ import annotations

from bench.smollm2_task import correction_prompt
from cipo.data.chat_arith import make_dataset


def test_correction_prompt_layout():
    row = make_dataset(1, 0)[0]
    msgs = correction_prompt(row, "  5 + 2 = 8. Answer: 8\n")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0] == row["prompt"][0] and msgs[1]["content"] == "5 + 2 = 8. Answer: 8"
    assert msgs[2]["content"] == "Solve the problem again."
