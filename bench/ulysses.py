"""Ulysses sequence parallelism on CPU: memory per rank of a training step, one process vs 2 ranks splitting it.

    python -m bench.ulysses                      # → bench/results/ulysses_cpu.{json,md}
    python -m bench.ulysses --quick              # small shapes (CI smoke test, ~30 s)

Launches ``torchrun --nproc_per_node 2`` on itself (gloo). Both ranks hold the same model (bench.long_context's
CPU Qwen3, fp32, sdpa) and the same correction groups (bench.long_context's workload: a prompt of C tokens, 4
rollouts × 128 response tokens). First each rank runs the whole step alone (``sp = 1``: what one process does),
then :class:`cipo.trainer.sequence_parallel.UlyssesSP` splits every step over the two ranks (``sp = 2``); the
trainer's step is the same (``PolicyModule`` forward, fused loss on the rank's share of the sequences,
backward). Per row: the larger of the two ranks' peaks (PyTorch's CPU allocator; weights excluded, gradients
included), the memory model's prediction for a rank (``bench.long_context.memory_model(sp=...)``), and the group's
loss and gradient norm (summed over the ranks), which must equal the one-process step's.

What it can and cannot say: on CPU, sdpa with a mask keeps a float copy of the whole ``T × T`` mask per layer on
every rank — sequence parallelism does not split it — so the quadratic term limits the saving here; on a GPU with
flash-attn or flex_attention there is no such term (predicted, not measured: docs/LONG_CONTEXT.md). The two ranks
share the machine's cores, so step times are not a speed claim.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("CIPO_FORCE_TRITON", "0")

import torch  # noqa: E402

from bench._common import environment, log, write_json  # noqa: E402
from bench.long_context import (  # noqa: E402
    CONFIGS,
    CPU_MODEL,
    QUICK_MODEL,
    build_model,
    configure,
    correction_group,
    measure,
    memory_model,
)

REPO = Path(__file__).resolve().parents[1]
SP_CONFIGS = ("baseline", "checkpointing", "all")  # bench.long_context's switch sets, each with sp = 1 and sp = 2
SP_SIZE = 2


def worker(out_dir: Path, quick: bool) -> None:
    """One rank (under torchrun): the sweep with sp = 1, then with sp = 2; rank 0 writes ``rows.json``."""
    import deepspeed

    from cipo.trainer.build_locks import prepare_deepspeed
    from cipo.trainer.sequence_parallel import UlyssesSP

    prepare_deepspeed()  # as the trainer: no shm op to build, no endless wait on a stale build lock
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    device = torch.device("cpu")
    spec = dict(QUICK_MODEL if quick else CPU_MODEL)
    contexts = [64, 128] if quick else [256, 512, 1024, 2048]
    rollouts, response = (2, 16) if quick else (4, 128)
    torch.manual_seed(0)
    model = build_model(spec, device, torch.float32)
    params = sum(p.numel() for p in model.parameters())
    rows: list[dict[str, Any]] = []

    def sweep(sp: Optional[UlyssesSP]) -> None:
        for context in contexts:
            batch = correction_group(context, rollouts, response, spec["vocab_size"], device)
            for name in SP_CONFIGS:
                switches = CONFIGS[name]
                configure(model, switches)
                row = measure(model, batch, switches, device, timed_runs=0, sequence_parallel=sp)
                peaks: list[Any] = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(peaks, row.get("peak_extra_bytes"))
                size = sp.size if sp is not None else 1
                pred = memory_model(spec, context=context, rollouts=rollouts, response=response, act_bytes=4,
                                    param_count=params, fused=switches["fused"], shared=switches["shared"],
                                    tiled=switches["tiled"], ckpt=switches["ckpt"], sp=size)
                row.update(config=name, sp=size, context=context, tokens_plain=batch.num_tokens,
                           tokens_forward=pred["tokens_forward"], predicted_bytes=int(pred["total"]),
                           peak_per_rank=peaks)
                if row["status"] == "ok":
                    row["peak_extra_bytes"] = max(peaks)
                rows.append(row)
                if rank == 0:
                    log(f"[ulysses] sp={size} {name:<14} C={context:<5} N={batch.num_tokens:<6} {row['status']:<6.6} "
                        + (f"{row['peak_extra_bytes'] / 2**20:8.1f} MiB per rank (model "
                           f"{row['predicted_bytes'] / 2**20:8.1f})" if row["status"] == "ok" else ""))

    sweep(None)
    sweep(UlyssesSP.setup(model, SP_SIZE))
    if rank == 0:
        meta = {"model": {**spec, "dtype": "torch.float32", "parameters": params, "attn_implementation": "sdpa"},
                "workload": {"contexts": contexts, "rollouts": rollouts, "response": response}, "rows": rows}
        write_json(out_dir / "rows.json", meta)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def check(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The sp = 2 steps against the one-process steps of the same config and context: the largest relative
    gradient-norm difference and absolute loss difference (the on-policy loss is ~0: only its absolute
    difference means something)."""
    one = {(r["config"], r["context"]): r for r in rows if r["sp"] == 1 and r.get("status") == "ok"}
    grad = loss = 0.0
    for r in rows:
        ref = one.get((r["config"], r["context"]))
        if r["sp"] > 1 and r.get("status") == "ok" and ref is not None:
            grad = max(grad, abs(r["grad_norm"] - ref["grad_norm"]) / max(ref["grad_norm"], 1e-30))
            loss = max(loss, abs(r["loss"] - ref["loss"]))
    return {"max_relative_grad_norm_difference_vs_one_process": grad, "max_abs_loss_difference_vs_one_process": loss}


