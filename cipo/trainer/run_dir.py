"""The run directory's safety rules, checked before anything is loaded or written.

* A new run (no ``--resume``) never writes into a directory that holds another run's files: it would replace
  ``init_model/``, ``hf_model/`` and ``summary.json``, truncate ``metrics.jsonl`` and lose its checkpoints. It
  stops with a :class:`RunDirError` naming ``--resume``, a new ``trainer.run_dir`` or ``--overwrite``.
* ``--overwrite`` moves the old run aside whole, to the sibling ``<run_dir>.replaced-<UTC time>``, before the new
  run writes anything: one atomic rename, nothing deleted (remove the old directory yourself once you are sure).
* ``--resume`` needs an existing run with a checkpoint, and refuses a config that changes what defines the model
  or the data (:data:`DEFINING_KEYS`), naming each changed key with its recorded and new value.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from .checkpoint import CheckpointError, intact_alternatives, latest_checkpoint, looks_intact, recovery_hint

# What a run writes into its directory: any of them marks the directory as holding a run.
RUN_ARTIFACTS = ("checkpoints", "metrics.jsonl", "summary.json", "config.yaml", "init_model", "hf_model",
                 "curves.png")

# Config keys (dotted prefixes) that define the model or the data of a run: a resume must not change them. The
# tiny model is built from the seed, model.tiny_overrides and the warm start; the synthetic splits from the seed.
DEFINING_KEYS = ("model", "data", "warmstart", "trainer.seed", "actor.lora")
# ...except these, which change how the same model is computed or what is checked, not the model or data.
NON_DEFINING_KEYS = ("model.attn_implementation", "model.gradient_checkpointing", "model.use_reference",
                     "data.max_truncated_fraction")


class RunDirError(Exception):
    """The run directory cannot be used as asked; the message says why and what to do."""


def run_artifacts(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that a run writes (empty for a missing or fresh directory)."""
    return [name for name in RUN_ARTIFACTS if (Path(run_dir) / name).exists()]


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory that this start would damage or cannot use (read-only checks; every rank may call
    it). Raises :class:`RunDirError`."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: --resume continues the run in "
                          f"{run_dir}, --overwrite moves it aside and starts a new one")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"trainer.run_dir={str(run_dir)!r} is a file, not a directory; choose another "
                          "trainer.run_dir")
    found = run_artifacts(run_dir) if run_dir.is_dir() else []
    if resume:
        if not run_dir.exists():
            raise RunDirError(f"--resume: trainer.run_dir={str(run_dir)!r} does not exist; start a new run "
                              "without --resume")
        latest = latest_checkpoint(run_dir)
        if latest is not None and latest.is_file() and not looks_intact(latest):
            # fail before the model is built: the zip index of a truncated checkpoint does not read
            raise CheckpointError(f"--resume: checkpoint {latest} is truncated or corrupt (its zip index does not "
                                  f"read); {recovery_hint(latest.parent, exclude=latest)}")
        if latest is None:
            if not found:
                raise RunDirError(f"--resume: {run_dir} holds no run; start a new run without --resume")
            intact = intact_alternatives(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
            hint = (f"; {intact[0].name} looks intact: `echo {intact[0].name} > {run_dir / 'checkpoints' / 'latest'}`"
                    " to resume from it") if intact else ""
            raise RunDirError(f"--resume: {run_dir} has no checkpoint (no checkpoints/latest: the run stopped before "
                              f"its first save, see trainer.save_every){hint}; or start it again with --overwrite")
        return
    if found and not overwrite:
        raise RunDirError(f"trainer.run_dir={str(run_dir)!r} already holds a run ({', '.join(found)}); a new run "
                          "would overwrite it. Continue it with --resume, choose a new trainer.run_dir, or pass "
                          "--overwrite to move the old run aside")


def move_aside(run_dir: Path) -> Optional[Path]:
    """``--overwrite``: rename a run directory that holds a run to ``<run_dir>.replaced-<UTC time>`` (one rank
    only); returns the new path, or None when there was nothing to move."""
    run_dir = Path(run_dir)
    if not (run_dir.is_dir() and run_artifacts(run_dir)):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    suffix = 1
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{suffix}")
        suffix += 1
    try:
        os.rename(run_dir, target)
    except OSError as exc:
        raise RunDirError(f"--overwrite: could not move {run_dir} aside to {target.name} ({exc.strerror}); move or "
                          "remove it yourself, or choose a new trainer.run_dir") from exc
    return target


def check_resume_config(run_dir: Path, current: dict[str, Any]) -> None:
    """Compare the config of a resumed run (``current``, :func:`config_to_dict`) with the one the run recorded
    (``<run_dir>/config.yaml``); raise :class:`RunDirError` naming every changed key of :data:`DEFINING_KEYS`.
    Keys the recorded file lacks (written by an older version) are compared with their defaults."""
    from .config import TrainConfig, config_to_dict

    recorded_file = Path(run_dir) / "config.yaml"
    if not recorded_file.is_file():
        return  # nothing recorded to compare with (a run stopped before its config was written)
    try:
        recorded = yaml.safe_load(recorded_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunDirError(f"--resume: {recorded_file} is unreadable ({type(exc).__name__}); it records the run's "
                          "config, restore it (the checkpoint's own copy is under its 'config' key)") from exc
    if not isinstance(recorded, dict):
        raise RunDirError(f"--resume: {recorded_file} does not hold a config mapping; restore it")
    old, new, default = _flatten(recorded), _flatten(current), _flatten(config_to_dict(TrainConfig()))
    missing = object()
    changed = []
    for key in sorted(set(old) | set(new)):
        if not _defining(key):
            continue
        before = old.get(key, default.get(key, missing))
        after = new.get(key, default.get(key, missing))
        if before != after:
            show = [("<unset>" if v is missing else repr(v)) for v in (before, after)]
            changed.append(f"{key}: {show[0]} -> {show[1]}")
    if changed:
        raise RunDirError(f"--resume: the config changes what defines the run's model or data ({'; '.join(changed)})."
                          f" Resume with the recorded values ({recorded_file}), or start a new run (a new "
                          "trainer.run_dir, or --overwrite)")


def _defining(key: str) -> bool:
    def under(prefixes: tuple[str, ...]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    return under(DEFINING_KEYS) and not under(NON_DEFINING_KEYS)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b.c": leaf}``; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out
