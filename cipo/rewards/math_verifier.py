"""Math answer verification on top of math-verify (gold-first semantics).

Answer extraction, in order (the first rule that finds something decides; later rules are *not* tried when an
earlier one finds a malformed answer, so a broken final ``\\boxed{`` cannot be rescued by an earlier number):

1. ``boxed``: the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces; ``\\boxed 5`` also accepted).
2. ``answer_phrase``: the last "answer is X" / "answer: X" (also "final answer"), X up to the end of its line.
3. ``last_number``: the last number in the response (integer, decimal, ``a/b``, optional ``%``).

Only the last ``max_chars`` characters of a response are searched, and only the extracted snippet is handed to
math-verify, so the cost is bounded for arbitrarily long responses.

Every call is time-bounded. In the main thread (also the case in :func:`verify_batch` workers) math-verify's
``signal.alarm`` timeouts apply to each parse and comparison. A call from any other thread is judged in a helper
process (:mod:`cipo.rewards._math_helper`) that is SIGKILLed at ``deadline_s``: a thread can be neither interrupted
by an alarm nor waited on while sympy's C arithmetic holds the GIL.

Reward-hack guards (a policy learns whatever scores): a value that is not finite (``\\infty``, ``nan``) or too
large for a float never matches a finite gold through the tolerance; an exact number whose digits would not fit in
:data:`_MAX_DIGITS` (``9^{9^{9}}``, ``1000000!``) is refused before sympy can try to build it
(``reason="answer_too_large"``); the relative tolerance is for decimal approximations only (see
:func:`_numeric_close`).
"""

from __future__ import annotations

import functools
import math
import re
import threading
from typing import Any

from .types import RewardResult

_MAX_DIGITS = 10_000  # decimal digits an exact number may need; beyond it (2^{40000}, 5000!) it is refused
_SANE_MAGNITUDE = 1e15  # |value| above which a relative tolerance is no longer "float noise" (2^53 ~ 9e15)
_ISOLATION = ("auto", "process")

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
        timeout_s: math-verify's per-operation timeout (parse, each comparison), whole seconds.
        max_chars: only the last ``max_chars`` characters of a response are searched for the answer.
        fallbacks: use the ``answer_phrase`` and ``last_number`` rules when there is no ``\\boxed``.
        float_rounding: math-verify's rounding (decimal places) for numeric comparison.
        rel_tol: extra relative tolerance for a decimal approximation of the gold (see :func:`_numeric_close`).
        isolation: ``"auto"``: judge in this process in the main thread (SIGALRM timeouts), in a helper process
            from any other thread; ``"process"``: always in a helper process (also guards against a C-level
            operation that an alarm cannot interrupt; ~1 ms of IPC per uncached call on the dev machine).
        deadline_s: wall-clock bound of one judging in a helper process (default ``2 * timeout_s + 2``, as
            :func:`~cipo.rewards.batch.default_item_timeout`); past it the helper is killed and the result is
            ``reason="timeout"``. The first call of a thread may also wait for a helper to start (1-3 s, at most 60).
    """

    def __init__(
        self,
        timeout_s: int = 5,
        max_chars: int = 20000,
        fallbacks: bool = True,
        float_rounding: int = 6,
        rel_tol: float = 1e-6,
        isolation: str = "auto",
        deadline_s: float | None = None,
    ) -> None:
        if isolation not in _ISOLATION:
            raise ValueError(f"MathVerifier(isolation={isolation!r}): use one of {_ISOLATION}")
        self.timeout_s = max(1, int(timeout_s))
        self.max_chars = int(max_chars)
        self.fallbacks = bool(fallbacks)
        self.float_rounding = int(float_rounding)
        self.rel_tol = float(rel_tol)
        self.isolation = isolation
        self.deadline_s = float(deadline_s) if deadline_s else 2.0 * self.timeout_s + 2.0

    def _timeout(self) -> int | None:
        return self.timeout_s if _in_main_thread() else None

    def parse_gold(self, ground_truth: Any) -> list:
        """Parse a ground truth (plain or ``\\boxed``/``$``-wrapped LaTeX); cached, as gold repeats G times.

        In-process: time-bounded (SIGALRM) in the main thread only; :meth:`verify` is bounded everywhere."""
        return _parse_gold_cached(str(ground_truth).strip(), self._timeout())

    def verify(self, response: str, ground_truth: Any) -> RewardResult:
        """Verify one response against its ground truth. Never raises; returns within the time bound."""
        try:
            return self._verify(response, ground_truth)
        except Exception as exc:  # math-verify/sympy internals: one bad item must not kill a batch
            return RewardResult(0.0, "error", {"error": f"{type(exc).__name__}: {str(exc)[:200]}"})

    def _verify(self, response: str, ground_truth: Any) -> RewardResult:
        if not isinstance(response, str):
            return RewardResult(0.0, "no_answer", {"method": "none"})
        gt = str(ground_truth).strip()
        snippet, method = extract_answer(response, self.max_chars, self.fallbacks)
        details: dict[str, Any] = {"method": method, "extracted": (snippet or "")[:200]}
        if self.isolation == "process" or not _in_main_thread():
            from ._math_helper import HelperError, HelperTimeout

            try:
                score, reason, tolerance_used = _judge_in_helper(gt, snippet, method, self.float_rounding,
                                                                 self.rel_tol, self.timeout_s, self.deadline_s)
            except HelperTimeout:
                return RewardResult(0.0, "timeout", {**details, "deadline_s": self.deadline_s})
            except HelperError as exc:
                return RewardResult(0.0, "error", {**details, "error": str(exc)[:200]})
        else:
            score, reason, tolerance_used = _judge_all(gt, snippet, method, self.float_rounding, self.rel_tol,
                                                       self.timeout_s)
        if reason == "unparsable_gold":
            return RewardResult(0.0, reason, {"ground_truth": gt[:200]})
        if tolerance_used:
            details["tolerance"] = self.rel_tol
        return RewardResult(score, reason, details)

    def __repr__(self) -> str:
        return (f"MathVerifier(timeout_s={self.timeout_s}, max_chars={self.max_chars}, "
                f"fallbacks={self.fallbacks}, rel_tol={self.rel_tol}, isolation={self.isolation!r})")


def _judge_all(gt: str, snippet: str | None, method: str, float_rounding: int, rel_tol: float,
               timeout: int | None) -> tuple[float, str, bool]:
    """(score, reason, tolerance used) for a ground truth and an extracted answer (None: none found). Runs in the
    caller's main thread or in a helper process (:mod:`cipo.rewards._math_helper`)."""
    if not _parse_gold_cached(gt, timeout):
        return 0.0, "unparsable_gold", False
    if snippet is None:
        return 0.0, "no_answer", False
    return _judge(gt, snippet, method, float_rounding, rel_tol, timeout)