def markdown(data: dict[str, Any]) -> str:
    env, model, w = data["env"], data["model"], data["workload"]
    lines = [f"# Ulysses sequence parallelism: memory per rank ({'CPU, quick' if data['quick'] else 'CPU'})", "",
             f"Command: `{data['command']}` — {data['date']}; {env.get('device', '')}, load average "
             f"{env.get('load_avg')}; torch {env.get('versions', {}).get('torch')}, commit "
             f"`{str(env.get('commit'))[:12]}`, working-tree changes {env.get('worktree_changes')}.", "",
             f"Model: Qwen3-shaped, hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, heads "
             f"{model['num_attention_heads']}/{model['num_key_value_heads']}, vocab {model['vocab_size']}, "
             f"{model['parameters'] / 1e6:.1f} M parameters, fp32, sdpa. Workload: one correction group per step, a "
             f"prompt of C tokens, {w['rollouts']} rollouts × {w['response']} response tokens (N plain tokens; the "
             "`all` config forwards the shared-prefix stream). Peak = the larger of the two ranks' extra memory of "
             "one forward + backward (measured); model = `bench.long_context.memory_model` for one rank "
             "(predicted).", "",
             "| config | C | N | sp = 1 peak | sp = 2 peak per rank | sp 2 / sp 1 | model sp 2 | measured / model |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = data["rows"]
    for r in rows:
        if r["sp"] == 1:
            continue
        one = next((x for x in rows if x["sp"] == 1 and x["config"] == r["config"] and x["context"] == r["context"]),
                   None)
        if r.get("status") != "ok" or one is None or one.get("status") != "ok":
            lines.append(f"| {r['config']} | {r['context']} | {r['tokens_plain']} | | {r.get('status')} | | | |")
            continue
        lines.append(f"| {r['config']} | {r['context']} | {r['tokens_plain']} | "
                     f"{one['peak_extra_bytes'] / 2**20:.1f} MiB | {r['peak_extra_bytes'] / 2**20:.1f} MiB | "
                     f"{r['peak_extra_bytes'] / one['peak_extra_bytes']:.2f}× | "
                     f"{r['predicted_bytes'] / 2**20:.1f} MiB | {r['peak_extra_bytes'] / r['predicted_bytes']:.2f} |")
    c = data["check"]
    lines += ["", "The two ranks compute the one-process step: gradient norm within "
              f"{c['max_relative_grad_norm_difference_vs_one_process']:.1e} (relative), loss within "
              f"{c['max_abs_loss_difference_vs_one_process']:.1e} (absolute)."]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Optional[list[str]] = None) -> None:
    import datetime as _dt
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m bench.ulysses", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model and contexts")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--name", default=None, help="file stem (default ulysses_cpu[-quick])")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.quick)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={SP_SIZE}",
               f"--master_port={_free_port()}", "-m", "bench.ulysses", "--worker", tmp,
               *(["--quick"] if args.quick else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=REPO, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"bench.ulysses: torchrun failed ({proc.returncode})")
        data = json.loads((Path(tmp) / "rows.json").read_text())
    data.update(quick=args.quick, env=environment(torch.device("cpu")), check=check(data["rows"]),
                command=" ".join(["python -m bench.ulysses", *(shlex.quote(a) for a in (argv or sys.argv[1:]))]),
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    name = args.name or "ulysses_cpu" + ("-quick" if args.quick else "")
    path = args.out / f"{name}.json"
    write_json(path, data)
    (args.out / f"{name}.md").write_text(markdown(data))
    print(f"wrote {path}, {args.out / f'{name}.md'}")


if __name__ == "__main__":
    main()
