"""COPSD (``distill.method: copsd``; docs/algorithms.md, section 4): the sampled-token step with the
teacher reading the constitution, ``copsd.n`` samples per prompt, clipped token rewards normalised over
each prompt's group (or the outcome path), KL to the initial student and the mass-covering term. The
formulas are :mod:`opd.copsd`; settings, the ``copsd`` section (for its per-step numbers too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from opd.batch import Example
from opd.config import Params
from opd.constitution import constitutions_of, teacher_view
from opd.copsd import group_advantages, response_means, sequence_advantages, token_rewards
from opd.data import Row
from opd.evaluate import load_detector, load_judge
from opd.losses import masked_mean
from opd.methods.base import Context, Own
from opd.methods.sampled import AdvantageFn, SampledOPD, Shaped
from opd.paths import resolve
from opd.rollout import Rollout


def copsd_shaping(low: float, high: float, credit: str = "token",
                  outcome: Callable[[Example, list[int]], float] | None = None,
                  outcome_tasks: Sequence[str] = ()) -> AdvantageFn:
    """COPSD: clipped token rewards, normalised over all valid tokens of each prompt's n samples
    (``credit: sequence``: each response's mean reward, normalised over the n responses). Rows of
    ``outcome_tasks`` take the reference code's outcome path instead: ``outcome(example, response)``
    scores each response as a whole, normalised over the group, spread over its tokens. A prompt's
    n samples share its task, so a group is wholly on one path and mixed batches need no care."""

    def shape(ro: Rollout, examples: list[Example], t_logp: torch.Tensor, mask: torch.Tensor,
              t_ent: torch.Tensor | None) -> Shaped:
        old = ro.old_logprobs.cpu()
        raw = t_logp - old
        r = token_rewards(t_logp, old, mask, low, high)
        group = ro.prompt_index.cpu()
        adv = (group_advantages(r, mask, group) if credit == "token"
               else sequence_advantages(response_means(r, mask), mask, group))
        metrics = {"reward_mean": float(masked_mean(r, mask)),
                   "reward_clipped_frac": float(masked_mean((raw < low) | (raw > high), mask))}
        on_outcome = torch.tensor([e.row.task in outcome_tasks for e in examples])
        if outcome is not None and bool(on_outcome.any()):
            scores = torch.tensor([outcome(e, y) if hit else 0.0
                                   for e, y, hit in zip(examples, ro.responses, on_outcome.tolist(), strict=True)])
            adv = torch.where(on_outcome.unsqueeze(-1), sequence_advantages(scores, mask, group), adv)
            metrics |= {"outcome_frac": float(on_outcome.float().mean()),
                        "outcome_score": float(scores[on_outcome].mean())}
        if ro.entropy is not None:
            metrics["student_entropy"] = float(masked_mean(ro.entropy.cpu(), mask))
        return Shaped(adv, mask, metrics)

    return shape


def outcome_judge(params: Params, tok: Any) -> Callable[[Example, list[int]], float]:
    """The outcome reward of one sampled response (``copsd.outcome_judge``) on the row's bare prompt."""
    judge = load_judge(params.copsd.outcome_judge, load_detector(params.evaluate.refusal_detector),
                       params.data.answer_format)
    return lambda example, response: float(judge(example.row, tok.decode(response, skip_special_tokens=True)))


class Copsd(SampledOPD):
    """``distill.method: copsd``."""

    name = "copsd"

    def own(self, params: Params) -> Own:
        c = params.copsd
        return Own(c.prompts_per_step, c.n, c.lr, c.kl_coef, c.fkl_coef, c.fkl_beta)

    def teacher_path(self, params: Params, base: Path, cross: Path) -> Path:
        """The Cross-SFT recalibrated teacher, the original ("constitution OPSD"), or the initial student
        itself (self-distillation: the only thing it gains is the constitution)."""
        if params.copsd.teacher == "original":
            return resolve(base, "teacher")
        if params.copsd.teacher == "self":
            return resolve(base, "student_init")
        path = cross / "teacher"
        if not path.is_dir():
            raise FileNotFoundError(f"{path} missing: run the cross_sft stage first with distill.method: copsd "
                                    "(dvc repro cross_sft), or set copsd.teacher: original for the baseline without Cross-SFT")
        return path

    def teacher_view(self, params: Params, prepared: Path) -> Callable[[Row], Row]:
        texts = constitutions_of(params, prepared)
        return lambda r: teacher_view(r, texts, params.copsd.constitution_role)

    def shaping(self, ctx: Context) -> tuple[AdvantageFn, bool]:
        c = ctx.params.copsd
        judge = outcome_judge(ctx.params, ctx.tok) if c.outcome_tasks else None
        return copsd_shaping(c.reward_low, c.reward_high, c.credit, judge, c.outcome_tasks), True
