"""Procedurally generated arithmetic chat prompts for a small real instruct model (e.g. SmolLM2-135M-Instruct).

Unlike :mod:`cipo.data.synthetic` (a terse task for the tiny model warm-started in code), these prompts read like
what a chat model has seen: ``What is 7 + 5?``, ``Tom has 7 apples and buys 5 more. How many apples does he have
now?``, ``Which number is larger: 47 or 52?``, followed by an instruction that asks for a parseable final answer.
Responses are scored by :class:`cipo.rewards.MathVerifier` (``\\boxed{}``, then "answer is/Answer: N", then the
last number of the response; see :func:`score`), which is what the trainer routes this task's ``data_source`` to.

Rows follow verl's layout::

    {"data_source": "chat_arith", "prompt": [{"role": "user", "content": "What is 7 + 5? ..."}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": "12"},
     "extra_info": {"index": 0, "split": "train", "kind": "expr", "key": "expr:7+5", "expr": "7+5", ...}}

Splits: every problem has a key (its kind and numbers; e.g. ``word:7+5``: the names and objects of a word problem
do not make it a new problem). A seeded hash of the key puts a fixed ``heldout_fraction`` of the problem space in
the held-out part; the test split draws *distinct* problems from that part only and the train split draws from the
rest *with replacement* (the one-digit spaces hold only ~100 problems per kind, fewer than a run's training prompts).
So train and test are disjoint for any sizes, and the test split of ``n`` rows is a prefix of the one of ``n + k``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from typing import Any

DATA_SOURCE = "chat_arith"
KINDS = ("expr", "word", "compare")
OPS = "+-*"
# Appended to the question (after one space). "answer" asks for a line the verifier's answer-phrase rule reads.
INSTRUCTIONS = {
    "none": "",
    "boxed": "Put the final answer in \\boxed{}.",
    "answer": 'End your reply with "Answer: " followed by the number.',
    "number": "Reply with only the number.",
}
_NAMES = (("Tom", "he"), ("Sara", "she"), ("Ben", "he"), ("Lily", "she"), ("Sam", "he"), ("Anna", "she"))
_OBJECTS = ("apples", "pencils", "stickers", "marbles", "cookies", "books")
_WORD = {
    "+": "{name} has {a} {obj} and {verb} {b} more. How many {obj} does {pron} have now?",
    "-": "{name} has {a} {obj} and gives {b} of them to a friend. How many {obj} does {pron} have left?",
    "*": "There are {a} boxes with {b} {obj} in each box. How many {obj} are there in total?",
}
_GAIN_VERBS = ("buys", "finds", "gets")


class ChatArithError(ValueError):
    """A bad knob of the chat arithmetic task, or a split the knobs cannot fill; the message names the knob."""


@dataclass(frozen=True)
class ChatArithDifficulty:
    """Knobs of the task (the trainer's ``data.synthetic_difficulty`` with ``data.synthetic_task: chat_arith``).

    Attributes:
        kinds: problem kinds, each problem picks one uniformly: ``expr`` ("What is 7 + 5?"), ``word`` (a
            one-step story), ``compare`` ("Which number is larger: 47 or 52?"; the answer is the larger one).
        digits: maximum digits per operand (uniform in ``[0, 10**digits)``; word problems start at 1).
        n_operands: operands of an ``expr`` problem (word and compare problems have 2).
        ops: operators drawn from, any of ``+ - *``; ``*`` binds tighter in ``expr``; results are never negative.
        instruction: the answer-format sentence appended to the question, a key of :data:`INSTRUCTIONS`.
        heldout_fraction: share of the problem space reserved for the held-out split, in (0, 1).
    """

    # Defaults: the setting whose step-0 accuracy for SmolLM2-135M-Instruct lies in 0.2-0.6 (word problems and
    # "-" pull it below; bench/results/smollm2_task.md). Its space is small (145 problems: 100 sums, 45 pairs), so
    # half is held out: 67-80 held-out problems for seeds 0-5, room for a 64-prompt held-out split.
    kinds: tuple[str, ...] = ("expr", "compare")
    digits: int = 1
    n_operands: int = 2
    ops: str = "+"
    instruction: str = "boxed"
    heldout_fraction: float = 0.5

    def __post_init__(self) -> None:
        kinds = self.kinds
        if isinstance(kinds, str):
            kinds = (kinds,)
        if not isinstance(kinds, (list, tuple)) or not kinds or not all(isinstance(k, str) for k in kinds):
            raise ChatArithError(f"synthetic_difficulty.kinds must be a non-empty list of {list(KINDS)}; "
                                 f"got {self.kinds!r}")
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ChatArithError(f"synthetic_difficulty.kinds: unknown kind(s) {bad}; choose from {list(KINDS)}")
        object.__setattr__(self, "kinds", tuple(kinds))
        if isinstance(self.digits, bool) or not isinstance(self.digits, int) or not 1 <= self.digits <= 6:
            raise ChatArithError(f"synthetic_difficulty.digits must be an int in [1, 6]; got {self.digits!r}")
        if isinstance(self.n_operands, bool) or not isinstance(self.n_operands, int) or not 2 <= self.n_operands <= 5:
            raise ChatArithError(f"synthetic_difficulty.n_operands must be an int in [2, 5]; got {self.n_operands!r}")
        if (not isinstance(self.ops, str) or not self.ops or any(c not in OPS for c in self.ops)
                or len(set(self.ops)) != len(self.ops)):
            raise ChatArithError(f"synthetic_difficulty.ops must be a string of distinct operators from {OPS!r} "
                                 f"(e.g. '+' or '+-'); got {self.ops!r}")
        if self.instruction not in INSTRUCTIONS:
            raise ChatArithError(f"synthetic_difficulty.instruction must be one of {list(INSTRUCTIONS)}; "
                                 f"got {self.instruction!r}")
        frac = self.heldout_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
            raise ChatArithError(f"synthetic_difficulty.heldout_fraction must be a number in (0, 1); got {frac!r}")

    @classmethod
    def coerce(cls, value: ChatArithDifficulty | dict | None) -> ChatArithDifficulty:
        """Accept a ChatArithDifficulty, a dict of its fields (unknown keys are an error naming them) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {"kinds", "digits", "n_operands", "ops", "instruction", "heldout_fraction"}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ChatArithError(f"synthetic_difficulty: unknown key(s) {unknown} for synthetic_task chat_arith; "
                                     f"known: {sorted(known)}")
            return cls(**value)
        raise ChatArithError(f"synthetic_difficulty must be a mapping of {cls.__name__} fields or empty; got "
                             f"{type(value).__name__}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d


def evaluate(expr: str) -> int:
    """Value of an integer expression of ``+ - *`` (``*`` first, then left to right), e.g. ``"7+2*3"`` -> 13."""
    total = 0
    for i, term in enumerate(_split_keep(expr, "+-")):
        sign, body = (term[0], term[1:]) if i else ("+", term)
        prod = 1
        for factor in body.split("*"):
            prod *= int(factor)
        total += prod if sign == "+" else -prod
    return total


def _split_keep(expr: str, seps: str) -> list[str]:
    """``"7+2*3-1"`` -> ``["7", "+2*3", "-1"]``."""
    out, cur = [], ""
    for c in expr:
        if c in seps and cur:
            out.append(cur)
            cur = c
        else:
            cur += c
    out.append(cur)
    return out


def _operand(rng: random.Random, digits: int, low: int = 0) -> int:
    return rng.randint(low, 10**digits - 1)


def make_problem(rng: random.Random, d: ChatArithDifficulty) -> dict[str, Any]:
    """One problem: ``{"kind", "key", "expr", "question", "answer"}``; ``answer`` is an int >= 0."""
    kind = rng.choice(d.kinds)
    if kind == "compare":
        a = _operand(rng, d.digits)
        b = _operand(rng, d.digits)
        while b == a:
            b = _operand(rng, d.digits)
        lo, hi = sorted((a, b))
        return {"kind": kind, "key": f"compare:{lo},{hi}", "expr": f"max({a},{b})",
                "question": f"Which number is larger: {a} or {b}?", "answer": hi}
    if kind == "word":
        op = rng.choice(d.ops)
        a, b = _operand(rng, d.digits, 1), _operand(rng, d.digits, 1)
        if op == "-" and a < b:
            a, b = b, a
        name, pron = rng.choice(_NAMES)
        question = _WORD[op].format(name=name, pron=pron, obj=rng.choice(_OBJECTS), verb=rng.choice(_GAIN_VERBS),
                                    a=a, b=b)
        expr = f"{a}{op}{b}"
        return {"kind": kind, "key": f"word:{expr}", "expr": expr, "question": question, "answer": evaluate(expr)}
    while True:  # expr: redraw the rare negative results of mixed "-" expressions
        operands = [_operand(rng, d.digits) for _ in range(d.n_operands)]
        ops = [rng.choice(d.ops) for _ in range(d.n_operands - 1)]
        if ops == ["-"] and operands[0] < operands[1]:
            operands.reverse()  # a plain difference: order it rather than redraw (keeps "-" problems uniform)
        expr = str(operands[0]) + "".join(o + str(x) for o, x in zip(ops, operands[1:]))
        value = evaluate(expr)
        if value >= 0:
            break
    shown = str(operands[0]) + "".join(f" {o} {x}" for o, x in zip(ops, operands[1:]))
    return {"kind": kind, "key": f"expr:{expr}", "expr": expr, "question": f"What is {shown}?", "answer": value}


def is_heldout(key: str, seed: int, fraction: float) -> bool:
    """Whether problem ``key`` belongs to the held-out part of the space (a seeded hash, stable across runs)."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") < fraction * 2**64


def user_message(question: str, instruction: str) -> str:
    """The user turn: the question and the answer-format instruction (:data:`INSTRUCTIONS` key)."""
    text = INSTRUCTIONS[instruction]
    return f"{question} {text}" if text else question


def problem_to_row(problem: dict[str, Any], index: int, split: str, d: ChatArithDifficulty) -> dict[str, Any]:
    """verl-layout row for one problem."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": user_message(problem["question"], d.instruction)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(problem["answer"])},
        "extra_info": {"index": index, "split": split, "kind": problem["kind"], "key": problem["key"],
                       "expr": problem["expr"], "question": problem["question"], "difficulty": d.as_dict()},
    }


