"""verl-style mini-batch updates (``actor.ppo_mini_batch_size``): several optimizer steps per rollout batch.

One trainer (the tiny model of the end-to-end tests, HF engine) is built per module; each test restores its
initial weights and a fresh optimizer, then updates on a fixed hand-built step (4 base groups of 4, 3 correction
groups of 2, rewards half right in every group, so every advantage is non-zero). Checks: one mini-batch equal to
the batch is today's update path bit for bit (a verbatim copy of it is the reference); with two mini-batches the
second update's ratios move away from 1 and get clipped; each mini-batch's loss is normalised over that
mini-batch; the config and runtime errors; and the data-parallel split, including two ranks simulated by threads
whose summed gradients must equal one process's.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from cipo import PackedBatch, SequenceSample
from cipo.algorithm import step_advantages
from cipo.packing import BASE_STREAM, CORRECTION_STREAM
from cipo.trainer import trainer as trainer_module
from cipo.trainer.backend import TorchBackend
from cipo.trainer.config import load_config
from cipo.trainer.config_io import ConfigError
from cipo.trainer.distributed import DistContext, balanced_partition
from cipo.trainer.mini_batch import mini_batch_rows, partition_rows, stream_normalizers
from cipo.trainer.step_metrics import StepMetrics
from cipo.trainer.trainer import CIPOTrainer

from .test_train_e2e import fast_config

BASE_GROUPS, BASE_SIZE, CORR_GROUPS, CORR_SIZE = 4, 4, 3, 2  # train_batch_size 4 in the fast config


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mini") / "run"
    # 128-token micro-batches: several per mini-batch, so the mini-batch normaliser spans micro-batches.
    trainer = CIPOTrainer(fast_config(run_dir, "rollout.engine=hf", "actor.micro_batch_tokens=128",
                                      "actor.lr=1e-2"))
    trainer.initial_state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    yield trainer
    trainer.close()


@pytest.fixture(scope="module")
def step(trainer) -> tuple[PackedBatch, torch.Tensor]:
    """A fixed step: ``BASE_GROUPS`` base groups, then ``CORR_GROUPS`` correction groups, as assemble_step
    packs them; lengths vary so that the token-balanced rank split is not trivial."""
    gen = torch.Generator().manual_seed(0)
    vocab = trainer.model.config.vocab_size
    sequences, group = [], 0
    for stream, groups, size in ((BASE_STREAM, BASE_GROUPS, BASE_SIZE), (CORRECTION_STREAM, CORR_GROUPS, CORR_SIZE)):
        for _ in range(groups):
            prompt = torch.randint(0, vocab, (int(torch.randint(5, 14, (1,), generator=gen)),), generator=gen)
            for k in range(size):
                response = torch.randint(0, vocab, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen)
                sequences.append(SequenceSample(prompt.tolist(), response.tolist(), float(k % 2), group,
                                                stream=stream, prefix_id=group))
            group += 1
    batch = PackedBatch.from_sequences(sequences)
    return batch, step_advantages(batch, trainer.alg)


def fresh(trainer: CIPOTrainer, **actor: Any) -> CIPOTrainer:
    """The module's trainer as a shallow copy with the initial weights, a new optimizer and the given
    ``actor.*`` values (and ``loss_*`` keys replacing fields of the loss config)."""
    shell = copy.copy(trainer)
    loss = {k[len("loss_"):]: actor.pop(k) for k in list(actor) if k.startswith("loss_")}
    shell.cfg = dataclasses.replace(trainer.cfg, actor=dataclasses.replace(trainer.cfg.actor, **actor))
    shell.loss_cfg = dataclasses.replace(trainer.loss_cfg, **loss)
    trainer.model.load_state_dict(trainer.initial_state)
    shell.backend = TorchBackend(trainer.model, shell.cfg, shell.dist)
    return shell


def update(shell: CIPOTrainer, step, policy=None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Run one ``_update_policy`` (or ``policy(shell, batch, advantages, metrics)``); the weights and metrics."""
    batch, advantages = step
    metrics = StepMetrics()
    (policy or CIPOTrainer._update_policy)(shell, batch, advantages, metrics)
    return {k: v.clone() for k, v in shell.model.state_dict().items()}, metrics.values


