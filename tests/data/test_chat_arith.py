"""The chat arithmetic task for a small instruct model: generation, splits, knobs, answers, the lenient scoring rule
(pinned on SmolLM2-135M-Instruct-style rambling) and its selection from the trainer config. No model needed."""

from __future__ import annotations

import ast
import operator
import re

import pytest

from cipo.data.chat_arith import (
    DATA_SOURCE,
    INSTRUCTIONS,
    ChatArithDifficulty,
    ChatArithError,
    evaluate,
    make_dataset,
    make_splits,
    score,
)
from cipo.data.dataset import validate_row
from cipo.data.tasks import check_difficulty, make_task_splits

DIFFICULTIES = [
    {},
    {"kinds": ["expr", "word", "compare"], "digits": 1, "ops": "+-"},
    {"kinds": ["expr"], "digits": 2, "n_operands": 3, "ops": "+-*"},
    {"kinds": ["word"], "digits": 2, "ops": "+-*"},
    {"kinds": ["compare"], "digits": 2, "instruction": "boxed"},
]


# ----------------------------------------------------------------------------------------- independent answers

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _ast_value(node: ast.AST) -> int:
    """Python's own parse of the expression (precedence included), independent of chat_arith.evaluate."""
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_ast_value(node.left), _ast_value(node.right))
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    raise AssertionError(f"unexpected node {ast.dump(node)}")


def _expected(row: dict) -> int:
    """The answer re-derived from the *question text* alone."""
    q = row["extra_info"]["question"]
    nums = [int(x) for x in re.findall(r"\d+", q)]
    kind = row["extra_info"]["kind"]
    if kind == "expr":
        m = re.fullmatch(r"What is ([\d +\-*]+)\?", q)
        assert m, q
        return _ast_value(ast.parse(m.group(1), mode="eval").body)
    if kind == "compare":
        assert re.fullmatch(r"Which number is larger: \d+ or \d+\?", q), q
        assert nums[0] != nums[1], q
        return max(nums)
    assert len(nums) == 2 and all(x >= 1 for x in nums), q
    if " more." in q:
        return nums[0] + nums[1]
    if " gives " in q:
        return nums[0] - nums[1]
    assert " in each box" in q, q
    return nums[0] * nums[1]


@pytest.mark.parametrize("difficulty", DIFFICULTIES, ids=str)
def test_answers_correct_by_construction_and_verl_layout(difficulty):
    train, test = make_splits(300, 40, seed=3, difficulty=difficulty)
    d = ChatArithDifficulty.coerce(difficulty or None)
    for row in train + test:
        gt = row["reward_model"]["ground_truth"]
        assert int(gt) == _expected(row) >= 0, row["extra_info"]
        assert row["data_source"] == DATA_SOURCE and row["reward_model"]["style"] == "rule"
        msgs = row["prompt"]
        assert [m["role"] for m in msgs] == ["user"]
        assert msgs[0]["content"].startswith(row["extra_info"]["question"])
        assert msgs[0]["content"].endswith(INSTRUCTIONS[d.instruction])
        assert row["extra_info"]["kind"] in d.kinds
        assert validate_row(row, "mem", "row", None, True)["reward_model"]["ground_truth"] == gt
        digits = [len(x) for x in re.findall(r"\d+", row["extra_info"]["question"])]
        assert max(digits) <= d.digits


def test_every_kind_and_operator_appears():
    rows = make_dataset(400, 0, {"kinds": ["expr", "word", "compare"], "ops": "+-*"})
    assert {r["extra_info"]["kind"] for r in rows} == {"expr", "word", "compare"}
    exprs = " ".join(r["extra_info"]["expr"] for r in rows)
    assert all(op in exprs for op in "+-*")


def test_evaluate_precedence_and_order():
    assert evaluate("7+2*3") == 13
    assert evaluate("9-2-3") == 4  # left to right
    assert evaluate("2*3*4-5+6") == 25
    assert evaluate("12") == 12


# ------------------------------------------------------------------------------------------------- splits, seed

@pytest.mark.parametrize("difficulty", DIFFICULTIES, ids=str)
def test_deterministic_in_seed(difficulty):
    assert make_splits(50, 20, seed=1, difficulty=difficulty) == make_splits(50, 20, seed=1, difficulty=difficulty)
    assert make_splits(50, 20, seed=1, difficulty=difficulty) != make_splits(50, 20, seed=2, difficulty=difficulty)


def problem_keys(rows: list[dict]) -> set[str]:
    """The problem keys (``extra_info.key``) of chat-arith rows."""
    return {r["extra_info"]["key"] for r in rows}


