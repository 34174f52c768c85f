"""Does CIPO beat GRPO here? A seeded, paired study with ablations and controls: ``python -m bench.study``.

Two models (``--model``):

* ``tiny`` (default, ``configs/tiny.yaml``): for each seed, one warm start (the trainer's own, ``cipo train`` with
  ``trainer.total_steps=0``) is trained and shared by every arm of that seed, so arms of a seed differ only in the
  algorithm (a paired comparison); the warm start itself differs between seeds, so the spread over seeds includes
  it. Each arm trains ``--steps`` steps from that warm start (``model.path`` = its ``init_model/``). The warm
  start is evaluated too.
* ``smollm2`` (``configs/smollm2_arith.yaml``): the pretrained SmolLM2-135M-Instruct itself, no warm start, at a
  per-step budget that fits one job in about 45 min on the 2-core CPU; arms grpo, cipo and the three controls
  (docs/STUDY.md §7 pre-registers it).

Every run is evaluated with :func:`cipo.evaluation.evaluate_run` — the code behind ``cipo eval`` — on the seed's
synthetic held-out split (disjoint from its training prompts, never used for any choice). Arms
(:mod:`bench.study.arms`; everything else is the base config's):

* ``grpo`` — the correction stream off (``correction_enabled: false``), the same base batch;
* ``cipo`` — the full method;
* ``fixed_rho`` — no adaptive replay (``rho_step_up = rho_step_down = 0``: ρ stays at ``rho_init``);
* ``no_shaping`` — no risk-averse shaping (``alpha = 0``);
* ``no_difficulty`` — no difficulty preference (``p_low = 0, p_high = 1``);
* ``offline`` — offline replay (``offline: true``: conditioning trajectories from the first steps only);
* ``cipo_lambda_half`` — λ = 0.5 (the optimizer-cost control);
* ``grpo_lr065`` — GRPO at the config's ``actor.lr`` × 0.65;
* ``grpo_matched`` — GRPO with CIPO's samples per step (a larger group on the same prompts);
* ``cipo_verdict`` — the correction prompt also states the verifier's (true) verdict on the attempt.

Every job (warm start, arm × seed) runs in its own process (a fresh vLLM engine, memory returned), one at a
time, seed by seed; a job whose ``result.json`` holds the same spec is reused (:mod:`bench.study.runner`: run the
command again to finish an interrupted study). Writes to ``--out`` (:mod:`bench.study.report`): ``study.json``
(every run, the aggregate, the settings), ``table.md`` (mean ± 95 % CI over seeds, t-distribution, and paired
differences over the seeds where both arms finished), ``curves.png``, ``pass_at_k.png`` and ``commands.md`` (the
exact commands, and their ``cipo train`` / ``cipo eval`` equivalents).

``--quick``: 1 seed, a few steps of a small batch, a tiny eval — a smoke run of the whole pipeline
(tests/bench/test_study_quick.py; with ``--model smollm2``, tests/bench/test_study_smollm2.py); its numbers mean
nothing.
"""

from .arms import ARMS, build_jobs
from .cli import main, parse_args
from .probes import classify_failure, probe_run
from .stats import aggregate, mean_ci, t_quantile

__all__ = ["ARMS", "aggregate", "build_jobs", "classify_failure", "main", "mean_ci", "parse_args", "probe_run",
           "t_quantile"]
