"""Never lose a run: a new run refuses a directory holding another run, --overwrite moves it aside, --resume
refuses a config that changes the model or the data, a corrupt checkpoint or ``latest`` names the file and the
intact previous checkpoint, rotation never deletes the checkpoint just written, and a full disk is one line.

The CLI cases fail before any model is built (seconds); the end-to-end ones reuse test_train_e2e's tiny config."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import yaml

from cipo import cli
from cipo.trainer import checkpoint as ckpt
from cipo.trainer.run_dir import RunDirError, check_resume_config, check_run_dir
from cipo.trainer.step_metrics import truncate_metrics_log

from .test_train_e2e import FAST, TINY, fast_config


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["train", str(TINY), *[f"--set={o}" for o in FAST], "--set=rollout.n=4", *args])
    return code, capsys.readouterr().err


def fake_run(run_dir: Path, steps=(1, 2)) -> None:
    """A finished run's files, as the trainer writes them."""
    for step in steps:
        ckpt.save_checkpoint(run_dir, step, {"step": step})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in steps))
    (run_dir / "summary.json").write_text("{}\n")
    (run_dir / "init_model").mkdir()


# ----------------------------------------------------------------------------------------- run directory


def test_new_run_into_an_existing_run_is_refused_and_nothing_changes(tmp_path: Path, capsys):
    run = tmp_path / "run"
    fake_run(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = run_cli(capsys, f"--set=trainer.run_dir={run}")
    assert code == 2
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "run_dir" in err
    assert len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_and_overwrite_exclude_each_other(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(capsys, f"--set=trainer.run_dir={tmp_path}", "--resume", "--overwrite")
    assert exc.value.code == 2


@pytest.mark.parametrize("case", ["missing", "empty", "no_checkpoint", "file"])
def test_resume_without_a_run_is_one_clear_line(tmp_path: Path, capsys, case: str):
    run = tmp_path / "run"
    if case == "empty":
        run.mkdir()
    elif case == "no_checkpoint":
        run.mkdir()
        (run / "metrics.jsonl").write_text("")
    elif case == "file":
        run.write_text("not a directory")
    code, err = run_cli(capsys, f"--set=trainer.run_dir={run}", "--resume")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    expected = {"missing": "does not exist", "empty": "holds no run", "no_checkpoint": "has no checkpoint",
                "file": "is a file"}[case]
    assert expected in err
    if case == "missing":
        assert not run.exists()  # a refused resume creates nothing


def test_resume_refuses_a_changed_model_or_data_naming_the_keys(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    config = fast_config(run, "rollout.n=4")
    from cipo.trainer.config import config_to_dict

    recorded = config_to_dict(config)
    (run / "config.yaml").write_text(yaml.safe_dump(recorded))
    wider = next(o for o in FAST if o.startswith("model.tiny_overrides")).replace("hidden_size: 64", "hidden_size: 128")
    changed = fast_config(run, "rollout.n=4", wider, "data.synthetic_train_size=32",
                          "actor.lr=1e-3", "trainer.total_steps=9", "model.attn_implementation=eager")
    with pytest.raises(RunDirError) as exc:
        check_resume_config(run, config_to_dict(changed))
    message = str(exc.value)
    assert "model.tiny_overrides.hidden_size: 64 -> 128" in message
    assert "data.synthetic_train_size: 64 -> 32" in message and message.count(" -> ") == 2
    for allowed in ("actor.lr", "trainer.total_steps", "attn_implementation", "num_hidden_layers"):
        assert allowed not in message  # optimisation, length and compute settings may change on resume
    check_resume_config(run, config_to_dict(fast_config(run, "rollout.n=4", "actor.lr=1e-3", "trainer.total_steps=9")))


def test_overwrite_moves_the_old_run_aside(tmp_path: Path):
    from cipo.trainer.run_dir import move_aside

    run = tmp_path / "run"
    fake_run(run)
    check_run_dir(run, resume=False, overwrite=True)
    moved = move_aside(run)
    assert moved is not None and moved.name.startswith("run.replaced-") and not run.exists()
    assert ckpt.latest_checkpoint(moved).name == "step_000002.pt"
    assert move_aside(run) is None  # nothing there: nothing moved


# ----------------------------------------------------------------------------------------- checkpoints


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path: Path):
    # a run resumed from step 2 while steps 3 and 4 of the abandoned continuation are still there
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep=0)
    (tmp_path / "checkpoints" / "latest").write_text("step_000002.pt\n")
    path = ckpt.save_checkpoint(tmp_path, 3, {"step": 3, "new": True}, keep=2)
    assert ckpt.latest_checkpoint(tmp_path) == path and ckpt.load_checkpoint(path)["new"]
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_000002.pt", "step_000003.pt", "step_000004.pt"]  # 1 rotated out, later ones kept


def test_rotation_sorts_by_step_and_removes_stale_temp_files(tmp_path: Path):
    ckpt.save_checkpoint(tmp_path, 999_999, {"step": 999_999}, keep=0)
    (tmp_path / "checkpoints" / ".step_0000005.pt.abc.tmp").write_bytes(b"left by a kill")
    path = ckpt.save_checkpoint(tmp_path, 1_000_000, {"step": 1_000_000}, keep=1)  # a 7-digit name sorts first
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == [path.name]
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))


