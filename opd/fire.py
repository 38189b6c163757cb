"""FiRe-OPD: filter low-quality trajectories, then softly reweight tokens (docs/algorithms.md, section 3).

All statistics (the quantile threshold, the entropy maxima, the batch-normalisation mean) are
taken over the WHOLE optimisation batch: the caller gathers them across processes before
micro-batching. The public reference code takes the quantile per micro-batch of one, where it
keeps everything; :func:`trajectory_filter` is called once per batch, so micro-batch size does
not change which trajectories are kept.

Also here, for honest ablations in the same code path: the hard token-selection rival (keep the
top ``rho`` fraction of tokens by student entropy + teacher-student divergence, TIP-like).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from opd.losses import masked_mean


def trajectory_scores(t_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``s_i = (1/L_i) sum_t m_it log pi_T(y_it)``: the teacher's mean log-prob of each response."""
    return (t_logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def trajectory_filter(scores: torch.Tensor, q: float, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``s_i >= quantile(s, q)`` (linear interpolation); returns (keep [B] float, tau).

    ``valid`` marks trajectories that take part (e.g. not fully masked); others are neither used
    for the threshold nor kept.
    """
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    if not valid.any():
        return torch.zeros_like(scores), scores.new_tensor(float("nan"))
    tau = torch.quantile(scores[valid].double(), q).to(scores.dtype)
    return ((scores >= tau) & valid).to(scores.dtype), tau


def confidence_weights(t_ent: torch.Tensor, s_ent: torch.Tensor, mask: torch.Tensor, alpha: float, beta: float,
                       t_max: torch.Tensor | float | None = None, s_max: torch.Tensor | float | None = None) -> torch.Tensor:
    """``w~ = (1 + alpha cT)(1 + beta cS)``, in ``[1, (1+alpha)(1+beta)]`` on valid tokens.

    ``cT = clip(1 - H_T / max H_T, 0, 1)`` (teacher sure) and ``cS = clip(H_S / max H_S, 0, 1)``
    (student unsure), with maxima over the valid tokens of the whole batch (pass the gathered
    maxima as ``t_max`` / ``s_max`` under several processes). Detached: weights carry no gradient.
    """
    t_ent, s_ent, m = t_ent.detach(), s_ent.detach(), mask.bool()
    t_max = t_ent[m].max() if t_max is None else torch.as_tensor(t_max, dtype=t_ent.dtype)
    s_max = s_ent[m].max() if s_max is None else torch.as_tensor(s_max, dtype=s_ent.dtype)
    tiny = torch.finfo(t_ent.dtype).tiny
    c_t = (1.0 - t_ent / t_max.clamp(min=tiny)).clamp(0.0, 1.0)
    c_s = (s_ent / s_max.clamp(min=tiny)).clamp(0.0, 1.0)
    return ((1.0 + alpha * c_t) * (1.0 + beta * c_s)) * mask


def normalise_weights(w: torch.Tensor, mask: torch.Tensor, how: Literal["trajectory", "batch"],
                      batch_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Scale weights to mean 1 over each trajectory's valid tokens, or over all valid tokens."""
    if how == "trajectory":
        mean = (w * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    else:
        mean = masked_mean(w, mask) if batch_mean is None else batch_mean
    return (w / torch.as_tensor(mean).clamp(min=1e-12)) * mask


def hard_token_selection(s_ent: torch.Tensor, divergence: torch.Tensor, mask: torch.Tensor, rho: float) -> torch.Tensor:
    """TIP-like rival: keep the top ``rho`` fraction of valid tokens by
    ``H_S / max H_S + D / max D`` (student entropy plus teacher-student divergence)."""
    m = mask.bool()
    if not m.any():
        return torch.zeros_like(mask)
    d = divergence.abs()
    z = s_ent / s_ent[m].max().clamp(min=1e-12) + d / d[m].max().clamp(min=1e-12)
    thresh = torch.quantile(z[m].double(), 1.0 - rho).to(z.dtype)
    return ((z >= thresh) & m).to(mask.dtype)


Gather = Callable[[torch.Tensor], torch.Tensor]


def _local(x: torch.Tensor) -> torch.Tensor:
    return x


def _global_max(x: torch.Tensor, m: torch.Tensor, gather: Gather) -> torch.Tensor:
    local = x[m.bool()].max() if m.any() else x.new_tensor(0.0)
    return gather(local.reshape(1)).max()


def filter_audit(keep: torch.Tensor, valid: torch.Tensor, reliability: torch.Tensor,
                 gather: Gather = _local) -> dict[str, float]:
    """Was the filter dropping what the teacher gets wrong? The mean teacher reliability (its measured
    correctness on each trajectory's task / problem type; NaN = unknown) of the kept and of the
    dropped valid trajectories of the whole batch. A key is absent when its side is empty."""
    keep, valid, rel = gather(keep.float()).bool(), gather(valid.float()).bool(), gather(reliability.float())
    known = valid & ~rel.isnan()
    out = {}
    for key, side in (("kept_reliability", keep), ("dropped_reliability", ~keep)):
        sel = known & side
        if sel.any():
            out[key] = float(rel[sel].mean())
    return out


@dataclass
class FireOutput:
    adv: torch.Tensor  # stopgrad(w A) k
    mask: torch.Tensor  # m * k (and the hard selection, when on)
    weights: torch.Tensor  # normalised weights on valid tokens (1 where reweighting is off)
    keep: torch.Tensor  # [B] trajectories kept
    tau: torch.Tensor


@torch.no_grad()  # every FiRe statistic is a constant of the update: nothing here carries a gradient
def fire_advantages(adv: torch.Tensor, t_logp: torch.Tensor, t_ent: torch.Tensor | None, s_ent: torch.Tensor | None,
                    mask: torch.Tensor, *, filter_on: bool, q: float, reweight: bool, alpha: float, beta: float,
                    normalize: Literal["trajectory", "batch"], token_select: bool = False, rho: float = 0.5,
                    divergence: torch.Tensor | None = None, gather: Gather = _local) -> FireOutput:
    """FiRe on a whole optimisation batch: filter, reweight, combine.

    ``gather`` concatenates a tensor across processes (``accelerator.gather``; identity on one
    process) so the quantile, the entropy maxima and the batch mean are global. With
    ``filter_on=False`` and ``reweight=False`` (or alpha = beta = 0) this is vanilla OPD.
    """
    valid = mask.sum(-1) > 0
    if filter_on:
        scores = trajectory_scores(t_logp, mask)
        _, tau = trajectory_filter(gather(scores), q, gather(valid))
        keep = ((scores >= tau) & valid).to(mask.dtype)
    else:
        keep, tau = valid.to(mask.dtype), t_logp.new_tensor(float("nan"))
    if reweight:
        if t_ent is None or s_ent is None:
            raise ValueError("FiRe reweighting needs teacher and student entropies")
        raw = confidence_weights(t_ent, s_ent, mask, alpha, beta, _global_max(t_ent, mask, gather),
                                 _global_max(s_ent, mask, gather))
        batch_mean = None
        if normalize == "batch":
            sums = gather(torch.stack([(raw * mask).sum(), mask.sum()]).reshape(1, 2)).sum(0)
            batch_mean = sums[0] / sums[1].clamp(min=1.0)
        w = normalise_weights(raw, mask, normalize, batch_mean)
    else:
        w = mask.clone()
    tok_mask = mask * keep.unsqueeze(-1)
    if token_select:
        if s_ent is None or divergence is None:
            raise ValueError("hard token selection needs the student entropy and the divergence")
        tok_mask = tok_mask * hard_token_selection(s_ent, divergence, mask, rho)
    return FireOutput((w * adv).detach() * tok_mask, tok_mask, w, keep, tau)
