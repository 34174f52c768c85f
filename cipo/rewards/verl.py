"""Adapter with verl's custom reward signature: ``compute_score(data_source, solution_str, ground_truth, extra_info)``.

Point verl at it with ``custom_reward_function.path=<this file> custom_reward_function.name=compute_score``.
Code items are recognised by their ground truth (a tests dict, or its JSON, see :mod:`code_verifier`) or by a
``data_source`` naming a code dataset; everything else is verified as math. One verifier of each kind is kept per
process. ``extra_info`` may carry ``{"timeout_s": ..., "memory_mb": ...}`` for code items.
"""

from __future__ import annotations

import json
from typing import Any

from .code_verifier import CodeVerifier
from .math_verifier import MathVerifier

_CODE_SOURCES = (
    "code", "apps", "taco", "codecontests", "livecodebench", "humaneval", "mbpp", "leetcode", "primeintellect",
)
_math: MathVerifier | None = None
_code: dict[tuple[float, int], CodeVerifier] = {}


def _as_code_tests(ground_truth: Any) -> Any | None:
    gt = ground_truth
    if isinstance(gt, (str, bytes)):
        s = gt.strip()
        if not s.startswith(b"{" if isinstance(s, bytes) else "{"):
            return None
        try:
            gt = json.loads(s)
        except ValueError:
            return None
    if isinstance(gt, dict) and (gt.get("type") in ("assert", "stdio") or ("inputs" in gt and "outputs" in gt)):
        return gt
    return None


def is_code_item(data_source: str, ground_truth: Any) -> bool:
    """True when this item should go to the code verifier."""
    if _as_code_tests(ground_truth) is not None:
        return True
    ds = (data_source or "").lower()
    return any(k in ds for k in _CODE_SOURCES) and not isinstance(ground_truth, (int, float))


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> float:
    """verl-compatible reward: 1.0 or 0.0."""
    global _math
    if is_code_item(data_source, ground_truth):
        extra = extra_info if isinstance(extra_info, dict) else {}
        key = (float(extra.get("timeout_s", 5.0)), int(extra.get("memory_mb", 1024)))
        if key not in _code:
            _code[key] = CodeVerifier(timeout_s=key[0], memory_mb=key[1])
        tests = _as_code_tests(ground_truth)
        return _code[key].verify(solution_str, tests if tests is not None else ground_truth).score
    if _math is None:
        _math = MathVerifier()
    return _math.verify(solution_str, ground_truth).score
