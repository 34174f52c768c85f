"""The trainer's YAML config: sections named after verl's (``data``, ``actor``, ``rollout``, ``algorithm``,
``trainer``), each a dataclass whose fields are the YAML keys.

``cipo train configs/tiny.yaml --set actor.lr=3e-4 --set trainer.total_steps=20`` loads the file, applies the
overrides, and validates every key and value (:mod:`cipo.trainer.config_io`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ..algorithm.config import CIPOConfig
from ..config import PolicyLossConfig
from .config_io import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclass
class ModelConfig:
    """The policy. ``path`` is a local HF directory; ``"tiny"`` builds the tiny Qwen3 model in code."""

    path: str = "tiny"
    tiny_overrides: dict = field(default_factory=dict)  # Qwen3Config fields for the built tiny model
    dtype: Literal["float32", "bfloat16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    gradient_checkpointing: bool = False
    use_reference: bool = False  # a frozen copy of the initial policy for the KL term


@dataclass
class DataConfig:
    """Prompts. ``train_files``/``val_files``: JSONL or parquet with verl's columns; empty → the synthetic task."""

    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    synthetic_train_size: int = 2000
    synthetic_val_size: int = 64
    synthetic_difficulty: dict = field(default_factory=dict)
    max_prompt_length: int = 512
    shuffle: bool = True


@dataclass
class RolloutConfig:
    """Sampling. ``engine``: ``auto`` (vLLM when installed, else HF ``generate``), ``vllm`` or ``hf``."""

    engine: Literal["auto", "vllm", "hf"] = "auto"
    n: int = 8  # responses per prompt (GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_response_length: int = 64
    gpu_memory_utilization: float = 0.4
    free_cache_engine: bool = True  # vLLM on GPU: sleep (weights to host, KV cache freed) while the trainer works
    update_weights_bucket_megabytes: int = 256  # ZeRO-3: weights gathered for the engine per bucket (0: per tensor)


