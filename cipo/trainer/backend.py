"""How the policy is optimised: plain PyTorch on one process, or DeepSpeed ZeRO-2/3 on many.

Both backends expose the same few calls to the trainer — ``forward`` (the packed forward + fused loss, or
log-probs), ``backward``, ``step``, the full weights for the rollout engine and the HF export, and checkpoint
save/load — so the step is written once.

Why the loss runs inside one module (:class:`PolicyModule`): under ZeRO-3 a parameter is materialised only while
a module that owns it (or registered it as external) runs its forward. The fused loss multiplies the hidden
states by the LM head's weight without calling the head module, so :class:`FusedHead` registers that weight as
its external parameter and the loss runs in its forward.

Gradient scaling under data parallelism: the loss is normalised by *global* per-stream counts, so the true
gradient is the *sum* of the ranks' gradients; DeepSpeed averages them, hence ``backward`` multiplies the loss by
the number it divides by (:func:`gradient_divisor`). Micro-batches are counted by the trainer, which marks the
last one as the accumulation boundary (``scale_wrt_gas=False``: no division by an accumulation count).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..config import PolicyLossConfig
from ..packing import PackedBatch
from .checkpoint import atomic_write_bytes, atomic_write_text, load_checkpoint, rng_state, set_rng_state
from .config import TrainConfig
from .distributed import DistContext
from .forward import lm_head_weight, packed_hidden_states
from .long_context import CheckpointOffload, configure_model
from .lora import base_model, is_lora, lora_scaling, merged_named_weights
from .master_weights import MasterWeights
from .sequence_parallel import UlyssesSP, optional_sp
from .shared_prefix import SharedPrefixLayout

POLICY_PREFIX = "policy."  # PolicyModule's name for the HF model: stripped from exported state-dict keys
WORLD_SIZE_FILE = "world_size"  # in a DeepSpeed checkpoint: the number of ranks that wrote it


class FusedHead(nn.Module):
    """The LM head applied inside the fused loss (or the chunked log-prob); owns no parameters itself."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._model = [model]  # a list, so the HF model is not registered twice as a submodule

    def forward(self, hidden: torch.Tensor, batch: PackedBatch, loss_cfg: PolicyLossConfig, *, fused: bool,
                logp_only: bool, **loss_kwargs: Any):
        weight = lm_head_weight(self._model[0])
        if logp_only:
            from ..kernels.linear_logprob import linear_logprob

            return linear_logprob(hidden, weight, batch.targets, temperature=loss_cfg.temperature).float()
        if fused:
            from ..fused_loss import fused_linear_policy_loss

            return fused_linear_policy_loss(hidden, weight, batch, loss_cfg, **loss_kwargs)
        return materialized_policy_loss(hidden, weight, batch, loss_cfg, **loss_kwargs)


def materialized_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, batch: PackedBatch,
                             config: PolicyLossConfig, **kwargs: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """The unfused path (``actor.fused_loss: false``): the fused loss's end-to-end reference,
    :func:`cipo.fused_loss_ref.materialized_policy_loss`, on fp32 copies — the full fp32 logits ``[n, V]``,
    log-softmax, gather (what verl does by default), then :func:`cipo.cipo_policy_loss` with the per-token entropy
    (the ``entropy`` metric and bonus, as the fused loss has them). For comparisons only: it is exactly the memory
    the fused loss exists to avoid."""
    from ..fused_loss_ref import materialized_policy_loss as reference_loss

    out = reference_loss(hidden.float(), weight.float(), batch, config, with_entropy=True, **kwargs)
    return out.loss, out.metrics


