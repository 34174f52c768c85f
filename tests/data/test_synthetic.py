"""The synthetic arithmetic task: worked solutions, determinism, verl layout, corrupted attempts, scoring."""

import random

import pytest

from cipo.data.dataset import validate_row
from cipo.data.synthetic import (
    DATA_SOURCE,
    Difficulty,
    addition_solution,
    carry_columns,
    corrupt_solution,
    expressions,
    last_boxed,
    make_dataset,
    make_splits,
    score,
    solution_for,
    subtraction_solution,
)

DIFFICULTIES = [
    Difficulty(),
    Difficulty(digits=3, ops="+-"),
    Difficulty(digits=2, n_operands=3),
    Difficulty(digits=2, ops="-"),
]


def _check_columns(solution: str) -> None:
    """Every column ``a+b(+c)=s`` / ``a-b(-1)(+10)=d`` is arithmetically right."""
    for step in solution.rsplit(" \\boxed{", 1)[0].split(" "):
        lhs, rhs = step.split("=")
        assert eval(lhs) == int(rhs), step  # lhs is digits joined by + and -


def test_worked_solutions_examples():
    assert addition_solution([47, 85]) == "7+5=12 4+8+1=13 \\boxed{132}"
    assert addition_solution([5, 0]) == "5+0=5 \\boxed{5}"
    assert addition_solution([99, 99, 99]) == "9+9+9=27 9+9+9+2=29 \\boxed{297}"
    assert subtraction_solution(85, 47) == "5-7+10=8 8-4-1=3 \\boxed{38}"
    assert subtraction_solution(100, 1) == "0-1+10=9 0-1+10=9 1-1=0 \\boxed{99}"
    assert subtraction_solution(7, 7) == "7-7=0 \\boxed{0}"
    with pytest.raises(ValueError):
        subtraction_solution(1, 2)


@pytest.mark.parametrize("difficulty", DIFFICULTIES, ids=str)
def test_rows_are_correct_and_in_verl_layout(difficulty):
    rows = make_dataset(300, seed=1, difficulty=difficulty)
    assert len(expressions(rows)) == 300  # distinct problems
    for r in rows:
        assert r["data_source"] == DATA_SOURCE
        assert r["prompt"][0]["role"] == "user" and "\\boxed{}" in r["prompt"][0]["content"]
        gt = r["reward_model"]["ground_truth"]
        sol = r["extra_info"]["solution"]
        assert isinstance(gt, str) and int(gt) == eval(r["prompt"][0]["content"][8:].split("?")[0])
        assert score(sol, gt) == 1.0
        _check_columns(sol)
        assert solution_for({"prompt": r["prompt"]}) == sol  # re-derivable from the prompt alone
        assert validate_row(r, "x.jsonl", "line 1", None, True) == r
        assert all(len(str(x)) <= difficulty.digits for x in r["extra_info"]["operands"])


def test_deterministic_and_seeded():
    assert make_dataset(50, seed=3) == make_dataset(50, seed=3)
    assert make_dataset(50, seed=3) != make_dataset(50, seed=4)
    assert make_dataset(50, seed=3, difficulty=2) == make_dataset(50, seed=3, difficulty={"digits": 2})


def test_splits_disjoint():
    train, test = make_splits(500, 100, seed=0, difficulty=Difficulty(digits=2))
    assert len(train) == 500 and len(test) == 100
    assert not expressions(train) & expressions(test)
    with pytest.raises(ValueError, match="distinct"):
        make_dataset(200, difficulty=Difficulty(digits=1))  # only 100 one-digit sums exist


def test_difficulty_validation():
    with pytest.raises(ValueError):
        Difficulty(digits=0)
    with pytest.raises(ValueError):
        Difficulty(n_operands=1)
    with pytest.raises(ValueError):
        Difficulty(ops="*")
    with pytest.raises(TypeError):
        Difficulty.coerce("hard")


@pytest.mark.parametrize("difficulty", DIFFICULTIES, ids=str)
def test_corrupted_attempts_are_wrong_carry_slips(difficulty):
    rng = random.Random(0)
    rows = make_dataset(300, seed=2, difficulty=difficulty)
    for r in rows:
        bad = corrupt_solution(r, rng)
        assert score(bad, r["reward_model"]["ground_truth"]) == 0.0, (r["prompt"], bad)
        if carry_columns(r):
            _check_columns(bad)  # the slip is a forgotten carry; every written column is still consistent
            assert bad.count("+") + bad.count("-") < solution_for(r).count("+") + solution_for(r).count("-")


def test_carry_columns():
    assert carry_columns(make_row("47+85")) == [1]
    assert carry_columns(make_row("40+85")) == []
    assert carry_columns(make_row("100-1")) == [1, 2]
    assert carry_columns(make_row("999+1")) == [1, 2]


def make_row(expr: str) -> dict:
    return {"prompt": [{"role": "user", "content": f"What is {expr}? Put the answer in \\boxed{{}}."}],
            "reward_model": {"ground_truth": str(eval(expr))}}


@pytest.mark.parametrize(
    "response, truth, expected",
    [
        ("7+5=12 \\boxed{132}", "132", 1.0),
        ("\\boxed{131} then \\boxed{132}", "132", 1.0),  # the last box counts
        ("\\boxed{132} then \\boxed{131}", "132", 0.0),
        ("\\boxed{ 132 }", "132", 1.0),
        ("\\boxed{0132}", "132", 1.0),
        ("\\boxed{+7}", "7", 1.0),
        ("\\boxed{-7}", "-7", 1.0),
        ("\\boxed{13.2}", "132", 0.0),
        ("\\boxed{\\frac{1}{2}}", "132", 0.0),
        ("132", "132", 0.0),
        ("\\boxed{132", "132", 0.0),
        ("", "132", 0.0),
    ],
)
def test_score(response, truth, expected):
    assert score(response, truth) == expected


def test_last_boxed_nested():
    assert last_boxed("a \\boxed{x{y}z} b") == "x{y}z"
    assert last_boxed("none") is None