def todays_update_policy(self, batch: PackedBatch, advantages: torch.Tensor, m: StepMetrics) -> None:
    """The update path before mini-batches, verbatim (the reference for bit-for-bit equality)."""
    actor = self.cfg.actor
    normalizers = stream_normalizers(batch, self.loss_cfg.loss_agg_mode)
    owned = self._owned_rows(batch)
    local, local_adv = batch.select(owned), advantages[owned]
    micro = self._micro_batches(local)
    if actor.ppo_epochs > 1:
        local.old_logp = self._logp(self.backend.forward, local, micro)  # the policy before the first update
    else:
        local.old_logp = None  # on-policy: the loss uses its own log-probs, detached (ratio exactly 1)
    if self.ref_model is not None:
        local.ref_logp = self._logp(self.ref_model, local, micro)
    kwargs = dict(fused=actor.fused_loss, lambda_corr=self.alg.lambda_corr, base_normalizer=normalizers[0],
                  corr_normalizer=normalizers[1])
    for _ in range(actor.ppo_epochs):
        self.backend.zero_grad()
        part, total = StepMetrics(), 0.0
        for k, rows in enumerate(micro):
            sub_rows = rows if rows is not None else [0]
            sub = local.select(sub_rows)
            loss, metrics = self.backend.forward(sub, self.loss_cfg, advantages=local_adv[sub_rows], **kwargs)
            if rows is None:
                loss = loss * 0.0  # a padding micro-batch: keeps ZeRO's collectives in step, adds nothing
            self.backend.backward(loss, last=k == len(micro) - 1)
            if rows is not None:
                total += float(loss.detach())
                part.add_loss_metrics(metrics, weight=float(sub.loss_mask.sum()))
        grad_norm, applied = self.backend.step()
        m.merge_loss_parts(self.dist.all_gather_object(part.loss_part()))
        loss_sum, padding = self.dist.all_reduce([total, micro.count(None)])
        m.set(**{"actor/loss": loss_sum, "actor/grad_norm": grad_norm, "actor/padding_micro_batches": padding,
                 "actor/skipped_nonfinite": float(not applied)})


def count_forwards(shell: CIPOTrainer) -> list[str]:
    """Record the kind of every backend forward (``logp``: no-grad log-probs; ``loss``: a training forward)."""
    calls: list[str] = []
    forward = shell.backend.forward

    def counted(batch, loss_cfg, **kwargs):
        calls.append("logp" if kwargs.get("logp_only") else "loss")
        return forward(batch, loss_cfg, **kwargs)

    shell.backend.forward = counted
    return calls


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ----------------------------------------------------------------------------------------------- (1) today


@pytest.mark.parametrize("epochs", [1, 2])
@pytest.mark.parametrize("mini", [None, BASE_GROUPS])
def test_one_mini_batch_is_todays_path_bit_for_bit(trainer, step, epochs: int, mini: Optional[int]):
    today = fresh(trainer, ppo_epochs=epochs)  # (each shell restores the initial weights: make it just before use)
    want_calls = count_forwards(today)
    want_weights, want = update(today, step, todays_update_policy)
    new = fresh(trainer, ppo_epochs=epochs, ppo_mini_batch_size=mini)
    got_calls = count_forwards(new)
    got_weights, got = update(new, step)
    assert any(not torch.equal(want_weights[k], trainer.initial_state[k]) for k in want_weights), "nothing moved"
    assert_same_weights(got_weights, want_weights)
    assert got_calls == want_calls  # the same forwards: no old-log-prob forward for a single update
    if epochs == 1:
        assert got == want  # the same keys, the same floats
        return
    # Two epochs: today's path reported the last update; now the mean over both, and the last under actor/last/.
    assert got["actor/updates"] == 2
    for name in ("clipfrac", "clipfrac_lower", "approx_kl"):
        assert got[f"actor/last/{name}"] == want[f"actor/{name}"], name
    assert want["actor/clipfrac"] > 0  # the second epoch is off-policy: the mean differs from the last
    assert got["actor/clipfrac"] == pytest.approx(want["actor/clipfrac"] / 2)


