"""Markdown tables and PNG plots from a suite's merged JSON (``python -m bench report FILE.json`` redraws them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

GiB = 2**30
MiB = 2**20

CPU_TARGET_TIME = 1.1  # fused time ≤ 1.1 × naive (CPU target shape T=8192 H=256 V=32000 fp32; docs/BENCHMARKS.md)
CPU_TARGET_MEMORY = 0.25  # fused peak extra memory ≤ 25 % of naive's
GPU_TARGET_TIME = 1.15  # fused fwd+bwd ≤ 1.15 × the bare LM-head matmul fwd+bwd (docs/BENCHMARKS.md)
GPU_TARGET_MEMORY = 1.5 * GiB  # extra memory beyond the gradients (docs/BENCHMARKS.md)


def _fmt_time(seconds: Optional[float], gpu: bool) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1e3:.1f} ms" if gpu else f"{seconds:.3g} s"


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "–"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


def _ratio(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _spread(r: dict[str, Any], gpu: bool) -> str:
    if r.get("min_s") is None:
        return "–"
    text = f"{_fmt_time(r['min_s'], gpu)}–{_fmt_time(r['max_s'], gpu)}"
    if r.get("iqr_s") is not None:
        text += f" (IQR {_fmt_time(r['iqr_s'], gpu)})"
    return text + f", n={r.get('repeats')}"


def _sci(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.1e}"


def loss_table(shape_result: dict[str, Any], gpu: bool) -> list[str]:
    s = shape_result["shape"]
    lines = [f"#### T={s['tokens']} H={s['hidden']} V={s['vocab']} {s['dtype']}"
             + (f" ({s['tag']})" if s.get("tag") else ""), ""]
    if shape_result.get("status"):
        return lines + [f"Not run: {shape_result['status']}", ""]
    cpu_col = "" if gpu else " CPU time vs naive |"
    lines += ["| method | fwd+bwd median | spread | vs naive |" + cpu_col + " vs matmul | peak extra memory | "
              "vs naive | beyond dH, dW | semantics |",
              "|---|---:|---|---:|" + ("" if gpu else "---:|") + "---:|---:|---:|---:|---|"]
    for r in shape_result["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {r['status']} | | |" + ("" if gpu else " |")
                         + f" | | | | {r['semantics']} |")
            continue
        cpu_cell = "" if gpu else f" {_ratio(r.get('cpu_time_vs_naive'))} |"
        lines.append(
            f"| {r['label']} | {_fmt_time(r['median_s'], gpu)} | {_spread(r, gpu)} | {_ratio(r.get('time_vs_naive'))} "
            f"|{cpu_cell} {_ratio(r.get('time_vs_matmul'))} | {_fmt_bytes(r['peak_extra_bytes'])} "
            f"| {_ratio(r.get('memory_vs_naive'))} | {_fmt_bytes(r['peak_beyond_grads_bytes'])} | {r['semantics']} |")
    profiled = [r for r in shape_result["rows"] if r.get("kernels")]
    if profiled:
        lines += ["", "Device time per kernel (one profiled call, torch.profiler):", ""]
        for r in profiled:
            total = sum(k["ms"] for k in r["kernels"])
            lines.append(f"- {r['label']} ({total:.2f} ms): " + "; ".join(
                f"`{k['kernel'][:60]}` ×{k['calls']} {k['ms']:.2f} ms" for k in r["kernels"]))
    return lines + [""]


def error_table(err: dict[str, Any]) -> list[str]:
    s = err["shape"]
    ref = err.get("reference", {})
    lines = [f"#### Error vs float64: T={s['tokens']} H={s['hidden']} V={s['vocab']} {s['dtype']}", "",
             f"Float64 loss: ours {ref.get('cipo_loss', float('nan')):.6g}, Liger's formula "
             f"{ref.get('liger_loss', float('nan')):.6g} (the loss is a small difference of advantage-weighted terms, "
             "so its relative error is large compared with the gradients' errors).", "",
             "| method | loss abs. err | loss rel. err | ‖dH−dH₆₄‖/‖dH₆₄‖ | ‖dW−dW₆₄‖/‖dW₆₄‖ | max abs logp err "
             "| mean abs logp err | reference |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in err["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {r['status']} | | | | | | |")
            continue
        lines.append(f"| {r['label']} | {_sci(r.get('loss_abs'))} | {_sci(r.get('loss_rel'))} "
                     f"| {_sci(r.get('dH_rel'))} | {_sci(r.get('dW_rel'))} "
                     f"| {_sci(r.get('logp_max_abs'))} | {_sci(r.get('logp_mean_abs'))} "
                     f"| {r.get('reference', r.get('semantics', ''))} |")
    return lines + [""]


def _row(shape_result: dict[str, Any], method: str) -> Optional[dict[str, Any]]:
    return next((r for r in shape_result.get("rows", []) if r["method"] == method and r.get("status") == "ok"), None)


def cpu_targets(loss: dict[str, Any]) -> list[str]:
    target = next((s for s in loss.get("shapes", []) if s["shape"].get("tag") == "cpu-target"), None)
    if target is None:
        return []
    lines = ["#### CPU targets (T=8192, H=256, V=32000, fp32)", ""]
    for method in ("fused", "linear_logprob"):
        r = _row(target, method)
        if r is None or r.get("time_vs_naive") is None:
            lines.append(f"- {method}: not measured")
            continue
        t, m = r["time_vs_naive"], r["memory_vs_naive"]
        t_text = "met" if t <= CPU_TARGET_TIME else f"missed by {(t / CPU_TARGET_TIME - 1) * 100:.0f} %"
        m_text = "met" if m <= CPU_TARGET_MEMORY else f"missed by {(m - CPU_TARGET_MEMORY) * 100:.1f} points"
        c = r.get("cpu_time_vs_naive")
        lines.append(f"- {r['label']}: wall time {t:.2f}× naive (target ≤ {CPU_TARGET_TIME}×: {t_text})"
                     + ("" if c is None else f", process CPU time {c:.2f}× naive")
                     + f"; peak extra memory {m * 100:.1f} % of naive's (target ≤ 25 %: {m_text})")
    return lines + [""]


def gpu_targets(loss: dict[str, Any]) -> list[str]:
    shapes = [s for s in loss.get("shapes", []) if s["shape"].get("tag") == "issue-3"]
    if not shapes:
        return []
    lines = ["#### Issue-3 targets (bf16, V=151936; reported, not asserted)", "",
             "| T | H | fused / matmul (≤ 1.15×) | fused extra beyond dH, dW (≤ 1.5 GiB) |", "|---:|---:|---|---|"]
    for s in shapes:
        f, m = _row(s, "fused"), _row(s, "matmul")
        ratio = None if f is None or m is None else f["median_s"] / m["median_s"]
        rt = "not measured" if ratio is None else f"{ratio:.2f}× ({'met' if ratio <= GPU_TARGET_TIME else 'missed'})"
        mem = "not measured" if f is None else (
            f"{_fmt_bytes(f['peak_beyond_grads_bytes'])} "
            f"({'met' if f['peak_beyond_grads_bytes'] <= GPU_TARGET_MEMORY else 'missed'})")
        lines.append(f"| {s['shape']['tokens']} | {s['shape']['hidden']} | {rt} | {mem} |")
    err = loss.get("error")
    if err:
        rows = {r["method"]: r for r in err["rows"] if r.get("status") == "ok"}
        naive, ll, fused = rows.get("naive"), rows.get("linear_logprob"), rows.get("fused")
        if naive and ll and "logp_max_abs" in ll:
            ok = ll["logp_max_abs"] <= naive["logp_max_abs"]
            lines += ["", f"logp error vs float64 (T={err['shape']['tokens']}): cipo linear_logprob max "
                          f"{ll['logp_max_abs']:.1e} vs torch's bf16 path (bf16 logits upcast to fp32) "
                          f"{naive['logp_max_abs']:.1e}: {'no worse (met)' if ok else 'worse (missed)'}"]
        if naive and fused:
            ok = fused["dH_rel"] <= naive["dH_rel"] * 1.05 and fused["dW_rel"] <= naive["dW_rel"] * 1.05
            lines.append(f"fused gradients vs float64: dH {fused['dH_rel']:.1e}, dW {fused['dW_rel']:.1e} vs naive "
                         f"dH {naive['dH_rel']:.1e}, dW {naive['dW_rel']:.1e}: {'no worse' if ok else 'worse'}")
    return lines + [""]


def trainer_table(tr: dict[str, Any], gpu: bool) -> list[str]:
    m = tr.get("model", {})
    lines = [f"Model: Qwen3 architecture, {m.get('parameters', 0) / 1e6:.1f} M parameters "
             f"(hidden {m.get('hidden_size')}, {m.get('num_hidden_layers')} layers, vocab {m.get('vocab_size')}, "
             f"{m.get('dtype')}), random weights; "
             f"{tr.get('rollouts_per_step')} correction-shaped sequence(s) per step; {tr.get('mode')}; loss: "
             f"{tr.get('loss_config')}.", "",
             "| loss | checkpointing | context | tokens/step | tokens/s | step median | spread | peak extra memory |"
             + (" peak allocated |" if gpu else ""),
             "|---|---|---:|---:|---:|---:|---|---:|" + ("---:|" if gpu else "")]
    for r in tr.get("rows", []):
        head = f"| {r['loss']} | {'on' if r['checkpointing'] else 'off'} | {r['context']} |"
        if r.get("status") != "ok":
            lines.append(head + f" {r.get('tokens', '')} | {r['status']} | | | |" + (" |" if gpu else ""))
            continue
        lines.append(head + f" {r['tokens']} | {r['tokens_per_s']:.0f} | {_fmt_time(r['median_s'], gpu)} | "
                     f"{_spread(r, gpu)} | {_fmt_bytes(r['peak_extra_bytes'])} |"
                     + (f" {r.get('peak_allocated_gib', '–')} GiB |" if gpu else ""))
    if tr.get("longest_fit"):
        lines += ["", "Longest context that fits: " + "; ".join(f"{k}: {v if v else 'none tried fits'}"
                                                               for k, v in tr["longest_fit"].items())]
    return lines + [""]


def verifier_table(v: dict[str, Any]) -> list[str]:
    if "sizes" not in v:  # killed before it wrote anything: the section's status says so
        return []
    lines = [f"Sizes: {v['sizes']['math']} math answers, {v['sizes']['code']} programs; sandbox: {v.get('sandbox')}; "
             f"sanity {'ok' if v.get('sanity_ok') else 'FAILED'}; load average {v.get('load_avg')}.", "",
             "| verifier | workers | items | seconds | verifications/s | worker CPU ms/item |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in v["rows"]:
        lines.append(f"| {r['verifier']} | {r['workers']} | {r['n']} | {r['seconds']} | {r['per_s']} | "
                     f"{r['worker_cpu_ms_per_item']} |")
    return lines + ["", v.get("note", ""), ""]


def small_kernel_table(small: dict[str, Any], gpu: bool) -> list[str]:
    lines = ["### Kernels without an LM head", "", "| kernel | what | median | spread |", "|---|---|---:|---|"]
    for r in small["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['kernel']} | {r['what']} | {r.get('status')} | |")
            continue
        lines.append(f"| {r['kernel']} | {r['what']} | {_fmt_time(r['median_s'], gpu)} | {_spread(r, gpu)} |")
    return lines + [""]


def markdown(data: dict[str, Any]) -> str:
    gpu = data["suite"] == "gpu"
    env = data.get("env", {})
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    changes = env.get("worktree_changes")
    lines = [f"# Benchmarks: suite `{data['suite']}`{' (--quick)' if data.get('quick') else ''}", "",
             f"- Command: `{data['command']}`",
             f"- Machine: {env.get('device')}; {env.get('cpu_count')} CPUs, {env.get('ram_gib')} GiB RAM; "
             f"{env.get('platform')}; load average at start {env.get('load_avg')}"
             + (f"; GPU {env['gpu']}" if env.get("gpu") else ""),
             f"- Commit: `{env.get('commit')}`" + (f" + working-tree changes ({changes['modified']} modified, "
                                                    f"{changes['untracked']} untracked files)" if changes and
                                                   (changes["modified"] or changes["untracked"]) else ""),
             f"- Versions: {versions}", f"- Date: {data.get('date')}; wall time {data.get('seconds')} s", ""]
    for key, sec in data.get("sections", {}).items():
        if sec.get("status") not in (None, "ok"):
            lines += [f"## {key}", "", f"Not completed: {sec['status']}", ""]
        if key.startswith("loss"):
            part = {"loss": "kernel targets", "loss_tiling": "tiling study"}.get(key, "T sweep")
            lines += [f"## Loss: LM head + policy loss, forward + backward ({part})", "",
                      f"Loss: {sec.get('config')}. Peak extra memory: "
                      + ("`torch.cuda.max_memory_allocated` minus the memory allocated before the call"
                         if env.get("gpu") else
                         "profiler memory events (PyTorch CPU allocator), peak of allocated − freed")
                      + " during one call, gradients dH and dW included; \"beyond dH, dW\" subtracts them. "
                      "Times: median of repeated runs after the first (profiled or warm-up) call; compile time "
                      "is never timed.", ""]
            lines += cpu_targets(sec) if not gpu else gpu_targets(sec)
            for s in sec.get("shapes", []):
                lines += loss_table(s, gpu)
            if sec.get("error"):
                lines += error_table(sec["error"])
            if sec.get("small_kernels"):
                lines += small_kernel_table(sec["small_kernels"], gpu)
        elif key == "trainer":
            lines += ["## Trainer: one policy update (packed forward + loss + backward)", ""] + trainer_table(sec, gpu)
        elif key == "verifiers":
            lines += ["## Verifiers: throughput", ""] + verifier_table(sec)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- plots


def plots(data: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - plots are optional where matplotlib is missing
        return []
    written = []
    shapes = [s for key, sec in data.get("sections", {}).items() if key.startswith("loss")
              for s in sec.get("shapes", []) if not s.get("status")]
    series: dict[tuple[int, int, str], dict[str, list[tuple[int, float, float]]]] = {}
    for s in shapes:
        sh = s["shape"]
        for r in s["rows"]:
            if r.get("status") == "ok":
                series.setdefault((sh["vocab"], sh["hidden"], sh["dtype"]), {}).setdefault(r["label"], []).append(
                    (sh["tokens"], r["median_s"], r["peak_extra_bytes"]))
    if series:
        keys = sorted(series)
        fig, axes = plt.subplots(2, len(keys), figsize=(5.5 * len(keys), 8), squeeze=False)
        for j, key in enumerate(keys):
            for label, pts in sorted(series[key].items()):
                pts = sorted(set(pts))
                xs = [p[0] for p in pts]
                axes[0][j].plot(xs, [p[1] for p in pts], marker="o", label=label)
                axes[1][j].plot(xs, [p[2] / MiB for p in pts], marker="o", label=label)
            V, H, dt = key
            for i, ylabel in enumerate(("fwd+bwd time [s]", "peak extra memory [MiB]")):
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("tokens T")
                ax.set_ylabel(ylabel)
                ax.set_title(f"V={V} H={H} {dt}")
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"LM head + policy loss ({name})")
        fig.tight_layout()
        path = out_dir / f"{name}_loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    tr = data.get("sections", {}).get("trainer")
    if tr and any(r.get("status") == "ok" for r in tr.get("rows", [])):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in tr["rows"]:
            if r.get("status") == "ok":
                groups.setdefault(f"{r['loss']}, ckpt {'on' if r['checkpointing'] else 'off'}", []).append(r)
        for label, rows in sorted(groups.items()):
            rows.sort(key=lambda r: r["context"])
            xs = [r["context"] for r in rows]
            axes[0].plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=label)
            axes[1].plot(xs, [r["peak_extra_bytes"] / MiB for r in rows], marker="o", label=label)
        for ax, ylabel in zip(axes, ("tokens/s", "peak extra memory [MiB]")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"one policy update ({name})")
        fig.tight_layout()
        path = out_dir / f"{name}_trainer.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(data: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}.md"
    md.write_text(markdown(data))
    return [md, *plots(data, out_dir, name)]


def redraw(json_path: Path) -> list[Path]:
    data = json.loads(Path(json_path).read_text())
    name = Path(json_path).stem
    return write(data, Path(json_path).parent, name)


def summary(data: dict[str, Any]) -> str:
    """The targets and the headline loss tables (target shapes), for a terminal."""
    gpu = data["suite"] == "gpu"
    lines = [f"## {data['suite']} suite{' (--quick)' if data.get('quick') else ''}: {data.get('env', {}).get('device')}"
             f"; {data.get('seconds')} s", ""]
    for key, sec in data.get("sections", {}).items():
        if sec.get("status") not in (None, "ok"):
            lines.append(f"section {key}: {sec['status']}")
    loss = data.get("sections", {}).get("loss")
    if loss:
        lines += gpu_targets(loss) if gpu else cpu_targets(loss)
        for s in loss.get("shapes", []):
            if s["shape"].get("tag") in ("issue-3", "cpu-target", "quick"):
                lines += loss_table(s, gpu)
    tiling = data.get("sections", {}).get("loss_tiling")
    if tiling:
        lines += ["Tiling study (the automatic rule's evidence):", ""]
        for s in tiling.get("shapes", []):
            lines += loss_table(s, gpu)
        if tiling.get("error"):
            lines += error_table(tiling["error"])
    tr = data.get("sections", {}).get("trainer")
    if tr and tr.get("longest_fit"):
        lines += ["Trainer, longest context that fits: " + "; ".join(f"{k}: {v}" for k, v in tr["longest_fit"].items())]
    return "\n".join(lines)
