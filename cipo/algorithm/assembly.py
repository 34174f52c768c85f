"""One training step's base + correction sequences as one :class:`~cipo.packing.PackedBatch`, and its advantages.

Layout: the base groups first (stream 0, group ids ``0 … G_b − 1``), then the correction groups (stream 1,
group ids ``G_b … G_b + G_c − 1``), each group's rollouts in order — so the streams' group ids never collide
and group normalisation never mixes them. Loss masks cover response tokens only (``PackedBatch``'s
convention). The rollout engine's log-probs, when given, go to ``rollout_logp`` and, unless a trainer forward
supplied them, to ``old_logp`` (one update per batch: the sampler *is* the old policy). λ is not baked into the
batch: the loss takes ``CIPOConfig.lambda_corr`` (``cipo.cipo_policy_loss(..., lambda_corr=λ,
advantages=step_advantages(batch, config, regression=...))``).

With the correction stream off (``CIPOConfig.correction_active`` False) the batch holds the base sequences
only and the loss is plain GRPO's, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch

from ..advantages import group_advantages
from ..packing import BASE_STREAM, CORRECTION_STREAM, PackedBatch, SequenceSample, TokenIds, TokenValues
from .config import CIPOConfig
from .pass_rate import PromptId
from .selector import PromptResult, Selection
from .shaping import ShapingResult, shape_advantages, shape_rewards
from .template import CorrectionPrompt, CorrectionTemplate, Decode, Encode

_LOGP_FIELDS = ("old_logp", "rollout_logp", "ref_logp")


@dataclass
class Rollout:
    """One sampled response.

    Attributes:
        response_ids: the response tokens.
        reward: the verifier's reward (shaped or not, see :func:`shape_correction_groups`).
        correct: the verifier's verdict (needed for shaping correction rollouts).
        rollout_logp: the rollout engine's log-prob of each response token.
        old_logp: the old policy's log-probs from a trainer forward; defaults to ``rollout_logp``.
        ref_logp: the reference policy's log-probs (for a KL penalty).
    """

    response_ids: TokenIds
    reward: float
    correct: Optional[bool] = None
    rollout_logp: Optional[TokenValues] = None
    old_logp: Optional[TokenValues] = None
    ref_logp: Optional[TokenValues] = None


@dataclass
class RolloutGroup:
    """The responses to one prompt: a base prompt's G responses, or a correction prompt's M refinements.

    Attributes:
        prompt_ids: the (correction) prompt's tokens, chat template applied.
        rollouts: the responses, at least one.
        prompt_id: the original prompt's id (for metrics and the pass-rate tracker).
        conditioning_correct: correction groups only — whether the conditioning trajectory was correct.
    """

    prompt_ids: TokenIds
    rollouts: list[Rollout]
    prompt_id: Optional[PromptId] = None
    conditioning_correct: Optional[bool] = None


def build_correction_prompts(selection: Selection, candidates: Sequence[PromptResult], template: CorrectionTemplate,
                             *, encode: Optional[Encode] = None, decode: Optional[Decode] = None
                             ) -> list[CorrectionPrompt]:
    """The correction prompt of every pick, in the selection's order (``candidates`` as given to the selector)."""
    out = []
    for pick in selection.picks:
        result = candidates[pick.result_index]
        attempt = result.trajectories[pick.trajectory_index]
        out.append(template.build(result.prompt, attempt.text, encode=encode, decode=decode, correct=attempt.correct))
    return out


def shape_correction_groups(corr_groups: Sequence[RolloutGroup], config: CIPOConfig
                            ) -> tuple[list[RolloutGroup], ShapingResult]:
    """Risk-averse shaping of the correction groups with ``config.alpha`` and ``config.shaping_target``.

    Needs ``conditioning_correct`` on every group and ``correct`` on every rollout. Returns new groups (rewards
    shaped in ``"reward"`` mode, unchanged in ``"advantage"`` mode) and the :class:`ShapingResult`, whose
    ``regression`` list follows the correction sequences in batch order (pass it to :func:`step_advantages`).
    """
    cond, correct, rewards = [], [], []
    for g, group in enumerate(corr_groups):
        if group.conditioning_correct is None:
            raise ValueError(f"corr_groups[{g}].conditioning_correct is None; shaping needs the conditioning "
                             "trajectory's correctness")
        for r, rollout in enumerate(group.rollouts):
            if rollout.correct is None:
                raise ValueError(f"corr_groups[{g}].rollouts[{r}].correct is None; shaping needs the verdict")
            cond.append(bool(group.conditioning_correct))
            correct.append(bool(rollout.correct))
            rewards.append(float(rollout.reward))
    result = shape_rewards(cond, correct, rewards, config.alpha, target=config.shaping_target)
    shaped_groups, k = [], 0
    for group in corr_groups:
        rollouts = []
        for rollout in group.rollouts:
            rollouts.append(replace(rollout, reward=result.rewards[k]))
            k += 1
        shaped_groups.append(replace(group, rollouts=rollouts))
    return shaped_groups, result