# ----------------------------------------------------------------------------------------------- (2) ratios


@dataclass
class Seen:
    """What the loss saw in each update: the ratio of every loss token to its old log-prob."""

    ratios: list[list[torch.Tensor]]
    normalizers: list[tuple[Optional[float], Optional[float]]]


def spy(shell: CIPOTrainer) -> Seen:
    """Wrap the backend: before every loss micro-batch, the current log-probs against the batch's old ones."""
    seen = Seen([[]], [])
    forward, step_fn = shell.backend.forward, shell.backend.step

    def watched_forward(batch, loss_cfg, **kwargs):
        if not kwargs.get("logp_only"):
            now = forward(batch, loss_cfg, logp_only=True).detach()
            mask = batch.loss_mask
            seen.ratios[-1].append(torch.exp(now[mask] - batch.old_logp[mask]))
            if len(seen.ratios[-1]) == 1:
                seen.normalizers.append((kwargs["base_normalizer"], kwargs["corr_normalizer"]))
        return forward(batch, loss_cfg, **kwargs)

    def watched_step(**kwargs):
        seen.ratios.append([])
        return step_fn(**kwargs)

    shell.backend.forward, shell.backend.step = watched_forward, watched_step
    return seen


def test_two_mini_batches_clip_the_second_update(trainer, step):
    shell = fresh(trainer, ppo_mini_batch_size=BASE_GROUPS // 2, loss_clip_ratio_low=0.01, loss_clip_ratio_high=0.01)
    seen = spy(shell)
    _, metrics = update(shell, step)
    first, second = (torch.cat(r) for r in seen.ratios[:2])
    assert len(seen.ratios) == 3 and not seen.ratios[2]  # two optimizer steps
    # Old log-probs come from one forward before the first step: the first mini-batch is on-policy ...
    torch.testing.assert_close(first, torch.ones_like(first), rtol=0, atol=1e-5)
    # ... the second was collected by the policy before the first step, which has moved since.
    assert (second - 1).abs().max() > 0.05
    assert metrics["actor/updates"] == 2
    assert metrics["actor/last/clipfrac"] > 0 and metrics["actor/last/approx_kl"] != 0
    assert metrics["actor/clipfrac"] == pytest.approx(metrics["actor/last/clipfrac"] / 2)  # the mean over updates


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
def test_each_mini_batch_is_normalised_over_itself(trainer, step, mode: str):
    """The micro-batches of an update sum to the loss of its whole mini-batch taken alone."""
    batch, advantages = step
    shell = fresh(trainer, ppo_mini_batch_size=1, ppo_epochs=2, loss_loss_agg_mode=mode)
    plans = mini_batch_rows(batch, 1)
    plain_forward = shell.backend.forward
    seen, expected = spy(shell), []
    original = shell._optimizer_step

    def checked(plan):
        with torch.no_grad():  # the mini-batch in one forward, normalised by its own counts
            loss, _ = plain_forward(plan.local, shell.loss_cfg, advantages=plan.advantages,
                                    fused=shell.cfg.actor.fused_loss, lambda_corr=shell.alg.lambda_corr)
        values = original(plan)
        expected.append((float(loss), values["actor/loss"]))
        return values

    shell._optimizer_step = checked
    update(shell, step)
    assert len(expected) == 2 * len(plans) == 2 * BASE_GROUPS
    for alone, summed in expected:
        assert summed == pytest.approx(alone, rel=1e-5, abs=1e-7)
    for rows, normalizers in zip(plans * 2, seen.normalizers):
        assert normalizers == stream_normalizers(batch.select(rows), mode)


# ----------------------------------------------------------------------------------------------- (3) errors


@pytest.mark.parametrize("value,match", [
    ("0", "actor.ppo_mini_batch_size must be >= 1"),
    ("-2", "actor.ppo_mini_batch_size must be >= 1"),
    ("3", r"actor.ppo_mini_batch_size=3 does not divide algorithm.train_batch_size=4; set it to one of \[1, 2, 4\]"),
    ("8", "actor.ppo_mini_batch_size=8 does not divide algorithm.train_batch_size=4"),
    ("two", "actor.ppo_mini_batch_size must be an integer"),
])
def test_bad_mini_batch_sizes_name_the_field(value: str, match: str):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["algorithm.train_batch_size=4", f"actor.ppo_mini_batch_size={value}"])
    good = load_config(None, ["algorithm.train_batch_size=4", "actor.ppo_mini_batch_size=2"])
    assert good.actor.ppo_mini_batch_size == 2
    assert load_config(None, ["algorithm.train_batch_size=4"]).actor.ppo_mini_batch_size is None


