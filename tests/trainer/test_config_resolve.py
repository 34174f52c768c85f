"""TrainConfig.resolve(): every key checked before anything starts, one name per setting, no key that nothing reads,
over-long prompts counted and refused, config and data files that are not what they seem named with their line."""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from cipo.data.dataset import DatasetError, load_dataset
from cipo.trainer.config import TrainConfig, load_config, load_run_config
from cipo.trainer.config_io import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


# ----------------------------------------------------------------------------------------------- one name each


def test_rollout_n_is_the_group_size():
    assert load_config(None, ["rollout.n=2"]).cipo_config().rollouts_per_prompt == 2
    cfg = load_config(None)
    assert cfg.rollout.n == 8 and cfg.cipo_config().rollouts_per_prompt == 8


def test_rollouts_per_prompt_is_an_alias_that_must_agree():
    cfg = load_config(None, ["algorithm.rollouts_per_prompt=4"])
    assert cfg.rollout.n == 4 and cfg.cipo_config().rollouts_per_prompt == 4
    assert "rollouts_per_prompt" not in cfg.algorithm  # the recorded config.yaml holds one name
    assert load_config(None, ["algorithm.rollouts_per_prompt=4", "rollout.n=4"]).rollout.n == 4
    with pytest.raises(ConfigError, match="rollout.n=2 and algorithm.rollouts_per_prompt=4 .* set only rollout.n"):
        load_config(None, ["algorithm.rollouts_per_prompt=4", "rollout.n=2"])


def test_resolve_is_idempotent():
    cfg = load_config(TINY)
    before = dataclasses.asdict(cfg)
    assert dataclasses.asdict(cfg.resolve()) == before


def test_prompts_per_step_is_refused_naming_train_batch_size():
    with pytest.raises(ConfigError, match="trainer.prompts_per_step is not a setting; set algorithm.train_batch_size"):
        load_config(None, ["trainer.prompts_per_step=4"])


