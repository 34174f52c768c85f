"""Correction template: wording, chat/raw renderings, truncation policy, no ground-truth leak."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cipo.algorithm import VERDICT_PATTERN, CorrectionTemplate, truncate_attempt

from .helpers import char_decode, char_encode

NO_BUDGET = CorrectionTemplate(max_attempt_tokens=None)


def test_default_wording_is_neutral():
    template = CorrectionTemplate()
    assert VERDICT_PATTERN.search(template.wording()) is None
    for word in ("incorrect", "wrong", "correct answer", "mistake", "error"):
        assert word not in template.wording().lower()


@pytest.mark.parametrize("wording", [
    "{problem}\nYour previous answer was wrong:\n{attempt}",
    "{problem}\n{attempt}\nFind the mistake.",
    "{problem}\n{attempt}\nThe correct answer differs.",
    "{problem}\n{attempt}\nThis is incorrect.",
])
def test_verdict_words_rejected_unless_allowed(wording):
    with pytest.raises(ValueError, match="verdict"):
        CorrectionTemplate(user_format=wording, max_attempt_tokens=None)
    CorrectionTemplate(user_format=wording, max_attempt_tokens=None, allow_verdict_words=True)


def test_verdict_in_system_message_rejected():
    with pytest.raises(ValueError, match="verdict"):
        CorrectionTemplate(system="Fix the errors.")


@pytest.mark.parametrize("fmt", ["{problem} only", "{attempt} only", "{problem}{attempt}{extra}",
                                 "{problem}{problem}{attempt}", "{problem {attempt}"])
def test_user_format_needs_both_placeholders_once(fmt):
    with pytest.raises(ValueError, match="user_format"):
        CorrectionTemplate(user_format=fmt)


@pytest.mark.parametrize("field,value", [("max_attempt_tokens", 8), ("max_attempt_tokens", 0),
                                         ("head_fraction", 1.5), ("head_fraction", -0.1),
                                         ("elision_marker", "[{n} cut]"), ("system", 3)])
def test_invalid_fields_name_themselves(field, value):
    with pytest.raises(ValueError, match=f"CorrectionTemplate.{field}"):
        CorrectionTemplate(**{field: value})


def test_string_prompt_renderings():
    out = NO_BUDGET.build("Compute 2+2.", "I think it is 4.")
    assert out.messages == [{"role": "user", "content": out.text}]
    assert out.text.startswith("Compute 2+2.\n\n")
    assert "<previous_attempt>\nI think it is 4.\n</previous_attempt>" in out.text
    assert not out.truncated and out.omitted_tokens == 0 and out.marker == "" and out.attempt_tokens is None


def test_chat_prompt_keeps_leading_messages_and_system_rules():
    prompt = [{"role": "system", "content": "You are a careful solver."}, {"role": "user", "content": "Solve x+1=3."}]
    out = CorrectionTemplate(max_attempt_tokens=None, system="Think step by step.").build(prompt, "x = 2")
    assert out.messages[0] == prompt[0]  # the prompt's own system message wins
    assert len(out.messages) == 2 and out.messages[1]["role"] == "user"
    assert out.messages[1]["content"].startswith("Solve x+1=3.")
    assert out.text.startswith("You are a careful solver.\n\n")
    plain = CorrectionTemplate(max_attempt_tokens=None, system="Think step by step.").build("Solve x+1=3.", "x = 2")
    assert plain.messages[0] == {"role": "system", "content": "Think step by step."}
    assert plain.text.startswith("Think step by step.\n\nSolve x+1=3.")


@pytest.mark.parametrize("prompt", [[], [{"role": "assistant", "content": "hi"}], [{"role": "user"}], 5])
def test_bad_prompts_raise(prompt):
    with pytest.raises(ValueError, match="prompt"):
        NO_BUDGET.build(prompt, "attempt")


def test_braces_in_problem_and_attempt_are_literal():
    out = NO_BUDGET.build("Evaluate {x} for x={1}.", "Answer: \\boxed{3} {attempt} {problem}")
    assert "Evaluate {x} for x={1}." in out.text and "\\boxed{3} {attempt} {problem}" in out.text


def test_build_has_no_ground_truth_input():
    # The template never sees the ground truth; ``correct`` (the verifier's verdict) is read only by a template that
    # states the verdict (an ablation, which must also lift the verdict-word check), and a neutral template's prompt
    # does not depend on it.
    params = set(inspect.signature(CorrectionTemplate.build).parameters)
    assert params == {"self", "prompt", "attempt", "encode", "decode", "correct"}
    neutral = CorrectionTemplate(max_attempt_tokens=None)
    built = [neutral.build("What is 2 + 2?", "5", correct=c).messages for c in (None, True, False)]
    assert built[0] == built[1] == built[2]


def test_budget_requires_tokenizer():
    with pytest.raises(ValueError, match="encode and decode"):
        CorrectionTemplate().build("p", "a")


# ---------------------------------------------------------------------------------------------- truncation


def test_short_attempt_is_untouched():
    text, total, omitted, marker = truncate_attempt("short attempt", 64, char_encode, char_decode)
    assert (text, total, omitted, marker) == ("short attempt", 13, 0, "")
    exact = "x" * 64
    assert truncate_attempt(exact, 64, char_encode, char_decode)[0] == exact


def test_long_attempt_keeps_head_and_tail_within_budget():
    attempt = "PLAN " + "m" * 5000 + " FINAL ANSWER: 42"
    template = CorrectionTemplate(max_attempt_tokens=400, head_fraction=0.25)
    out = template.build("Problem text that must stay whole " * 50, attempt, encode=char_encode, decode=char_decode)
    assert out.truncated and out.attempt_tokens == len(attempt)
    assert len(char_encode(out.attempt)) <= 400
    assert out.attempt.startswith("PLAN ") and out.attempt.endswith(" FINAL ANSWER: 42")
    assert out.marker in out.attempt and f"{out.omitted_tokens} tokens omitted" in out.marker
    head, tail = out.attempt.split(out.marker)
    kept = len(head) + len(tail)
    assert kept + out.omitted_tokens == len(attempt)
    assert len(head) == int(kept * 0.25) and len(tail) == kept - len(head)
    assert ("Problem text that must stay whole " * 50) in out.text  # the problem is never cut


@pytest.mark.parametrize("head_fraction", [0.0, 1.0])
def test_head_fraction_extremes(head_fraction):
    attempt = "A" * 100 + "Z" * 100
    text, _, omitted, marker = truncate_attempt(attempt, 60, char_encode, char_decode, head_fraction=head_fraction)
    assert omitted > 0 and len(text) <= 60
    assert text.startswith(marker) if head_fraction == 0.0 else text.endswith(marker)


def test_budget_holds_for_a_tokenizer_that_grows_on_reencode():
    # decode appends a character per call, so head + marker + tail re-encodes longer than its parts.
    def decode(ids):
        return char_decode(ids) + "~"

    text, total, omitted, _ = truncate_attempt("q" * 1000, 100, char_encode, decode)
    assert len(char_encode(text)) <= 100 and total == 1000 and omitted > 900


def test_marker_that_does_not_fit_raises():
    with pytest.raises(ValueError, match="does not fit"):
        truncate_attempt("w" * 100, 16, char_encode, char_decode, marker="[" + "-" * 40 + " {omitted} cut]")


# ---------------------------------------------------------------------------------------------- no leak


_alphabet = st.characters(codec="utf-8", categories=("L", "N", "P", "Zs"), exclude_characters="\r")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(problem=st.text(_alphabet, max_size=200), attempt=st.text(_alphabet, max_size=600),
       answer=st.text(st.characters(categories=("L", "N"), codec="ascii"), min_size=3, max_size=8),
       budget=st.one_of(st.none(), st.integers(min_value=48, max_value=300)),
       chat=st.booleans())
def test_template_never_adds_the_ground_truth(problem, attempt, answer, budget, chat):
    """The output is (prompt, attempt pieces, fixed wording): an answer absent from all three never appears.

    The template cannot know whether the *attempt* holds the answer (a correct one does), so the property is
    that it adds nothing derived from the ground truth beyond what (prompt, attempt) already contain.
    """
    template = CorrectionTemplate(max_attempt_tokens=budget)
    assume(answer not in problem and answer not in attempt and answer not in template.wording())
    prompt = [{"role": "user", "content": problem}] if chat else problem
    out = template.build(prompt, attempt, encode=char_encode, decode=char_decode)
    assume(answer not in out.marker)  # the marker's token count is a number, unrelated to the answer
    assert answer not in out.text
    assert all(answer not in m["content"] for m in out.messages)
    # The output is exactly the fixed wording around the problem and the attempt's head and tail.
    assert out.messages[-1]["content"] == template.user_format.format(problem=problem, attempt=out.attempt)
    if out.truncated:
        head, _, tail = out.attempt.partition(out.marker)
        assert attempt.startswith(head) and attempt.endswith(tail)
    else:
        assert out.attempt == attempt
    assert VERDICT_PATTERN.search(template.wording() + out.marker) is None
    if budget is not None:
        assert len(char_encode(out.attempt)) <= budget