@pytest.mark.parametrize("difficulty", DIFFICULTIES, ids=str)
def test_splits_disjoint_by_problem(difficulty):
    train, test = make_splits(2000, 40, seed=0, difficulty=difficulty)
    assert not problem_keys(train) & problem_keys(test)
    assert len(problem_keys(test)) == len(test)  # held-out problems are distinct
    # Disjoint for any sizes: a larger training split never reaches into the held-out part.
    bigger_train = make_dataset(5000, 0, difficulty, split="train")
    assert not problem_keys(bigger_train) & problem_keys(test)


def test_word_problems_with_the_same_numbers_are_the_same_problem():
    rows = make_dataset(500, 0, {"kinds": ["word"], "ops": "+"})
    by_key: dict[str, set[str]] = {}
    for r in rows:
        by_key.setdefault(r["extra_info"]["key"], set()).add(r["extra_info"]["question"])
    assert any(len(qs) > 1 for qs in by_key.values())  # names/objects vary, the key (numbers) does not
    compare = make_dataset(300, 0, {"kinds": ["compare"]})
    assert all(re.fullmatch(r"compare:(\d+),(\d+)", r["extra_info"]["key"]) for r in compare)
    keys = [tuple(map(int, r["extra_info"]["key"][8:].split(","))) for r in compare]
    assert all(a < b for a, b in keys)  # "3 or 7" and "7 or 3" share a key


def test_held_out_split_is_a_prefix_of_a_larger_one():
    # The evaluator draws the run's test split with another size; its rows must be the run's rows.
    d = DIFFICULTIES[1]
    assert make_dataset(30, 5, d, split="test") == make_dataset(60, 5, d, split="test")[:30]
    assert make_splits(100, 30, 5, d)[1] == make_splits(7, 30, 5, d)[1]


def test_held_out_part_is_about_heldout_fraction_of_the_space():
    from cipo.data.chat_arith import is_heldout

    keys = [f"expr:{a}+{b}" for a in range(100) for b in range(100)]
    share = sum(is_heldout(k, 0, 0.2) for k in keys) / len(keys)
    assert 0.18 < share < 0.22


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_defaults_fill_the_trainers_default_split_sizes(seed):
    # data.synthetic_train_size / synthetic_val_size default to 2000 / 64: the default knobs must fill both.
    train, test = make_splits(2000, 64, seed=seed)
    assert len(train) == 2000 and len(problem_keys(test)) == 64


def test_too_small_held_out_space_is_a_clear_error():
    # One-digit sums: 100 problems, ~20 of them held out.
    with pytest.raises(ChatArithError, match=r"could only draw \d+ of 64 distinct held-out.*synthetic_val_size"):
        make_splits(10, 64, seed=0, difficulty={"kinds": ["expr"], "digits": 1})


# ---------------------------------------------------------------------------------------------------- knobs

@pytest.mark.parametrize("knobs, message", [
    ({"kinds": []}, r"kinds must be a non-empty list"),
    ({"kinds": ["expr", "riddle"]}, r"unknown kind\(s\) \['riddle'\]"),
    ({"kinds": [3]}, r"kinds must be a non-empty list"),
    ({"digits": 0}, r"digits must be an int in \[1, 6\]; got 0"),
    ({"digits": 7}, r"digits must be an int in \[1, 6\]"),
    ({"digits": 1.5}, r"digits must be an int"),
    ({"digits": True}, r"digits must be an int"),
    ({"n_operands": 1}, r"n_operands must be an int in \[2, 5\]"),
    ({"ops": ""}, r"ops must be a string of distinct operators"),
    ({"ops": "+/"}, r"ops must be a string of distinct operators"),
    ({"ops": "++"}, r"ops must be a string of distinct operators"),
    ({"instruction": "json"}, r"instruction must be one of \['none', 'boxed', 'answer', 'number'\]"),
    ({"heldout_fraction": 0}, r"heldout_fraction must be a number in \(0, 1\)"),
    ({"heldout_fraction": 1.0}, r"heldout_fraction must be a number in \(0, 1\)"),
    ({"digit": 2}, r"unknown key\(s\) \['digit'\] for synthetic_task chat_arith"),
])
def test_bad_knobs_name_the_knob(knobs, message):
    with pytest.raises(ChatArithError, match=message):
        ChatArithDifficulty.coerce(knobs)


def test_bad_sizes_and_split():
    with pytest.raises(ChatArithError, match="split must be 'train' or 'test'"):
        make_dataset(3, split="val")
    with pytest.raises(ChatArithError, match="split size must be an int >= 0"):
        make_dataset(-1)
    with pytest.raises(ChatArithError, match="must be a mapping"):
        ChatArithDifficulty.coerce(3)


