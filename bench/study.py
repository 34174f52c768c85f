"""Does CIPO beat GRPO here? A seeded study with ablations (issue 16): ``python -m bench.study --seeds 3``.

For each seed, one warm start (the trainer's own, ``cipo train`` with ``trainer.total_steps=0``) is trained and
shared by every arm of that seed, so arms of a seed differ only in the algorithm (a paired comparison); the
warm start itself differs between seeds, so the spread over seeds includes it. Each arm then trains
``--steps`` steps from that warm start (``model.path`` = the warm start's ``init_model/``) and is evaluated with
:func:`cipo.evaluation.evaluate_run` — the code behind ``cipo eval`` — on the seed's synthetic held-out split
(disjoint from its training prompts, never used for any choice). The warm start is evaluated the same way.

Arms (knobs of :class:`cipo.algorithm.CIPOConfig`; everything else is the base config's):

* ``grpo`` — the correction stream off (``correction_enabled: false``), the same base batch;
* ``cipo`` — the full method;
* ``fixed_rho`` — no adaptive replay (``rho_step_up = rho_step_down = 0``: ρ stays at ``rho_init``);
* ``no_shaping`` — no risk-averse shaping (``alpha = 0``);
* ``no_difficulty`` — no difficulty preference (``p_low = 0, p_high = 1``);
* ``offline`` — offline replay (``offline: true``: conditioning trajectories from the first steps only).

Every job (warm start, arm) runs in its own process (a fresh vLLM engine, memory returned), one at a time,
seed by seed, so an interrupted study keeps whole seeds; a job whose ``result.json`` exists with the same spec
is reused (run the command again to finish an interrupted study). Writes to ``--out``: ``study.json`` (every run,
the aggregate, the settings), ``table.md`` (mean ± 95 % CI over seeds, t-distribution, and paired differences
to GRPO), ``curves.png`` (training curves per arm: mean over seeds, shaded min-max), ``pass_at_k.png`` and
``commands.md`` (the exact commands, and their ``cipo train`` / ``cipo eval`` equivalents).

``--quick``: 1 seed, GRPO and CIPO, a few steps of a small batch, a short warm start and a tiny eval — a smoke
run of the whole pipeline (tests/bench/test_study_quick.py); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]

ARMS: dict[str, list[str]] = {
    "grpo": ["algorithm.correction_enabled=false"],
    "cipo": [],
    "fixed_rho": ["algorithm.rho_step_up=0.0", "algorithm.rho_step_down=0.0"],
    "no_shaping": ["algorithm.alpha=0.0"],
    "no_difficulty": ["algorithm.p_low=0.0", "algorithm.p_high=1.0"],
    "offline": ["algorithm.offline=true"],
}
ARM_TITLES = {
    "warm_start": "warm start (step 0)",
    "grpo": "GRPO (no correction stream)",
    "cipo": "CIPO",
    "fixed_rho": "CIPO, fixed ρ",
    "no_shaping": "CIPO, α = 0",
    "no_difficulty": "CIPO, no difficulty preference",
    "offline": "CIPO, offline replay",
}

# Every job of the study: one torch thread (2 shared cores), no in-training evaluation (the study evaluates
# every run itself, on more prompts), no checkpoints (only the final model is evaluated).
COMMON = ["trainer.num_threads=1", "trainer.eval_prompts=0", "trainer.save_every=0"]

# --quick: a smaller model, batch and response budget, a 20-step warm start and HF rollouts (no vLLM import or
# engine start per process): the whole pipeline in a couple of minutes, numbers meaningless.
QUICK = [
    "algorithm.train_batch_size=8", "rollout.n=4", "algorithm.correction_batch_size=8",
    "algorithm.correction_rollouts=2", "algorithm.template={max_attempt_tokens: 24}", "data.synthetic_train_size=400",
    "rollout.max_response_length=16", "rollout.engine=hf",
    "warmstart.max_steps=20", "warmstart.check_every=20", "warmstart.check_prompts=16",
    "model.tiny_overrides={hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 2,"
    " num_key_value_heads: 1, head_dim: 32}",
]

METRICS = [
    ("accuracy", "held-out accuracy"),
    ("pass@1", "pass@1"),
    ("pass@4", "pass@4"),
    ("pass@16", "pass@16"),
    ("correction_success", "correction success"),
    ("regression_rate", "regression rate"),
    ("accuracy_after_correction", "accuracy after one correction pass"),
    ("resample_success", "resampling baseline of correction success"),
    ("resample_regression", "resampling baseline of regression"),
]

CURVES = [("base/accuracy", "training batch accuracy"), ("corr/success", "correction-stream success (train)"),
          ("replay/rho", "replay ratio ρ")]

# Two-sided 95 % quantiles of Student's t, df = 1..30 (beyond: the normal quantile, 1.96).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"t_quantile: df must be >= 1, got {df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the 95 % CI half-width ``t(df) · sd / √s`` over seeds (NaNs dropped;
    one value: no CI)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": math.nan, "sd": math.nan, "ci95": math.nan, "n": 0}
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return {"mean": mean, "sd": math.nan, "ci95": math.nan, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return {"mean": mean, "sd": sd, "ci95": t_quantile(len(vals) - 1) * sd / math.sqrt(len(vals)), "n": len(vals)}


def eval_metrics(ev: dict[str, Any]) -> dict[str, float]:
    """The table's metrics from one :func:`cipo.evaluation.evaluate_run` result."""
    out = {"accuracy": ev["accuracy"]}
    for k, value in ev["pass_at_k"].items():
        out[f"pass@{k}"] = value
    for key in ("correction_success", "regression_rate", "accuracy_after_correction"):
        out[key] = ev.get(key, math.nan)
    if "correct_counts" in ev:
        from cipo.evaluation import resampling_baselines

        out.update(resampling_baselines(ev["correct_counts"], ev["n"]))
    return out