class PolicyModule(nn.Module):
    """HF causal LM + fused head: ``forward(batch, ...)`` → ``(loss, metrics)``, or ``[n]`` log-probs.

    With ``shared_prefix`` (``actor.shared_prefix``) the sequences of a micro-batch that have identical prompts
    share one copy of it in the forward (:mod:`cipo.trainer.shared_prefix`); the loss sees the same rows and gives
    the same result. ``tokens_forward`` / ``tokens_packed`` count the tokens the decoder processed and those the
    plain packed batches held, over every forward since :meth:`pop_token_counts`.
    """

    def __init__(self, model: nn.Module, shared_prefix: bool = False, sequence_parallel: Optional[UlyssesSP] = None
                 ) -> None:
        super().__init__()
        self.policy = model
        self.head = FusedHead(model)
        self.shared_prefix = shared_prefix
        self.sp = sequence_parallel
        self.tokens_forward = 0
        self.tokens_packed = 0

    def forward(self, batch: PackedBatch, loss_cfg: PolicyLossConfig, *, fused: bool = True,
                logp_only: bool = False, loss_rows: Optional[list[int]] = None, **loss_kwargs: Any):
        """``(loss, metrics)`` of ``batch`` — of its sequences ``loss_rows`` only when given (sequence
        parallelism: :meth:`UlyssesSP.loss_rows`; an empty list gives a zero loss that still reaches every weight
        the forward used, and no metrics) — or, with ``logp_only``, ``[N]`` log-probs of every sequence."""
        if not self.shared_prefix:
            hidden = self._hidden(batch.input_ids, batch.position_ids, batch.num_tokens)
            return self._head(hidden, batch, loss_cfg, fused, logp_only, loss_rows, loss_kwargs)
        layout = SharedPrefixLayout.build(batch)
        if self.sp is None:
            hidden = layout.hidden_states(self.policy)  # [R, H]: the loss view's rows only
            self._count(layout.num_tokens, batch.num_tokens)
        else:  # the mask comes from the stream's position_ids (sequence_parallel.attention_rule)
            hidden = self._hidden(layout.input_ids, layout.position_ids, batch.num_tokens)
            hidden = hidden.index_select(0, layout.hidden_index)
        out = self._head(hidden, layout.view, loss_cfg, fused, logp_only, loss_rows, loss_kwargs)
        return layout.scatter_to_batch(out) if logp_only else out

    def _hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor, packed_tokens: int) -> torch.Tensor:
        """``[L, H]`` hidden states of a stream: one forward, or this rank's shard gathered over its SP group."""
        if self.sp is None:
            self._count(input_ids.numel(), packed_tokens)
            return packed_hidden_states(self.policy, input_ids, position_ids)
        # counted per rank: the shard (padding included); the plain batch once per group
        self._count(self.sp.local_tokens(input_ids.numel()), packed_tokens if self.sp.rank == 0 else 0)
        return self.sp.hidden_states(self.policy, input_ids, position_ids)

    def _head(self, hidden: torch.Tensor, batch: PackedBatch, loss_cfg: PolicyLossConfig, fused: bool,
              logp_only: bool, loss_rows: Optional[list[int]], loss_kwargs: dict[str, Any]):
        if loss_rows is None or logp_only:
            return self.head(hidden, batch, loss_cfg, fused=fused, logp_only=logp_only, **loss_kwargs)
        rows = loss_rows or [0]  # no rows: run the loss on one and zero it, so the backward reaches the same weights
        hidden = hidden.index_select(0, batch.token_index(rows))
        advantages = loss_kwargs.get("advantages")
        if advantages is not None:  # [S] per sequence, or [T] per token
            picked = advantages[rows] if advantages.numel() == batch.num_seqs else \
                advantages[batch.token_index(rows)]
            loss_kwargs = {**loss_kwargs, "advantages": picked}
        loss, metrics = self.head(hidden, batch.select(rows), loss_cfg, fused=fused, logp_only=False, **loss_kwargs)
        return (loss, metrics) if loss_rows else (loss * 0.0, {})

    def _count(self, forward: int, packed: int) -> None:
        self.tokens_forward += int(forward)
        self.tokens_packed += int(packed)

    def pop_token_counts(self) -> tuple[int, int]:
        """``(tokens through the decoder, tokens of the plain packed batches)`` since the last call; resets both."""
        counts = (self.tokens_forward, self.tokens_packed)
        self.tokens_forward = self.tokens_packed = 0
        return counts


# ----------------------------------------------------------------------------------------------- backends


