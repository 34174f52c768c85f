"""The report of ``python -m bench.long_context``: Markdown tables and the CPU sweep's plot from its result JSON.

Written next to the JSON by every run, and again by ``--redraw`` (after the memory model's predictions are
recomputed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def write_report(data: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    """``<name>.md`` and ``<name>.png`` from a result JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.md"]
    paths[0].write_text(markdown(data))
    png = plot(data, out_dir / f"{name}.png")
    if png is not None:
        paths.append(png)
    return paths


def markdown(data: dict[str, Any]) -> str:
    env = data.get("env", {})
    versions = env.get("versions", {})
    model = data["model"]
    lines = [f"# Long contexts: memory of a training step ({data['suite'].upper()}"
             + (", quick" if data.get("quick") else "") + ")", "",
             f"Command: `{data.get('command', '')}` — {data.get('date', '')}; {env.get('device', '')}, load "
             f"average {env.get('load_avg')}; torch {versions.get('torch')}, transformers "
             f"{versions.get('transformers')}, deepspeed {data.get('deepspeed')}; commit "
             f"`{_short_commit(env.get('commit'))}`, working-tree changes {env.get('worktree_changes')}.", "",
             f"Model: Qwen3-shaped, hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, MLP "
             f"{model['intermediate_size']}, heads {model['num_attention_heads']}/{model['num_key_value_heads']}, "
             f"vocab {model['vocab_size']}, {model['parameters'] / 1e6:.1f} M parameters, {model['dtype']}. "]
    if data["suite"] == "cpu":
        w = data["workload"]
        lines += [f"Workload: {w['what']}; rollouts {w['rollouts']}, response {w['response']}. N = tokens of the "
                  "plain packed micro-batch, L = tokens through the decoder. Peak = extra memory of one forward + "
                  "backward (PyTorch CPU allocator; weights excluded, their gradients included). *Measured* "
                  "columns come from this run; *model* is `bench.long_context.memory_model` (predicted).", "",
                  "| config | context | N | L | peak (measured) | per plain token | model (predicted) | "
                  "measured / model | step (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in data["rows"]:
            if r.get("status") != "ok":
                lines.append(f"| {r['config']} | {r['context']} | | | {r.get('status')} | | | | |")
                continue
            t = r.get("median_s") or r.get("profiled_s")
            lines.append(f"| {r['config']} | {r['context']} | {r['tokens_plain']} | {r['tokens_forward']} | "
                         f"{r['peak_extra_bytes'] / 2**20:.1f} MiB | {r['bytes_per_plain_token'] / 1024:.1f} KiB | "
                         f"{r['predicted_bytes'] / 2**20:.1f} MiB | {r['peak_extra_bytes'] / r['predicted_bytes']:.2f} "
                         f"| {t:.2f} |")
        base = {r["context"]: r for r in data["rows"] if r["config"] == "baseline" and r.get("status") == "ok"}
        if base:
            lines += ["", "Peak relative to the baseline at the same context (lower is better):", "",
                      "| config | " + " | ".join(f"C={c}" for c in sorted(base)) + " |",
                      "|---|" + "---:|" * len(base)]
            for name in data["configs"]:
                cells = []
                for c in sorted(base):
                    r = next((x for x in data["rows"] if x["config"] == name and x["context"] == c
                              and x.get("status") == "ok"), None)
                    cells.append(f"{r['peak_extra_bytes'] / base[c]['peak_extra_bytes']:.2f}×" if r else "–")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        check = data.get("check", {})
        lines += ["", "Every configuration computes the same step: against the baseline's, the gradient norm differs "
                  f"by at most {check.get('max_relative_grad_norm_difference_vs_baseline', float('nan')):.1e} "
                  "(relative) and the loss by at most "
                  f"{check.get('max_abs_loss_difference_vs_baseline', float('nan')):.1e} (absolute)."]
    else:
        lines += ["", "Measured on the GPU: the largest context that trained under each cap.", "",
                  "| cap (GiB) | config | largest context | tokens plain | tokens forward |",
                  "|---:|---|---:|---:|---:|"]
        for cap, per in data.get("largest", {}).items():
            for name, v in per.items():
                if v is None:
                    lines.append(f"| {cap} | {name} | none fits | | |")
                else:
                    lines.append(f"| {cap} | {name} | {v['context']} | {v['tokens_plain']} | {v['tokens_forward']} |")
    if data.get("predicted_limits"):
        limits = data["predicted_limits"]
        names = list(next(iter(limits.values())))
        lines += ["", f"**Predicted, not measured** — the memory model for the Qwen3-4B shape in bf16 (weights + "
                  f"gradients, no optimizer state, flash/flex attention: no dense mask), one correction group of "
                  f"{data['limits_workload']['rollouts']} rollouts × {data['limits_workload']['response']} response "
                  "tokens per micro-batch: the largest correction context C that trains under each cap, and the "
                  "tokens through the decoder (forward) / in the plain packed micro-batch. `–`: not even C = 1 fits.",
                  "", "| cap (GiB) | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]

        def cell(v: Optional[dict[str, int]]) -> str:
            if v is None:
                return "–"
            return f"C={v['context']:,} ({v['tokens_forward']:,} fwd / {v['tokens_plain']:,} plain)"

        for cap, per in limits.items():
            lines.append(f"| {cap} | " + " | ".join(cell(per[n]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def _short_commit(commit: Any) -> str:
    text = str(commit)
    return text[:9] if len(text) == 40 and all(c in "0123456789abcdef" for c in text) else text


def plot(data: dict[str, Any], path: Path) -> Optional[Path]:
    if data["suite"] != "cpu":
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(data["configs"]):
        rows = [r for r in data["rows"] if r["config"] == name and r.get("status") == "ok"]
        if not rows:
            continue
        color = f"C{i}"
        ctx = [r["context"] for r in rows]
        axes[0].plot(ctx, [r["bytes_per_plain_token"] / 1024 for r in rows], "o-", color=color, label=name)
        axes[0].plot(ctx, [r["predicted_bytes"] / r["tokens_plain"] / 1024 for r in rows], ":", color=color)
        axes[1].plot([r["tokens_plain"] for r in rows], [r["peak_extra_bytes"] / 2**20 for r in rows], "o-",
                     color=color, label=name)
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("correction context C (tokens)")
    axes[0].set_ylabel("peak extra memory per plain token (KiB)")
    axes[0].set_title("measured (solid) vs memory model (dotted)")
    axes[1].set_xlabel("plain packed tokens per micro-batch N")
    axes[1].set_ylabel("peak extra memory (MiB)")
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_title("peak of one training step")
    axes[0].legend(fontsize=8)
    w = data["workload"]
    fig.suptitle(f"one correction group per micro-batch: {w['rollouts']} rollouts × {w['response']} response "
                 f"tokens; {data['model']['parameters'] / 1e6:.1f} M-parameter Qwen3, fp32, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