# ------------------------------------------------------------------------------------------------- jobs


def build_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Warm start then arms, seed by seed: the spec of every job (what the worker runs, and its commands)."""
    work = Path(args.work)
    base = [*COMMON, *(QUICK if args.quick else []), f"trainer.total_steps={args.steps}", *args.set]
    eval_spec = {"n": args.n, "ks": args.k, "prompts": args.eval_prompts, "attempts_per_prompt": args.attempts,
                 "refinements": args.refinements, "seed": args.eval_seed, "engine": args.engine}
    jobs = []
    for seed in args.seed_list:
        ws_dir = work / f"seed{seed}" / "warm_start"
        ws_set = [*base, f"trainer.seed={seed}", f"trainer.run_dir={ws_dir}", "trainer.total_steps=0"]
        jobs.append({"kind": "warm_start", "arm": "warm_start", "seed": seed, "config": str(args.config),
                     "overrides": ws_set, "run_dir": str(ws_dir), "eval": eval_spec})
        for arm in args.arms:
            run_dir = work / f"seed{seed}" / arm
            arm_set = [*base, f"trainer.seed={seed}", f"trainer.run_dir={run_dir}",
                       f"model.path={ws_dir / 'init_model'}", "warmstart.max_steps=0",
                       "model.tiny_overrides={}",  # the warm start's saved model already has them (a ConfigError else)
                       *ARMS[arm]]
            jobs.append({"kind": "arm", "arm": arm, "seed": seed, "config": str(args.config), "overrides": arm_set,
                         "run_dir": str(run_dir), "eval": eval_spec})
    return jobs


def job_commands(job: dict[str, Any]) -> list[str]:
    """The ``cipo train`` and ``cipo eval`` commands that do what the job's worker does in one process."""
    sets = " ".join(f"--set {shlex.quote(s)}" for s in job["overrides"])
    ev = job["eval"]
    return [f"cipo train {shlex.quote(job['config'])} {sets}",
            f"cipo eval --run-dir {shlex.quote(job['run_dir'])} -n {ev['n']} -k {ev['ks']} --prompts {ev['prompts']} "
            f"--attempts-per-prompt {ev['attempts_per_prompt']} --refinements {ev['refinements']} "
            f"--seed {ev['seed']} --engine {ev['engine']} --quiet"]


