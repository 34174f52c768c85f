"""Weights out of a run, without the launcher: the consolidated HF model of any checkpoint.

``cipo export RUN_DIR [--step N] [--out DIR]`` reads a single-process checkpoint (``step_N.pt``) or a DeepSpeed
one (``step_N/``, ZeRO-2 or ZeRO-3 shards, consolidated to fp32 on the CPU by DeepSpeed's ``zero_to_fp32``) and
writes ``save_pretrained`` output with the run's tokenizer. The trainer itself exports ``<run_dir>/hf_model`` at
the end of training; this is for any other step, or a run that was stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .backend import POLICY_PREFIX
from .checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint


def find_checkpoint(run_dir: Path, step: Optional[int] = None) -> Path:
    """The checkpoint of ``step`` (file or directory), or the latest one."""
    if step is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint (no checkpoints/latest)")
        return path
    base = checkpoint_path(run_dir, step)
    for candidate in (base.with_suffix(".pt"), base):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{run_dir} has no checkpoint of step {step} ({base.name}.pt or {base.name}/)")


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The policy's full weights in a checkpoint, under HF parameter names (fp32 for DeepSpeed checkpoints)."""
    path = Path(path)
    if path.is_file():
        payload = load_checkpoint(path)
        if "lora_scaling" in payload:
            from .lora import merge_lora_state_dict

            return merge_lora_state_dict(payload["model"], payload["lora_scaling"])
        return payload["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {name.removeprefix(POLICY_PREFIX): tensor for name, tensor in state.items()}


def export_checkpoint(run_dir: Path, out_dir: Path, step: Optional[int] = None) -> Path:
    """Write the checkpoint of ``step`` (default: the latest) as an HF model directory; returns ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    source = initial_model_dir(run_dir)
    path = find_checkpoint(run_dir, step)
    weights = checkpoint_weights(path)
    model = AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path} does not match the model in {source}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(source), local_files_only=True).save_pretrained(str(out_dir))
    return Path(out_dir)


def initial_model_dir(run_dir: Path, model_path: Optional[str] = None) -> Path:
    """The HF directory a run started from (what its rollout engine loaded first, and the model a checkpoint's
    weights go into): ``init_model/`` (the built tiny model), else the directory ``model.path`` names
    (``model_path``, default read from ``RUN/config.yaml``).

    Raises:
        FileNotFoundError: no ``init_model/`` and no ``config.yaml``, or ``model.path`` names no usable model.
    """
    run_dir = Path(run_dir)
    if (run_dir / "init_model" / "config.json").is_file():
        return run_dir / "init_model"
    if model_path is None:
        import yaml

        config_file = run_dir / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no init_model/ and no config.yaml)")
        model_path = str(yaml.safe_load(config_file.read_text())["model"]["path"])
    from ..models.gguf_source import ModelSourceError, resolve_model_source

    try:
        return resolve_model_source(model_path)
    except ModelSourceError as exc:
        raise FileNotFoundError(f"{run_dir}: the initial model is missing (no init_model/config.json): {exc}"
                                ) from None
