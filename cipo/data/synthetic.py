"""A synthetic verifiable task: multi-digit addition / subtraction with a short column-wise worked solution.

Prompt (user message): ``What is 47+85? Put the answer in \\boxed{}.``
Worked solution (the warm-start target, ~4 characters per column):

    ``7+5=12 4+8+1=13 \\boxed{132}``        (addition: digits of one column, plus the carry, right to left)
    ``5-7+10=8 8-4-1=3 \\boxed{38}``        (subtraction, a >= b: "+10" borrows, "-1" pays the borrow back)

Columns go right to left and the last column's sum is written whole (its leading digits lead the answer). A
model that slips (a forgotten carry, a misread digit, a wrong column sum) leaves the slip visible in the
trajectory, where a correction pass can spot and redo it.

Rows follow verl's layout: ``{"prompt": [{"role": "user", "content": ...}], "reward_model": {"ground_truth": "132",
"style": "rule"}, "data_source": "synthetic_arith", "extra_info": {...}}``.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

DATA_SOURCE = "synthetic_arith"
PROMPT_FORMAT = "What is {expr}? Put the answer in \\boxed{{}}."
_PROMPT_RE = re.compile(r"What is ([0-9+\-]+)\?")


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the task.

    Attributes:
        digits: maximum digits per operand (operands are uniform in ``[0, 10**digits)``).
        n_operands: operands per addition (subtraction always has 2).
        ops: "+" (addition only), "-" (subtraction only) or "+-" (each problem picks one, 50/50).
    """

    digits: int = 2
    n_operands: int = 2
    ops: str = "+"

    def __post_init__(self) -> None:
        if not isinstance(self.digits, int) or not 1 <= self.digits <= 9:
            raise ValueError(f"Difficulty.digits must be an int in [1, 9]; got {self.digits!r}")
        if not isinstance(self.n_operands, int) or self.n_operands < 2:
            raise ValueError(f"Difficulty.n_operands must be an int >= 2; got {self.n_operands!r}")
        if self.ops not in ("+", "-", "+-"):
            raise ValueError(f"Difficulty.ops must be '+', '-' or '+-'; got {self.ops!r}")

    @classmethod
    def coerce(cls, value: Difficulty | dict | int | None) -> Difficulty:
        """Accept a Difficulty, a dict of its fields, an int (= digits) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, Difficulty):
            return value
        if isinstance(value, int):
            return cls(digits=value)
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"difficulty must be a Difficulty, dict, int or None; got {type(value).__name__}")


def _digits_rev(x: int) -> list[int]:
    return [int(c) for c in reversed(str(x))]


def addition_solution(operands: list[int], drop_carry_at: int | None = None) -> str:
    """Column-wise worked sum, right to left, e.g. ``[47, 85]`` -> ``"7+5=12 4+8+1=13 \\boxed{132}"``.

    ``drop_carry_at=i`` forgets the carry into column ``i`` (a typical slip, used to make wrong attempts); the
    later columns and the boxed answer then follow from the faulty column.
    """
    cols = [_digits_rev(x) for x in operands]
    width = max(len(c) for c in cols)
    carry, steps, digits = 0, [], []
    for i in range(width):
        terms = [c[i] for c in cols if i < len(c)]
        if carry and i != drop_carry_at:
            terms.append(carry)
        s = sum(terms)
        steps.append("+".join(map(str, terms)) + f"={s}")
        carry = s // 10
        digits.append(str(s % 10) if i < width - 1 else str(s))
    return " ".join(steps) + f" \\boxed{{{int(''.join(reversed(digits)))}}}"


def subtraction_solution(a: int, b: int, drop_borrow_at: int | None = None) -> str:
    """Column-wise worked difference for ``a >= b``, e.g. ``(85, 47)`` -> ``"5-7+10=8 8-4-1=3 \\boxed{38}"``.

    ``drop_borrow_at=i`` forgets to pay back the borrow in column ``i`` (see :func:`addition_solution`).
    """
    if a < b:
        raise ValueError(f"subtraction_solution needs a >= b; got {a} - {b}")
    da, db = _digits_rev(a), _digits_rev(b)
    borrow, steps, digits = 0, [], []
    for i in range(len(da)):
        x, y = da[i], (db[i] if i < len(db) else None)
        pay = borrow if i != drop_borrow_at else 0
        d = x - (y or 0) - pay
        expr = f"{x}" + (f"-{y}" if y is not None else "") + ("-1" if pay else "")
        borrow = 1 if d < 0 else 0
        if borrow and i < len(da) - 1:
            d += 10
            expr += "+10"
        steps.append(f"{expr}={d}")
        digits.append(str(d))
    value = int("".join(reversed(digits))) if not digits[-1].startswith("-") else -1
    if value < 0:  # only reachable with a fault in the top column; keep it a plain wrong number
        value = int("".join(reversed(digits[:-1])) or "0")
    return " ".join(steps) + f" \\boxed{{{value}}}"


def make_problem(rng: random.Random, difficulty: Difficulty) -> dict:
    """One problem: ``{"expr", "answer", "operands", "op", "solution"}``."""
    op = rng.choice(difficulty.ops) if len(difficulty.ops) > 1 else difficulty.ops
    hi = 10**difficulty.digits - 1
    if op == "+":
        operands = [rng.randint(0, hi) for _ in range(difficulty.n_operands)]
        answer = sum(operands)
        solution = addition_solution(operands)
    else:
        a, b = sorted((rng.randint(0, hi), rng.randint(0, hi)), reverse=True)
        operands = [a, b]
        answer = a - b
        solution = subtraction_solution(a, b)
    expr = op.join(map(str, operands))
    return {"expr": expr, "answer": answer, "operands": operands, "op": op, "solution": solution}


def problem_to_row(problem: dict, index: int, split: str, difficulty: Difficulty) -> dict:
    """verl-layout row for one problem."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": PROMPT_FORMAT.format(expr=problem["expr"])}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(problem["answer"])},
        "extra_info": {
            "index": index,
            "split": split,
            "operands": list(problem["operands"]),
            "op": problem["op"],
            "solution": problem["solution"],
            "difficulty": asdict(difficulty),
        },
    }