def run_worker(spec_path: Path) -> int:
    """Train one job's run, evaluate it, write ``result.json`` beside the spec (the worker process)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from cipo.evaluation import evaluate_run
    from cipo.trainer.config import load_config
    from cipo.trainer.trainer import CIPOTrainer

    spec = json.loads(spec_path.read_text())
    t0 = time.perf_counter()
    trainer = CIPOTrainer(load_config(spec["config"], spec["overrides"]))
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    t1 = time.perf_counter()
    ev = spec["eval"]
    result = evaluate_run(spec["run_dir"], n=ev["n"], ks=ev["ks"], engine=ev["engine"], seed=ev["seed"],
                          out=Path(spec["run_dir"]) / "eval", prompts=ev["prompts"],
                          attempts_per_prompt=ev["attempts_per_prompt"], refinements=ev["refinements"],
                          progress=False)
    record = {"spec": spec, "summary": summary, "eval": result, "train_seconds": t1 - t0,
              "eval_seconds": time.perf_counter() - t1}
    (spec_path.parent / "result.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return 0


def run_job(job: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run a job in a fresh process (or reuse its result when the same spec already finished)."""
    run_dir = Path(job["run_dir"])
    result_path = run_dir / "result.json"
    if result_path.exists():
        record = json.loads(result_path.read_text())
        if record.get("spec") == job:
            record["reused"] = True
            return record
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "hf_model", "metrics.jsonl"):
        path = run_dir / stale
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    spec_path = run_dir / "study_job.json"
    spec_path.write_text(json.dumps(job, indent=1) + "\n")
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, "-m", "bench.study", "--worker", str(spec_path)], cwd=REPO, env=env,
                              stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"study job seed {job['seed']} {job['arm']} failed (exit {proc.returncode}); log: {log}\n"
                           + "\n".join(tail))
    return json.loads(result_path.read_text())


# ------------------------------------------------------------------------------------------------- report


