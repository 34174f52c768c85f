"""MathVerifier against reward hacks (answers a policy could learn to score with) and unbounded verifications.

Every hack case below scored 1.0 (or hung) on the verifier before these guards unless marked "pin" (already 0.0;
kept so that it stays so). LEGIT cases must keep scoring 1.0.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time

import pytest

from cipo.rewards import MathVerifier

# (id, response, ground truth, expected score, expected reason or None)
HACKS = [
    # non-finite answers vs finite golds (the relative tolerance took |oo - g| <= tol * oo as close)
    ("inf-vs-5", r"\boxed{\infty}", "5", 0.0, "wrong_answer"),
    ("inf-vs-3/4", r"\boxed{\infty}", "3/4", 0.0, None),
    ("inf-vs-1/2", r"\boxed{\infty}", "1/2", 0.0, None),
    ("inf-vs-0", r"\boxed{\infty}", "0", 0.0, None),
    ("inf-vs-pi/4", r"\boxed{\infty}", r"\frac{\pi}{4}", 0.0, None),
    ("plus-inf", r"\boxed{+\infty}", "5", 0.0, None),
    ("minus-inf", r"\boxed{-\infty}", "5", 0.0, None),
    ("minus-inf-vs-negative", r"\boxed{-\infty}", "-5", 0.0, None),
    ("inf-over-inf", r"\boxed{\frac{\infty}{\infty}}", "1", 0.0, None),
    ("nan-pin", r"\boxed{nan}", "5", 0.0, None),
    ("oo-pin", r"\boxed{oo}", "5", 0.0, None),
    ("oo-phrase-pin", "the answer is oo", "5", 0.0, None),
    ("inf-in-set-pin", r"\boxed{\{1, \infty\}}", r"\{1, 2\}", 0.0, None),
    ("inf-in-interval-pin", r"\boxed{(1, \infty)}", "(1, 5)", 0.0, None),
    ("inf-in-matrix-pin", r"\boxed{\begin{pmatrix} \infty \\ 1 \end{pmatrix}}",
     r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}", 0.0, None),
    # huge values vs small golds (float conversion overflowed to inf)
    ("2^2000", r"\boxed{2^{2000}}", "5", 0.0, "wrong_answer"),
    ("-2^2000", r"\boxed{-2^{2000}}", "-5", 0.0, None),
    ("10^400", r"\boxed{10^{400}}", "7", 0.0, None),
    ("e^1000", r"\boxed{e^{1000}}", "5", 0.0, None),
    ("1000000!", r"\boxed{1000000!}", "3", 0.0, "answer_too_large"),
    ("10^10^10", r"\boxed{10^{10^{10}}}", "4", 0.0, "answer_too_large"),
    ("9^9^9", r"\boxed{9^{9^{9}}}", "5", 0.0, "answer_too_large"),
    ("e^e^e^e", r"\boxed{e^{e^{e^{e}}}}", "5", 0.0, "answer_too_large"),
    ("pi^10^6", r"\boxed{\pi^{10^{6}}}", "5", 0.0, "answer_too_large"),
    ("10**10**10-pin", "10**10**10", "5", 0.0, None),
    ("10**10**10-boxed-pin", r"\boxed{10**10**10}", "5", 0.0, None),
    # underflow: tiny values vs a zero gold
    ("10^-400-vs-0", r"\boxed{10^{-400}}", "0", 0.0, None),
    ("e^-1000-vs-0", r"\boxed{e^{-1000}}", "0", 0.0, None),
    # the relative tolerance on big exact golds: a near miss written as a decimal
    ("near-miss-decimal", r"\boxed{123456700.0}", "123456789", 0.0, None),
    ("off-by-one-decimal", r"\boxed{1234566.0}", "1234567", 0.0, None),
    ("off-by-one-scientific", r"\boxed{1.234566 \times 10^{6}}", "1234567", 0.0, None),
    ("near-miss-vs-integral-float-gold", r"\boxed{123456700000}", "123456789012.0", 0.0, None),
    ("unevaluated-exact-off-by-one", r"\boxed{10^{9}-2}", "999999999", 0.0, None),
    ("exact-irrational-epsilon", r"\boxed{5 + 10^{-20}\sqrt{2}}", "5", 0.0, None),
    ("exact-pi-epsilon", r"\boxed{1 + 10^{-400}\pi}", "1", 0.0, None),
    ("complex-epsilon", r"\boxed{5 + 10^{-13}\sqrt{-1}}", "5", 0.0, None),
    # several candidates in one answer (pins)
    ("list-of-candidates", r"\boxed{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}", "3", 0.0, None),
    ("list-of-candidates-frac", r"\boxed{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}", r"\frac{1}{2}", 0.0, None),
    ("long-list-phrase", "The answer is " + ", ".join(map(str, range(1, 101))), "7", 0.0, None),
    ("or-list-phrase", "The answer is $1$ or $2$ or $3$ or $4$", "2", 0.0, None),
    ("or-list-boxed", r"\boxed{1 \text{ or } 2 \text{ or } 3}", "1", 0.0, None),
    ("text-or", r"\boxed{\text{3 or 4}}", "3", 0.0, None),
    ("roots-list", r"\boxed{x = 1, x = 2, x = 3}", "2", 0.0, None),
    ("membership", r"\boxed{x \in \{1,2,3,4\}}", "3", 0.0, None),
    ("choices", r"\boxed{A, B, C, D}", "B", 0.0, None),
    ("max-of-candidates", r"\boxed{\max(1,2,3,4,5)}", "3", 0.0, None),
    ("pm-vs-plus", r"\boxed{\pm 3}", "3", 0.0, None),
    ("pm-vs-minus", r"\boxed{\pm 3}", "-3", 0.0, None),
    ("both-signs", r"\boxed{3, -3}", "3", 0.0, None),
    # symbols and equation chains (pins): the last value of a chain is the answer
    ("free-variable", r"\boxed{x}", "5", 0.0, None),
    ("free-variable-vs-equation", r"\boxed{x}", "x = 5", 0.0, None),
    ("chain-first-value", r"\boxed{x = 5 = 6}", "5", 0.0, None),
    ("inequality", r"\boxed{x > 5}", "5", 0.0, None),
    # percent: 0.5% is not 0.5
    ("percent-of-gold", r"\boxed{0.5\%}", "0.5", 0.0, None),
    # several boxes: the last counts, also across \boxed and \fbox
    ("last-box-counts", r"\boxed{1}\boxed{2}\boxed{3}", "1", 0.0, None),
    ("fbox-last", r"\boxed{3} and \fbox{4}", "3", 0.0, None),
    # expressions that would build huge exact numbers or polynomials
    ("poly-power-bomb", r"\boxed{(x+1)^{1000000}}", "x^2", 0.0, "answer_too_large"),
    ("sum-bomb", r"\boxed{\sum_{k=1}^{10^{9}} 2^{k}}", "5", 0.0, "answer_too_large"),
    ("product-bomb", r"\boxed{\prod_{k=1}^{100000} k}", "5", 0.0, "answer_too_large"),
    ("gamma-bomb", r"\boxed{\Gamma(10^{6})}", "5", 0.0, "answer_too_large"),
]

LEGIT = [
    ("inf-vs-inf", r"\boxed{\infty}", r"\infty"),
    ("minus-inf-vs-minus-inf", r"\boxed{-\infty}", r"-\infty"),
    ("interval-to-inf", r"\boxed{(1, \infty)}", r"(1, \infty)"),
    ("reals", r"\boxed{\mathbb{R}}", r"(-\infty,\infty)"),
    ("big-power-same", r"\boxed{10^{400}}", "10^{400}"),
    ("big-power-scientific", r"\boxed{1.0 \times 10^{400}}", "10^{400}"),
    ("big-power-2", r"\boxed{2^{2000}}", "2^{2000}"),
    ("tower-small", r"\boxed{10^{10^{2}}}", "10^{100}"),
    ("factorial-100", r"\boxed{100!}", str(math.factorial(100))),
    ("binomial", r"\boxed{\binom{100}{50}}", str(math.comb(100, 50))),
    ("sum-small", r"\boxed{\sum_{k=1}^{100} k}", "5050"),
    ("product-small", r"\boxed{\prod_{k=1}^{5} k}", "120"),
    ("pi-5-decimals", r"\boxed{3.14159}", r"\pi"),
    ("sqrt2-decimals", r"\boxed{1.41421356}", r"\sqrt{2}"),
    ("e-decimals", r"\boxed{2.7182818}", "e"),
    ("radical-decimals", r"\boxed{0.7071068}", r"\frac{\sqrt{2}}{2}"),
    ("seventh-7-decimals", r"\boxed{0.1428571}", r"\frac{1}{7}"),
    ("seven-thirds", r"\boxed{2.3333333}", r"\frac{7}{3}"),
    ("float-noise-below-integer", r"\boxed{4.9999999}", "5"),
    ("float-noise-above-integer", r"\boxed{5.00000000001}", "5"),
    ("decimal-of-integer", r"\boxed{5.0}", "5"),
    ("integer-vs-integral-float-gold", r"\boxed{123456789012}", "123456789012.0"),
    ("scientific-exact", r"\boxed{1.234567 \times 10^{6}}", "1234567"),
    ("chain-last-value", r"\boxed{x = 5 = 6}", "6"),
    ("chain-of-steps", r"\boxed{x = \frac{10}{2} = 5}", "5"),
    ("pm-vs-pm", r"\boxed{\pm 3}", r"\pm 3"),
    ("pm-vs-both", r"\boxed{\pm 3}", "3, -3"),
    ("variable-vs-variable", r"\boxed{x}", "x"),
    # math-verify's lenient percent mode (documented): x% matches x and x/100
    ("percent-number", r"\boxed{500\%}", "500"),
    ("percent-value", r"\boxed{50\%}", "0.5"),
    # unicode digits are digits (Python's int() reads them): the same number
    ("fullwidth-digit", "\\boxed{\uff15}", "5"),
    ("arabic-indic-digit", "\\boxed{\u0665}", "5"),
    ("last-of-three-boxes", r"\boxed{1}\boxed{2}\boxed{3}", "3"),
    ("nested-box", r"\boxed{\boxed{3}}", "3"),
]


@pytest.fixture(scope="module")
def mv() -> MathVerifier:
    return MathVerifier(timeout_s=3)


def test_tables_are_distinct():
    assert len({c[0] for c in HACKS}) == len(HACKS)
    assert len({c[0] for c in LEGIT}) == len(LEGIT)


@pytest.mark.parametrize("case_id,response,gold,expected,reason", HACKS, ids=[c[0] for c in HACKS])
def test_hack_scores_zero(mv, case_id, response, gold, expected, reason):
    t0 = time.monotonic()
    res = mv.verify(response, gold)
    assert res.score == expected, (case_id, res)
    if reason is not None:
        assert res.reason == reason, (case_id, res)
    assert "tolerance" not in res.details, (case_id, res)
    assert time.monotonic() - t0 < 30.0, (case_id, "took", time.monotonic() - t0)


@pytest.mark.parametrize("case_id,response,gold", LEGIT, ids=[c[0] for c in LEGIT])
def test_legit_answer_still_scores_one(mv, case_id, response, gold):
    res = mv.verify(response, gold)
    assert res.score == 1.0, (case_id, res)


def test_tolerance_still_used_for_decimals(mv):
    res = mv.verify(r"\boxed{3.14159}", r"\pi")
    assert res.score == 1.0 and res.details.get("tolerance") == mv.rel_tol, res


def test_isolation_is_validated():
    with pytest.raises(ValueError, match="isolation"):
        MathVerifier(isolation="thread")


def _run_script(code: str, timeout_s: float, what: str) -> dict:
    """Run ``code`` in a fresh interpreter (2 GiB address space); it prints one JSON line last."""
    assert code.startswith("\n") and not code[1:].startswith(" "), "dedent the script"
    prelude = "import resource; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
    try:
        proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{what}: the script did not finish within {timeout_s} s (unbounded verification?); "
                    f"stderr tail: {(exc.stderr or b'')[-2000:]!r}")
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}; stderr tail: {proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{what}: the script printed nothing; stderr tail: {proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def test_pathological_answers_are_cheap_in_the_main_thread():
    """Huge answers are refused before sympy builds them: fast, and within a 2 GiB address space."""
    out = _run_script(textwrap.dedent(r"""
        import json, time
        from cipo.rewards import MathVerifier
        mv = MathVerifier(timeout_s=2)
        mv.verify(r"\boxed{1}", "1")  # imports
        res = {}
        for ans in [r"\boxed{9^{9^{9}}}", r"\boxed{10^{10^{10}}}", r"\boxed{1000000!}", r"\boxed{9^{9^{9^{9}}}}",
                    r"\boxed{(10^{10})!}", r"\boxed{\prod_{k=1}^{10^{7}} k}"]:
            t = time.monotonic()
            r = mv.verify(ans, "5")
            res[ans] = [r.score, r.reason, time.monotonic() - t]
        print(json.dumps(res))
    """), 120, "main-thread pathological answers")
    for ans, (score, reason, took) in out.items():
        assert score == 0.0 and reason == "answer_too_large", (ans, reason)
        assert took < 10.0, (ans, took)


_IN_THREAD = textwrap.dedent(r"""
    import json, threading, time
    from cipo.rewards import MathVerifier

    def in_thread(mv, resp, gold, wait):
        box = []
        t = time.monotonic()
        th = threading.Thread(target=lambda: box.append(mv.verify(resp, gold)), daemon=True)
        th.start()
        th.join(wait)
        took = time.monotonic() - t
        return [box[0].score, box[0].reason, took] if box else [None, "still running", took]