@functools.lru_cache(maxsize=1 << 16)
def _judge_in_helper(gt: str, snippet: str | None, method: str, float_rounding: int, rel_tol: float,
                     timeout: int, deadline_s: float) -> tuple[float, str, bool]:
    """:func:`_judge_all` in a helper process, killed at ``deadline_s``. Cached here too (timeouts and helper
    failures raise, so they are not cached)."""
    from ._math_helper import HelperError, run

    answer = run({"gt": gt, "snippet": snippet, "method": method, "float_rounding": float_rounding,
                  "rel_tol": rel_tol, "timeout": timeout}, deadline_s)
    if "result" not in answer:
        raise HelperError(answer.get("error", f"bad answer {answer!r}"))
    score, reason, tolerance_used = answer["result"]
    return float(score), str(reason), bool(tolerance_used)


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
    # Before sympy sees them: a number like 9^{9^{9}} is evaluated in C with the GIL held (no alarm, no thread
    # timeout can stop it) and needs gigabytes. A size check that fails to finish counts as too large.
    if _with_alarm(lambda: _too_large(pred), timeout, on_timeout=True):
        return 0.0, "answer_too_large", False
    if _with_alarm(lambda: _too_large(gold), timeout, on_timeout=True):
        return 0.0, "gold_too_large", False
    if verify(gold, pred, float_rounding=float_rounding, timeout_seconds=timeout):
        return 1.0, "correct", False
    if rel_tol > 0 and _with_alarm(lambda: _numeric_close(gold, pred, rel_tol, float_rounding), timeout,
                                   on_timeout=False):
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


def _with_alarm(fn: Any, seconds: int | None, on_timeout: Any) -> Any:
    """``fn()`` under a SIGALRM deadline (main thread; ``seconds=None``: no alarm). ``on_timeout`` when it fires."""
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
        return on_timeout
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_FACTORIAL_LIKE = ("factorial", "factorial2", "subfactorial", "gamma", "binomial", "RisingFactorial",
                   "FallingFactorial", "fibonacci", "lucas", "bell", "catalan", "harmonic", "primorial")


def _too_large(exprs: list) -> bool:
    """Whether an exact number in ``exprs`` (math-verify parse results) could need more than ``_MAX_DIGITS``
    decimal digits, judged from the expression tree alone (nothing big is ever evaluated)."""
    import sympy

    for e in exprs:
        if isinstance(e, sympy.Basic):
            try:
                if _log10_size(e, {}) > _MAX_DIGITS:
                    return True
            except RecursionError:
                return True
    return False


