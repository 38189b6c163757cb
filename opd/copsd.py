"""COPSD building blocks (docs/algorithms.md, sections 4-5): token rewards, group advantages, and the
Cross-SFT recalibration mix.

The teacher sees the prompt with its category's constitution (:mod:`opd.constitution`); the student
always sees the bare prompt. Rewards are the clipped teacher-minus-behaviour log-prob of each sampled token, and
advantages are normalised over ALL valid tokens of the ``n`` responses to one prompt (population
mean and standard deviation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from opd.constitution import teacher_view
from opd.data import Row


def token_rewards(t_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, low: float = -3.0,
                  high: float = 5.0) -> torch.Tensor:
    """``r_t = clip(log pi_T(y_t | x_c) - log pi_old(y_t | x), low, high)`` on valid tokens."""
    return (t_logp - old_logp).clamp(low, high) * mask


def group_advantages(rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``A_t = m_t (r_t - mu_g) / (sigma_g + eps)`` with mu, sigma over all valid tokens of group g."""
    adv = torch.zeros_like(rewards)
    m = mask.bool()
    for g in group.unique():
        rows = group == g
        vals = rewards[rows][m[rows]]
        if vals.numel() == 0:
            continue
        mu, sigma = vals.mean(), vals.std(unbiased=False)
        adv[rows] = (rewards[rows] - mu) / (sigma + eps)
    return adv.detach() * mask


def sequence_advantages(scores: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """One score per response, normalised over its group's responses (GRPO, as verl's outcome advantage:
    ``(s - mean_g) / (std_g + eps)``, unbiased std; a group of one gets 0) and spread over the
    response's valid tokens. The outcome path of the COPSD reference ("OPSDGate"), and sequence credit."""
    norm = torch.zeros_like(scores)
    for g in group.unique():
        rows = group == g
        if int(rows.sum()) > 1:
            vals = scores[rows]
            norm[rows] = (vals - vals.mean()) / (vals.std(unbiased=True) + eps)
    return (norm.unsqueeze(-1) * mask).detach()


def response_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's mean over its valid tokens (0 for a row without any)."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


@dataclass(frozen=True)
class CrossSFTMix:
    rows: list[Row]
    counts: dict[str, int]


def cross_sft_rows(self_answers: Sequence[tuple[Row, str]], safety: Sequence[Row], constitutions: dict[str, str],
                   include_self: bool = True, role: str = "user") -> CrossSFTMix:
    """The teacher's recalibration set, both sources with the constitution in the teacher's input.

    (a) over-refusal-prone and general prompts answered with the STUDENT's own (accepted) answers;
    (b) safety prompts answered by the oracle (their reference refusals, or a stronger model's).
    ``include_self=False`` is the "w/o self" ablation: source (a) is dropped.
    """
    a = [replace(teacher_view(r, constitutions, role), reference=ans, id=f"{r.id}-self")
         for r, ans in self_answers] if include_self else []
    b = [replace(teacher_view(r, constitutions, role), id=f"{r.id}-oracle") for r in safety if r.reference]
    return CrossSFTMix(a + b, {"self": len(a), "oracle": len(b)})
