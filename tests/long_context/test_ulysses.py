"""DeepSpeed's Ulysses sequence parallelism (``UlyssesSPAttentionHF``) on 2 CPU ranks over gloo.

Through cipo's :class:`~cipo.trainer.sequence_parallel.UlyssesSP`: one sequence, two packed sequences, an odd
length (padded to the group size) and a shared-prefix forward stream, split over the 2 ranks. The gathered hidden
states equal a one-process forward (transformers' block-diagonal mask, or the shared-prefix layout's explicit mask)
to 1e-5 absolute and the summed gradients to 1e-5 relative: the position-masked sdpa keeps packed sequences and
sibling responses apart, which DeepSpeed's wrapper alone does not (it drops the mask). A model that is not the
policy keeps the original attention. The same four cases through flex_attention, forward only (no flex backward on
CPU) and uncompiled (inductor's CPU code for it does not compile), against the sdpa references.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests._launch import child_env, free_port, run_child

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]


def _launch(tmp_path_factory, attention: str) -> list[dict]:
    out = tmp_path_factory.mktemp(f"ulysses_{attention}")
    env = child_env()
    if attention == "flex_attention":
        # flex_attention eagerly (its reference implementation): torch 2.13's inductor emits C++ that does not
        # compile for this CPU case ("cur_kvSplitSize6 was not declared"); the mask logic is what is tested here
        env["TORCHDYNAMO_DISABLE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(REPO / "tests" / "long_context" / "ulysses_worker.py"), str(out), attention]
    run_child(cmd, timeout=600, env=env, what=f"torchrun ulysses_worker.py ({attention})")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory, "sdpa")


@pytest.fixture(scope="module")
def flex_results(tmp_path_factory) -> list[dict]:
    pytest.importorskip("torch.nn.attention.flex_attention")
    return _launch(tmp_path_factory, "flex_attention")


CASES = ("one_sequence", "two_packed_sequences", "odd_packed_sequences", "shared_prefix_stream")


@pytest.mark.parametrize("case", CASES)
def test_sequence_parallel_forward_and_gradients_equal_one_process(results, case):
    for r in results:
        assert r["world"] == 2
        assert r[case]["hidden_max_abs"] <= 1e-5, r[case]
        assert r[case]["grad_max_rel"] <= 1e-5, r[case]


def test_other_models_keep_their_attention(results):
    """The SP attention is routed to the policy's modules only: another model's packed forward is unchanged."""
    for r in results:
        assert r["bystander_hidden_max_abs"] == 0.0


@pytest.mark.parametrize("case", CASES)
def test_flex_attention_under_sequence_parallelism_forward(flex_results, case):
    """The GPU path's logic on CPU, forward only: DeepSpeed hands flex_attention a plain causal BlockMask for the
    gathered stream; cipo replaces it with the one from position_ids, so packed sequences and shared-prefix
    siblings stay apart (= the one-process sdpa forward to 1e-5)."""
    for r in flex_results:
        assert r["attention"] == "flex_attention"
        assert r[case]["hidden_max_abs"] <= 1e-5, r[case]