def make_dataset(n: int, seed: int = 0, difficulty: ChatArithDifficulty | dict | None = None,
                 split: str = "train") -> list[dict[str, Any]]:
    """``n`` rows of ``split`` (``"train"``: with replacement from the training part of the space; ``"test"``:
    distinct problems from the held-out part), deterministic in ``(seed, difficulty, split)``.

    Raises:
        ChatArithError: a bad knob, a bad ``split``/``n``, or a held-out part with fewer than ``n`` problems.
    """
    d = ChatArithDifficulty.coerce(difficulty)
    if split not in ("train", "test"):
        raise ChatArithError(f"split must be 'train' or 'test'; got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ChatArithError(f"the {split} split size must be an int >= 0; got {n!r}")
    want_heldout = split == "test"
    # The problem stream does not depend on n, so a split of n rows is a prefix of one of n + k rows.
    rng = random.Random(f"chat_arith:{seed}:{d.as_dict()}:{split}")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    attempts, limit = 0, 200 * n + 2000
    while len(rows) < n:
        attempts += 1
        if attempts > limit:
            what = "distinct held-out" if want_heldout else "training"
            raise ChatArithError(
                f"could only draw {len(rows)} of {n} {what} problems at {d.as_dict()} (seed {seed}): the space is "
                f"too small; lower the split size (data.synthetic_val_size for the held-out split) or raise "
                f"synthetic_difficulty.digits / heldout_fraction, or add kinds/ops")
        p = make_problem(rng, d)
        if is_heldout(p["key"], seed, d.heldout_fraction) != want_heldout:
            continue
        if want_heldout:
            if p["key"] in seen:
                continue
            seen.add(p["key"])
        rows.append(problem_to_row(p, len(rows), split, d))
    return rows


def make_splits(n_train: int, n_test: int, seed: int = 0, difficulty: ChatArithDifficulty | dict | None = None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and held-out rows, disjoint by problem key for any sizes (see the module docstring)."""
    return (make_dataset(n_train, seed, difficulty, split="train"),
            make_dataset(n_test, seed, difficulty, split="test"))


_VERIFIER = None


def score(response: str, ground_truth: str) -> float:
    """The reward the trainer gives this task: :class:`cipo.rewards.MathVerifier` with its fallbacks on — the last
    ``\\boxed{}``; else the last "answer is X" / "Answer: X"; else the last number in the response."""
    global _VERIFIER
    if _VERIFIER is None:
        from cipo.rewards.math_verifier import MathVerifier

        _VERIFIER = MathVerifier()
    return float(_VERIFIER.verify(response, ground_truth).score)
