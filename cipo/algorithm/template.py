"""The correction prompt ``c = template(x, y_prev)`` (docs/DESIGN.md §1).

The template sees the original prompt and the model's own previous trajectory, nothing else: it has no
parameter for the ground truth, a critique or a verdict, and its own wording is neutral, because the previous
attempt may well be correct (replayed successes) and CIPO uses no external signal. Its output is, exactly,
the original prompt, the (possibly truncated) attempt and the template's fixed wording.

One ablation goes beyond the paper: a template with ``verdict_correct``/``verdict_incorrect`` set and a
``{verdict}`` placeholder states the verifier's verdict on the attempt. ``build`` then needs the attempt's
correctness (``correct=``) and picks the matching sentence, so the verdict is true for every attempt, replayed
successes included; such a template also needs ``allow_verdict_words``.

Two renderings of the same content:

* ``messages`` — a chat message list (``{"role", "content"}``) for a tokenizer's chat template;
* ``text`` — raw text, for base models and logs.

Long attempts are cut to a token budget (``max_attempt_tokens``) by keeping their head and tail around an
elision marker: the final answer and the closing argument sit at the end of a trajectory, the plan at its
start, and the middle is mostly exploration. Only the attempt is cut, never the original problem.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Optional, Sequence, Union

Message = dict[str, str]
PromptLike = Union[str, Sequence[Mapping[str, str]]]
Encode = Callable[[str], Sequence[int]]
Decode = Callable[[Sequence[int]], str]

DEFAULT_USER_FORMAT = (
    "{problem}\n\n"
    "Here is a previous attempt at this problem:\n\n"
    "<previous_attempt>\n{attempt}\n</previous_attempt>\n\n"
    "Review the previous attempt, then write a complete solution to the problem above, following its "
    "original instructions."
)
"""Default user message: the problem, the attempt between tags, a neutral request for a full solution."""

DEFAULT_ELISION_MARKER = "\n\n[... {omitted} tokens omitted ...]\n\n"

VERDICT_PATTERN = re.compile(
    r"\b(in)?correct(ly|ness|ed|ion|ions)?\b|\bwrong(ly)?\b|\bmistakes?\b|\bmistaken\b|\berrors?\b|\berroneous\b"
    r"|\bflaw(s|ed)?\b|\bfail(s|ed|ure|ures)?\b|\bright answer\b|\bground[- ]truth\b|\breference answer\b"
    r"|\bexpected answer\b|\bverdict\b|\bbuggy\b|\bbug\b",
    re.IGNORECASE,
)
"""Words that judge an attempt. The template's own wording must not contain them (``allow_verdict_words``
lifts the check for ablations that *do* give the model a verdict)."""


def _require(ok: bool, field: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"CorrectionTemplate.{field} must be {allowed}; got {value!r}")


def _format_fields(fmt: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]


@dataclass(frozen=True)
class CorrectionPrompt:
    """One built correction prompt.

    Attributes:
        messages: chat messages (the original prompt's leading messages, then the correction user message).
        text: the same content as raw text (system content, a blank line, the user message).
        attempt: the attempt as inserted (truncated when ``truncated``).
        truncated: whether the attempt was cut to the token budget.
        attempt_tokens: the attempt's token count before truncation (None when no tokenizer was given).
        omitted_tokens: how many attempt tokens the elision marker replaced (0 when not truncated).
        marker: the rendered elision marker ("" when not truncated).
    """

    messages: list[Message]
    text: str
    attempt: str
    truncated: bool
    attempt_tokens: Optional[int]
    omitted_tokens: int
    marker: str


@dataclass(frozen=True)
class CorrectionTemplate:
    """The wording and token budget of correction prompts.

    Attributes:
        user_format: the correction user message, with exactly the placeholders ``{problem}`` and
            ``{attempt}`` (literal braces doubled). Values are substituted verbatim (braces in a problem or an
            attempt are safe).
        system: system message added when the original prompt has none (a plain-string prompt, or a message
            list without a ``system`` message). None adds nothing.
        max_attempt_tokens: budget of the inserted attempt, elision marker included; None disables truncation.
            When set, :meth:`build` needs ``encode``/``decode``. ≥ 16.
        head_fraction: share of the kept attempt tokens taken from its head; the rest come from its tail.
            In [0, 1].
        elision_marker: text between head and tail; ``{omitted}`` (optional) becomes the number of tokens cut.
        allow_verdict_words: skip the check that the template's own wording contains no verdict words
            (:data:`VERDICT_PATTERN`) — only for ablations that deliberately give the model a verdict.
        verdict_correct, verdict_incorrect: the sentences that state the verifier's verdict on a correct / an
            incorrect attempt, substituted for a ``{verdict}`` placeholder in ``user_format``. Both None (the
            default: the paper's neutral prompt, no placeholder) or both strings (then ``{verdict}`` is required and
            :meth:`build` needs ``correct``).
    """

    user_format: str = DEFAULT_USER_FORMAT
    system: Optional[str] = None
    max_attempt_tokens: Optional[int] = 4096
    head_fraction: float = 0.25
    elision_marker: str = DEFAULT_ELISION_MARKER
    allow_verdict_words: bool = False
    verdict_correct: Optional[str] = None
    verdict_incorrect: Optional[str] = None

    def __post_init__(self) -> None:
        _require(isinstance(self.user_format, str), "user_format", "a string", self.user_format)
        try:
            names = _format_fields(self.user_format)
        except ValueError as exc:
            raise ValueError(f"CorrectionTemplate.user_format is not a valid format string ({exc}); double "
                             "literal braces") from exc
        verdicts = (self.verdict_correct, self.verdict_incorrect)
        _require(all(v is None for v in verdicts) or all(isinstance(v, str) for v in verdicts), "verdict_correct",
                 "None together with verdict_incorrect, or a string together with it", verdicts)
        if self.states_verdict:
            _require(sorted(names) == ["attempt", "problem", "verdict"], "user_format",
                     "a format string with exactly one {problem}, one {attempt} and one {verdict} placeholder "
                     "(verdict_correct/verdict_incorrect are set)", self.user_format)
        else:
            _require(sorted(names) == ["attempt", "problem"], "user_format",
                     "a format string with exactly one {problem} and one {attempt} placeholder", self.user_format)
        _require(self.system is None or isinstance(self.system, str), "system", "None or a string", self.system)
        _require(self.max_attempt_tokens is None or (isinstance(self.max_attempt_tokens, int)
                                                     and not isinstance(self.max_attempt_tokens, bool)
                                                     and self.max_attempt_tokens >= 16),
                 "max_attempt_tokens", "None (no truncation) or an int >= 16", self.max_attempt_tokens)
        _require(isinstance(self.head_fraction, (int, float)) and not isinstance(self.head_fraction, bool)
                 and 0.0 <= self.head_fraction <= 1.0, "head_fraction", "a float in [0, 1]", self.head_fraction)
        _require(isinstance(self.elision_marker, str), "elision_marker", "a string", self.elision_marker)
        try:
            marker_names = _format_fields(self.elision_marker)
        except ValueError as exc:
            raise ValueError(f"CorrectionTemplate.elision_marker is not a valid format string ({exc})") from exc
        _require(set(marker_names) <= {"omitted"}, "elision_marker",
                 "a string whose only placeholder is {omitted}", self.elision_marker)
        _require(isinstance(self.allow_verdict_words, bool), "allow_verdict_words", "a bool",
                 self.allow_verdict_words)
        if not self.allow_verdict_words:
            found = VERDICT_PATTERN.search(self.wording())
            if found:
                raise ValueError(f"CorrectionTemplate wording contains the verdict word {found.group(0)!r}; the "
                                 "correction prompt must stay neutral (no external signal). Set "
                                 "allow_verdict_words=True only for a deliberate ablation.")

    # ------------------------------------------------------------------ building

    @property
    def states_verdict(self) -> bool:
        """Whether the prompt states the verifier's verdict on the attempt (``verdict_correct``/``_incorrect``)."""
        return self.verdict_correct is not None

    def wording(self) -> str:
        """All text the template itself contributes (placeholders removed), for audits and tests."""
        parts = [self.user_format.format(problem="", attempt="", verdict=""),
                 self.elision_marker.replace("{omitted}", "")]
        if self.system:
            parts.append(self.system)
        if self.states_verdict:
            parts.extend([self.verdict_correct, self.verdict_incorrect])
        return "\n".join(parts)

    def build(self, prompt: PromptLike, attempt: str, *, encode: Optional[Encode] = None,
              decode: Optional[Decode] = None, correct: Optional[bool] = None) -> CorrectionPrompt:
        """Build the correction prompt from the original prompt and a previous trajectory.

        Args:
            prompt: the original prompt: a string (the problem) or a chat message list whose last ``user``
                message is the problem (earlier messages, e.g. a system message, are kept as they are).
            attempt: the previous trajectory's response text (decoded without special tokens).
            encode, decode: the tokenizer used for the budget (``encode(text) -> ids``, ``decode(ids) -> text``,
                both without special tokens). Required when ``max_attempt_tokens`` is set.
            correct: the verifier's verdict on the attempt. Required when the template states the verdict
                (:attr:`states_verdict`), ignored otherwise.

        Raises:
            ValueError: on a malformed prompt, a budget without a tokenizer, or a verdict template without
                ``correct``.
        """
        if not isinstance(attempt, str):
            raise ValueError(f"attempt must be a string (the decoded trajectory); got {type(attempt).__name__}")
        verdict = ""
        if self.states_verdict:
            if not isinstance(correct, bool):
                raise ValueError("this CorrectionTemplate states the verdict (verdict_correct/verdict_incorrect are "
                                 f"set): pass correct=True or False, the attempt's verdict; got {correct!r}")
            verdict = self.verdict_correct if correct else self.verdict_incorrect
        leading, problem = _split_prompt(prompt)
        truncated, attempt_tokens, omitted, marker = False, None, 0, ""
        if self.max_attempt_tokens is not None:
            if encode is None or decode is None:
                raise ValueError("CorrectionTemplate.max_attempt_tokens is set: pass encode and decode (the "
                                 "tokenizer), or set max_attempt_tokens=None to insert attempts uncut")
            attempt, attempt_tokens, omitted, marker = truncate_attempt(
                attempt, self.max_attempt_tokens, encode, decode, head_fraction=self.head_fraction,
                marker=self.elision_marker)
            truncated = omitted > 0
        elif encode is not None:
            attempt_tokens = len(encode(attempt))
        body = self.user_format.format(problem=problem, attempt=attempt, verdict=verdict)
        has_system = any(m["role"] == "system" for m in leading)
        messages = [dict(m) for m in leading]
        if self.system is not None and not has_system:
            messages.insert(0, {"role": "system", "content": self.system})
        messages.append({"role": "user", "content": body})
        system_text = "\n\n".join(m["content"] for m in messages[:-1] if m["role"] == "system")
        text = f"{system_text}\n\n{body}" if system_text else body
        return CorrectionPrompt(messages=messages, text=text, attempt=attempt, truncated=truncated,
                                attempt_tokens=attempt_tokens, omitted_tokens=omitted, marker=marker)

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CorrectionTemplate":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CorrectionTemplate key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)


def truncate_attempt(attempt: str, budget: int, encode: Encode, decode: Decode, *, head_fraction: float = 0.25,
                     marker: str = DEFAULT_ELISION_MARKER) -> tuple[str, int, int, str]:
    """Cut ``attempt`` to at most ``budget`` tokens (re-encoded, marker included): head + marker + tail.

    Policy: an attempt within the budget is returned unchanged. Otherwise ``k = budget − len(marker)`` tokens
    are kept, ``floor(k · head_fraction)`` from the head and the rest from the tail, joined by the marker
    (``{omitted}`` = tokens cut). Decoding token slices and re-encoding can merge tokens across the joins
    differently, so the result is re-encoded and ``k`` shrunk by the excess until it fits: the bound holds for
    any tokenizer, and is met with equality-or-less on the first try for tokenizers without cross-join merges.

    Returns:
        ``(text, original_tokens, omitted_tokens, rendered_marker)``; ``omitted_tokens`` is 0 and
        ``rendered_marker`` "" when nothing was cut.

    Raises:
        ValueError: when the marker alone does not fit in the budget.
    """
    ids = list(encode(attempt))
    total = len(ids)
    if total <= budget:
        return attempt, total, 0, ""
    kept = budget - len(encode(marker.format(omitted=total)))
    while kept >= 0:
        head = math.floor(kept * head_fraction)
        tail = kept - head
        rendered = marker.format(omitted=total - kept)
        text = decode(ids[:head]) + rendered + (decode(ids[total - tail:]) if tail else "")
        excess = len(encode(text)) - budget
        if excess <= 0:
            return text, total, total - kept, rendered
        kept -= excess
    raise ValueError(f"the elision marker {marker!r} does not fit in a budget of {budget} tokens; raise "
                     "max_attempt_tokens or shorten the marker")


def correction_prompt_ids(template: CorrectionTemplate, rows: Sequence[Mapping[str, Any]],
                          attempts: Sequence[tuple[int, str]], prompt_ids: Callable[[Any], list[int]],
                          encode: Encode, decode: Decode, correct: Optional[Sequence[bool]] = None
                          ) -> list[list[int]]:
    """Token ids of the correction prompts ``template(x, attempt)`` for ``(row index, attempt text)`` pairs.

    ``prompt_ids`` renders chat messages with the tokenizer's chat template (and applies the prompt-length limit);
    ``encode``/``decode`` measure the attempt's token budget; ``correct`` (one verdict per attempt) is needed by a
    template that states the verdict. One function for the trainer's in-training evaluation and ``cipo eval``, so
    both score corrections of exactly the same prompts."""
    if correct is not None and len(correct) != len(attempts):
        raise ValueError(f"correct has {len(correct)} verdicts for {len(attempts)} attempts")
    verdicts: Sequence[Optional[bool]] = [None] * len(attempts) if correct is None else correct
    built = [template.build(rows[i]["prompt"], text, encode=encode, decode=decode, correct=verdict)
             for (i, text), verdict in zip(attempts, verdicts)]
    return [prompt_ids(p.messages) for p in built]


def _split_prompt(prompt: PromptLike) -> tuple[list[Message], str]:
    """(messages before the problem, problem text) of a string or chat-message prompt."""
    if isinstance(prompt, str):
        return [], prompt
    if not isinstance(prompt, Sequence) or not prompt:
        raise ValueError(f"prompt must be a string or a non-empty list of chat messages; got {prompt!r:.80}")
    messages = []
    for i, m in enumerate(prompt):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"prompt[{i}] must be a mapping with string 'role' and 'content'; got {m!r:.80}")
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message of a chat prompt must be the user's problem; got role "
                         f"{messages[-1]['role']!r}")
    return messages[:-1], messages[-1]["content"]