@dataclass
class ActorConfig:
    """Optimisation and the loss. ``loss`` holds :class:`cipo.PolicyLossConfig`'s fields."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ppo_epochs: int = 1  # passes over the batch's mini-batches; > 1 computes old log-probs with a trainer forward
    # verl's name and meaning: base prompts per optimizer step (each with its rollout.n responses); the correction
    # groups are dealt evenly over the train_batch_size / ppo_mini_batch_size mini-batches. None: the whole batch.
    ppo_mini_batch_size: Optional[int] = None
    micro_batch_tokens: int = 4096  # token budget of one forward/backward
    adv_estimator: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    fused_loss: bool = True  # False: materialise the logits (for comparisons only)
    # Long contexts (docs/LONG_CONTEXT.md). shared_prefix: sequences with identical prompts share one copy of it in
    # the forward (sdpa/eager/flex_attention). tiled_mlp: DeepSpeed's TiledMLP, the MLP over sequence slices
    # (tiled_mlp_shards of them; 0: ceil(tokens / hidden_size)). checkpoint_offload: DeepSpeed's offload of the
    # checkpointed layer inputs to host memory (needs model.gradient_checkpointing; acts on GPU tensors only).
    shared_prefix: bool = False
    tiled_mlp: bool = False
    tiled_mlp_shards: int = 0
    checkpoint_offload: bool = False
    # verl's name: ranks that split one micro-batch's tokens (DeepSpeed's Ulysses; strategy deepspeed; sdpa,
    # flex_attention or flash_attention_2; must divide the launch's ranks and the attention heads).
    ulysses_sequence_parallel_size: int = 1
    strategy: Literal["torch", "deepspeed"] = "torch"  # deepspeed: ZeRO data parallelism (the `deepspeed` section)
    loss: dict = field(default_factory=dict)

    def loss_config(self, temperature: float) -> PolicyLossConfig:
        """The loss config, with the rollout's temperature (the trainer must apply the sampler's T)."""
        values = dict(self.loss)
        if "temperature" in values and values["temperature"] != temperature:
            raise ConfigError(f"actor.loss.temperature={values['temperature']} differs from rollout.temperature="
                              f"{temperature}; leave it unset — the trainer uses the rollout's temperature")
        values["temperature"] = temperature
        return from_dict(PolicyLossConfig, values, "actor.loss")


@dataclass
class WarmStartConfig:
    """A brief supervised warm start of the tiny model on the synthetic task, so that RL starts where it has
    signal: it stops as soon as held-out sampled accuracy reaches ``target_accuracy`` (checked every
    ``check_every`` steps), at ``max_steps`` at the latest. ``correction_fraction`` of the rows also teach the
    correction format (the configured template around a correct or a carry-dropping attempt): without it the
    correction stream of a model this small has no signal at all."""

    max_steps: int = 0  # 0: no warm start
    target_accuracy: float = 0.35
    check_every: int = 25
    check_prompts: int = 64
    lr: float = 3e-3
    batch_size: int = 32
    correction_fraction: float = 0.5


@dataclass
class DeepSpeedSection:
    """DeepSpeed ZeRO, used when ``actor.strategy: deepspeed`` (launch with ``torchrun`` or ``deepspeed``).

    Mixed precision follows ``model.dtype``: ``bfloat16`` trains bf16 weights with fp32 master weights.
    ``config`` holds raw DeepSpeed JSON keys merged over the generated config (they win), e.g.
    ``{zero_optimization: {reduce_bucket_size: 5.0e8}}``.
    """

    zero_stage: int = 2  # 2: shard optimizer states and gradients; 3: also the weights
    offload_optimizer: bool = False  # optimizer states (and the step) on the CPU: DeepSpeed's CPU Adam
    offload_param: bool = False  # ZeRO-3 only: weights on the CPU between uses
    config: dict = field(default_factory=dict)


@dataclass
class TrainerConfig:
    total_steps: int = 10
    prompts_per_step: int = 16
    seed: int = 0
    run_dir: str = "runs/tiny"
    save_every: int = 5
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_prompts: int = 64
    device: str = "auto"
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    progress: bool = True
    save_hf_model: bool = True  # after training: a consolidated HF model in <run_dir>/hf_model


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    algorithm: dict = field(default_factory=dict)  # CIPOConfig's fields
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def cipo_config(self) -> CIPOConfig:
        return from_dict(CIPOConfig, self.algorithm, "algorithm")

    def validate(self) -> None:
        """Cross-section checks; raises ConfigError naming the key."""
        checks: list[tuple[bool, str]] = [
            (self.rollout.n >= 1, "rollout.n must be >= 1"),
            (self.rollout.temperature > 0, "rollout.temperature must be > 0"),
            (self.rollout.max_response_length >= 1, "rollout.max_response_length must be >= 1"),
            (self.rollout.update_weights_bucket_megabytes >= 0, "rollout.update_weights_bucket_megabytes must be >= 0"),
            (self.actor.lr > 0, "actor.lr must be > 0"),
            (self.actor.ppo_epochs >= 1, "actor.ppo_epochs must be >= 1"),
            (self.actor.micro_batch_tokens >= 1, "actor.micro_batch_tokens must be >= 1"),
            (self.actor.grad_clip >= 0, "actor.grad_clip must be >= 0 (0 disables clipping)"),
            (self.trainer.total_steps >= 0, "trainer.total_steps must be >= 0"),
            (self.trainer.prompts_per_step >= 1, "trainer.prompts_per_step must be >= 1"),
            (self.trainer.save_every >= 0, "trainer.save_every must be >= 0"),
            (self.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage must be 0, 1, 2 or 3"),
            (not self.deepspeed.offload_param or self.deepspeed.zero_stage == 3,
             "deepspeed.offload_param needs deepspeed.zero_stage: 3 (only ZeRO-3 partitions the weights)"),
            (not self.actor.shared_prefix or self.model.attn_implementation != "flash_attention_2",
             "actor.shared_prefix needs model.attn_implementation sdpa, eager or flex_attention (flash-attn varlen "
             "cannot express a shared prefix)"),
            (self.actor.tiled_mlp_shards >= 0, "actor.tiled_mlp_shards must be >= 0 (0: automatic)"),
            (self.actor.ulysses_sequence_parallel_size >= 1, "actor.ulysses_sequence_parallel_size must be >= 1"),
            (self.actor.ulysses_sequence_parallel_size == 1 or self.actor.strategy == "deepspeed",
             "actor.ulysses_sequence_parallel_size > 1 needs actor.strategy: deepspeed (launched with torchrun)"),
            (self.actor.ulysses_sequence_parallel_size == 1 or self.model.attn_implementation != "eager",
             "actor.ulysses_sequence_parallel_size > 1 needs model.attn_implementation sdpa, flex_attention or "
             "flash_attention_2 (DeepSpeed's Ulysses does not take eager)"),
            (not self.actor.checkpoint_offload or self.model.gradient_checkpointing,
             "actor.checkpoint_offload needs model.gradient_checkpointing: true (it offloads the checkpointed "
             "layer inputs)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.actor.loss_config(self.rollout.temperature)
        self._check_mini_batch(self.cipo_config().train_batch_size)

    def _check_mini_batch(self, train_batch_size: int) -> None:
        """``actor.ppo_mini_batch_size`` must split ``algorithm.train_batch_size`` into whole mini-batches (verl
        asserts the same), so every optimizer step sees as many prompts."""
        size = self.actor.ppo_mini_batch_size
        if size is None:
            return
        if size < 1:
            raise ConfigError(f"actor.ppo_mini_batch_size must be >= 1 (base prompts per optimizer step) or null "
                              f"(the whole batch); got {size!r}")
        if train_batch_size % size:
            divisors = [d for d in range(1, train_batch_size + 1) if train_batch_size % d == 0]
            raise ConfigError(f"actor.ppo_mini_batch_size={size} does not divide algorithm.train_batch_size="
                              f"{train_batch_size}; set it to one of {divisors} (or null for one update per "
                              "batch)")


def load_config(path: Optional[Union[str, Path]], overrides: Optional[list[str]] = None) -> TrainConfig:
    """Load a YAML config (or the defaults when ``path`` is None), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = load_yaml(path) if path is not None else {}
    apply_overrides(raw, list(overrides or []))
    config = from_dict(TrainConfig, raw)
    config.validate()
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return to_dict(config)
