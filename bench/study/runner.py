"""Running the study's jobs: each in a fresh process (a fresh vLLM engine, memory returned) that trains, then
evaluates with :func:`cipo.evaluation.evaluate_run` and writes ``result.json`` beside the job's spec.

A job whose ``result.json`` holds the same spec is reused, so an interrupted study is finished by running the same
command again: the unit of resumption is the job. Each finished job is also archived under the results folder
(:func:`archive_job`: its result, metrics log, curves and evaluation, a few hundred kB), which is committed: a clone
without the run directories reuses the archived jobs, so a study spans sessions and machines.

Anything else in a job's run directory is a leftover (an interrupted job, or one with another spec) and is removed
before the job runs again, since the trainer refuses a directory that holds another run's files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
RESULT = "result.json"
SPEC = "study_job.json"


ARCHIVED = (RESULT, "metrics.jsonl", "curves.png", "config.yaml", "eval/eval.json", "eval/pass_at_k.png")
"""What :func:`archive_job` keeps of a finished job's run directory (not the model)."""


def archive_dir(out: Path, job: dict[str, Any]) -> Path:
    """Where the results folder ``out`` keeps the job's archived files."""
    return Path(out) / "jobs" / f"seed{job['seed']}" / job["arm"]


def archive_job(job: dict[str, Any], out: Path) -> Path:
    """Copy the finished job's :data:`ARCHIVED` files from its run directory into :func:`archive_dir`, replacing an
    older archive of the job (the result last, through a temporary name: a half-copied archive never reads as
    finished)."""
    dest = archive_dir(out, job)
    if dest.is_dir():
        shutil.rmtree(dest)  # another spec's files must not mix with this job's
    run_dir = Path(job["run_dir"])
    for name in ARCHIVED[1:]:
        if (run_dir / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / name, dest / name)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / RESULT, dest / (RESULT + ".partial"))
    os.replace(dest / (RESULT + ".partial"), dest / RESULT)
    return dest


def job_file(record: dict[str, Any], name: str) -> Path:
    """A file of the job's run (``metrics.jsonl``, ``config.yaml``): in its run directory, else in its archive."""
    path = Path(record["spec"]["run_dir"]) / name
    if not path.exists() and record.get("archive"):
        return Path(record["archive"]) / name
    return path


def _read_record(result_path: Path, job: dict[str, Any]) -> Optional[dict[str, Any]]:
    if not result_path.exists():
        return None
    try:
        record = json.loads(result_path.read_text())
    except (OSError, ValueError):
        return None  # cut short while written by a version that wrote it in place: run the job again
    return record if record.get("spec") == job else None


def finished_record(job: dict[str, Any], out: Optional[Path] = None) -> Optional[dict[str, Any]]:
    """The job's stored record when it finished with this very spec (``"reused": True`` added): from its run
    directory, else from its archive under the results folder ``out``; None when neither holds it."""
    record = _read_record(Path(job["run_dir"]) / RESULT, job)
    if record is None and out is not None:
        record = _read_record(archive_dir(out, job) / RESULT, job)
        if record is not None:
            record["archive"] = str(archive_dir(out, job))
    if record is not None:
        record["reused"] = True
    return record


def clear_run_dir(run_dir: Path) -> None:
    """Remove what an unfinished or differently specified job left in ``run_dir`` (the directory stays)."""
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def code_version() -> str:
    """The commit the job runs (short hash, ``+changes`` when tracked files outside ``bench/results/`` differ from
    it): a study spans sessions and commits, so each job records its own."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown"
        # the study's own reports under bench/results/ change as it runs: they are not code
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
        return head + ("+changes" if changed else "")
    except OSError:
        return "unknown"


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (model, in-process vLLM engine, update), or a child's if larger."""
    import resource

    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 2**20


def run_worker(spec_path: Path) -> int:
    """Train one job's run, evaluate it, write ``result.json`` beside the spec (the worker process)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from cipo.evaluation import evaluate_run
    from cipo.trainer.config import load_config
    from cipo.trainer.trainer import CIPOTrainer

    spec = json.loads(spec_path.read_text())
    commit = code_version()  # at the start: what this process imported
    t0 = time.perf_counter()
    trainer = CIPOTrainer(load_config(spec["config"], spec["overrides"]))
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    t1 = time.perf_counter()
    ev = spec["eval"]
    result = evaluate_run(spec["run_dir"], step=ev.get("step"), n=ev["n"], ks=ev["ks"], engine=ev["engine"],
                          seed=ev["seed"], out=Path(spec["run_dir"]) / "eval", prompts=ev["prompts"],
                          attempts_per_prompt=ev["attempts_per_prompt"], refinements=ev["refinements"],
                          progress=False)
    record = {"spec": spec, "summary": summary, "eval": result, "train_seconds": t1 - t0,
              "eval_seconds": time.perf_counter() - t1, "peak_rss_gib": peak_rss_gib(),
              "commit": commit}
    # written whole or not at all: a job killed here must not leave a result that reads as finished
    partial = spec_path.parent / (RESULT + ".partial")
    partial.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(partial, spec_path.parent / RESULT)
    return 0


def run_job(job: dict[str, Any], log: Path, out: Optional[Path] = None) -> dict[str, Any]:
    """Run a job in a fresh process (or reuse its result when the same spec already finished), and archive it under
    the results folder ``out`` when given."""
    record = finished_record(job, out)
    if record is not None:
        if out is not None and "archive" not in record:
            record["archive"] = str(archive_job(job, out))  # finished before archiving existed
        return record
    run_dir = Path(job["run_dir"])
    clear_run_dir(run_dir)
    spec_path = run_dir / SPEC
    spec_path.write_text(json.dumps(job, indent=1) + "\n")
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, "-m", "bench.study", "--worker", str(spec_path)], cwd=REPO, env=env,
                              stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"study job seed {job['seed']} {job['arm']} failed (exit {proc.returncode}); log: {log}\n"
                           + "\n".join(tail))
    record = json.loads((run_dir / RESULT).read_text())
    if out is not None:
        record["archive"] = str(archive_job(job, out))
    return record