def test_kinds_accepts_a_single_string_and_lists():
    assert ChatArithDifficulty.coerce({"kinds": "compare"}).kinds == ("compare",)
    assert ChatArithDifficulty.coerce({"kinds": ["expr", "word"]}).kinds == ("expr", "word")


# ------------------------------------------------------------------------------------------------ the reward

# Realistic SmolLM2-135M-Instruct-style responses (its rambling style) and the reward the trainer gives them.
@pytest.mark.parametrize("response, gt, expected", [
    ("To compute 5 + 2, we need to break it down into smaller steps. First, 5 + 2 = 7. So the answer is 7.", "7", 1),
    ("To compute 5 + 2, we need to break it down. 5 + 2 = 7. Then 7 + 1 = 8", "7", 0),  # the last number counts
    ("5 + 2 = 7. Then 7 + 1 = 8", "8", 1),
    ("Let's add the numbers: 5 + 2 = 7.\n\nAnswer: 7", "7", 1),
    ("Step 1: 7 + 9 = 16\nStep 2: check 16 - 9 = 7\n**Answer: 16**", "16", 1),
    ("The answer is 7 apples.", "7", 1),
    ("Tom has 7 apples and buys 5 more, so Tom has 12 apples now.", "12", 1),
    ("So the final answer is \\boxed{12}.", "12", 1),
    ("First 3 + 4 = \\boxed{7}, and then we add 1 to get 8.", "7", 1),  # a \boxed wins over later numbers
    ("The answer is 12.\nLet me double check: 12 - 5 = 7.", "12", 1),  # "answer is" beats the last number
    # Known gap of MathVerifier's answer phrase: after a digit, ". " does not end the sentence (decimal guard), so
    # the snippet runs on to the end of the line and does not parse as 12.
    ("The answer is 12. Let me double check: 7 + 5 = 12, 12 - 5 = 7.", "12", 0),
    ("Answer: 12\nExplanation: 7 + 5 makes 13 when you count the carry.", "12", 1),
    ("The larger number is 52.", "52", 1),
    ("52 is larger than 47.", "52", 0),  # known gap: last number 47 (the "answer" instruction avoids it)
    ("I'm sorry, I can't help with that.", "7", 0),
    ("The answer is seven.", "7", 0),
    ("", "7", 0),
])
def test_lenient_final_answer_rule(response, gt, expected):
    assert score(response, gt) == expected


# ------------------------------------------------------------------------------------------ task selection

def test_task_registry_dispatch_and_errors():
    chat = make_task_splits("chat_arith", 5, 3, seed=0, difficulty={"digits": 2})
    assert all(r["data_source"] == DATA_SOURCE for r in chat[0] + chat[1])
    arith = make_task_splits("arith", 5, 3, seed=0, difficulty={"digits": 2})
    assert all(r["data_source"] == "synthetic_arith" for r in arith[0] + arith[1])
    with pytest.raises(ValueError, match=r"synthetic_task must be one of \['arith', 'chat_arith'\]; got 'gsm8k'"):
        make_task_splits("gsm8k", 5, 3)
    check_difficulty("chat_arith", {"kinds": ["word"]})
    with pytest.raises(ValueError, match="unknown key"):
        check_difficulty("chat_arith", {"n_operands": 2, "digits": 2, "carry": 1})


def test_trainer_config_selects_the_task():
    from cipo.trainer.config import load_config
    from cipo.trainer.config_io import ConfigError
    from cipo.trainer.setup import load_data

    cfg = load_config(None, ["data.synthetic_task=chat_arith", "warmstart.max_steps=0",
                             "data.synthetic_train_size=50", "data.synthetic_val_size=10",
                             "data.synthetic_difficulty={kinds: [expr, compare], digits: 2}"])
    train, val = load_data(cfg)
    assert len(train) == 50 and len(val) == 10
    assert {r["data_source"] for r in train + val} == {DATA_SOURCE}
    assert {r["extra_info"]["kind"] for r in train} <= {"expr", "compare"}
    assert load_config(None).data.synthetic_task == "arith"
    with pytest.raises(ConfigError, match=r"data.synthetic_task must be one of \['arith', 'chat_arith'\]"):
        load_config(None, ["data.synthetic_task=gsm8k"])
    with pytest.raises(ConfigError, match=r"data.synthetic_difficulty \(data.synthetic_task chat_arith\).*kinds"):
        load_config(None, ["data.synthetic_task=chat_arith", "warmstart.max_steps=0",
                           "data.synthetic_difficulty={kinds: [poem]}"])
    with pytest.raises(ConfigError, match="no worked solutions for the tiny model's warm start"):
        load_config(None, ["data.synthetic_task=chat_arith", "warmstart.max_steps=50"])
