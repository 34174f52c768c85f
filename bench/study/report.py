"""The study's report: ``study.json``, ``table.md`` (mean ± 95 % CI per arm, paired differences, training
diagnostics), ``curves.png``, ``pass_at_k.png`` and ``commands.md``."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .arms import ARM_TITLES, GRPO_FAMILY, job_commands
from .runner import REPO, job_file
from .stats import METRICS, aggregate, eval_metrics, mean_ci, prompt_paired_difference

CURVES = [("base/accuracy", "training batch accuracy"), ("corr/success", "correction-stream success (train)"),
          ("replay/rho", "replay ratio ρ")]


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
        path = job_file(rec, "metrics.jsonl")
        if rec["spec"]["kind"] != "arm" or not path.exists():
            continue
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        config_path = job_file(rec, "config.yaml")
        grad_clip = yaml.safe_load(config_path.read_text())["actor"]["grad_clip"] if config_path.exists() else 0.0
        for line in lines:
            base, corr = line.get("actor/tokens/base", 0.0), line.get("actor/tokens/corr", 0.0)
            line["corr_token_share"] = corr / (base + corr) if base + corr else math.nan
            if grad_clip and "actor/grad_norm" in line:
                line["grad_clipped"] = float(line["actor/grad_norm"] > grad_clip)
        values = per_arm.setdefault(rec["spec"]["arm"], {})
        for key, _ in DIAGNOSTICS:
            if rec["spec"]["arm"] in GRPO_FAMILY and key not in ("base/accuracy", "actor/loss/base", "actor/grad_norm",
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


def table_markdown(agg: dict[str, Any], order: Sequence[str], start: str = "same warm start") -> str:
    """The markdown tables: mean ± 95 % CI per arm, paired differences to GRPO and, when ``agg`` has them, the
    other pre-registered contrasts (``start``: what the arms of a seed start from, for the captions)."""
    cols = [m for m, _ in METRICS]
    head = "| arm | " + " | ".join(title for _, title in METRICS) + " |\n|---|" + "---:|" * len(cols) + "\n"
    lines = [head]
    for arm in order:
        if arm in agg["arms"]:
            stats = agg["arms"][arm]
            lines.append(f"| {ARM_TITLES.get(arm, arm)} | " + " | ".join(_fmt(stats[m]) for m in cols) + " |\n")
    text = "".join(lines)
    if agg["paired_vs_grpo"]:
        text += f"\nPaired differences to GRPO (same seed, {start}; mean ± 95 % CI over seeds):\n\n"
        text += head.replace("| arm |", "| arm − GRPO |")
        for arm in order:
            if arm in agg["paired_vs_grpo"]:
                stats = agg["paired_vs_grpo"][arm]
                text += f"| {ARM_TITLES.get(arm, arm)} | " + " | ".join(_fmt(stats[m], signed=True) for m in cols) + \
                    " |\n"
    if agg.get("contrasts"):
        text += (f"\nOther pre-registered paired differences (same seed, {start}; over the seeds where both arms "
                 "finished; mean ± 95 % CI over seeds):\n\n")
        text += head.replace("| arm |", "| contrast | seeds |").replace("|---|", "|---|---|", 1)
        for name, stats in agg["contrasts"].items():
            arm, reference = name.split("−")
            text += (f"| {ARM_TITLES.get(arm, arm)} − {ARM_TITLES.get(reference, reference)} | "
                     f"{','.join(map(str, stats['seeds']))} | "
                     + " | ".join(_fmt(stats[m], signed=True) for m in cols) + " |\n")
    return text


def start_differences(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per trained job: its held-out accuracy minus its seed's starting model's (the ``pretrained`` or
    ``warm_start`` job), paired over the same prompts (:func:`prompt_paired_difference`)."""
    starts = {r["spec"]["seed"]: r for r in records if r["spec"]["arm"] in ("pretrained", "warm_start")}
    out = []
    for r in records:
        start = starts.get(r["spec"]["seed"])
        if r["spec"]["kind"] != "arm" or start is None or "correct_counts" not in r["eval"] \
                or "correct_counts" not in start["eval"] or r["eval"]["n"] != start["eval"]["n"]:
            continue
        diff = prompt_paired_difference(r["eval"]["correct_counts"], start["eval"]["correct_counts"], r["eval"]["n"])
        out.append({"seed": r["spec"]["seed"], "arm": r["spec"]["arm"], "start": start["spec"]["arm"],
                    "start_accuracy": start["eval"]["accuracy"], "accuracy": r["eval"]["accuracy"], **diff})
    return out