class TorchBackend:
    """One process: AdamW, a warm-up schedule, gradient clipping; checkpoints are one atomic file."""

    def __init__(self, model: nn.Module, config: TrainConfig, dist: DistContext) -> None:
        actor = config.actor
        self.model = model
        self.long_context = configure_model(model, tiled_mlp=actor.tiled_mlp, tiled_mlp_shards=actor.tiled_mlp_shards)
        self.module = PolicyModule(model, shared_prefix=actor.shared_prefix)
        self.sequence_parallel = None
        self.offload = CheckpointOffload(actor.checkpoint_offload)
        self.dist = dist
        self.grad_clip = actor.grad_clip
        self.lora = actor.lora
        trainable = [p for p in model.parameters() if p.requires_grad]
        # bf16 weights: the optimizer updates fp32 masters (cipo/trainer/master_weights.py)
        self.master = MasterWeights(trainable) if MasterWeights.needed(trainable) else None
        self.optimizer = torch.optim.AdamW(self.master.params if self.master else trainable, lr=actor.lr,
                                           betas=tuple(actor.betas), weight_decay=actor.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_schedule(actor.warmup_steps))

    def forward(self, batch: PackedBatch, loss_cfg: PolicyLossConfig, **kwargs: Any):
        return _offloaded_forward(self.offload, self.module, batch, loss_cfg, kwargs)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            self.model.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        try:
            loss.backward()
        finally:
            self.offload.end()

    def step(self, skip: bool = False) -> tuple[float, bool]:
        """Clip (``actor.grad_clip > 0``), update, advance the schedule; returns the pre-clip gradient norm and
        whether the update was applied. It is not when ``skip`` (the caller saw a non-finite loss) or when the norm
        is not finite: then the gradients are dropped and neither the weights nor the schedule move."""
        if self.master is not None:
            self.master.pull_grads()
        owners = self.master.params if self.master is not None else self.model.parameters()
        params = [p for p in owners if p.grad is not None]
        # the norm clipping computes anyway (one fused reduction) doubles as the finiteness check of every gradient
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else math.inf))
        if skip or not math.isfinite(norm):
            self.zero_grad()
            return norm, False
        self.optimizer.step()
        if self.master is not None:
            self.master.push()
        self.scheduler.step()
        return norm, True

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(HF name, full tensor)`` for every parameter (views of the live weights; do not modify); LoRA adapters
        merged into their base weights."""
        if is_lora(self.model):
            return merged_named_weights(self.model)
        return ((name, p.detach()) for name, p in self.model.named_parameters())

    def save(self, path: Path, client_state: dict[str, Any]) -> Path:
        """One file ``<path>.pt`` with the model, optimizer and schedule states and ``client_state``."""
        file = path.with_suffix(".pt")
        payload = {**client_state, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "scheduler": self.scheduler.state_dict(), "rng": rng_state()}
        if self.master is not None:
            payload["master_weights"] = self.master.state_dict()
        if is_lora(self.model):  # what cipo export / cipo eval need to merge the adapters
            payload["lora_scaling"] = lora_scaling(self.lora)
        atomic_write_bytes(file, lambda handle: torch.save(payload, handle))
        return file

    def load(self, path: Path) -> dict[str, Any]:
        """Restore a checkpoint written by :meth:`save`; returns its client state."""
        if path.is_dir():
            raise ValueError(f"{path} is a DeepSpeed checkpoint; resume it with actor.strategy=deepspeed")
        payload = load_checkpoint(path)
        self.model.load_state_dict(payload.pop("model"))
        self.optimizer.load_state_dict(payload.pop("optimizer"))
        self.scheduler.load_state_dict(payload.pop("scheduler"))
        masters = payload.pop("master_weights", None)
        if self.master is not None:
            if masters is None:
                raise ValueError(f"{path} holds no fp32 master weights (written by a run with model.dtype=float32?); "
                                 "resume with the model.dtype it was written with")
            self.master.load_state_dict(masters)
        set_rng_state(payload.pop("rng"))
        return payload


class DeepSpeedBackend:
    """ZeRO-2/3 data parallelism (``deepspeed.initialize``) with the same interface as :class:`TorchBackend`.

    A checkpoint is a directory ``<path>/`` written by ``engine.save_checkpoint`` (one shard of the optimizer
    state per rank, and of the weights under ZeRO-3), plus each rank's RNG state; the trainer's own state travels
    as DeepSpeed's ``client_state``.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, dist: DistContext) -> None:
        import deepspeed

        from .build_locks import prepare_deepspeed

        # again here (init_distributed did it too): deepspeed.initialize builds its comm backend itself when the
        # caller made the process group, and ZeRO-Offload JIT-builds CPU Adam
        prepare_deepspeed()
        actor = config.actor
        self.model = model
        self.dist = dist
        self.ds_config = deepspeed_config(config)
        self.bucket_megabytes = config.rollout.update_weights_bucket_megabytes
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        self.gradient_divisor = gradient_divisor(self.ds_config, dist)
        self.long_context = configure_model(model, tiled_mlp=actor.tiled_mlp, tiled_mlp_shards=actor.tiled_mlp_shards)
        self.sequence_parallel = optional_sp(model, actor.ulysses_sequence_parallel_size)
        self.module = PolicyModule(model, shared_prefix=actor.shared_prefix, sequence_parallel=self.sequence_parallel)
        self.offload = CheckpointOffload(actor.checkpoint_offload)
        if self.stage == 3:
            deepspeed.zero.register_external_parameter(self.module.head, lm_head_weight(model))
        optimizer: Any = None
        if "optimizer" not in self.ds_config:  # no offload: torch's AdamW on the ZeRO partitions (no op to build)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=actor.lr,
                                          betas=tuple(actor.betas), weight_decay=actor.weight_decay)
        schedule = warmup_schedule(actor.warmup_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            model_parameters=None if optimizer is not None else [p for p in model.parameters() if p.requires_grad],
            mpu=None if self.sequence_parallel is None else self.sequence_parallel.mpu)

    def forward(self, batch: PackedBatch, loss_cfg: PolicyLossConfig, **kwargs: Any):
        return _offloaded_forward(self.offload, self.engine, batch, loss_cfg, kwargs)

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        try:
            self.engine.backward(loss * self.gradient_divisor, scale_wrt_gas=False)
        finally:
            self.offload.end()

    def step(self, skip: bool = False) -> tuple[float, bool]:
        """Clip (DeepSpeed's ``gradient_clipping``), update, advance the schedule; the pre-clip global norm and
        whether the update was applied.

        DeepSpeed's ZeRO optimizers skip the update (and the schedule) themselves when the global gradient norm is
        not finite — one all-reduced decision, the same on every rank. ``skip`` (this rank's loss was not finite)
        cannot be honoured after ZeRO reduced the gradients; a non-finite loss gives a non-finite gradient in
        practice, and the trainer counts a non-finite loss either way."""
        self.engine.step()
        applied = bool(self.engine.was_step_applied())
        norm = self.engine.get_global_grad_norm()
        return (float(norm) if norm is not None else (0.0 if applied else math.inf)), applied

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def gathered(self, params: list[nn.Parameter]):
        """Context in which ZeRO-3-partitioned ``params`` hold their full data (every rank must enter it)."""
        if self.stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def full_named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(HF name, full tensor)`` per parameter. Under ZeRO-3 they are gathered in buckets of about
        ``rollout.update_weights_bucket_megabytes`` (one coalesced all-gather each; a collective: every rank must
        consume the whole iterator) and cloned, since the full data is released when the gather ends; at most one
        bucket is held at a time (0: one parameter at a time)."""
        bucket_bytes = self.bucket_megabytes * 2**20
        named = list(self.model.named_parameters())
        if self.stage != 3:
            yield from ((name, param.detach()) for name, param in named)
            return
        bucket: list[tuple[str, nn.Parameter]] = []
        size = 0
        for index, (name, param) in enumerate(named):
            bucket.append((name, param))
            size += param.ds_numel * param.element_size()  # ds_numel: the full size of a partitioned parameter
            if size >= bucket_bytes or index == len(named) - 1:
                with self.gathered([p for _, p in bucket]):
                    full = [(n, p.detach().clone()) for n, p in bucket]
                yield from full
                bucket, size = [], 0

    def save(self, path: Path, client_state: dict[str, Any]) -> Path:
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state=client_state, save_latest=False)
        state = rng_state()
        atomic_write_bytes(path / f"rng_rank{self.dist.rank}.pt", lambda handle: torch.save(state, handle))
        if self.dist.is_main:
            atomic_write_text(path / WORLD_SIZE_FILE, f"{self.dist.world_size}\n")
        self.dist.barrier()  # every rank's shards are on disk before the caller points `latest` here
        return path

    def load(self, path: Path) -> dict[str, Any]:
        if not path.is_dir():
            raise ValueError(f"{path} is a single-process checkpoint; resume it with actor.strategy=torch")
        written_by = int((path / WORLD_SIZE_FILE).read_text().strip())
        if written_by != self.dist.world_size:
            # ZeRO shards the optimizer state by rank: it reloads only on the world that wrote it.
            raise ValueError(f"{path} was written by {written_by} ranks; resume it on {written_by} ranks (this run "
                             f"has {self.dist.world_size})")
        rng_file = path / f"rng_rank{self.dist.rank}.pt"
        loaded, client_state = self.engine.load_checkpoint(str(path.parent), tag=path.name,
                                                           load_module_strict=True)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {path}")
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        return client_state


def _offloaded_forward(offload: CheckpointOffload, module, batch: PackedBatch, loss_cfg: PolicyLossConfig,
                       kwargs: dict[str, Any]):
    """``module(batch, ...)`` inside the checkpoint-offload context when it is on (closed by the backward; here
    at once for log-prob forwards, which have no backward, and when the forward fails)."""
    offload.begin()
    try:
        out = module(batch, loss_cfg, **kwargs)
    except BaseException:
        offload.end()
        raise
    if kwargs.get("logp_only") or not torch.is_grad_enabled():
        offload.end()
    return out


def gradient_divisor(ds_config: dict[str, Any], dist: DistContext) -> int:
    """What DeepSpeed (0.19.8) divides the ranks' summed gradients by: the world size, or with Ulysses sequence
    parallelism ``world / sp`` — except on ZeRO-3's reduce-scatter path (``reduce_scatter: true``, its default),
    which averages over the whole world whatever the SP size (its other path divides by ``world / sp`` but is
    taken only for buckets under ``reduce_bucket_size``, so cipo refuses it under SP). Checked by the full
    gradient of a 2-rank SP run against one process (tests/long_context/test_ulysses_trainer.py, ZeRO-2 and 3).

    Raises:
        ValueError: ZeRO-3 with ``reduce_scatter: false`` under sequence parallelism.
    """
    if dist.sp_size == 1:
        return dist.world_size
    zero = ds_config.get("zero_optimization", {})
    if int(zero.get("stage", 0)) != 3:
        return dist.dp_size
    if not zero.get("reduce_scatter", True):
        raise ValueError("actor.ulysses_sequence_parallel_size > 1 with deepspeed.zero_stage 3 needs "
                         "zero_optimization.reduce_scatter: true (DeepSpeed's other ZeRO-3 path averages the "
                         "gradients differently depending on the bucket size); remove it from deepspeed.config")
    return dist.world_size


def make_backend(model: nn.Module, config: TrainConfig, dist: DistContext):
    """The backend ``actor.strategy`` names; several ranks need DeepSpeed."""
    if config.actor.strategy == "deepspeed":
        return DeepSpeedBackend(model, config, dist)
    if dist.distributed:
        raise ValueError(f"launched with {dist.world_size} ranks but actor.strategy=torch runs one process; set "
                         "--set actor.strategy=deepspeed")
    return TorchBackend(model, config, dist)


def warmup_schedule(warmup_steps: int):
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant (a LambdaLR factor)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run, from ``actor`` and ``deepspeed`` (whose ``config`` keys win).

    Micro-batches are formed by token budget outside DeepSpeed, so its batch-size keys are set to 1 and the
    trainer marks accumulation boundaries itself.
    """
    actor, ds = config.actor, config.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "contiguous_gradients": True,
                            "overlap_comm": torch.cuda.is_available()}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": config.model.dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if actor.grad_clip > 0:
        out["gradient_clipping"] = actor.grad_clip
    if ds.offload_optimizer:
        # ZeRO-Offload steps on the CPU: DeepSpeed's CPU Adam (built on first use), configured here.
        out["optimizer"] = {"type": "AdamW", "params": {"lr": actor.lr, "betas": list(actor.betas),
                                                        "weight_decay": actor.weight_decay}}
    return _merge(out, ds.config)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def export_hf(backend, tokenizer, out_dir: Path, dist: DistContext) -> Optional[Path]:
    """Write the policy as one consolidated HF model directory (``save_pretrained`` + tokenizer).

    Every rank must call it (under ZeRO-3 the weights are gathered); rank 0 writes, into a temporary sibling that
    replaces ``out_dir`` only when complete, so a crash never leaves a half-written export in its place.
    Returns ``out_dir`` on rank 0, None elsewhere.
    """
    state = {name: tensor.cpu() for name, tensor in backend.full_named_weights()}
    if not dist.is_main:
        dist.barrier()
        return None
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        base_model(backend.model).save_pretrained(str(tmp), state_dict=state)
        tokenizer.save_pretrained(str(tmp))
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        dist.barrier()
    return out_dir