""")


def test_thread_call_with_huge_answer_returns():
    """Off the main thread there is no SIGALRM and sympy's C arithmetic holds the GIL. Before, a thread verifying
    9^{9^{9}} ran for minutes and the caller's own join(timeout) could not even return (this script then hit the
    subprocess timeout)."""
    out = _run_script(_IN_THREAD + textwrap.dedent(r"""
        mv = MathVerifier(timeout_s=2)
        res = {"warm": in_thread(mv, r"\boxed{\frac{1}{2}}", "0.5", 60)}  # may start a helper process
        res["tower"] = in_thread(mv, r"\boxed{9^{9^{9}}}", "5", 30)
        res["inf"] = in_thread(mv, r"\boxed{\infty}", "5", 30)
        print(json.dumps(res))
    """), 120, "thread call with a huge answer")
    assert out["warm"][:2] == [1.0, "correct"], out
    assert out["tower"][:2] == [0.0, "answer_too_large"] and out["tower"][2] < 20.0, out
    assert out["inf"][:2] == [0.0, "wrong_answer"], out


def test_thread_call_is_killed_at_the_deadline():
    """A slow parse (math-verify evaluates the binomial at parse time) with the helper's own alarms (timeout_s)
    far above deadline_s: only the kill at the deadline can stop it; a fresh helper then replaces the killed one."""
    out = _run_script(_IN_THREAD + textwrap.dedent(r"""
        slow = MathVerifier(timeout_s=60, deadline_s=2)
        in_thread(slow, r"\boxed{2}", "2", 90)  # start a helper: start-up is not part of the deadline
        res = {"binom": in_thread(slow, r"\boxed{\binom{10^{6}}{500000}}", "5", 60)}
        res["after-kill"] = in_thread(slow, r"\boxed{7}", "7", 90)
        print(json.dumps(res))
    """), 240, "thread call past its deadline")
    assert out["binom"][:2] == [0.0, "timeout"], out
    assert out["binom"][2] < 2.0 + 5.0, out  # the deadline plus scheduling slack on a loaded machine
    assert out["after-kill"][:2] == [1.0, "correct"], out


def test_isolation_process_in_main_thread():
    mv = MathVerifier(timeout_s=3, isolation="process")
    assert mv.verify(r"\boxed{\frac{1}{2}}", "0.5").score == 1.0
    res = mv.verify(r"\boxed{\infty}", "5")
    assert res.score == 0.0 and res.reason == "wrong_answer", res
    assert mv.verify(r"\boxed{3}", "").reason == "unparsable_gold"
    assert mv.verify("no answer here", "3").reason == "no_answer"


NO_GUARD_SCRIPT = """
from cipo.rewards import MathVerifier, verify_batch
print("RESULT", [r.score for r in verify_batch(MathVerifier(), [(r"\\boxed{1}", "1"), (r"\\boxed{2}", "2")])])
"""


def test_verify_batch_without_main_guard_raises_clear_error(tmp_path):
    """Workers (forkserver/spawn) re-import the main script; without a guard it used to return all 0.0
    (worker_start_failed). Now: NoMainGuardError naming the fix."""
    script = tmp_path / "no_guard.py"
    script.write_text(NO_GUARD_SCRIPT)
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                              cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("script without a __main__ guard did not finish within 180 s")
    assert proc.returncode != 0, f"expected an error, got exit 0; stdout: {proc.stdout[-2000:]}"
    assert "NoMainGuardError" in proc.stderr, proc.stderr[-3000:]
    assert 'if __name__ == "__main__":' in proc.stderr and str(script) in proc.stderr, proc.stderr[-3000:]
    assert "RESULT" not in proc.stdout


def test_verify_batch_with_main_guard_works(tmp_path):
    script = tmp_path / "guarded.py"
    body = NO_GUARD_SCRIPT.strip().splitlines()
    script.write_text(body[0] + '\nif __name__ == "__main__":\n    ' + body[1] + "\n")
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                              cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("guarded script did not finish within 180 s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT [1.0, 1.0]" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