def start_markdown(diffs: list[dict[str, Any]]) -> str:
    if not diffs:
        return ""
    text = ("\nAgainst the starting model, per job (same seed, same held-out prompts; mean ± 95 % t-interval over "
            "the prompts, the evaluation's own noise):\n\n| seed | arm | step 0 | last step | difference |\n"
            "|---:|---|---:|---:|---:|\n")
    for d in diffs:
        text += (f"| {d['seed']} | {ARM_TITLES.get(d['arm'], d['arm'])} | {d['start_accuracy']:.3f} "
                 f"| {d['accuracy']:.3f} | {_fmt(d, signed=True)} |\n")
    return text


def jobs_markdown(runs: list[dict[str, Any]]) -> str:
    """What each job cost: training and evaluation minutes (inside the worker) and its peak RSS."""
    text = ("\nJobs (minutes inside the worker process; peak RSS: the worker's, model + in-process vLLM + update):"
            "\n\n| seed | arm | training (min) | evaluation (min) | peak RSS (GiB) | commit |\n"
            "|---:|---|---:|---:|---:|---|\n")
    for r in runs:
        rss = f"{r['peak_rss_gib']:.2f}" if r.get("peak_rss_gib") is not None else "—"
        text += (f"| {r['seed']} | {ARM_TITLES.get(r['arm'], r['arm'])} | {r['train_seconds'] / 60:.1f} "
                 f"| {r['eval_seconds'] / 60:.1f} | {rss} | {r.get('commit') or '—'} |\n")
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
            if arm in GRPO_FAMILY and key != "base/accuracy":
                continue  # no correction stream: ρ is logged but unused
            series = []
            for rec in runs:
                path_m = job_file(rec, "metrics.jsonl")
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
    order = ["warm_start", "pretrained", *args.arms]
    agg = aggregate(records, args.arms, contrasts=[c for c in args.contrasts if set(c) <= set(args.arms)])
    diag = training_diagnostics(records)
    start = "same warm start" if args.model == "tiny" else "same pretrained model"
    table = table_markdown(agg, order, start) + diagnostics_markdown(diag, order)
    runs = [{"seed": r["spec"]["seed"], "arm": r["spec"]["arm"], "run_dir": r["spec"]["run_dir"],
             "metrics": eval_metrics(r["eval"]), "train_seconds": r["train_seconds"],
             "eval_seconds": r["eval_seconds"], "peak_rss_gib": r.get("peak_rss_gib"), "commit": r.get("commit"),
             "reused": r.get("reused", False),
             "failed_attempts": r["eval"].get("failed_attempts"), "correct_attempts": r["eval"].get("correct_attempts"),
             "warmstart": (r["summary"].get("warmstart") or {}).get("steps") if r["spec"]["arm"] == "warm_start"
             else None}
            for r in records]
    settings = {k: v for k, v in vars(args).items() if k not in ("worker",)}
    settings["config"] = str(settings["config"])
    study = {"command": "python -m bench.study " + " ".join(shlex.quote(a) for a in argv), "settings": settings,
             "environment": environment(), "wall_seconds": wall, "runs": runs, "aggregate": agg,
             "training_diagnostics": diag, "vs_start": start_differences(records)}
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
    (out / "table.md").write_text(header + table + start_markdown(study["vs_start"]) + jobs_markdown(runs))
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