def test_a_run_recorded_before_rollout_n_loads_as_it_trained(tmp_path: Path):
    """Old config.yaml files hold trainer.prompts_per_step and a rollout.n nothing read; the run used
    algorithm.rollouts_per_prompt."""
    old = {"rollout": {"n": 8, "temperature": 1.0}, "trainer": {"prompts_per_step": 16, "total_steps": 2},
           "algorithm": {"train_batch_size": 4, "rollouts_per_prompt": 4}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = load_run_config(path)
    assert cfg.rollout.n == 4 and cfg.cipo_config().train_batch_size == 4


# ----------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("override, message", [
    ("data.max_prompt_length=-5", "data.max_prompt_length must be >= 1"),
    ("data.max_prompt_length=0", "data.max_prompt_length must be >= 1"),
    ("data.max_prompt_length=1000", r"data.max_prompt_length=1000 \+ rollout.max_response_length=64 = 1064 exceeds "
                                    r"the model's max_position_embeddings=1024"),
    ("data.max_truncated_fraction=1.5", "data.max_truncated_fraction must be in"),
    ("data.truncation=middle", r"data.truncation must be one of \['left', 'right', 'drop'\]"),
    ("data.synthetic_train_size=0", "data.synthetic_train_size must be >= 1"),
    ("data.synthetic_val_size=-1", "data.synthetic_val_size must be >= 0"),
    ("data.synthetic_difficulty={digit: 3}", "data.synthetic_difficulty.*digit"),
    ("data.val_files=[x.jsonl]", "data.val_files needs data.train_files"),
    ("trainer.eval_prompts=-1", "trainer.eval_prompts must be >= 0"),
    ("trainer.eval_every=-1", "trainer.eval_every must be >= 0"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints must be >= 1"),
    ("trainer.num_threads=-1", "trainer.num_threads must be >= 0"),
    ("trainer.run_dir=''", "trainer.run_dir must name a directory"),
    ("trainer.device=gpu", "trainer.device must be auto, cpu, cuda or cuda:N; got 'gpu'"),
    ("actor.warmup_steps=-1", "actor.warmup_steps must be >= 0"),
    ("actor.weight_decay=-0.01", "actor.weight_decay must be >= 0"),
    ("actor.betas=[0.9, 1.0]", r"actor.betas must be two numbers in \[0, 1\)"),
    ("actor.betas=[-0.1, 0.9]", r"actor.betas must be two numbers in \[0, 1\)"),
    ("actor.betas=[0.9]", r"actor.betas must be two numbers in \[0, 1\)"),
    ("actor.lr=.inf", "actor.lr must be a finite number"),
    ("actor.lr=nan", "actor.lr must be a finite number"),
    ("rollout.temperature=.nan", "rollout.temperature must be a finite number"),
    ("rollout.temperature=inf", "rollout.temperature must be a finite number"),
    ("rollout.top_k=0", r"rollout.top_k must be -1 \(off\) or >= 1; got 0"),
    ("rollout.top_k=-2", r"rollout.top_k must be -1 \(off\) or >= 1"),
    ("rollout.top_p=0", r"rollout.top_p must be in \(0, 1\]"),
    ("rollout.top_p=1.1", r"rollout.top_p must be in \(0, 1\]"),
    ("rollout.gpu_memory_utilization=0", r"rollout.gpu_memory_utilization must be in \(0, 1\]"),
    ("rollout.gpu_memory_utilization=1.5", r"rollout.gpu_memory_utilization must be in \(0, 1\]"),
    ("rollout.n=0", "rollout.n must be >= 1"),
    ("warmstart.lr=0", "warmstart.lr must be > 0"),
    ("warmstart.lr=-1e-3", "warmstart.lr must be > 0"),
    ("warmstart.max_steps=-1", "warmstart.max_steps must be >= 0"),
    ("warmstart.check_every=0", "warmstart.check_every must be >= 1"),
    ("warmstart.target_accuracy=1.5", r"warmstart.target_accuracy must be in \[0, 1\]"),
    ("warmstart.correction_fraction=-0.1", r"warmstart.correction_fraction must be in \[0, 1\]"),
    ("model.tiny_overrides={num_layers: 2}", r"unknown model.tiny_overrides key\(s\) \['num_layers'\]"),
    ("model.tiny_overrides={eos_token_id: 3}", r"unknown model.tiny_overrides key\(s\) \['eos_token_id'\]"),
])
def test_bad_values_are_refused_naming_the_key(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_warm_start_needs_rows_beyond_its_check_prompts():
    with pytest.raises(ConfigError, match="data.synthetic_train_size=64 leaves no warm-start rows"):
        load_config(None, ["warmstart.max_steps=10", "data.synthetic_train_size=64"])
    assert load_config(None, ["data.synthetic_train_size=64"]).data.synthetic_train_size == 64  # no warm start


def test_tiny_overrides_known_keys_and_positions():
    cfg = load_config(None, ["model.tiny_overrides={hidden_size: 64, max_position_embeddings: 2048}",
                             "data.max_prompt_length=1500"])
    assert cfg.model.tiny_overrides["hidden_size"] == 64
    with pytest.raises(ConfigError, match="model.tiny_overrides applies to model.path: tiny only"):
        load_config(None, ["model.path=/somewhere", "model.tiny_overrides={hidden_size: 64}"])


def test_an_hf_directory_s_positions_bound_prompt_plus_response(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    with pytest.raises(ConfigError, match=r"= 320 exceeds the model's max_position_embeddings=256"):
        load_config(None, [f"model.path={tmp_path}", "data.max_prompt_length=256"])
    assert load_config(None, [f"model.path={tmp_path}", "data.max_prompt_length=192"]).data.max_prompt_length == 192


@pytest.mark.parametrize("overrides, world_size, message", [
    (["algorithm.train_batch_size=2"], 4, "algorithm.train_batch_size=2 is smaller than the 4 data-parallel ranks"),
    (["algorithm.train_batch_size=4", "actor.ppo_mini_batch_size=1"], 2,
     "actor.ppo_mini_batch_size=1 is smaller than the 2 data-parallel ranks"),
    (["actor.ulysses_sequence_parallel_size=2", "actor.strategy=deepspeed"], 3,
     "actor.ulysses_sequence_parallel_size=2 must divide the launch's 3 rank"),
])
def test_the_split_over_ranks_is_checked_by_resolve(overrides: list[str], world_size: int, message: str):
    cfg = load_config(None, overrides)  # the launch is not known yet: no rank checks
    with pytest.raises(ConfigError, match=message):
        cfg.resolve(world_size=world_size)


# ----------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("text, message", [
    ("", "the config file is empty"),
    ("# only a comment\n", "the config file is empty"),
    ("{}\n", "the config file is empty"),
    ("- model\n- data\n", "the top level must be a mapping of sections .*got a list"),
    ("actor:\n  lr: 1.0e-4\n  grad_clip: 1.0\n  lr: 1.0e-5\n", "line 4: key 'lr' is given twice in one mapping "
                                                                 r"\(first on line 2\)"),
    ("actor: {lr: 1.0e-4}\nactor: {lr: 2.0e-4}\n", "line 2: key 'actor' is given twice"),
])
def test_bad_config_files_are_refused(tmp_path: Path, text: str, message: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("actor: &a {lr: 1.0e-4, grad_clip: 0.5}\nwarmstart:\n  <<: {lr: 1.0e-3, max_steps: 0}\n"
                    "  lr: 2.0e-3\n")
    assert load_config(path).warmstart.lr == 2e-3


def test_a_non_utf8_config_file_names_file_and_line(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"model:\n  path: tiny\ntrainer:\n  run_dir: runs/caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"{path}: line 4: not UTF-8 \(byte 0xe9"):
        load_config(path)


def test_a_non_utf8_dataset_names_file_and_line(tmp_path: Path):
    good = b'{"prompt": "1+1?", "reward_model": {"ground_truth": "2"}, "data_source": "math"}\n'
    bad = b'{"prompt": "caf\xe9?", "reward_model": {"ground_truth": "2"}, "data_source": "math"}\n'
    path = tmp_path / "train.jsonl"
    path.write_bytes(good + b"\n" + bad)
    with pytest.raises(DatasetError, match=rf"{path}: line 3: not UTF-8 \(byte 0xe9 at column 16\)"):
        load_dataset(path)


# ----------------------------------------------------------------------------------------------- truncation


@pytest.fixture(scope="module")
def tokenizer():
    from cipo.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _rows(*texts: str) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": t}], "reward_model": {"ground_truth": "1"},
             "data_source": "x"} for t in texts]


def test_truncation_sides(tokenizer):
    from cipo.data.dataset import chat_prompt_ids
    from cipo.rollout.session import PromptTruncator, generation_suffix

    ids = chat_prompt_ids(tokenizer, "What is 12+34? " * 8)
    suffix = generation_suffix(tokenizer)
    assert suffix and ids[-len(suffix):] == suffix
    left = PromptTruncator(tokenizer, 20, "left")
    assert left(ids) == ids[-20:] and left.count == 1
    right = PromptTruncator(tokenizer, 20, "right")
    cut = right(ids)
    assert len(cut) == 20 and cut[:20 - len(suffix)] == ids[:20 - len(suffix)] and cut[-len(suffix):] == suffix
    assert right(ids[:10]) == ids[:10] and right.count == 1  # short prompts pass unchanged, uncounted


def _screen(tokenizer, rows, *overrides):
    from cipo.data.dataset import chat_prompt_ids
    from cipo.rollout.session import screen_prompts

    config = load_config(None, ["data.max_prompt_length=24", *overrides])
    return screen_prompts(rows, lambda p: chat_prompt_ids(tokenizer, p), config, "training")


def test_over_long_prompts_are_refused_by_default(tokenizer):
    rows = _rows("1+1?", "a long question " * 10, "2+2?")
    with pytest.raises(ConfigError, match=r"1 of 3 training prompts \(33.33%\) are longer than "
                                          r"data.max_prompt_length=24 tokens .*first: training row 1.*lose their "
                                          r"beginning.*data.max_truncated_fraction >= 0.3333"):
        _screen(tokenizer, rows)


def test_over_long_prompts_within_the_threshold_are_reported_or_dropped(tokenizer):
    rows = _rows("1+1?", "a long question " * 10, "2+2?")
    with pytest.warns(UserWarning, match="1 of 3 training prompts .* will lose their beginning"):
        kept, report = _screen(tokenizer, rows, "data.max_truncated_fraction=0.5")
    assert kept == rows and report["over_limit"] == 1 and report["longest"] > 24
    with pytest.warns(UserWarning, match="will be dropped"):
        kept, report = _screen(tokenizer, rows, "data.max_truncated_fraction=0.5", "data.truncation=drop")
    assert kept == [rows[0], rows[2]] and report["over_limit"] == 1
    kept, report = _screen(tokenizer, _rows("1+1?"))
    assert report["over_limit"] == 0


# ----------------------------------------------------------------------------------------------- no dead keys


ACCESSORS = {("actor", "loss"): "loss_config"}  # ActorConfig.loss_config() builds PolicyLossConfig from actor.loss
SECTION_CLASSES = {"model", "data", "rollout", "actor", "warmstart", "deepspeed", "trainer"}


def _leaf_keys(cls: type, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_keys(hints[f.name], path + (f.name,))
        else:
            out.append(path + (f.name,))
    return out


def _section_classes(cls: type) -> dict[str, str]:
    """Config dataclass name → its section's field name, e.g. ``LoraSection`` → ``lora``."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[hints[f.name].__name__] = f.name
            out.update(_section_classes(hints[f.name]))
    return out


def _reads(source_files: list[Path], sections: set[str]) -> set[tuple[str, str]]:
    """``(section, key)`` pairs read as ``<...>.section.key``, ``section.key`` (a variable named after its section,
    e.g. a parameter ``lora``) or ``alias.key`` where ``alias = <...>.section`` or ``alias: SectionClass``."""
    classes = _section_classes(TrainConfig)
    reads: set[tuple[str, str]] = set()
    for path in source_files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases: dict[str, str] = {name: name for name in sections}
        for node in ast.walk(tree):
            if isinstance(node, ast.arg) and node.annotation is not None:
                annotation = ast.unparse(node.annotation).strip("'\"")
                if annotation in classes:
                    aliases[node.arg] = classes[annotation]
            if isinstance(node, ast.Assign):
                pairs = [(t, node.value) for t in node.targets]
                if len(node.targets) == 1 and isinstance(node.targets[0], ast.Tuple) and \
                        isinstance(node.value, ast.Tuple):
                    pairs = list(zip(node.targets[0].elts, node.value.elts))
                for target, value in pairs:
                    if isinstance(target, ast.Name) and isinstance(value, ast.Attribute) and value.attr in sections:
                        aliases[target.id] = value.attr
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            if isinstance(owner, ast.Attribute) and owner.attr in sections:
                reads.add((owner.attr, node.attr))
            elif isinstance(owner, ast.Name) and owner.id in aliases:
                reads.add((aliases[owner.id], node.attr))
    return reads


def test_every_config_key_is_read_outside_the_config():
    """A key that only config.py mentions (validated, written to config.yaml, never used) fails here: the way
    rollout.n and trainer.prompts_per_step did. ``algorithm`` (CIPOConfig's fields) is read whole."""
    keys = _leaf_keys(TrainConfig)
    sections = {path[-2] for path in keys if len(path) >= 2}
    assert SECTION_CLASSES <= sections
    config_files = {ROOT / "cipo" / "trainer" / "config.py", ROOT / "cipo" / "trainer" / "config_io.py"}
    files = [p for p in (ROOT / "cipo").rglob("*.py") if p not in config_files]
    reads = _reads(files, sections)
    # keys read whole by a TrainConfig accessor that the trainer calls
    for (section, key), accessor in ACCESSORS.items():
        if any(accessor in {n.attr for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                            if isinstance(n, ast.Attribute)} for p in files):
            reads.add((section, key))
    dead = [".".join(path) for path in keys if len(path) >= 2 and (path[-2], path[-1]) not in reads]
    assert not dead, f"config keys nothing outside cipo/trainer/config*.py reads: {dead}"
    top = {path[0] for path in keys if len(path) == 1}
    assert top == {"algorithm"}  # the only top-level leaf; read through TrainConfig.cipo_config()


# ----------------------------------------------------------------------------------------------- in the trainer


ONE_STEP = [  # the tiny model, one step, no warm start, no evaluation, no export: seconds on CPU
    "warmstart.max_steps=0", "trainer.total_steps=1", "trainer.num_threads=1", "trainer.save_every=0",
    "trainer.progress=false", "trainer.eval_prompts=0", "trainer.save_hf_model=false",
    "data.synthetic_train_size=64", "data.synthetic_val_size=8", "rollout.engine=hf",
    "algorithm.train_batch_size=4", "algorithm.correction_batch_size=4", "algorithm.correction_rollouts=2",
    "algorithm.template={max_attempt_tokens: 24}", "rollout.max_response_length=12", "actor.micro_batch_tokens=384",
    "model.tiny_overrides={hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 2,"
    " num_key_value_heads: 1, head_dim: 32}",
]


@pytest.mark.timeout(600)
def test_the_trainer_samples_rollout_n_and_counts_cut_prompts(tmp_path: Path):
    """rollout.n=2 gives groups of 2 (it used to change nothing); correction prompts (problem + attempt) longer
    than data.max_prompt_length are counted per step, and the summary reports them."""
    from cipo.data import synthetic
    from cipo.data.dataset import chat_prompt_ids
    from cipo.models.tiny import build_tiny_tokenizer
    from cipo.trainer.trainer import CIPOTrainer

    train, val = synthetic.make_splits(64, 8, seed=0)
    tok = build_tiny_tokenizer()
    longest = max(len(chat_prompt_ids(tok, row["prompt"])) for row in train + val)  # base prompts fit exactly
    config = load_config(TINY, [*ONE_STEP, "rollout.n=2", f"data.max_prompt_length={longest}",
                                f"trainer.run_dir={tmp_path / 'run'}"])
    trainer = CIPOTrainer(config)
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["batch/sequences"] == 4 * 2 + 4 * 2  # 4 base prompts x rollout.n=2, 4 correction prompts x 2
    assert line["base/truncated_prompts"] == 0 and line["corr/truncated_prompts"] == 4
    assert summary["prompts_over_limit"] == {"train": 0, "val": 0, "cut_in_training": 4}
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["rollout"]["n"] == 2 and "rollouts_per_prompt" not in recorded["algorithm"]
    assert "prompts_per_step" not in recorded["trainer"]


def test_the_alias_conflicts_with_a_file_s_rollout_n():
    """configs/tiny.yaml names rollout.n: overriding the group size through the alias is refused, not ignored."""
    with pytest.raises(ConfigError, match="rollout.n=8 and algorithm.rollouts_per_prompt=4"):
        load_config(TINY, ["algorithm.rollouts_per_prompt=4"])
    assert load_config(TINY, ["rollout.n=4"]).cipo_config().rollouts_per_prompt == 4
