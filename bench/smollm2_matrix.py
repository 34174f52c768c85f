"""SmolLM2-135M-Instruct on this machine, one setting per row: per-step rollout and training rates and peak RSS for
fp32 and bf16, full fine-tuning and LoRA, shared-prefix packing on and off.

Each setting is ``cipo train configs/smollm2_arith.yaml`` in a fresh process at the study's budget
(``bench.study.arms.SMOLLM2`` without its LoRA keys: 6 prompts × 4 samples, 6 correction prompts × 2, 64 response
tokens), for ``--steps`` steps. Times come from the trainer's own per-step metrics (``time/rollout_base``,
``time/rollout_corr``, ``time/update``: old log-probs, forward + backward, optimizer and the weight push into vLLM);
rollout tokens/s = sampled response tokens / rollout time; training tokens/s = tokens through the decoder in the
update (``batch/tokens_forward``, all passes) / update time. Peak RSS is the child's ``ru_maxrss`` (``wait4``):
model, vLLM engine (in-process) and update together.

    python -m bench.smollm2_matrix --out bench/results/smollm2_matrix      # ~30 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from bench._common import REPO, _git, cpu_model, mem_total_gib

CONFIG = "configs/smollm2_arith.yaml"
# (name, overrides, steps): the study's LoRA setting is "fp32 LoRA"; bf16 rows take one step (they are slow here)
LORA = ["actor.lora.rank=16", "actor.lr=2.0e-4"]
SETTINGS: list[tuple[str, list[str], int]] = [
    ("fp32, full, shared prefix", [], 2),
    ("fp32, full, no shared prefix", ["actor.shared_prefix=false"], 2),
    ("fp32, LoRA r16, shared prefix", LORA, 2),
    ("bf16, full, shared prefix", ["model.dtype=bfloat16"], 1),
    ("bf16, LoRA r16, shared prefix", ["model.dtype=bfloat16", *LORA], 1),
]
STEP_KEYS = ("time/rollout_base", "time/rollout_corr", "time/update", "time/step", "batch/tokens_forward",
             "batch/tokens_forward_unshared", "rollout/response_tokens_base", "rollout/response_tokens_corr",
             "base/accuracy")


def study_budget() -> list[str]:
    """The study's per-step budget (``bench.study.arms.SMOLLM2``) without its LoRA keys."""
    from bench.study.arms import SMOLLM2

    return [o for o in SMOLLM2 if not o.startswith(("actor.lora.", "actor.lr="))]


def run_setting(name: str, overrides: list[str], steps: int, work: Path, timeout_s: float,
                config: str = CONFIG, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train one setting in a fresh process; its per-step rates and the process's peak RSS."""
    run_dir = work / name.replace(",", "").replace(" ", "_")
    sets = [*study_budget(), *overrides, *extra, f"trainer.total_steps={steps}", "trainer.eval_prompts=0",
            "trainer.save_every=0", "trainer.save_hf_model=false", f"trainer.run_dir={run_dir}"]
    cmd = [sys.executable, "-c", "import sys; from cipo.cli import main; sys.exit(main())", "train", config]
    for s in sets:
        cmd += ["--set", s]
    log = work / f"{run_dir.name}.log"
    t0 = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                env=dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + timeout_s
        while True:  # wait4 gives this child's own peak RSS (getrusage(RUSAGE_CHILDREN) is a max over all of them)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(1.0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen, so it never waits again
    row: dict[str, Any] = {"setting": name, "overrides": sets, "steps": steps, "wall_s": time.perf_counter() - t0,
                           "exit": proc.returncode, "peak_rss_gib": usage.ru_maxrss / 2**20,
                           "command": f"cipo train {config} " + " ".join(f"--set {s}" for s in sets)}
    metrics = run_dir / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    row["per_step"] = [{k: line.get(k) for k in STEP_KEYS} for line in lines]
    if proc.returncode != 0 or not lines:
        row["log_tail"] = log.read_text(errors="replace").splitlines()[-20:]
        return row
    last = lines[-1]  # the last step: no one-time costs (first oneDNN primitives, first weight push)
    rollout_s = last["time/rollout_base"] + last["time/rollout_corr"]
    sampled = last["rollout/response_tokens_base"] + last.get("rollout/response_tokens_corr", 0.0)
    row.update({"step_s": last["time/step"], "rollout_s": rollout_s, "update_s": last["time/update"],
                "rollout_tokens_per_s": sampled / rollout_s, "train_tokens_per_s":
                last["batch/tokens_forward"] / last["time/update"], "sampled_tokens": sampled,
                "tokens_forward": last["batch/tokens_forward"]})
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| setting | step (s) | rollouts (s) | sampled tokens | rollout tok/s | update (s) "
        "| tokens through the decoder | training tok/s | peak RSS (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "step_s" not in r:
            lines.append(f"| {r['setting']} | failed (exit {r['exit']}) | | | | | | | {r['peak_rss_gib']:.2f} |")
            continue
        lines.append(f"| {r['setting']} | {r['step_s']:.1f} | {r['rollout_s']:.1f} | {r['sampled_tokens']:.0f} "
                     f"| {r['rollout_tokens_per_s']:.0f} | {r['update_s']:.1f} | {r['tokens_forward']:.0f} "
                     f"| {r['train_tokens_per_s']:.0f} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    ap.add_argument("--only", default="", help="comma-separated row numbers (0-based) to run; default all")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per setting")
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every setting")
    args = ap.parse_args(argv)
    try:
        chosen = [SETTINGS[int(i)] for i in args.only.split(",")] if args.only else SETTINGS
    except (ValueError, IndexError):
        ap.error(f"--only {args.only!r}: comma-separated row numbers from 0 to {len(SETTINGS) - 1} "
                 f"({'; '.join(f'{i}: {name}' for i, (name, _, _) in enumerate(SETTINGS))})")
    work = Path(tempfile.mkdtemp(prefix="cipo_smollm2_matrix_"))
    result: dict[str, Any] = {"machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {mem_total_gib()} GiB",
                              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                              "commit": _git("rev-parse", "--short", "HEAD"), "config": args.config,
                              "budget": [*study_budget(), *args.set], "rows": []}
    try:
        for name, overrides, steps in chosen:
            print(f"[matrix] {name} ({steps} step(s)) ...", flush=True)
            row = run_setting(name, overrides, steps, work, args.timeout_s, args.config, tuple(args.set))
            row["load_average_after"] = os.getloadavg()
            result["rows"].append(row)
            print(f"[matrix] {name}: " + (f"step {row['step_s']:.1f} s, rollout {row['rollout_tokens_per_s']:.0f} "
                                          f"tok/s, training {row['train_tokens_per_s']:.0f} tok/s, "
                                          if "step_s" in row else f"FAILED (exit {row['exit']}), ")
                  + f"peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")  # partial results survive
            args.out.with_suffix(".md").write_text(markdown(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