def test_a_step_the_size_does_not_divide_is_refused(step):
    batch, _ = step
    for size in (0, 3, 8):
        with pytest.raises(ValueError, match=f"actor.ppo_mini_batch_size={size} must be >= 1 and divide the step's "
                                             f"{BASE_GROUPS} base groups"):
            mini_batch_rows(batch, size)


def test_fewer_prompts_per_mini_batch_than_ranks_is_refused(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(trainer_module, "init_distributed", lambda *a, **k: DistContext(rank=0, world_size=2))
    monkeypatch.setenv("WORLD_SIZE", "2")  # what the launcher sets: the config is resolved against it
    with pytest.raises(ConfigError,
                       match="actor.ppo_mini_batch_size=1 is smaller than the 2 data-parallel ranks.*set it to >= 2"):
        CIPOTrainer(fast_config(tmp_path / "run", "actor.ppo_mini_batch_size=1"))


# ----------------------------------------------------------------------------------------------- (4) ranks


def test_mini_batches_take_whole_groups_of_both_streams(step):
    batch, _ = step
    groups, streams = batch.group_id.tolist(), batch.stream.tolist()
    plans = mini_batch_rows(batch, 2)
    assert sorted(r for rows in plans for r in rows) == list(range(batch.num_seqs))
    assert all(rows == sorted(rows) for rows in plans)
    members = [sorted({groups[r] for r in rows}) for rows in plans]
    # base groups 0-3 two by two; correction groups 4, 5, 6 dealt 2 + 1
    assert members == [[0, 1, 4, 5], [2, 3, 6]]
    for rows in plans:  # no group is split
        assert sum(groups[r] in {groups[x] for x in rows} for r in range(batch.num_seqs)) == len(rows)
        assert {streams[r] for r in rows} == {BASE_STREAM, CORRECTION_STREAM}
    assert mini_batch_rows(batch, None) == mini_batch_rows(batch, BASE_GROUPS) == [list(range(batch.num_seqs))]
    assert [len(rows) for rows in mini_batch_rows(batch, 1)] == [BASE_SIZE + CORR_SIZE] * 3 + [BASE_SIZE]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_mini_batch_by_whole_groups(step, world: int):
    batch, _ = step
    groups = batch.group_id.tolist()
    for rows in mini_batch_rows(batch, 2) + mini_batch_rows(batch, None):
        parts = partition_rows(batch, rows, world)
        assert sorted(r for part in parts for r in part) == rows  # a partition of the mini-batch
        assert all(part == sorted(part) and part for part in parts)  # batch order; no rank left empty
        owners = [{groups[r] for r in part} for part in parts]
        assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])  # whole groups
    # The whole step splits exactly as before mini-batches existed.
    tokens = torch.zeros(int(batch.group_id.max()) + 1, dtype=torch.long).index_add_(
        0, batch.group_id, batch.seq_lens.long())
    before = [[r for r, g in enumerate(groups) if g in set(part)]
              for part in balanced_partition(tokens.tolist(), world)]
    assert partition_rows(batch, list(range(batch.num_seqs)), world) == before


