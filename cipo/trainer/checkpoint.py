"""Atomic checkpoints: nothing already written is ever lost, and a half-written file is never read.

A checkpoint is one file ``step_<N>.pt`` (one process) or one directory ``step_<N>/`` (DeepSpeed: a shard per
rank) under ``<run_dir>/checkpoints``; ``latest`` names the newest *complete* one. Files are written to a
temporary file in the same directory, flushed and fsynced, then renamed over the target (rename is atomic on
POSIX), and the directory is fsynced so the rename itself survives a crash. ``latest`` moves only after the whole
checkpoint is on disk, so a crash mid-save leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Write a file atomically: ``write(fileobj)`` fills a temp file that then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer touches, so a resumed run draws the same numbers."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Write ``payload`` (state dicts, RNG states, plain data) as the checkpoint of ``step``; keep the newest
    ``keep`` checkpoints. Returns the checkpoint's path."""
    path = checkpoint_path(run_dir, step).with_suffix(".pt")
    atomic_write_bytes(path, lambda handle: torch.save(payload, handle))
    publish_checkpoint(path, keep)
    return path


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes (without suffix: a file adds ``.pt``, a directory adds nothing)."""
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def publish_checkpoint(path: Path, keep: int = 2) -> None:
    """Point ``latest`` at a complete checkpoint (file or directory) and delete all but the newest ``keep``."""
    ckpt_dir = path.parent
    atomic_write_text(ckpt_dir / LATEST, path.name + "\n")
    if keep > 0:
        for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    if not path.exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing; the run directory was edited by "
                                "hand — point 'latest' at an existing step_*.pt")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only=False: the payload holds RNG states and plain Python containers we wrote ourselves.
    return torch.load(path, map_location="cpu", weights_only=False)