def make_dataset(
    n: int,
    seed: int = 0,
    difficulty: Difficulty | dict | int | None = None,
    split: str = "train",
    exclude: set[str] | None = None,
) -> list[dict]:
    """``n`` distinct problems in verl's row layout, deterministic in ``(n, seed, difficulty)``.

    Args:
        exclude: expressions (``row["extra_info"]`` ``expr`` form, e.g. ``"47+85"``) never to emit — pass
            :func:`expressions` of the training set to build a disjoint held-out set.
    Raises:
        ValueError: when the difficulty has fewer than ``n`` distinct problems left.
    """
    difficulty = Difficulty.coerce(difficulty)
    rng = random.Random(f"{seed}:{difficulty}:{split}")  # str seeds hash deterministically (sha512)
    seen = set(exclude or ())
    rows: list[dict] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct problems at {difficulty}; lower n or raise digits")
        p = make_problem(rng, difficulty)
        if p["expr"] in seen:
            continue
        seen.add(p["expr"])
        rows.append(problem_to_row(p, len(rows), split, difficulty))
    return rows


def make_splits(
    n_train: int, n_test: int, seed: int = 0, difficulty: Difficulty | dict | int | None = None
) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out test sets."""
    train = make_dataset(n_train, seed, difficulty, split="train")
    test = make_dataset(n_test, seed, difficulty, split="test", exclude=expressions(train))
    return train, test


def expressions(rows: list[dict]) -> set[str]:
    """The expressions (``"47+85"``) of synthetic rows."""
    out = set()
    for r in rows:
        m = _PROMPT_RE.search(prompt_text(r))
        if m:
            out.add(m.group(1))
    return out


def prompt_text(row: dict) -> str:
    """The last user message of a row's prompt (or the prompt itself when it is a string)."""
    p = row["prompt"]
    if isinstance(p, str):
        return p
    return [m for m in p if m["role"] == "user"][-1]["content"]


def solution_for(row: dict) -> str:
    """The worked solution of a synthetic row (from ``extra_info`` or re-derived from the prompt)."""
    extra = row.get("extra_info") or {}
    if "solution" in extra:
        return extra["solution"]
    m = _PROMPT_RE.search(prompt_text(row))
    if not m:
        raise ValueError(f"not a synthetic arithmetic prompt: {prompt_text(row)!r:.80}")
    expr = m.group(1)
    if "-" in expr:
        a, b = (int(x) for x in expr.split("-"))
        return subtraction_solution(a, b)
    return addition_solution([int(x) for x in expr.split("+")])


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth, j = 1, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
        j += 1
    return None


_INT_RE = re.compile(r"^[+-]?\d+$")


def score(response: str, ground_truth: str) -> float:
    """1.0 when the last ``\\boxed{...}`` holds exactly the ground-truth integer (spaces and a leading "+" or
    zeros tolerated), else 0.0. A lightweight local check; the general verifier lives in ``cipo.rewards``."""
    got = last_boxed(response)
    if got is None:
        return 0.0
    got = got.strip().replace(" ", "")
    if not _INT_RE.match(got):
        return 0.0
    try:
        return 1.0 if int(got) == int(str(ground_truth).strip()) else 0.0
    except ValueError:
        return 0.0


def _expr_operands(row: dict) -> tuple[str, list[int]]:
    m = _PROMPT_RE.search(prompt_text(row))
    if not m:
        raise ValueError(f"not a synthetic arithmetic prompt: {prompt_text(row)!r:.80}")
    op = "-" if "-" in m.group(1) else "+"
    return op, [int(x) for x in m.group(1).split(op)]


def carry_columns(row: dict) -> list[int]:
    """Columns (0 = units) that receive a carry (addition) or pay back a borrow (subtraction)."""
    op, operands = _expr_operands(row)
    cols = [_digits_rev(x) for x in operands]
    width = max(len(c) for c in cols)
    out, carry = [], 0
    for i in range(width):
        if carry:
            out.append(i)
        terms = [c[i] if i < len(c) else 0 for c in cols]
        if op == "+":
            carry = (sum(terms) + carry) // 10
        else:
            carry = 1 if terms[0] - terms[1] - carry < 0 else 0
    return out


def dropped_carry_solutions(row: dict) -> list[str]:
    """The worked solutions with one carry (or borrow) forgotten, one per :func:`carry_columns` entry."""
    op, operands = _expr_operands(row)
    if op == "-":
        return [subtraction_solution(operands[0], operands[1], drop_borrow_at=i) for i in carry_columns(row)]
    return [addition_solution(operands, drop_carry_at=i) for i in carry_columns(row)]


def corrupt_solution(row: dict, rng: random.Random) -> str:
    """A plausible *wrong* worked solution: one carry (or borrow) forgotten, later columns and the answer
    following from it. Without any carry, the boxed answer is off by one instead. For correction-style data."""
    slips = dropped_carry_solutions(row)
    if slips:
        return rng.choice(slips)
    good = solution_for(row)
    ans = int(row["reward_model"]["ground_truth"])
    wrong = ans + 1 if ans == 0 else ans + rng.choice([-1, 1])
    return good.rsplit(" \\boxed{", 1)[0] + f" \\boxed{{{wrong}}}"
