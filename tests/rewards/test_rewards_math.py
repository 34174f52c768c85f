"""MathVerifier: a table of cases with expected scores, extraction rules, bounded time, threads."""

from __future__ import annotations

import threading
import time

import pytest

from cipo.rewards import MathVerifier, extract_answer

LONG_FILLER = "Let us think step by step about this. " * 3000  # ~114k characters

# (id, response, ground_truth, expected score)
CASES = [
    # fractions vs decimals
    ("frac-vs-decimal", r"So the result is $\boxed{\frac{1}{2}}$.", "0.5", 1.0),
    ("decimal-vs-frac", r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    ("dfrac", r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
    ("frac-shorthand", r"\boxed{\frac34}", "3/4", 1.0),
    ("wrong-fraction", r"\boxed{\frac{2}{3}}", "0.5", 0.0),
    ("unsimplified-fraction", r"\boxed{\frac{4}{8}}", r"\frac{1}{2}", 1.0),
    ("third-rounded-6", r"\boxed{0.333333}", r"\frac{1}{3}", 1.0),
    ("third-rounded-2", r"\boxed{0.33}", r"\frac{1}{3}", 0.0),
    ("negative", r"\boxed{-\frac{7}{2}}", "-3.5", 1.0),
    ("sign-error", r"\boxed{3.5}", "-3.5", 0.0),
    # radicals
    ("radical-equiv", r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    ("radical-rationalised", r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),
    ("radical-wrong", r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0.0),
    ("pi-expression", r"\boxed{2\pi}", r"2\pi", 1.0),
    ("pi-decimals", r"\boxed{3.14159265}", r"\pi", 1.0),
    ("pi-two-decimals", r"\boxed{3.14}", r"\pi", 0.0),
    # percentages
    ("percent-vs-number", r"\boxed{50\%}", "50", 1.0),
    ("number-vs-percent-gold", r"\boxed{50}", r"50\%", 1.0),
    ("percent-wrong", r"\boxed{40\%}", "50", 0.0),
    # intervals
    ("interval-same", r"\boxed{[1, 2)}", "[1,2)", 1.0),
    ("interval-open-vs-halfopen", r"\boxed{(1,2)}", "[1,2)", 0.0),
    ("interval-infinity", r"\boxed{(-\infty, 3]}", r"(-\infty,3]", 1.0),
    ("interval-union", r"\boxed{(-\infty,0)\cup(1,\infty)}", r"(-\infty,0)\cup(1,\infty)", 1.0),
    # sets
    ("set-order", r"\boxed{\{3, 1, 2\}}", r"\{1,2,3\}", 1.0),
    ("set-missing-element", r"\boxed{\{1, 2\}}", r"\{1,2,3\}", 0.0),
    ("multiple-roots-comma", r"\boxed{2, 3}", "3, 2", 1.0),
    # equations and expressions
    ("equation-vs-value", r"\boxed{x = 3}", "3", 1.0),
    ("value-vs-equation-gold", r"\boxed{3}", "x=3", 1.0),
    ("polynomial-expanded", r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("polynomial-wrong", r"\boxed{(x-1)^2}", "x^2+2x+1", 0.0),
    ("line-equation", r"\boxed{y = 2x + 1}", "y=2x+1", 1.0),
    # units and text
    ("units-cm", r"\boxed{5\text{ cm}}", "5", 1.0),
    ("units-meters-gold", r"\boxed{10}", r"10\text{ meters}", 1.0),
    ("degrees", r"\boxed{30^\circ}", "30", 1.0),
    ("thousands-separator", r"\boxed{1,000}", "1000", 1.0),
    ("big-integer", r"\boxed{123456789}", "123456789", 1.0),
    ("big-integer-off-by-one", r"\boxed{123456788}", "123456789", 0.0),
    # malformed LaTeX
    ("unclosed-boxed", r"The answer is \boxed{\frac{1}{2}", "0.5", 0.0),
    ("unbalanced-inner", r"\boxed{\frac{1}{2}}}} trailing", "0.5", 1.0),
    ("garbage-in-box", r"\boxed{\frac{{}{2}}", "0.5", 0.0),
    ("empty-box", r"\boxed{}", "0", 0.0),
    # no answer
    ("no-answer-text", "I do not know how to solve this problem.", "7", 0.0),
    ("empty-response", "", "7", 0.0),
    # fallbacks
    ("answer-phrase", "Adding them up, the answer is 42.", "42", 1.0),
    ("answer-colon-latex", r"Final answer: $\frac{3}{4}$", "0.75", 1.0),
    ("answer-bold", "**Answer:** **12**", "12", 1.0),
    ("last-number", "First we get 3, then 5, and finally 8", "8", 1.0),
    ("last-number-wrong", "The total is 8 and then we subtract 1 to get 7", "8", 0.0),
    # several boxed answers: the last wins
    ("several-boxed-last-right", r"First try \boxed{3}. Wait, recheck: \boxed{4}", "4", 1.0),
    ("several-boxed-first-right", r"\boxed{4} hmm no, actually \boxed{5}", "4", 0.0),
    ("boxed-beats-later-number", r"\boxed{6} (this took 12 steps)", "6", 1.0),
    # very long responses
    ("long-boxed-at-end", LONG_FILLER + r"\boxed{17}", "17", 1.0),
    ("long-answer-at-start-only", r"\boxed{17}" + LONG_FILLER, "17", 0.0),  # outside the search window
    ("fbox", r"\fbox{9}", "9", 1.0),
    ("gold-already-boxed", r"\boxed{9}", r"$\boxed{9}$", 1.0),
]


@pytest.fixture(scope="module")
def mv() -> MathVerifier:
    return MathVerifier(timeout_s=3)


def test_table_has_enough_cases():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id,response,gold,expected", CASES, ids=[c[0] for c in CASES])
def test_math_table(mv, case_id, response, gold, expected):
    res = mv.verify(response, gold)
    assert res.score == expected, (case_id, res)
    assert res.score in (0.0, 1.0)
    assert isinstance(res.reason, str) and res.reason


@pytest.mark.parametrize(
    "response,expected",
    [
        (r"so \boxed{\frac{1}{2}} done", (r"\frac{1}{2}", "boxed")),
        (r"\boxed{a} and \boxed{b}", ("b", "boxed")),
        (r"\boxed 5 apples", ("5", "boxed")),
        (r"\boxed{\{1,2\}}", (r"\{1,2\}", "boxed")),
        (r"\boxed{2", (None, "malformed_boxed")),
        ("The answer is $x^2$. Done.", ("$x^2$", "answer_phrase")),
        ("the answer is 3.5.", ("3.5", "answer_phrase")),
        ("values 1, 2 and 10/3", ("10/3", "last_number")),
        ("nothing here", (None, "none")),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_fallbacks_can_be_disabled():
    strict = MathVerifier(fallbacks=False)
    assert strict.verify("the answer is 42", "42").reason == "no_answer"
    assert strict.verify(r"\boxed{42}", "42").score == 1.0


def test_reasons_and_details(mv):
    res = mv.verify(r"\boxed{3}", "4")
    assert res.reason == "wrong_answer" and res.details["method"] == "boxed" and res.details["extracted"] == "3"
    assert mv.verify(r"\boxed{3}", "3").reason == "correct"
    assert mv.verify("no digits", "3").reason == "no_answer"
    assert mv.verify(r"\boxed{3}", "").reason == "unparsable_gold"
    assert mv.verify(None, "3").score == 0.0  # type: ignore[arg-type]


def test_pathological_answer_is_bounded():
    """A power tower cannot be evaluated; math-verify's alarms (and ours) bound the time."""
    fast = MathVerifier(timeout_s=1)
    t0 = time.monotonic()
    res = fast.verify(r"\boxed{9^{9^{9^{9}}}}", "5")
    assert res.score == 0.0
    assert time.monotonic() - t0 < 8.0


def test_long_response_is_fast(mv):
    resp = ("1 + 1 = 2, " * 200_000) + r"\boxed{2}"  # 2.2 MB with many numbers
    t0 = time.monotonic()
    assert mv.verify(resp, "2").score == 1.0
    assert time.monotonic() - t0 < 2.0


def test_works_off_the_main_thread(mv):
    """Off the main thread (no SIGALRM) the judging runs in a helper process; the answer is the same."""
    out = []
    t = threading.Thread(target=lambda: out.append(mv.verify(r"\boxed{\frac{1}{2}}", "0.5")))
    t.start()
    t.join(30)
    assert out and out[0].score == 1.0, out


def test_verifier_is_picklable(mv):
    import pickle

    clone = pickle.loads(pickle.dumps(mv))
    assert clone.verify(r"\boxed{1}", "1").score == 1.0
