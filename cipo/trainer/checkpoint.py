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
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

LATEST = "latest"
STEP_NAME = re.compile(r"step_(\d+)(\.pt)?")  # a checkpoint's name: step_<N>.pt (file) or step_<N> (directory)


class CheckpointError(RuntimeError):
    """A checkpoint (or ``latest``) that cannot be used; the message names the file and what to do."""


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
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            # torch.save's OSError (full disk) names no file: name the one being written
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
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
    """Point ``latest`` at a complete checkpoint (file or directory), then keep the newest ``keep`` of the
    checkpoints up to and including it (``keep`` <= 0: keep all).

    Rotation never deletes ``path`` itself, and never a checkpoint of a *later* step: those are left by a run
    resumed from an earlier checkpoint (the resumed run overwrites them as it reaches their steps), so counting
    them would delete the checkpoint just written and leave ``latest`` pointing at nothing."""
    ckpt_dir = path.parent
    atomic_write_text(ckpt_dir / LATEST, path.name + "\n")
    step = checkpoint_step(path)
    if keep > 0 and step is not None:
        older = [p for p in _step_entries(ckpt_dir) if checkpoint_step(p) < step]  # type: ignore[operator]
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    # temp files of writes a kill interrupted (the live ones belong to this process, which is done writing)
    for pattern in (".step_*.tmp", f".{LATEST}.*.tmp"):
        for stale in ckpt_dir.glob(pattern):
            stale.unlink(missing_ok=True)


def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a checkpoint named ``step_<N>.pt`` or ``step_<N>``; None for any other name."""
    match = STEP_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def _step_entries(ckpt_dir: Path) -> list[Path]:
    """The checkpoints in ``ckpt_dir``, oldest first (by step, not by name)."""
    found = [p for p in ckpt_dir.glob("step_*") if checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p))  # type: ignore[arg-type, return-value]


def looks_intact(path: Path) -> bool:
    """Cheap completeness test, without loading tensors: a ``.pt`` file's zip index reads (a truncated file has
    none); a DeepSpeed directory holds its ``world_size`` and every rank's RNG file (each rank writes its own
    after its shards)."""
    path = Path(path)
    try:
        if path.is_file():
            with zipfile.ZipFile(path) as archive:
                return bool(archive.namelist())
        if path.is_dir():
            ranks = int((path / "world_size").read_text().strip())
            return all((path / f"rng_rank{rank}.pt").is_file() for rank in range(ranks))
    except (OSError, ValueError, zipfile.BadZipFile):
        return False
    return False


def intact_alternatives(ckpt_dir: Path, exclude: Optional[Path] = None) -> list[Path]:
    """The checkpoints of ``ckpt_dir`` that look intact (:func:`looks_intact`), newest first."""
    return [p for p in reversed(_step_entries(ckpt_dir)) if p != exclude and looks_intact(p)]


def recovery_hint(ckpt_dir: Path, exclude: Optional[Path] = None) -> str:
    """What to do when the checkpoint ``latest`` names cannot be used: the newest intact other one, if any."""
    alternatives = intact_alternatives(ckpt_dir, exclude)
    if not alternatives:
        return (f"no other intact checkpoint is in {ckpt_dir}; start a new run (a new trainer.run_dir, or "
                "--overwrite, which moves this one aside)")
    best = alternatives[0]
    return (f"the previous checkpoint {best.name} looks intact: resume from it with "
            f"`echo {best.name} > {ckpt_dir / LATEST}` and --resume (nothing is deleted)")


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run (what ``latest`` names), or None when there is no ``latest``.

    Raises:
        CheckpointError: ``latest`` does not name a checkpoint, or names a missing one; the message offers the
            newest intact checkpoint.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer} is unreadable ({exc}); {recovery_hint(ckpt_dir)}") from None
    if checkpoint_step(Path(name)) is None or "/" in name:
        raise CheckpointError(f"{pointer} holds {name[:60]!r}, not a checkpoint name (step_<N>.pt or step_<N>); "
                              f"it is corrupt: {recovery_hint(ckpt_dir)}")
    path = ckpt_dir / name
    if not path.exists():
        raise CheckpointError(f"{pointer} names {name}, which is missing (the run directory was edited by hand); "
                              f"{recovery_hint(ckpt_dir)}")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of a single-process checkpoint ``step_<N>.pt``.

    Raises:
        CheckpointError: the file is truncated or corrupt (torch's own error is one line of the message, which
            names the file and offers the newest intact other checkpoint).
    """
    path = Path(path)
    try:
        # weights_only=False: the payload holds RNG states and plain Python containers we wrote ourselves.
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, ImportError, AttributeError) as exc:
        # ImportError/AttributeError: an unpickling error from a garbled payload
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {reason[:200]}); "
                              f"{recovery_hint(path.parent, exclude=path)}") from exc