class Hub:
    """The collectives of ``world`` ranks that are threads of this process."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots: list[Any] = [None] * world

    def gather(self, rank: int, obj: Any) -> list[Any]:
        self.barrier.wait()
        self.slots[rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # everyone has read before the next write
        return out


@dataclass(frozen=True)
class ThreadDist(DistContext):
    hub: Any = None

    def all_gather_object(self, obj):
        return self.hub.gather(self.rank, obj)

    def all_reduce(self, values, op: str = "sum"):
        columns = zip(*self.hub.gather(self.rank, [float(v) for v in values]))
        return [sum(c) if op == "sum" else max(c) for c in columns]

    def barrier(self) -> None:
        self.hub.barrier.wait()


class SummingBackend(TorchBackend):
    """Data parallelism by hand: the ranks' gradients are summed before each optimizer step."""

    def step(self, skip: bool = False) -> tuple[float, bool]:
        params = list(self.model.parameters())
        mine = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for p, *grads in zip(params, *self.dist.hub.gather(self.dist.rank, mine)):
            p.grad = torch.stack(grads).sum(0)
        return super().step(skip=skip)


def test_two_thread_ranks_equal_one_process(trainer, step):
    """Two ranks (threads) with mini-batches: each update's loss over the whole mini-batch across ranks, so the
    summed gradients, the weights and the metrics equal one process's (to fp32 summation order)."""
    settings = dict(ppo_mini_batch_size=2, ppo_epochs=2, micro_batch_tokens=96)
    want_weights, want = update(fresh(trainer, **settings), step)
    hub, results, errors = Hub(2), [None, None], []

    def rank(r: int) -> None:
        try:
            shell = fresh_rank(trainer, r, hub, **settings)
            results[r] = update(shell, step)
        except BaseException as exc:  # surfaced below; the barrier's timeout frees the other rank
            errors.append(exc)
            hub.barrier.abort()

    shells_ready = threading.Lock()

    def fresh_rank(trainer, r, hub, **actor):
        with shells_ready:  # one model per rank, copied from the initial weights
            shell = fresh(trainer, **actor)
            shell.model = copy.deepcopy(trainer.model)
            shell.dist = ThreadDist(rank=r, world_size=2, hub=hub)
            shell.backend = SummingBackend(shell.model, shell.cfg, shell.dist)
        return shell

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    (w0, m0), (w1, m1) = results
    for name in want_weights:
        # 4 AdamW steps move weights by ~3e-2; fp32 summation order (per-rank partial sums) moves them by < 1e-5.
        torch.testing.assert_close(w0[name], want_weights[name], rtol=0, atol=2e-5, msg=name)
        assert torch.equal(w0[name], w1[name]), name  # the ranks stay identical
    assert m0 == m1
    assert m0["actor/updates"] == want["actor/updates"] == 4
    assert m0["actor/padding_micro_batches"] > 0  # uneven ranks: the padding micro-batches ran
    for name in ("actor/loss", "actor/pg_loss", "actor/loss/base", "actor/loss/corr", "actor/clipfrac",
                 "actor/approx_kl", "actor/tokens/base", "actor/tokens/corr", "actor/grad_norm"):
        assert m0[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name


def test_a_real_step_with_two_mini_batches(trainer):
    """Through ``train_step``: rollouts, the correction stream and two optimizer steps."""
    metrics = fresh(trainer, ppo_mini_batch_size=2).train_step()
    assert metrics["actor/updates"] == 2
    for name in ("actor/loss", "actor/clipfrac", "actor/last/clipfrac", "actor/last/approx_kl", "actor/grad_norm"):
        assert name in metrics, name
    assert metrics["batch/sequences"] == 4 * 4 + 4 * 2
