"""FiRe-OPD (``distill.method: fire``; docs/algorithms.md, section 3): the sampled-token step with FiRe's
trajectory filter and soft token weights on the reverse-KL advantage, statistics global over processes.
The formulas are :mod:`opd.fire`; settings, the ``fire`` section.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from opd.batch import Example
from opd.config import DEFAULT_TEACHER, FireConfig
from opd.fire import filter_audit, fire_advantages
from opd.losses import masked_mean
from opd.methods.base import Context
from opd.methods.sampled import AdvantageFn, SampledOPD, Shaped
from opd.paths import RELIABILITY
from opd.rollout import Rollout


def fire_shaping(acc: Accelerator, f: FireConfig, reliability_of: Callable[[Example], float] | None = None) -> AdvantageFn:
    """FiRe-OPD's filter and weights on top of the reverse-KL advantage, with global statistics.
    ``reliability_of`` (the teacher's measured correctness on a sample's task / problem type, NaN when
    unknown) adds the filter audit: the mean reliability of kept and of dropped trajectories."""
    gather = lambda x: acc.gather(x.to(acc.device)).cpu()  # noqa: E731

    def shape(ro: Rollout, examples: list[Example], t_logp: torch.Tensor, mask: torch.Tensor,
              t_ent: torch.Tensor | None) -> Shaped:
        old = ro.old_logprobs.cpu()
        s_ent = ro.entropy.cpu() if ro.entropy is not None else None
        out = fire_advantages((t_logp - old) * mask, t_logp, t_ent, s_ent, mask, filter_on=f.filter,
                              q=f.filter_quantile, reweight=f.reweight, alpha=f.alpha, beta=f.beta,
                              normalize=f.normalize, token_select=f.token_select, rho=f.select_rho,
                              divergence=(old - t_logp) * mask, gather=gather)
        w = out.weights[mask.bool()]
        metrics = {"kept_frac": float(out.keep.mean()), "filter_tau": float(out.tau),
                   "token_kept_frac": float(out.mask.sum() / mask.sum().clamp(min=1)),
                   "weight_mean": float(w.mean()) if w.numel() else 0.0,
                   "weight_max": float(w.max()) if w.numel() else 0.0,
                   "weight_p90": float(w.quantile(0.9)) if w.numel() else 0.0}
        if t_ent is not None and s_ent is not None:
            metrics["teacher_entropy"] = float(masked_mean(t_ent, mask))
            metrics["student_entropy"] = float(masked_mean(s_ent, mask))
        if reliability_of is not None and f.filter:
            rel = torch.tensor([reliability_of(e) for e in examples], dtype=torch.float32)
            metrics |= filter_audit(out.keep, mask.sum(-1) > 0, rel, gather)
        return Shaped(out.adv, out.mask, metrics)

    return shape


def reliability_lookup(base: Path) -> Callable[[Example], float] | None:
    """A sample's teacher reliability (``RELIABILITY``, measured in the teacher stage) for the filter
    audit: its routed teacher's correctness on the row's task / category; NaN when not measured."""
    path = base / RELIABILITY
    if not path.is_file():
        return None
    table = json.loads(path.read_text())

    def of(example: Example) -> float:
        rates = table.get("teacher" if example.teacher == DEFAULT_TEACHER else f"teacher_{example.teacher}", {})
        return float(rates.get(f"{example.row.task}/{example.row.category}", float("nan")))

    return of


class Fire(SampledOPD):
    """``distill.method: fire``."""

    name = "fire"

    def shaping(self, ctx: Context) -> tuple[AdvantageFn, bool]:
        f = ctx.params.fire
        return fire_shaping(ctx.acc, f, reliability_lookup(ctx.base)), f.reweight or f.token_select
