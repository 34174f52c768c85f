"""What a run is built from, once, before the first step: the data, the policy and its tokenizer (an HF model
directory, or the tiny model built and warm-started in code) and the frozen reference model. The rollout engine,
the prompt codec and sampling come from :mod:`cipo.rollout.session`.

:class:`cipo.trainer.trainer.CIPOTrainer` calls these in its constructor and then only orchestrates. Every
function takes the run's :class:`TrainConfig` and what it needs of the trainer's state explicitly.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch

from ..algorithm import CIPOConfig
from ..config import PolicyLossConfig
from ..rollout.session import PromptCodec, engine_from_config, sampling_from_config
from .backend import PolicyModule, deepspeed_config
from .config import TrainConfig
from .distributed import DistContext
from .forward import lm_head_weight


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def all_synthetic(config: TrainConfig) -> bool:
    """No data files: the synthetic arithmetic task for training and evaluation."""
    return not config.data.train_files and not config.data.val_files


def load_data(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """The training and held-out rows (``data.*``): the synthetic splits, or the concatenated files."""
    from ..data.tasks import make_task_splits

    data = config.data
    if all_synthetic(config):
        return make_task_splits(data.synthetic_task, data.synthetic_train_size, data.synthetic_val_size,
                                seed=config.trainer.seed, difficulty=data.synthetic_difficulty or None)
    from ..data.dataset import load_dataset

    train = [row for path in data.train_files for row in load_dataset(path)]
    val = [row for path in data.val_files for row in load_dataset(path)]
    return train, val


def zero3(config: TrainConfig) -> bool:
    return config.actor.strategy == "deepspeed" and config.deepspeed.zero_stage == 3


def from_pretrained(config: TrainConfig, source: Path, device: torch.device) -> torch.nn.Module:
    """The HF model from ``source``; under ZeRO-3 each rank loads only its partition of the weights."""
    from transformers import AutoModelForCausalLM

    model_cfg = config.model
    kwargs = dict(dtype=getattr(torch, model_cfg.dtype), local_files_only=True,
                  attn_implementation=model_cfg.attn_implementation)
    if not zero3(config):
        return AutoModelForCausalLM.from_pretrained(str(source), **kwargs).to(device)
    from transformers.integrations import HfDeepSpeedConfig

    marker = HfDeepSpeedConfig(deepspeed_config(config))  # noqa: F841 - alive while loading: zero.Init
    return AutoModelForCausalLM.from_pretrained(str(source), **kwargs)


def load_policy(config: TrainConfig, alg: CIPOConfig, run_dir: Path, device: torch.device, dist: DistContext,
                train_rows: list[dict], fresh: bool) -> tuple[torch.nn.Module, Any, Path, dict[str, Any]]:
    """The policy (HF model, in training mode), its tokenizer, the directory the engine loads (the initial
    weights) and the run history the setup wrote (``{"warmstart": ...}`` when the tiny model was warm-started
    now; the same on every rank)."""
    from transformers import AutoTokenizer

    model_cfg = config.model
    init_dir = run_dir / "init_model"
    history: dict[str, Any] = {}
    if model_cfg.path == "tiny":
        # Rank 0 builds (and warm-starts) the tiny model; the others wait, then load what it saved.
        if dist.is_main and (fresh or not (init_dir / "config.json").exists()):
            warmstart = build_tiny(config, alg, init_dir, train_rows, device, dist)
            if warmstart is not None:
                history["warmstart"] = warmstart
        history = dist.broadcast_object(history)
        source = init_dir
    else:
        source = model_directory(model_cfg.path)
        init_dir = source
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    model = from_pretrained(config, source, device)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if config.actor.lora.rank > 0:
        from .lora import apply_lora

        model = apply_lora(model, config.actor.lora)
    model.train()
    return model, tokenizer, init_dir, history


def model_directory(path: str) -> Path:
    """The local HF directory ``model.path`` names (not ``"tiny"``): the directory itself, or for ``"smollm2"`` and
    ``*.gguf`` files the HF directory converted from the GGUF once and cached (:mod:`cipo.models.gguf_source`, whose
    ``ModelSourceError`` — a ConfigError — names what is wrong)."""
    from ..models.gguf_source import resolve_model_source

    return resolve_model_source(path)


def build_tiny(config: TrainConfig, alg: CIPOConfig, init_dir: Path, train_rows: list[dict], device: torch.device,
               dist: DistContext) -> Optional[dict[str, Any]]:
    """Build the tiny model and tokenizer in code, warm-start them on the synthetic task, save them in
    ``init_dir``; returns the warm start's record (None without a warm start)."""
    from ..models.tiny import build_tiny_model, build_tiny_tokenizer
    from ..warmstart import AccuracyStopper, warm_start

    tokenizer = build_tiny_tokenizer(init_dir)
    model = build_tiny_model(init_dir, tokenizer, seed=config.trainer.seed, **config.model.tiny_overrides)
    ws = config.warmstart
    record = None
    if ws.max_steps > 0:
        # The stopper samples from the saved random init, then from pushed weights; its engine is closed
        # before the trainer's own engine starts on the warm weights.
        # Only rank 0 warm-starts: a vLLM engine would join the other ranks' process group, so use HF there.
        engine = engine_from_config(config, init_dir, device, kind="hf" if dist.distributed else None)
        template = alg.template
        codec = PromptCodec(tokenizer)

        def correction_messages(prompt, attempt):
            return template.build(prompt, attempt, encode=codec.encode, decode=codec.decode).messages

        # Stop on prompts the warm start does not train on; the eval set stays unseen until evaluation.
        sft_rows, check_rows = train_rows[:-ws.check_prompts], train_rows[-ws.check_prompts:]
        stopper = AccuracyStopper(model, engine, tokenizer, check_rows, target=ws.target_accuracy,
                                  every=ws.check_every,
                                  sampling=sampling_from_config(config, config.trainer.seed))
        try:
            result = warm_start(model, tokenizer, sft_rows, steps=ws.max_steps, lr=ws.lr,
                                seed=config.trainer.seed, batch_size=ws.batch_size,
                                correction_builder=correction_messages,
                                correction_fraction=ws.correction_fraction,
                                progress=config.trainer.progress, on_step=stopper)
        finally:
            engine.close()
        record = {"steps": result.steps, "seconds": result.seconds,
                  "final_loss": result.losses[-1] if result.losses else None, "checks": stopper.history}
    model.save_pretrained(str(init_dir))
    return record


def reference_model(config: TrainConfig, loss_cfg: PolicyLossConfig, model: torch.nn.Module, init_dir: Path,
                    device: torch.device) -> Optional[Any]:
    """The frozen initial policy for the KL term, as a callable ``PolicyModule`` (None without KL).

    Under ZeRO-3 it is loaded partitioned and wrapped by an optimizer-less DeepSpeed engine; otherwise it is
    a copy of ``model`` on every rank."""
    if not (config.model.use_reference or loss_cfg.kl_coef > 0):
        return None
    if zero3(config):
        import deepspeed

        module = PolicyModule(from_pretrained(config, init_dir, device).eval())
        deepspeed.zero.register_external_parameter(module.head, lm_head_weight(module.policy))
        ds_config = {k: v for k, v in deepspeed_config(config).items() if k not in ("optimizer", "gradient_clipping")}
        engine, *_ = deepspeed.initialize(model=module, config=ds_config)
        engine.eval()
        return engine
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return PolicyModule(ref)
