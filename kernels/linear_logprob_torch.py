"""The torch path of ``linear_logprob`` (the CPU path; fp64 always): the tiled epilogues
:func:`update_row_stats_torch_` and :func:`softmax_grad_torch_`, same contract and formulas as the Triton epilogues
in :mod:`.linear_logprob`, and :class:`OnlineRowStats`, the running row state they share.

The float64 ground truth the tests hold this path and the Triton kernels to is the materialised
:func:`.linear_logprob_ref.linear_logprob_reference`; production never calls that one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._chunking import accum_dtype

IGNORE_INDEX = -100
#: Initial running maximum: finite, so that ``(m − m') · d`` and ``exp(m − m')`` never see ``inf − inf``.
_MAX_INIT = -3.0e38


@dataclass
class OnlineRowStats:
    """Running softmax statistics of ``s = z / temperature`` per row, mergeable across column tiles.

    All fields are ``[R]`` tensors in the accumulation dtype (fp32, fp64 for fp64 inputs).

    Attributes:
        row_max: running ``m = max s`` (starts at -3e38).
        sum_exp: ``d = Σ exp(s − m)`` (starts at 0).
        dot: ``a = Σ exp(s − m)·(s − m)`` for the entropy, or None when not wanted.
        target_logit: ``s[target]`` once the target's column has been seen (0 for ignored rows).
    """

    row_max: torch.Tensor
    sum_exp: torch.Tensor
    dot: torch.Tensor | None
    target_logit: torch.Tensor

    @classmethod
    def empty(cls, n_rows: int, dtype: torch.dtype, device: torch.device, want_entropy: bool) -> OnlineRowStats:
        """Fresh state for ``n_rows`` rows."""
        return cls(
            row_max=torch.full((n_rows,), _MAX_INIT, dtype=dtype, device=device),
            sum_exp=torch.zeros(n_rows, dtype=dtype, device=device),
            dot=torch.zeros(n_rows, dtype=dtype, device=device) if want_entropy else None,
            target_logit=torch.zeros(n_rows, dtype=dtype, device=device),
        )

    def rows(self, sl: slice) -> OnlineRowStats:
        """View of the state for rows ``sl`` (updates write through)."""
        return OnlineRowStats(
            self.row_max[sl], self.sum_exp[sl], None if self.dot is None else self.dot[sl], self.target_logit[sl]
        )

    def finalize(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(logp, log_norm, entropy | None)`` once every column has been merged; ``lse = row_max + log_norm``.

        ``log_norm`` and ``row_max`` are kept apart because at ``|s| ~ 1e4`` their fp32 sum rounds ``log_norm``
        away; the gradient epilogue needs both.
        """
        log_norm = torch.log(self.sum_exp)
        valid = targets != IGNORE_INDEX
        logp = torch.where(valid, (self.target_logit - self.row_max) - log_norm, 0.0)
        ent = None if self.dot is None else log_norm - self.dot / self.sum_exp
        return logp, log_norm, ent


def update_row_stats_torch_(
    z: torch.Tensor, col_offset: int, targets: torch.Tensor, inv_temp: float, st: OnlineRowStats
) -> None:
    n_cols = z.shape[1]
    acc = accum_dtype(z.dtype)
    # A scaled copy, so z stays intact for a gradient epilogue after this one (copy and scale in one pass).
    s = torch.mul(z, inv_temp) if z.dtype == acc else z.to(acc).mul_(inv_temp)
    local = targets - col_offset
    hit = (targets != IGNORE_INDEX) & (local >= 0) & (local < n_cols)
    rows = hit.nonzero().squeeze(1)
    st.target_logit[rows] = s[rows, local[rows]]  # picked before s is shifted, exactly as the kernel does
    m_new = torch.maximum(st.row_max, s.amax(dim=1))
    rescale = torch.exp(st.row_max - m_new)
    s.sub_(m_new.unsqueeze(1))  # shifted logits, <= 0
    e = torch.exp(s) if st.dot is not None else s.exp_()  # the shifted logits are only needed for the entropy
    if st.dot is not None:
        # Σ e·(s − m') as a batched dot: no further [R, V] temporary
        blk = torch.bmm(e.unsqueeze(1), s.unsqueeze(2)).view(-1)
        st.dot.copy_(rescale * (st.dot + (st.row_max - m_new) * st.sum_exp) + blk)
    st.sum_exp.copy_(st.sum_exp * rescale + e.sum(dim=1))
    st.row_max.copy_(m_new)


def softmax_grad_torch_(
    z: torch.Tensor,
    col_offset: int,
    targets: torch.Tensor,
    inv_temp: float,
    row_max: torch.Tensor,
    log_norm: torch.Tensor,
    ent: torch.Tensor | None,
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
) -> None:
    acc = accum_dtype(z.dtype)
    s = z if z.dtype == acc else z.to(acc)
    s.mul_(inv_temp).sub_(row_max.unsqueeze(1)).sub_(log_norm.unsqueeze(1))  # log p = (s − m) − log d
    if g_ent is not None:
        assert ent is not None
        p = torch.exp(s)
        # s <- −(g_ent / T)·p·(log p + H)
        s.add_(ent.unsqueeze(1)).mul_(p).mul_((g_ent * -inv_temp).unsqueeze(1))
        if g_logp is not None:
            s.addcmul_(p, (g_logp * -inv_temp).unsqueeze(1))
        dz = s
    else:  # logp only: everything in place, no temporary
        assert g_logp is not None
        dz = s.exp_().mul_((g_logp * -inv_temp).unsqueeze(1))
    if g_logp is not None:
        local = targets - col_offset
        hit = (targets != IGNORE_INDEX) & (local >= 0) & (local < z.shape[1])
        rows = hit.nonzero().squeeze(1)
        dz[rows, local[rows]] += g_logp[rows] * inv_temp
    if dz.data_ptr() != z.data_ptr():
        z.copy_(dz)

