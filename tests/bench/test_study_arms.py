"""The study's arms and jobs without training anything: every arm's exact overrides, the verdict arm's prompt (the
verdict only there, and true for each attempt), the SmolLM2 mode's jobs (no warm start), the partial-table rule
and the reuse / clean-rerun rule of a job's run directory."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from bench.study.arms import (
    ARMS,
    VERDICT_CORRECT,
    VERDICT_INCORRECT,
    arm_overrides,
    build_jobs,
    job_commands,
    verdict_user_format,
    yaml_float,
)
from bench.study.cli import parse_args
from bench.study.runner import archive_dir, archive_job, clear_run_dir, finished_record, job_file
from bench.study.stats import aggregate
from cipo.algorithm import VERDICT_PATTERN, CorrectionTemplate
from cipo.trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]
# encode/decode for the attempt's token budget: one token per byte (enough for these short attempts)
CODEC = {"encode": lambda text: list(text.encode()), "decode": lambda ids: bytes(ids).decode()}


def _jobs(argv: list[str], tmp_path: Path) -> dict[tuple[int, str], dict]:
    args = parse_args([*argv, "--work", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    return {(job["seed"], job["arm"]): job for job in build_jobs(args)}


def _arm_part(job: dict, base_len: int) -> list[str]:
    return job["overrides"][base_len:]


def test_existing_arms_keep_their_overrides() -> None:
    assert ARMS["grpo"] == ["algorithm.correction_enabled=false"]
    assert ARMS["cipo"] == []
    assert ARMS["fixed_rho"] == ["algorithm.rho_step_up=0.0", "algorithm.rho_step_down=0.0"]
    assert ARMS["no_shaping"] == ["algorithm.alpha=0.0"]
    assert ARMS["no_difficulty"] == ["algorithm.p_low=0.0", "algorithm.p_high=1.0"]
    assert ARMS["offline"] == ["algorithm.offline=true"]


def test_tiny_quick_jobs_are_the_former_commands(tmp_path: Path) -> None:
    jobs = _jobs(["--quick"], tmp_path)
    assert list(jobs) == [(0, "warm_start"), (0, "grpo"), (0, "cipo")]
    work = tmp_path / "runs" / "seed0"
    common = ["trainer.num_threads=1", "trainer.eval_prompts=0", "trainer.save_every=0",
              "algorithm.train_batch_size=8", "rollout.n=4", "algorithm.correction_batch_size=8",
              "algorithm.correction_rollouts=2", "algorithm.template={max_attempt_tokens: 24}",
              "data.synthetic_train_size=400", "rollout.max_response_length=16", "rollout.engine=hf",
              "warmstart.max_steps=20", "warmstart.check_every=20", "warmstart.check_prompts=16",
              "model.tiny_overrides={hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, "
              "num_attention_heads: 2, num_key_value_heads: 1, head_dim: 32}", "trainer.total_steps=3"]
    assert jobs[0, "warm_start"]["overrides"] == [*common, "trainer.seed=0", f"trainer.run_dir={work / 'warm_start'}",
                                                 "trainer.total_steps=0"]
    assert jobs[0, "grpo"]["overrides"] == [
        *common, "trainer.seed=0", f"trainer.run_dir={work / 'grpo'}",
        f"model.path={work / 'warm_start' / 'init_model'}", "warmstart.max_steps=0", "model.tiny_overrides={}",
        "algorithm.correction_enabled=false"]
    assert set(jobs[0, "grpo"]) == {"kind", "arm", "seed", "config", "overrides", "run_dir", "eval"}
    assert jobs[0, "grpo"]["eval"] == {"n": 4, "ks": "1,2,4", "prompts": 16, "attempts_per_prompt": 1,
                                       "refinements": 2, "seed": 0, "engine": "hf"}
    defaults = parse_args(["--work", str(tmp_path)])
    assert defaults.arms == ["grpo", "cipo", "fixed_rho", "no_shaping", "no_difficulty", "offline"]


def test_new_arms_overrides_are_pinned(tmp_path: Path) -> None:
    """tiny.yaml: lr 2e-4, 16 prompts × 8, 16 correction prompts × 4, its user_format."""
    arms = "grpo,cipo_lambda_half,grpo_lr065,grpo_matched,cipo_verdict"
    jobs = _jobs(["--arms", arms, "--seeds", "1"], tmp_path)
    base_len = len(jobs[0, "grpo"]["overrides"]) - 1
    assert _arm_part(jobs[0, "cipo_lambda_half"], base_len) == ["algorithm.lambda_corr=0.5"]
    assert _arm_part(jobs[0, "grpo_lr065"], base_len) == ["algorithm.correction_enabled=false",
                                                          "actor.lr=0.00013000000000000002"]
    # G + B_c·M / B = 8 + 16·4 / 16: 12 samples per prompt, 192 per step like CIPO's 128 + 64
    assert _arm_part(jobs[0, "grpo_matched"], base_len) == ["algorithm.correction_enabled=false", "rollout.n=12"]
    assert _arm_part(jobs[0, "cipo_verdict"], base_len) == [
        'algorithm.template.user_format="{problem}\\nPrevious attempt: {attempt}\\n{verdict}\\n'
        'Solve the problem again."',
        'algorithm.template.verdict_correct="The answer above was judged correct."',
        'algorithm.template.verdict_incorrect="The answer above was judged incorrect."',
        "algorithm.template.allow_verdict_words=true"]
    for arm in arms.split(","):  # every command line loads and resolves
        job = jobs[0, arm]
        overrides = [o for o in job["overrides"] if not o.startswith(("model.path=", "model.tiny_overrides"))]
        load_config(REPO / job["config"], overrides)


def test_derived_arms_follow_the_resolved_config() -> None:
    config = load_config(REPO / "configs" / "smollm2_arith.yaml",
                         ["algorithm.train_batch_size=8", "rollout.n=4", "algorithm.correction_batch_size=8",
                          "algorithm.correction_rollouts=3", "actor.lr=2.0e-4"])
    assert arm_overrides("grpo_matched", config) == ["algorithm.correction_enabled=false", "rollout.n=7"]  # 4 + ⌈24/8⌉
    assert arm_overrides("grpo_lr065", config)[1] == "actor.lr=0.00013000000000000002"
    assert yaml_float(2e-7) == "2.0e-07" and yaml.safe_load(yaml_float(2e-7)) == 2e-7
    with pytest.raises(ValueError, match="resolved config"):
        arm_overrides("grpo_matched")
    assert verdict_user_format("{problem} {attempt}") == "{problem} {attempt}\n{verdict}"


def _verdict_template(tmp_path: Path) -> CorrectionTemplate:
    job = _jobs(["--arms", "cipo_verdict", "--seeds", "1"], tmp_path)[0, "cipo_verdict"]
    overrides = [o for o in job["overrides"] if not o.startswith(("model.path=", "model.tiny_overrides"))]
    return load_config(REPO / job["config"], overrides).cipo_config().template


def test_verdict_is_true_for_each_attempt_and_only_in_the_verdict_arm(tmp_path: Path) -> None:
    template = _verdict_template(tmp_path)
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 2 + 3?"}]
    wrong = template.build(prompt, "2 + 3 = 6", **CODEC, correct=False).messages[-1]
    right = template.build(prompt, "2 + 3 = 5", **CODEC, correct=True).messages[-1]
    assert VERDICT_INCORRECT in wrong["content"] and VERDICT_CORRECT not in wrong["content"]
    assert VERDICT_CORRECT in right["content"] and VERDICT_INCORRECT not in right["content"]
    assert right["content"] == ("What is 2 + 3?\nPrevious attempt: 2 + 3 = 5\nThe answer above was judged correct.\n"
                                "Solve the problem again.")
    with pytest.raises(ValueError, match="pass correct=True or False"):
        template.build(prompt, "2 + 3 = 6", **CODEC)
    # every other arm: the neutral template, no verdict whatever the attempt
    for arm in ["cipo", "cipo_lambda_half", "fixed_rho"]:
        job = _jobs(["--arms", arm, "--seeds", "1"], tmp_path / arm)[0, arm]
        overrides = [o for o in job["overrides"] if not o.startswith(("model.path=", "model.tiny_overrides"))]
        neutral = load_config(REPO / job["config"], overrides).cipo_config().template
        assert not neutral.states_verdict
        for correct in (True, False, None):
            text = neutral.build(prompt, "2 + 3 = 5", **CODEC, correct=correct).text
            assert not VERDICT_PATTERN.search(text.replace("2 + 3 = 5", "")), (arm, text)


def test_verdict_template_needs_its_placeholder_and_the_permission() -> None:
    with pytest.raises(ValueError, match="verdict"):
        CorrectionTemplate(user_format="{problem} {attempt}", verdict_correct="ok.", verdict_incorrect="no.",
                           allow_verdict_words=True)
    with pytest.raises(ValueError, match="verdict word"):
        CorrectionTemplate(user_format="{problem} {attempt} {verdict}", verdict_correct="judged correct.",
                           verdict_incorrect="judged incorrect.")
    with pytest.raises(ValueError, match="verdict_correct"):
        CorrectionTemplate(user_format="{problem} {attempt}", verdict_correct="x")


def test_smollm2_mode_builds_arms_without_a_warm_start(tmp_path: Path) -> None:
    args = parse_args(["--model", "smollm2", "--work", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert args.config == str(Path("configs") / "smollm2_arith.yaml") and args.steps == 30 and args.seeds == 3
    assert args.arms == ["grpo", "cipo", "cipo_lambda_half", "grpo_matched", "cipo_verdict"]
    jobs = build_jobs(args)
    # per seed: the pretrained model evaluated at step 0 (no training), then the five arms
    assert [(job["seed"], job["kind"]) for job in jobs] == [
        (seed, kind) for seed in range(3) for kind in ["pretrained", *["arm"] * 5]]
    for start in jobs[::6]:
        assert start["eval"]["step"] == 0 and "trainer.total_steps=0" in start["overrides"]
        assert start["run_dir"].endswith(f"seed{start['seed']}/pretrained")
        assert "--step 0 " in job_commands(start)[1]
    jobs = [job for job in jobs if job["kind"] == "arm"]
    for job in jobs:
        assert "step" not in job["eval"] and "--step" not in job_commands(job)[1]
        assert not any(o.startswith(("model.path=", "warmstart.", "model.tiny_overrides")) for o in job["overrides"])
        config = load_config(REPO / job["config"], job["overrides"])
        assert config.model.path == "smollm2" and config.warmstart.max_steps == 0
        assert config.trainer.total_steps == 30 and config.actor.lora.rank == 16
        alg = config.cipo_config()
        if job["arm"] == "grpo_matched":  # 6 × 6 = 36 samples, CIPO's 6 × 4 + 6 × 2
            assert config.rollout.n * alg.train_batch_size == 36 and not alg.correction_active
        else:
            assert config.rollout.n == 4 and alg.train_batch_size == 6
    assert {job["arm"]: job for job in jobs if job["seed"] == 0}["grpo"]["eval"]["ks"] == "1,4,16"


def _record(arm: str, seed: int, acc: float) -> dict:
    return {"spec": {"arm": arm, "seed": seed},
            "eval": {"accuracy": acc, "pass_at_k": {"1": acc}, "correction_success": 0.1, "regression_rate": 0.2}}


def test_partial_table_pairs_only_seeds_where_both_finished() -> None:
    records = [_record("grpo", 0, 0.5), _record("grpo", 1, 0.6),
               _record("grpo_matched", 1, 0.55), _record("grpo_matched", 2, 0.9),
               _record("cipo", 0, 0.6), _record("cipo", 1, 0.7), _record("cipo", 2, 0.1)]
    agg = aggregate(records, ["grpo", "cipo", "grpo_matched"], contrasts=[("cipo", "grpo_matched"),
                                                                           ("cipo_verdict", "cipo")])
    vs_grpo = agg["paired_vs_grpo"]["cipo"]["accuracy"]  # seeds 0, 1 (grpo has no seed 2)
    assert vs_grpo["n"] == 2 and vs_grpo["mean"] == pytest.approx(0.1)
    assert agg["paired_vs_grpo"]["grpo_matched"]["accuracy"]["n"] == 1  # seed 1 only: no CI
    assert math.isnan(agg["paired_vs_grpo"]["grpo_matched"]["accuracy"]["ci95"])
    contrast = agg["contrasts"]["cipo−grpo_matched"]
    assert contrast["seeds"] == [1, 2] and contrast["accuracy"]["mean"] == pytest.approx((0.15 - 0.8) / 2)
    assert "cipo_verdict−cipo" not in agg["contrasts"]  # not run yet: no row rather than a wrong one
    assert agg["arms"]["cipo"]["accuracy"]["n"] == 3 and agg["arms"]["cipo"]["seeds"] == [0, 1, 2]
    assert "contrasts" not in aggregate(records, ["grpo", "cipo"])  # the tiny study's aggregate is unchanged


def test_finished_jobs_are_reused_and_leftovers_cleared(tmp_path: Path) -> None:
    run_dir = tmp_path / "seed0" / "cipo"
    job = {"kind": "arm", "arm": "cipo", "seed": 0, "config": "c.yaml", "overrides": ["a=1"], "run_dir": str(run_dir),
           "eval": {}}
    assert finished_record(job) is None
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("x: 1\n")  # an interrupted job: the trainer would refuse this directory
    (run_dir / "checkpoints").mkdir()
    (run_dir / "result.json").write_text('{"spec": {"arm": "cip')  # cut short while written
    assert finished_record(job) is None
    clear_run_dir(run_dir)
    assert run_dir.is_dir() and not any(run_dir.iterdir())
    (run_dir / "result.json").write_text(json.dumps({"spec": {**job, "overrides": ["a=2"]}}))
    assert finished_record(job) is None  # another spec: run again
    (run_dir / "result.json").write_text(json.dumps({"spec": job, "eval": {}}))
    assert finished_record(job)["reused"] is True


def test_archived_jobs_are_reused_without_their_run_directory(tmp_path: Path) -> None:
    """A fresh clone has the committed results folder but no run directories: its archived jobs count as finished."""
    run_dir, out = tmp_path / "runs" / "seed1" / "grpo", tmp_path / "results"
    job = {"kind": "arm", "arm": "grpo", "seed": 1, "config": "c.yaml", "overrides": [], "run_dir": str(run_dir),
           "eval": {}}
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"spec": job, "eval": {}}))
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "eval" / "eval.json").write_text("{}")
    (run_dir / "hf_model").mkdir()  # the model is not archived
    dest = archive_job(job, out)
    assert dest == archive_dir(out, job) == out / "jobs" / "seed1" / "grpo"
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "eval/eval.json", "metrics.jsonl", "result.json"]
    (dest / "curves.png").write_text("an older archive's file")
    assert archive_job(job, out) == dest and not (dest / "curves.png").exists()  # replaced whole
    shutil.rmtree(tmp_path / "runs")
    assert finished_record(job) is None
    record = finished_record(job, out)
    assert record["reused"] is True and record["archive"] == str(dest)
    assert job_file(record, "metrics.jsonl") == dest / "metrics.jsonl"
    (dest / "result.json").write_text(json.dumps({"spec": {**job, "overrides": ["x=1"]}}))
    assert finished_record(job, out) is None  # an archive of another spec: run again


def test_difference_to_the_starting_model_is_paired_by_prompt() -> None:
    from bench.study.report import start_differences
    from bench.study.stats import prompt_paired_difference

    diff = prompt_paired_difference([4, 2, 3], [2, 2, 1], n=4)  # per prompt +0.5, 0, +0.5
    assert diff["mean"] == pytest.approx(1 / 3) and diff["n"] == 3
    assert diff["ci95"] == pytest.approx(4.303 * math.sqrt(1 / 12) / math.sqrt(3), rel=1e-3)
    with pytest.raises(ValueError, match="paired by prompt"):
        prompt_paired_difference([1, 2], [1], n=4)

    def rec(arm: str, kind: str, seed: int, counts: list[int]) -> dict:
        return {"spec": {"arm": arm, "kind": kind, "seed": seed},
                "eval": {"n": 4, "correct_counts": counts, "accuracy": sum(counts) / (4 * len(counts))}}

    records = [rec("pretrained", "pretrained", 0, [1, 1, 2]), rec("cipo", "arm", 0, [3, 1, 2]),
               rec("grpo", "arm", 1, [4, 4, 4])]  # seed 1 has no starting model: no row
    (only,) = start_differences(records)
    assert (only["arm"], only["start"], only["start_accuracy"]) == ("cipo", "pretrained", 1 / 3)
    assert only["mean"] == pytest.approx(2 / 12)


def test_each_job_records_the_commit_it_ran() -> None:
    import re

    from bench.study.runner import code_version

    assert re.fullmatch(r"[0-9a-f]{7,40}(\+changes)?|unknown", code_version())
