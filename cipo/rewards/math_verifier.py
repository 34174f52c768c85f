"""Math answer verification on top of math-verify (gold-first semantics).

Answer extraction, in order (the first rule that finds something decides; later rules are *not* tried when an
earlier one finds a malformed answer, so a broken final ``\\boxed{`` cannot be rescued by an earlier number):

1. ``boxed``: the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces; ``\\boxed 5`` also accepted).
2. ``answer_phrase``: the last "answer is X" / "answer: X" (also "final answer"), X up to the end of its line.
3. ``last_number``: the last number in the response (integer, decimal, ``a/b``, optional ``%``).

Only the last ``max_chars`` characters of a response are searched, and only the extracted snippet is handed to
math-verify, so the cost is bounded for arbitrarily long responses. math-verify's own timeouts use
``signal.alarm``: they are on in the main thread (including worker processes of :func:`verify_batch`) and off in
other threads, where the caller must bound time (``verify_batch`` does, with a per-item deadline).
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any

from .types import RewardResult

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_RE = re.compile(r"(?i)\banswer\s*(?:is|:|=)\s*:?\s*(?P<ans>[^\n]+)")
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?(?:\s*\\?%)?")
_MAX_SNIPPET = 1000
_INT_RE = re.compile(r"-?\d{1,300}")


def _boxed_content(text: str, start: int) -> str | None:
    """Content of the ``\\boxed`` whose backslash is at ``start``; None if malformed (unbalanced or empty)."""
    i = _BOX_RE.match(text, start).end()
    n = len(text)
    while i < n and text[i] == " ":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        # `\boxed 5` form: the next token.
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    j = i
    while j < n:
        c = text[j]
        if c == "\\" and j + 1 < n and text[j + 1] in "{}":
            j += 2  # escaped brace: a literal, does not count
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                content = text[i + 1 : j].strip()
                return content or None
        j += 1
    return None


def extract_answer(response: str, max_chars: int = 20000, fallbacks: bool = True) -> tuple[str | None, str]:
    """Return ``(answer_snippet, method)``; method is ``boxed``, ``answer_phrase``, ``last_number``,
    ``malformed_boxed`` (snippet None) or ``none``."""
    text = response[-max_chars:] if len(response) > max_chars else response
    last_box = None
    for m in _BOX_RE.finditer(text):
        last_box = m
    if last_box is not None:
        content = _boxed_content(text, last_box.start())
        if content is None or len(content) > _MAX_SNIPPET:
            return None, "malformed_boxed"
        return content, "boxed"
    if not fallbacks:
        return None, "none"
    last_ans = None
    for m in _ANSWER_RE.finditer(text):
        last_ans = m
    if last_ans is not None:
        ans = last_ans.group("ans").strip(" \t*")  # markdown bold around the answer
        ans = re.split(r"(?<=[^\d\\])\.(?:\s|$)", ans, maxsplit=1)[0]  # end of sentence, not a decimal point
        ans = ans.strip(" \t*").rstrip(".").strip(" \t*")
        if ans and len(ans) <= _MAX_SNIPPET:
            return ans, "answer_phrase"
    last_num = None
    for m in _NUMBER_RE.finditer(text):
        last_num = m
    if last_num is not None:
        return last_num.group(0), "last_number"
    return None, "none"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class MathVerifier:
    """Score 1.0 when the response's final answer equals the ground truth (math-verify), else 0.0.

    Args:
        timeout_s: math-verify's per-operation timeout (parse, each comparison), whole seconds, main thread only.
        max_chars: only the last ``max_chars`` characters of a response are searched for the answer.
        fallbacks: use the ``answer_phrase`` and ``last_number`` rules when there is no ``\\boxed``.
        float_rounding: math-verify's rounding (decimal places) for numeric comparison.
        rel_tol: extra relative tolerance for numeric answers (``|a - b| <= rel_tol * max(|a|, |b|)``) when at least
            one side is a float or irrational; two exact rationals are never compared with a tolerance.
    """

    def __init__(
        self,
        timeout_s: int = 5,
        max_chars: int = 20000,
        fallbacks: bool = True,
        float_rounding: int = 6,
        rel_tol: float = 1e-6,
    ) -> None:
        self.timeout_s = max(1, int(timeout_s))
        self.max_chars = int(max_chars)
        self.fallbacks = bool(fallbacks)
        self.float_rounding = int(float_rounding)
        self.rel_tol = float(rel_tol)

    def _timeout(self) -> int | None:
        return self.timeout_s if _in_main_thread() else None

    def parse_gold(self, ground_truth: Any) -> list:
        """Parse a ground truth (plain or ``\\boxed``/``$``-wrapped LaTeX); cached, as gold repeats G times."""
        return _parse_gold_cached(str(ground_truth).strip(), self._timeout())

    def verify(self, response: str, ground_truth: Any) -> RewardResult:
        """Verify one response against its ground truth. Never raises."""
        try:
            return self._verify(response, ground_truth)
        except Exception as exc:  # math-verify/sympy internals: one bad item must not kill a batch
            return RewardResult(0.0, "error", {"error": f"{type(exc).__name__}: {str(exc)[:200]}"})

    def _verify(self, response: str, ground_truth: Any) -> RewardResult:
        if not isinstance(response, str):
            return RewardResult(0.0, "no_answer", {"method": "none"})
        gold = self.parse_gold(ground_truth)
        if not gold:
            return RewardResult(0.0, "unparsable_gold", {"ground_truth": str(ground_truth)[:200]})
        snippet, method = extract_answer(response, self.max_chars, self.fallbacks)
        details: dict[str, Any] = {"method": method, "extracted": (snippet or "")[:200]}
        if snippet is None:
            return RewardResult(0.0, "no_answer", details)
        score, reason, tolerance_used = _judge(str(ground_truth).strip(), snippet, method, self.float_rounding,
                                               self.rel_tol, self._timeout())
        if tolerance_used:
            details["tolerance"] = self.rel_tol
        return RewardResult(score, reason, details)

    def __repr__(self) -> str:
        return (f"MathVerifier(timeout_s={self.timeout_s}, max_chars={self.max_chars}, "
                f"fallbacks={self.fallbacks}, rel_tol={self.rel_tol})")


@functools.lru_cache(maxsize=1 << 16)
def _judge(gt: str, snippet: str, method: str, float_rounding: int, rel_tol: float,
           timeout: int | None) -> tuple[float, str, bool]:
    """(score, reason, tolerance used) for one extracted answer. Cached: in RL the G responses to a prompt often
    end in the same answer, so (ground truth, answer) pairs repeat; exceptions are not cached."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # Fast paths that cannot disagree with math-verify: identical text, or two plain integers (exact values).
    if method == "boxed" and snippet == gt:
        return 1.0, "correct", False
    if _INT_RE.fullmatch(snippet) and _INT_RE.fullmatch(gt):
        return (1.0, "correct", False) if int(snippet) == int(gt) else (0.0, "wrong_answer", False)
    gold = _parse_gold_cached(gt, timeout)
    if method == "boxed":
        pred = parse("\\boxed{" + snippet + "}", [LatexExtractionConfig(boxed_match_priority=0)],
                     parsing_timeout=timeout)
        if not pred:
            pred = parse(snippet, [ExprExtractionConfig()], parsing_timeout=timeout)
    elif method == "answer_phrase":
        pred = parse(snippet if "$" in snippet or "\\(" in snippet else f"${snippet}$",
                     [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=timeout)
    else:
        pred = parse(snippet.replace("\\%", "%"), [ExprExtractionConfig()], parsing_timeout=timeout)
    if not pred:
        return 0.0, "unparsable_answer", False
    if verify(gold, pred, float_rounding=float_rounding, timeout_seconds=timeout):
        return 1.0, "correct", False
    if rel_tol > 0 and _with_alarm(lambda: _numeric_close(gold, pred, rel_tol), timeout):
        return 1.0, "correct", True
    return 0.0, "wrong_answer", False


@functools.lru_cache(maxsize=4096)
def _parse_gold_cached(gt: str, timeout: int | None) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    if "\\boxed" in gt or "\\fbox" in gt or "$" in gt or "\\(" in gt or "\\[" in gt:
        gold = parse(gt, configs, parsing_timeout=timeout)
    else:
        gold = parse("\\boxed{" + gt + "}", configs, parsing_timeout=timeout)
    if not gold:
        gold = parse(gt, [ExprExtractionConfig()], parsing_timeout=timeout)
    return gold


def _with_alarm(fn: Any, seconds: int | None) -> Any:
    """``fn()`` under a SIGALRM deadline (main thread only; elsewhere the caller bounds time). False on timeout."""
    if seconds is None:
        return fn()
    import signal

    class _Expired(Exception):
        pass

    def handler(signum: int, frame: Any) -> None:
        raise _Expired

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    except _Expired:
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _numeric_close(gold: list, pred: list, rel_tol: float) -> bool:
    """Relative-tolerance check for answers that are plain numbers (math-verify compares decimal places)."""
    import sympy

    def as_float(x: Any) -> float | None:
        if isinstance(x, sympy.Basic) and x.is_number and not x.free_symbols:
            try:
                v = complex(x.evalf(30))
            except (TypeError, ValueError, OverflowError):
                return None
            return v.real if abs(v.imag) < 1e-12 else None
        return None

    def exact(x: Any) -> bool:
        return isinstance(x, sympy.Rational)  # Integer too: exact values were already compared exactly

    for g in gold:
        for p in pred:
            if exact(g) and exact(p):
                continue  # tolerance is for float noise, never for two exact numbers (123456788 != 123456789)
            gv, pv = as_float(g), as_float(p)
            if gv is not None and pv is not None and abs(gv - pv) <= rel_tol * max(abs(gv), abs(pv)):
                return True
    return False