def _log10_size(e: Any, bound_vars: dict) -> float:
    """Upper bound on the decimal digits (log10 of numerator, denominator or value) that evaluating ``e`` exactly
    could need. ``bound_vars`` maps summation/product variables to the size of their largest value."""
    import sympy

    inf = math.inf
    if isinstance(e, sympy.Rational):  # Integer included
        return _ilog10(max(abs(e.p), e.q))
    if isinstance(e, sympy.Float):
        _sign, man, exp, bc = e._mpf_
        return abs(exp + bc) * 0.30103 if man else 0.0
    if isinstance(e, sympy.Symbol):
        return bound_vars.get(e, 1.0)
    if not e.args:
        return 1.0  # pi, E, I, oo, nan, other atoms: no digits to build
    name = type(e).__name__
    if isinstance(e, (sympy.Sum, sympy.Product)):
        inner = dict(bound_vars)
        count = 1.0
        for lim in e.limits:
            if len(lim) != 3:
                return inf
            v, lo, hi = lim
            s = max(_log10_size(lo, bound_vars), _log10_size(hi, bound_vars))
            if s > 15:
                return inf
            inner[v] = s
            count *= 2 * 10.0 ** s
        body = _log10_size(e.function, inner)
        return count * max(body, 1.0) if isinstance(e, sympy.Product) else body + math.log10(count)
    if isinstance(e, sympy.Pow) or name == "exp":
        base, ex = (e.args if isinstance(e, sympy.Pow) else (sympy.E, e.args[0]))
        sb, sx = _log10_size(base, bound_vars), _log10_size(ex, bound_vars)
        if base in (sympy.S.Zero, sympy.S.One, sympy.S.NegativeOne):
            return sx
        if ex.free_symbols - set(bound_vars):
            return sb + sx  # a free variable in the exponent: nothing to evaluate
        if sx > 15:
            return inf
        magnitude = 10.0 ** sx  # |exponent| is at most this
        if not ex.free_symbols:
            magnitude = min(magnitude, abs(complex(ex.evalf(15))))  # small by the check above: cheap
        return max(sb, 0.30103) * max(magnitude, 1.0)
    if name in _FACTORIAL_LIKE:
        s = max(_log10_size(a, bound_vars) for a in e.args)
        if s > 15:
            return inf
        n = 10.0 ** s
        return n * max(math.log10(n), 1.0)
    if isinstance(e, sympy.Add):
        return max(_log10_size(a, bound_vars) for a in e.args) + math.log10(len(e.args))
    return sum(_log10_size(a, bound_vars) for a in e.args)  # Mul, functions, containers: conservative


def _ilog10(n: int) -> float:
    """log10(n) for an int n >= 1 (0 below), without float overflow for huge n."""
    if n <= 1:
        return 0.0
    return math.log10(n) if n.bit_length() < 1000 else n.bit_length() * 0.30103


def _numeric_close(gold: list, pred: list, rel_tol: float, float_rounding: int) -> bool:
    """Tolerance check for a decimal approximation of the gold, after math-verify said "not equal".

    Only finite real values of sane magnitude (``|v| <= _SANE_MAGNITUDE``) are compared, so ``\\infty``, ``nan``,
    complex values and numbers that overflow a float never match a finite gold. Two exact rationals are never
    compared with a tolerance (``123456788 != 123456789``). When the gold is an exact rational (or a float with an
    integral value), the answer must contain a decimal and be within ``min(rel_tol * max(|g|, |p|),
    10**-float_rounding)``: a big integer gold is not matched by a near miss written as ``1234566.0``, nor by an
    exact expression that is merely close. Otherwise (irrational or non-integral float gold) the relative tolerance
    applies: ``3.14159`` matches ``\\pi``.
    """
    import sympy
    from mpmath.libmp import finf, fnan, fninf

    def value(x: Any) -> Any:
        if not (isinstance(x, sympy.Expr) and x.is_number):
            return None
        try:
            v = x.evalf(30)
        except (TypeError, ValueError, ArithmeticError):
            return None
        if not isinstance(v, sympy.Float) or v._mpf_ in (finf, fninf, fnan):
            return None  # complex (has I), oo, zoo, nan, or not evaluable
        return v if abs(v) <= _SANE_MAGNITUDE else None

    def exact_rational(x: Any) -> bool:
        return not x.has(sympy.Float) and x.is_rational is True  # 2^{10} and 10^9 - 2 too, not just Integer

    for g in gold:
        gv = value(g)
        if gv is None:
            continue
        for p in pred:
            pv = value(p)
            if pv is None:
                continue
            if exact_rational(g) or (isinstance(g, sympy.Float) and float(gv).is_integer()):
                if exact_rational(p) or not p.has(sympy.Float):
                    continue  # exact vs exact: math-verify's verdict stands
                tol = min(rel_tol * max(abs(gv), abs(pv)), 10.0 ** -float_rounding)
            else:
                tol = rel_tol * max(abs(gv), abs(pv))
            if abs(gv - pv) <= tol:
                return True
    return False