def test_truncated_checkpoint_names_the_file_and_the_intact_previous_one(tmp_path: Path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "w": torch.ones(1000)})
    latest = ckpt.latest_checkpoint(tmp_path)
    latest.write_bytes(latest.read_bytes()[:300])
    with pytest.raises(ckpt.CheckpointError) as exc:
        ckpt.load_checkpoint(latest)
    message = str(exc.value)
    assert str(latest) in message and "truncated or corrupt" in message
    assert "step_000001.pt looks intact" in message and "echo step_000001.pt >" in message


@pytest.mark.parametrize("content", [b"", b"\x00\xff garbage", b"../../etc/passwd\n"])
def test_corrupt_latest_pointer_offers_the_newest_intact_checkpoint(tmp_path: Path, content: bytes):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1})
    (tmp_path / "checkpoints" / "latest").write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match="step_000001.pt looks intact"):
        ckpt.latest_checkpoint(tmp_path)


def test_deepspeed_directory_intactness(tmp_path: Path):
    complete, partial = tmp_path / "step_000002", tmp_path / "step_000003"
    for path, ranks in ((complete, 2), (partial, 1)):
        path.mkdir()
        (path / "world_size").write_text("2\n")
        for rank in range(ranks):
            (path / f"rng_rank{rank}.pt").write_bytes(b"x")
    assert ckpt.looks_intact(complete) and not ckpt.looks_intact(partial)
    assert ckpt.intact_alternatives(tmp_path) == [complete]


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch, capsys):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1})

    def full_disk(obj, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")  # what torch.save raises on a full disk

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as exc:
        ckpt.save_checkpoint(tmp_path, 2, {"step": 2})
    assert exc.value.filename.endswith("step_000002.pt")  # the file is named
    line = cli.describe_os_error(exc.value)
    assert "No space left on device" in line and "step_000002.pt" in line and "free disk space" in line
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001.pt"
    assert not (tmp_path / "checkpoints" / "step_000002.pt").exists()


def test_read_only_run_dir_is_one_line(tmp_path: Path, monkeypatch, capsys):
    # a read-only file system (chmod does not bind root, so the error is injected where the run dir is created)
    run = tmp_path / "run"
    original = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == run:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, err = run_cli(capsys, f"--set=trainer.run_dir={run}")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "Read-only file system" in err and str(run) in err and "choose another trainer.run_dir" in err


def test_real_run_refuses_a_second_start_and_overwrite_keeps_the_old_one(tmp_path: Path, capsys):
    run = tmp_path / "run"
    args = [f"--set=trainer.run_dir={run}", "--set=trainer.total_steps=1", "--set=rollout.engine=hf",
            "--set=trainer.save_hf_model=false"]
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    first = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["model"]
    code, err = run_cli(capsys, *args)
    assert code == 2 and "already holds a run" in err
    code, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0, err
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and f"moved to {moved[0]}" in err
    kept = ckpt.load_checkpoint(ckpt.latest_checkpoint(moved[0]))["model"]
    assert all(torch.equal(first[name], kept[name]) for name in first)  # the old run, intact
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_torn_metrics_lines_are_dropped_and_backed_up(tmp_path: Path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\nnot json\n{"step": 3}\n{"step": 4, "x"')
    truncate_metrics_log(path, 3)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert (tmp_path / "metrics.jsonl.bak").read_text().endswith('"x"')
    assert "dropped 2 unreadable line(s) (line 3, 5)" in capsys.readouterr().err


def test_real_resume_refuses_a_corrupt_checkpoint_and_a_changed_model(tmp_path: Path, capsys):
    run = tmp_path / "run"
    args = [f"--set=trainer.run_dir={run}", "--set=trainer.total_steps=2", "--set=rollout.engine=hf",
            "--set=trainer.save_hf_model=false", "--set=trainer.keep_checkpoints=2"]
    assert run_cli(capsys, *args)[0] == 0
    latest = ckpt.latest_checkpoint(run)
    latest.write_bytes(latest.read_bytes()[:1000])  # a truncated copy, e.g. a disk filled during rsync
    code, err = run_cli(capsys, *args, "--set=trainer.total_steps=3", "--resume")
    errors = [line for line in err.splitlines() if line.startswith("cipo: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert str(latest) in errors[0] and "step_000001.pt looks intact" in errors[0]
    (run / "checkpoints" / "latest").write_text("step_000001.pt\n")  # what the message says to do
    wider = next(o for o in FAST if o.startswith("model.tiny_overrides")).replace("hidden_size: 64", "hidden_size: 96")
    code, err = run_cli(capsys, *args, f"--set={wider}", "--resume")
    assert code == 2 and "model.tiny_overrides.hidden_size: 64 -> 96" in err, err
    code, err = run_cli(capsys, *args, "--set=trainer.total_steps=3", "--resume")
    assert code == 0, err
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
