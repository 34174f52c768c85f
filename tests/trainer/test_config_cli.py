"""Trainer config: YAML + --set overrides, and clear errors naming the key for bad keys and values."""

from __future__ import annotations

from pathlib import Path

import pytest

from cipo.cli import main
from cipo.trainer.config import load_config
from cipo.trainer.config_io import ConfigError

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path: Path):
    cfg = load_config(path)
    assert cfg.actor.loss_config(cfg.rollout.temperature).temperature == cfg.rollout.temperature


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config(None, ["actor.lr=3e-4", "trainer.total_steps=7", "actor.loss.clip_ratio_high=0.28",
                             "algorithm.lambda_corr=0.5", "data.synthetic_difficulty={digits: 2}"])
    assert cfg.actor.lr == 3e-4 and cfg.trainer.total_steps == 7
    assert cfg.actor.loss_config(1.0).clip_ratio_high == 0.28
    assert cfg.cipo_config().lambda_corr == 0.5
    assert cfg.data.synthetic_difficulty == {"digits": 2}


@pytest.mark.parametrize("override, message", [
    ("actor.lrr=1e-4", r"unknown config key\(s\) \['actor.lrr'\]; known keys in actor"),
    ("bogus.x=1", r"unknown config key\(s\) \['bogus'\]"),
    ("actor.lr=fast", "actor.lr must be a number"),
    ("trainer.total_steps=2.5", "trainer.total_steps must be an integer"),
    ("rollout.engine=tpu", r"rollout.engine must be one of \['auto', 'vllm', 'hf'\]"),
    ("actor.loss.clip_ratio_c=0.5", r"actor.loss: PolicyLossConfig.clip_ratio_c must be"),
    ("actor.loss.clip_ratio=0.2", r"unknown config key\(s\) \[.actor.loss.clip_ratio.\]"),
    ("actor.loss.temperature=0.7", "differs from rollout.temperature"),
    ("algorithm.alpha=-1", r"algorithm: CIPOConfig.alpha must be"),
    ("actor.lr=0", "actor.lr must be > 0"),
    ("actorlr", "must look like section.key=value"),
])
def test_bad_overrides_name_the_key(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("actor: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


def test_cli_reports_config_errors(capsys):
    assert main(["train", str(CONFIGS[0]), "--set", "actor.nope=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_cli_names_file_and_row_of_a_malformed_dataset(tmp_path: Path, capsys):
    data = tmp_path / "train.jsonl"
    good = '{"prompt": "1+1?", "reward_model": {"ground_truth": "2"}, "data_source": "math"}'
    data.write_text(good + "\n" + '{"prompt": "2+2?", "data_source": "math"}\n')
    config = next(c for c in CONFIGS if c.name == "qwen3_4b_math.yaml")  # one process: it reaches the data
    code = main(["train", str(config), "--set", f"data.train_files=[{data}]", "--set",
                 f"data.val_files=[{data}]", "--set", f"trainer.run_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(data) in err and "line 2" in err
