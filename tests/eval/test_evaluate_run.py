"""``evaluate_run`` / ``cipo eval`` on a tiny run: exact metrics with a scripted engine, real sampling with the HF
engine (deterministic, chunk-independent), checkpoints and step 0, data files, and the error messages."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from cipo import evaluation
from cipo.cli import main as cli_main
from cipo.data import synthetic
from cipo.data.dataset import DatasetError, save_jsonl
from cipo.evaluation import EvalError, correction_metrics, evaluate_run, pass_at_k, resampling_baselines
from cipo.rollout import RolloutBatch

N, M = 4, 2  # samples per prompt, refinements per attempt


class ScriptedEngine:
    """Answers by a script instead of a model: attempt j of prompt i is right iff j < right[i]; a refinement of a
    right attempt is right except the last one (regression 1/M), of a wrong attempt right only the first (success
    1/M). Knows the answers by parsing the expression in the decoded prompt."""

    def __init__(self, model_dir, right: dict[str, int], **_):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.right = right
        self.updated = False

    def generate(self, prompts, n, sampling):
        texts = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            expr = re.search(r"What is ([0-9+]+)\?", text).group(1)
            answer = sum(int(x) for x in expr.split("+"))
            refining = "previous attempt" in text.lower()  # the run's template (the problem's own \\boxed{} is empty)
            attempt_right = refining and f"\\boxed{{{answer}}}" in text
            for j in range(n):
                if refining:
                    ok = j < n - 1 if attempt_right else j == 0
                else:
                    ok = j < self.right[expr]
                texts.append(f"\\boxed{{{answer if ok else answer + 1}}}")
        count = len(prompts) * n
        return RolloutBatch([list(p) for p in prompts], n, [[0]] * count, texts, [[]] * count, ["stop"] * count,
                            sampling)

    def update_weights(self, named_tensors):
        self.updated = True

    def close(self):
        pass


def test_correction_metrics_known_values() -> None:
    out = correction_metrics([True, False, False], [True, False, True, True, False, False], 2)
    assert out["correction_success"] == pytest.approx(0.5)  # (1.0 + 0.0) / 2 failed attempts
    assert out["regression_rate"] == pytest.approx(0.5)
    assert out["attempt_accuracy"] == pytest.approx(1 / 3)
    assert out["accuracy_after_correction"] == pytest.approx(3 / 6)
    assert (out["failed_attempts"], out["correct_attempts"]) == (2, 1)
    assert math.isnan(correction_metrics([False], [True, True], 2)["regression_rate"])
    with pytest.raises(ValueError):
        correction_metrics([True], [True], 2)



def test_resampling_baselines_against_enumeration() -> None:
    """Over every ordered pair of distinct samples of a prompt (first: the attempt, second: a fresh sample), the
    share of fresh successes after a failed attempt and of fresh failures after a correct one."""
    n, counts = 5, [0, 1, 3, 5, 2]
    after_fail, after_right = [], []
    for c in counts:
        samples = [True] * c + [False] * (n - c)
        for i in range(n):
            for j in range(n):
                if i != j:
                    (after_right if samples[i] else after_fail).append(samples[j] if not samples[i] else not samples[j])
    out = resampling_baselines(counts, n)
    assert out["resample_success"] == pytest.approx(sum(after_fail) / len(after_fail))
    assert out["resample_regression"] == pytest.approx(sum(after_right) / len(after_right))
    assert math.isnan(resampling_baselines([0, 0], 4)["resample_regression"])


def test_scripted_engine_gives_exact_metrics(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    config = evaluation.load_run_config(tiny_run)
    rows, _ = evaluation.held_out_rows(config, None, 8)
    right = {synthetic.prompt_text(r).split("What is ")[1].split("?")[0]: i % (N + 1) for i, r in enumerate(rows)}
    monkeypatch.setattr("cipo.rollout.make_engine", lambda kind, model_dir, **kw: ScriptedEngine(model_dir, right))
    result = evaluate_run(tiny_run, n=N, ks="1,2,4", prompts=8, attempts_per_prompt=N, refinements=M,
                          out=tmp_path / "ev", progress=False)
    counts = [i % (N + 1) for i in range(8)]
    assert result["correct_counts"] == counts
    assert result["accuracy"] == pytest.approx(sum(counts) / (8 * N))
    for k in (1, 2, 4):
        expected = sum(pass_at_k(N, c, k) for c in counts) / 8
        assert result["pass_at_k"][str(k)] == pytest.approx(expected)
    assert result["pass_at_k"]["1"] == pytest.approx(result["accuracy"])
    assert result["correction_success"] == pytest.approx(1 / M)
    assert result["regression_rate"] == pytest.approx(1 / M)
    assert result["correct_attempts"] == sum(counts) and result["failed_attempts"] == 8 * N - sum(counts)
    assert result["resample_success"] == pytest.approx(resampling_baselines(counts, N)["resample_success"])
    on_disk = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert on_disk["pass_at_k"] == result["pass_at_k"]
    assert (tmp_path / "ev" / "pass_at_k.png").stat().st_size > 0


def test_hf_engine_final_model_deterministic_and_chunk_independent(tiny_run: Path, monkeypatch) -> None:
    kwargs = dict(n=N, ks=(1, 2, 4), engine="hf", prompts=6, attempts_per_prompt=2, refinements=M, progress=False,
                  seed=3)
    first = evaluate_run(tiny_run, **kwargs)
    monkeypatch.setattr(evaluation, "CHUNK_PROMPTS", 2)
    second = evaluate_run(tiny_run, **kwargs)
    assert first["model"].startswith("hf_model") and first["engine"] == "HFEngine"
    for key in ("correct_counts", "pass_at_k", "correction_success", "regression_rate", "accuracy"):
        a, b = first[key], second[key]
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), key
    assert 0.0 <= first["accuracy"] <= 1.0 and first["prompts"] == 6
    values = [first["pass_at_k"][k] for k in ("1", "2", "4")]
    assert values == sorted(values)
    assert first["failed_attempts"] + first["correct_attempts"] == 12


def test_checkpoint_steps_and_initial_policy(tiny_run: Path) -> None:
    kwargs = dict(n=2, ks=(1, 2), engine="hf", prompts=3, attempts_per_prompt=0, progress=False)
    assert evaluate_run(tiny_run, step=1, **kwargs)["model"] == "checkpoint step 1"
    initial = evaluate_run(tiny_run, step=0, **kwargs)
    assert initial["model"].startswith("step 0") and "correction_success" not in initial
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 7; available: .*step_000001"):
        evaluate_run(tiny_run, step=7, **kwargs)


def test_data_file_and_its_errors(tiny_run: Path, tmp_path: Path) -> None:
    rows = synthetic.make_dataset(3, seed=11, split="test")
    path = save_jsonl(rows, tmp_path / "held_out.jsonl")
    result = evaluate_run(tiny_run, data=path, n=2, ks=(1, 2), engine="hf", attempts_per_prompt=1, refinements=1,
                          progress=False)
    assert result["prompts"] == 3 and result["data"] == str(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="empty.jsonl: no rows"):
        evaluate_run(tiny_run, data=empty, n=2, ks=(1,), engine="hf", progress=False)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        evaluate_run(tiny_run, data=tmp_path / "missing.jsonl", n=2, ks=(1,), engine="hf", progress=False)


def test_request_errors(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="exceeds -n 4"):
        evaluate_run(tiny_run, n=4, ks=(1, 8), progress=False)
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        evaluate_run(tmp_path / "nope", n=2, ks=(1,), progress=False)
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        evaluate_run(tmp_path / "not_a_run", n=2, ks=(1,), progress=False)
    with pytest.raises(EvalError, match="attempts_per_prompt"):
        evaluate_run(tiny_run, n=2, ks=(1,), attempts_per_prompt=3, progress=False)


def test_cli_eval_writes_json_and_png(tiny_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    code = cli_main(["eval", "--run-dir", str(tiny_run), "-n", "4", "-k", "1,2,4", "--engine", "hf", "--prompts", "3",
                     "--attempts-per-prompt", "1", "--refinements", "1", "--out", str(out), "--quiet"])
    assert code == 0
    data = json.loads((out / "eval.json").read_text())
    assert set(data["pass_at_k"]) == {"1", "2", "4"} and (out / "pass_at_k.png").exists()
    assert '"pass_at_k"' in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["-n", "4", "-k", "1,8"], "k=[8] exceeds -n 4"),
    (["-k", "1,x"], "comma-separated integers"),
    (["--step", "9"], "no checkpoint of step 9"),
])
def test_cli_errors_are_one_clear_line(tiny_run: Path, capsys, argv, message) -> None:
    assert cli_main(["eval", "--run-dir", str(tiny_run), "--engine", "hf", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_run_dir(tmp_path: Path, capsys) -> None:
    assert cli_main(["eval", "--run-dir", str(tmp_path / "none")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_trainer_builds_the_same_correction_prompts() -> None:
    """The trainer's evaluation and ``cipo eval`` share ``correction_prompt_ids`` (through
    ``RolloutSession.sample_corrections``): it renders exactly ``template.build(prompt, attempt).messages`` through
    the given prompt renderer."""
    from cipo.algorithm import CorrectionTemplate, correction_prompt_ids

    template = CorrectionTemplate(user_format="{problem}\nPrevious attempt: {attempt}\nSolve the problem again.",
                                  max_attempt_tokens=None)
    rows = synthetic.make_dataset(2, seed=0)
    seen = []
    ids = correction_prompt_ids(template, rows, [(1, "7+5=12 \\boxed{12}")],
                                lambda messages: seen.append(messages) or [1, 2],
                                encode=lambda t: list(t.encode()), decode=lambda i: bytes(i).decode())
    assert ids == [[1, 2]]
    assert seen == [template.build(rows[1]["prompt"], "7+5=12 \\boxed{12}").messages]


def test_cli_generate_samples_the_final_model_of_any_run(tiny_run: Path, tmp_path: Path, capsys) -> None:
    # a run without init_model/ (a SmolLM2 run starts from the cached pretrained directory) and without checkpoints
    # (trainer.save_every 0): generate samples its hf_model/, the model `cipo eval` evaluates by default
    bare = tmp_path / "run"
    bare.mkdir()
    shutil.copy(tiny_run / "config.yaml", bare / "config.yaml")
    shutil.copytree(tiny_run / "hf_model", bare / "hf_model")
    for run_dir, label in ((tiny_run, "model: hf_model (final policy)"), (bare, "model: hf_model (final policy)"),
                           (tiny_run / "hf_model", f"model: {tiny_run / 'hf_model'}")):
        argv = ["generate", "--run-dir", str(run_dir), "--prompt", "1+2=", "-n", "2", "--max-tokens", "3"]
        assert cli_main(argv) == 0
        out, err = capsys.readouterr()
        assert label in err and "--- sample 1" in out
    assert cli_main(["generate", "--run-dir", str(tmp_path), "--prompt", "x"]) == 2
    assert "holds neither a run (config.yaml" in capsys.readouterr().err


def test_study_probe_samples_with_the_runs_settings(tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    """``python -m bench.study --probe`` samples as the run did: its top-p/top-k and its prompt truncation side."""
    import types

    import yaml

    from bench.study.probes import probe_run
    from cipo.rollout import make_engine
    from cipo.rollout.session import PromptCodec

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["rollout"].update(top_p=0.9, top_k=7)
    config["data"].update(truncation="right", max_prompt_length=14)  # every prompt is cut, from the right
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    seen = []

    class Recorder:
        def __init__(self, engine):
            self.engine, self.tokenizer = engine, engine.tokenizer

        def generate(self, prompts, n, sampling):
            seen.append((prompts, sampling))
            return types.SimpleNamespace(texts=["7+5=12 \\boxed{12}"] * (len(prompts) * n))

        def close(self):
            self.engine.close()

    monkeypatch.setattr("cipo.rollout.make_engine",
                        lambda kind, model_dir, **kw: Recorder(make_engine(kind, model_dir)))
    out = probe_run(run, prompts=2, n=2, attempts=1, refinements=1)
    assert out["samples"] == 4
    (prompts, sampling), _ = seen
    assert (sampling.top_p, sampling.top_k, sampling.max_tokens) == (0.9, 7, config["rollout"]["max_response_length"])
    rows, _ = evaluation.held_out_rows(evaluation.load_run_config(run), None, 2)
    tokenizer = make_engine("hf", run / "hf_model").tokenizer
    right, left = (PromptCodec(tokenizer, 14, side).prompt_ids(rows[0]["prompt"]) for side in ("right", "left"))
    assert prompts[0] == right != left