def assemble_step(base_groups: Sequence[RolloutGroup], corr_groups: Sequence[RolloutGroup] = (),
                  config: Optional[CIPOConfig] = None, *, mark_shared_prefixes: bool = True,
                  device: Union[str, torch.device] = "cpu") -> PackedBatch:
    """Pack one step: base groups (stream 0), then correction groups (stream 1).

    Args:
        base_groups: the base prompts' groups.
        corr_groups: the correction prompts' groups; dropped when ``config`` disables the correction stream.
        config: the CIPO config (None: keep every given group).
        mark_shared_prefixes: give the sequences of a group ``prefix_id = group id`` (they share the prompt),
            a hint for shared-prefix packing; False leaves -1.
        device: where the batch's tensors go.

    Raises:
        ValueError: an empty group, or a log-prob field given for some rollouts and not others.
    """
    if config is not None and not config.correction_active:
        corr_groups = ()
    labelled = ([("base_groups", i, BASE_STREAM, g) for i, g in enumerate(base_groups)]
                + [("corr_groups", i, CORRECTION_STREAM, g) for i, g in enumerate(corr_groups)])
    # A log-prob field must be all-or-nothing: PackedBatch would silently drop a partial one.
    present: dict[str, list[tuple[str, bool]]] = {name: [] for name in _LOGP_FIELDS}
    sequences: list[SequenceSample] = []
    for group_id, (kind, index, stream, group) in enumerate(labelled):
        where = f"{kind}[{index}]"
        if not group.rollouts:
            raise ValueError(f"{where} has no rollouts; a group needs at least one")
        for r, rollout in enumerate(group.rollouts):
            old = rollout.old_logp if rollout.old_logp is not None else rollout.rollout_logp
            values = {"old_logp": old, "rollout_logp": rollout.rollout_logp, "ref_logp": rollout.ref_logp}
            for name in _LOGP_FIELDS:
                present[name].append((f"{where}.rollouts[{r}]", values[name] is not None))
            sequences.append(SequenceSample(
                prompt_ids=group.prompt_ids, response_ids=rollout.response_ids, reward=float(rollout.reward),
                group_id=group_id, stream=stream, prefix_id=group_id if mark_shared_prefixes else -1, **values))
    for name, flags in present.items():
        have = [f for f in flags if f[1]]
        if have and len(have) != len(flags):
            missing = next(where for where, ok in flags if not ok)
            raise ValueError(f"{name} is given for some rollouts but not for {missing}; give it for all or none")
    return PackedBatch.from_sequences(sequences, device=device)


def shaped_group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, regression: Sequence[bool],
                            config: CIPOConfig, *, estimator: str = "grpo") -> torch.Tensor:
    """CIPO's advantage rule: rewards normalised within each group (:func:`cipo.group_advantages`), then
    ``A − α`` on the regressions when ``config.shaping_target == "advantage"`` (in ``"reward"`` mode the rewards
    are already shaped and the flags are not used).

    Args:
        rewards: ``[S]`` (shaped) rewards; the result has their dtype (float32 unless float64).
        group_ids: ``[S]`` integer group ids.
        regression: ``[S]`` one flag per sequence (False for base sequences).
    """
    adv = group_advantages(rewards, group_ids, estimator=estimator)
    if config.shaping_target != "advantage":
        return adv
    return shape_advantages(adv, regression, config.alpha)


def step_advantages(batch: PackedBatch, config: CIPOConfig, *, regression: Optional[Sequence[bool]] = None,
                    estimator: str = "grpo") -> torch.Tensor:
    """Per-sequence advantages ``[S]`` of an assembled step (:func:`shaped_group_advantages` on its rewards).

    Args:
        regression: one flag per *correction* sequence in batch order (:attr:`ShapingResult.regression`);
            ignored in ``"reward"`` mode (the rewards are already shaped); None: no regressions.
    """
    if config.shaping_target != "advantage" or regression is None:
        return group_advantages(batch.reward, batch.group_id, estimator=estimator)
    corr_rows = torch.nonzero(batch.stream == CORRECTION_STREAM).flatten().tolist()
    flags = [bool(f) for f in regression]
    if len(flags) != len(corr_rows):
        raise ValueError(f"regression has {len(flags)} flags; the batch has {len(corr_rows)} correction sequences")
    full = [False] * batch.num_seqs
    for row, flag in zip(corr_rows, flags):
        full[row] = flag
    return shaped_group_advantages(batch.reward, batch.group_id, full, config, estimator=estimator)