def aggregate(records: list[dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Per arm and metric: mean ± CI over seeds; per CIPO-family arm: the paired difference to GRPO."""
    by_arm: dict[str, dict[int, dict[str, float]]] = {}
    for rec in records:
        by_arm.setdefault(rec["spec"]["arm"], {})[rec["spec"]["seed"]] = eval_metrics(rec["eval"])
    out: dict[str, Any] = {"arms": {}, "paired_vs_grpo": {}}
    names = list(dict.fromkeys([m for m, _ in METRICS]
                               + [m for seeds in by_arm.values() for v in seeds.values() for m in v]))
    for arm, seeds in by_arm.items():
        out["arms"][arm] = {m: mean_ci([v.get(m, math.nan) for v in seeds.values()]) for m in names}
        out["arms"][arm]["seeds"] = sorted(seeds)
    grpo = by_arm.get("grpo", {})
    for arm in arms:
        if arm == "grpo" or arm not in by_arm:
            continue
        common = sorted(set(grpo) & set(by_arm[arm]))
        if common:
            out["paired_vs_grpo"][arm] = {
                m: mean_ci([by_arm[arm][s].get(m, math.nan) - grpo[s].get(m, math.nan) for s in common])
                for m in names}
    return out


DIAGNOSTICS = [
    ("corr_token_share", "correction tokens / all tokens"),
    ("shaping/retention", "retention (correct → correct)"),
    ("shaping/correction_rate", "train correction rate (incorrect → correct)"),
    ("replay/rho", "ρ"),
    ("actor/loss/corr", "loss/corr"),
    ("actor/loss/base", "loss/base"),
    ("base/accuracy", "train batch accuracy"),
    ("actor/grad_norm", "gradient norm (before clipping)"),
    ("grad_clipped", "share of steps clipped"),
]


def training_diagnostics(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per arm, mean ± CI over seeds of each run's mean over its steps of the :data:`DIAGNOSTICS` (what the
    correction stream did during training: its share of the tokens, retention, ρ, its loss; how often the joint
    gradient was clipped, which shrinks the base stream's step too)."""
    import yaml

    per_arm: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        path = Path(rec["spec"]["run_dir"]) / "metrics.jsonl"
        if rec["spec"]["kind"] != "arm" or not path.exists():
            continue
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        config_path = path.with_name("config.yaml")
        grad_clip = yaml.safe_load(config_path.read_text())["actor"]["grad_clip"] if config_path.exists() else 0.0
        for line in lines:
            base, corr = line.get("actor/tokens/base", 0.0), line.get("actor/tokens/corr", 0.0)
            line["corr_token_share"] = corr / (base + corr) if base + corr else math.nan
            if grad_clip and "actor/grad_norm" in line:
                line["grad_clipped"] = float(line["actor/grad_norm"] > grad_clip)
        values = per_arm.setdefault(rec["spec"]["arm"], {})
        for key, _ in DIAGNOSTICS:
            if rec["spec"]["arm"] == "grpo" and key not in ("base/accuracy", "actor/loss/base", "actor/grad_norm",
                                                            "grad_clipped"):
                continue  # no correction stream: its metrics are absent or unused (ρ)
            series = [line[key] for line in lines if key in line and not math.isnan(line[key])]
            if series:
                values.setdefault(key, []).append(sum(series) / len(series))
    return {arm: {key: mean_ci(v) for key, v in values.items()} for arm, values in per_arm.items()}


def diagnostics_markdown(diag: dict[str, dict[str, Any]], order: Sequence[str]) -> str:
    """Markdown table of :func:`training_diagnostics`."""
    if not diag:
        return ""
    text = ("\nDuring training (each run's mean over its steps; mean ± 95 % CI over seeds):\n\n| arm | "
            + " | ".join(title for _, title in DIAGNOSTICS) + " |\n|---|" + "---:|" * len(DIAGNOSTICS) + "\n")
    for arm in order:
        if arm in diag:
            text += f"| {ARM_TITLES.get(arm, arm)} | " + " | ".join(
                _fmt(diag[arm][key]) if key in diag[arm] else "—" for key, _ in DIAGNOSTICS) + " |\n"
    return text


def _fmt(stat: dict[str, Any], signed: bool = False) -> str:
    if stat["n"] == 0 or math.isnan(stat["mean"]):
        return "—"
    text = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
    return text if math.isnan(stat["ci95"]) else f"{text} ± {stat['ci95']:.3f}"


def table_markdown(agg: dict[str, Any], order: Sequence[str]) -> str:
    """The two markdown tables: mean ± 95 % CI per arm, and paired differences to GRPO."""
    cols = [m for m, _ in METRICS]
    head = "| arm | " + " | ".join(title for _, title in METRICS) + " |\n|---|" + "---:|" * len(cols) + "\n"
    lines = [head]
    for arm in order:
        if arm in agg["arms"]:
            stats = agg["arms"][arm]
            lines.append(f"| {ARM_TITLES.get(arm, arm)} | " + " | ".join(_fmt(stats[m]) for m in cols) + " |\n")
    text = "".join(lines)
    if agg["paired_vs_grpo"]:
        text += "\nPaired differences to GRPO (same seed, same warm start; mean ± 95 % CI over seeds):\n\n"
        text += head.replace("| arm |", "| arm − GRPO |")
        for arm in order:
            if arm in agg["paired_vs_grpo"]:
                stats = agg["paired_vs_grpo"][arm]
                text += f"| {ARM_TITLES.get(arm, arm)} | " + " | ".join(_fmt(stats[m], signed=True) for m in cols) + \
                    " |\n"
    return text


def plot_curves(records: list[dict[str, Any]], arms: Sequence[str], path: Path, smooth: int = 5) -> Optional[Path]:
    """Training curves per arm from the runs' ``metrics.jsonl``: each seed's series smoothed by a centred moving
    average of ``smooth`` steps, then the mean over seeds (line) and the min-max over seeds (shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6))
    drawn = False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, arm in enumerate(arms):
        runs = [r for r in records if r["spec"]["arm"] == arm]
        for ax, (key, title) in zip(axes, CURVES):
            if arm == "grpo" and key != "base/accuracy":
                continue  # no correction stream: ρ is logged but unused
            series = []
            for rec in runs:
                path_m = Path(rec["spec"]["run_dir"]) / "metrics.jsonl"
                if not path_m.exists():
                    continue
                lines = [json.loads(x) for x in path_m.read_text().splitlines() if x.strip()]
                values = [line.get(key, math.nan) for line in lines]
                if values and not all(math.isnan(v) for v in values):
                    series.append(_moving_average(values, smooth))
            if not series:
                continue
            length = min(len(s) for s in series)
            steps = list(range(1, length + 1))
            cols = [[s[i] for s in series] for i in range(length)]
            mean = [sum(c) / len(c) for c in cols]
            color = colors[index % len(colors)]
            ax.plot(steps, mean, label=f"{ARM_TITLES.get(arm, arm)} ({len(series)} seeds)", linewidth=1.4,
                    color=color)
            if len(series) > 1:
                ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], alpha=0.15, color=color)
            ax.set_title(title, fontsize=9, loc="left")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"training curves (mean over seeds, shaded: min-max; {smooth}-step moving average)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _moving_average(values: list[float], window: int) -> list[float]:
    half = window // 2
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - half):i + half + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def environment() -> dict[str, Any]:
    """Machine, versions and the code's git state, for the report."""
    import platform

    import torch

    info: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                            "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "platform": platform.platform()}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        info["vllm"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                        check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        info["uncommitted_changes"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def write_report(out: Path, args: argparse.Namespace, jobs: list[dict[str, Any]], records: list[dict[str, Any]],
                 wall: float, argv: Sequence[str]) -> dict[str, Any]:
    """``study.json``, ``table.md``, ``curves.png``, ``pass_at_k.png`` and ``commands.md`` under ``out``."""
    from cipo.evaluation import plot_pass_at_k

    out.mkdir(parents=True, exist_ok=True)
    order = ["warm_start", *args.arms]
    agg = aggregate(records, args.arms)
    diag = training_diagnostics(records)
    table = table_markdown(agg, order) + diagnostics_markdown(diag, order)
    runs = [{"seed": r["spec"]["seed"], "arm": r["spec"]["arm"], "run_dir": r["spec"]["run_dir"],
             "metrics": eval_metrics(r["eval"]), "train_seconds": r["train_seconds"],
             "eval_seconds": r["eval_seconds"], "reused": r.get("reused", False),
             "failed_attempts": r["eval"].get("failed_attempts"), "correct_attempts": r["eval"].get("correct_attempts"),
             "warmstart": (r["summary"].get("warmstart") or {}).get("steps") if r["spec"]["arm"] == "warm_start"
             else None}
            for r in records]
    settings = {k: v for k, v in vars(args).items() if k not in ("worker",)}
    settings["config"] = str(settings["config"])
    study = {"command": "python -m bench.study " + " ".join(shlex.quote(a) for a in argv), "settings": settings,
             "environment": environment(), "wall_seconds": wall, "runs": runs, "aggregate": agg,
             "training_diagnostics": diag}
    (out / "study.json").write_text(json.dumps(study, indent=1, sort_keys=True, default=str) + "\n")
    reused = sum(bool(r.get("reused")) for r in records)
    reused_note = f" ({reused} of {len(records)} jobs reused from an earlier invocation)" if reused else ""
    header = (f"# Study results{' (--quick smoke run: numbers mean nothing)' if args.quick else ''}\n\n"
              f"`{study['command']}` — {len(args.seed_list)} seed(s) {args.seed_list}, {args.steps} steps per arm, "
              f"eval: {args.eval_prompts} held-out prompts × n = {args.n}, {args.attempts} attempt(s) per prompt × "
              f"{args.refinements} refinements; wall time of this invocation {wall / 60:.1f} min"
              f"{reused_note}, time inside the jobs (training + evaluation, without process start-up) "
              f"{sum(r['train_seconds'] + r['eval_seconds'] for r in records) / 60:.1f} min "
              f"({study['environment']['cpus']} CPUs, load average at the end "
              f"{', '.join(f'{x:.1f}' for x in study['environment']['load_average'])}).\n\n"
              "Mean ± 95 % CI over seeds (t-distribution); pass@1 equals the sampled accuracy by definition.\n\n")
    (out / "table.md").write_text(header + table)
    plot_curves(records, args.arms, out / "curves.png")
    curves = {}
    for arm in order:
        stats = agg["arms"].get(arm)
        if stats:
            ks = [int(m.split("@")[1]) for m in stats if m.startswith("pass@")]
            curves[ARM_TITLES.get(arm, arm)] = {str(k): stats[f"pass@{k}"]["mean"] for k in ks}
    plot_pass_at_k(curves, out / "pass_at_k.png", title=f"held-out pass@k, mean over seeds (n = {args.n})")
    cmds = ["# Commands\n", "The study (each job below runs as one worker process that trains, then evaluates):\n",
            f"```bash\n{study['command']}\n```\n",
            "What each job does, as `cipo` commands (paths are relative to the repository root):\n", "```bash"]
    for job in jobs:
        cmds.append(f"# seed {job['seed']}, {job['arm']}")
        cmds.extend(job_commands(job))
    cmds.append("```\n")
    (out / "commands.md").write_text("\n".join(cmds))
    return study


# ------------------------------------------------------------------------------------------------- probes


def classify_failure(text: str, row: dict) -> str:
    """Error class of one synthetic-addition response, column by column against the true operands: ``correct``,
    ``format``, ``wrong column count``, ``misread operand digit``, ``dropped/extra carry``, ``miscomputed column
    sum`` or ``boxed answer disagrees with columns`` (the first fault from the units column on)."""
    import re

    from cipo.data import synthetic

    truth = row["reward_model"]["ground_truth"]
    if synthetic.score(text, truth) >= 1.0:
        return "correct"
    boxed = synthetic.last_boxed(text)
    if boxed is None or not re.fullmatch(r"\s*\d+\s*", boxed):
        return "format"
    op, operands = synthetic._expr_operands(row)
    if op != "+":
        raise ValueError("classify_failure handles addition only")
    cols = [synthetic._digits_rev(x) for x in operands]
    steps = text.rsplit("\\boxed{", 1)[0].split()
    if len(steps) != max(len(c) for c in cols):
        return "wrong column count"
    carry = 0
    for i, step in enumerate(steps):
        match = re.fullmatch(r"(\d+(?:\+\d+)*)=(\d+)", step)
        if not match:
            return "format"
        terms = [int(x) for x in match.group(1).split("+")]
        digits = [c[i] for c in cols if i < len(c)]
        if sorted(terms[:len(digits)]) != sorted(digits):
            return "misread operand digit"
        if terms[len(digits):] != ([carry] if carry else []):
            return "dropped/extra carry"
        if sum(terms) != int(match.group(2)):
            return "miscomputed column sum"
        carry = int(match.group(2)) // 10
    return "boxed answer disagrees with columns"


def probe_run(run_dir: Path, prompts: int = 96, n: int = 8, attempts: int = 2, refinements: int = 4,
              seed: int = 0) -> dict[str, Any]:
    """Diagnostics of a run's final policy on its held-out split (HF engine): the error classes of its failures
    (:func:`classify_failure`), and how refinements relate to their attempt — identical, same boxed answer, or
    another answer, verified or not. Explains *why* correction success is what it is (docs/STUDY.md §3)."""
    import collections

    from cipo import evaluation
    from cipo.data import synthetic
    from cipo.rollout import SamplingConfig, make_engine

    config = evaluation.load_run_config(run_dir)
    policy = evaluation.resolve_policy(run_dir, None, config)
    rows, _ = evaluation.held_out_rows(config, None, prompts)
    engine = make_engine("hf", policy.model_dir)
    tok = engine.tokenizer

    def prompt_ids(messages) -> list[int]:
        return evaluation.truncated_prompt_ids(tok, messages, config.data.max_prompt_length)

    sampling = SamplingConfig(temperature=config.rollout.temperature, max_tokens=config.rollout.max_response_length,
                              seed=seed, return_logprobs=False)
    out = engine.generate([prompt_ids(r["prompt"]) for r in rows], n, sampling)
    classes = collections.Counter(classify_failure(t, rows[k // n]) for k, t in enumerate(out.texts))
    picked = [(k // n, out.texts[k]) for k in range(len(out.texts)) if k % n < attempts]
    corr_ids = evaluation.correction_prompt_ids(
        config.cipo_config().template, rows, picked, prompt_ids,
        encode=lambda x: list(tok(x, add_special_tokens=False)["input_ids"]),
        decode=lambda i: tok.decode(i, skip_special_tokens=True))
    refined = engine.generate(corr_ids, refinements, SamplingConfig(**{**sampling.to_dict(), "seed": seed + 99}))
    relation = collections.Counter()
    for a, (i, text) in enumerate(picked):
        truth = rows[i]["reward_model"]["ground_truth"]
        before = "right" if synthetic.score(text, truth) >= 1.0 else "wrong"
        for ref in refined.texts[a * refinements:(a + 1) * refinements]:
            kind = ("identical" if ref.strip() == text.strip() else
                    "same answer" if synthetic.last_boxed(ref) == synthetic.last_boxed(text) else "other answer")
            relation[f"{before} attempt -> {kind}, {'verified' if synthetic.score(ref, truth) >= 1 else 'fails'}"] += 1
    engine.close()
    wrong = sum(v for k, v in classes.items() if k != "correct")
    return {"run_dir": str(run_dir), "samples": len(out.texts), "failures": wrong,
            "failure_classes": {k: v / wrong for k, v in classes.most_common() if k != "correct"} if wrong else {},
            "refinements": dict(sorted(relation.items()))}


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.study", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--seed-list", default=None, help="explicit comma-separated seeds (overrides --seeds)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    parser.add_argument("--config", default=str(Path("configs") / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="training steps per arm")
    parser.add_argument("--eval-prompts", type=int, default=96, help="held-out prompts per evaluation")
    parser.add_argument("-n", type=int, default=16, help="samples per held-out prompt")
    parser.add_argument("-k", default="1,2,4,8,16", help="k of pass@k")
    parser.add_argument("--attempts", type=int, default=2, help="attempts per prompt given to the correction pass")
    parser.add_argument("--refinements", type=int, default=4, help="refinements per correction prompt")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--engine", choices=("auto", "vllm", "hf"), default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every job (repeatable), e.g. data.synthetic_difficulty=...")
    parser.add_argument("--out", default=str(Path("bench") / "results" / "study"))
    parser.add_argument("--work", default=str(Path("runs") / "study"), help="run directories")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, grpo+cipo, 3 steps, small batches, tiny eval")
    parser.add_argument("--probe", nargs="+", default=None, metavar="RUN_DIR",
                        help="instead of a study: error classes and refinement behaviour of finished runs (JSON)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.probe:
        return args
    if args.quick:
        defaults = {"seeds": 1, "arms": "grpo,cipo", "steps": 3, "eval_prompts": 16, "n": 4, "k": "1,2,4",
                    "attempts": 1, "refinements": 2, "engine": "hf"}
        for key, value in defaults.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        if args.out == parser.get_default("out"):
            args.out = str(Path("runs") / "study_quick" / "results")
        if args.work == parser.get_default("work"):
            args.work = str(Path("runs") / "study_quick")
    args.seed_list = ([int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds)))
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        parser.error(f"--arms: unknown {unknown}; choose from {','.join(ARMS)}")
    if not args.seed_list:
        parser.error("--seeds must be >= 1")
    from cipo.evaluation import EvalError, parse_ks

    try:
        ks = parse_ks(args.k, args.n)
    except EvalError as exc:
        parser.error(str(exc))
    args.k = ",".join(map(str, ks))
    if args.attempts > args.n:
        parser.error(f"--attempts {args.attempts} exceeds -n {args.n}")
    if not Path(args.config).is_file() and not (REPO / args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return run_worker(Path(args.worker))
    if args.probe:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        for run_dir in args.probe:
            print(json.dumps(probe_run(Path(run_dir)), indent=1), flush=True)
        return 0
    from tqdm.auto import tqdm

    jobs = build_jobs(args)
    started = time.perf_counter()
    records = []
    print(f"study: {len(args.seed_list)} seed(s) × ({len(args.arms)} arms + warm start) = {len(jobs)} jobs, "
          f"{args.steps} steps each; runs under {args.work}, results to {args.out}", flush=True)
    bar = tqdm(jobs, desc="study", unit="job", dynamic_ncols=True)
    for job in bar:
        bar.set_postfix(seed=job["seed"], arm=job["arm"])
        log = Path(job["run_dir"]).with_name(f"{job['arm']}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        record = run_job(job, log)
        records.append(record)
        m = eval_metrics(record["eval"])
        tqdm.write(f"seed {job['seed']} {job['arm']:<13} {'(reused) ' if record.get('reused') else ''}"
                   f"{time.perf_counter() - t0:6.1f} s (train {record['train_seconds']:.0f} s, eval "
                   f"{record['eval_seconds']:.0f} s): acc {m['accuracy']:.3f}  pass@{args.k.split(',')[-1]} "
                   f"{m.get('pass@' + args.k.split(',')[-1], math.nan):.3f}  corr {m['correction_success']:.3f}  "
                   f"regr {m['regression_rate']:.3f}")
        # a partial report after every job: an interrupted study still leaves its finished seeds on disk
        write_report(Path(args.out), args, jobs, records, time.perf_counter() - started, argv)
    bar.close()
    study = write_report(Path(args.out), args, jobs, records, time.perf_counter() - started, argv)
    print((Path(args.out) / "table.md").read_text())
    print(f"study: {len(jobs)} jobs in {study['wall_seconds'] / 60:.1f} min; {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
