"""What a distillation method is: its settings, its teacher, and the step it builds.

``distill_stage`` looks the method up once (:data:`opd.methods.METHODS`), asks it for its teacher
folder, the teacher's view of a row and its per-step numbers, assembles a :class:`Context` (models,
prompt pool, rollout backends) and lets the method build the step the training loop calls. A method
reads its own settings section (``fire``, ``copsd``; ``distill`` for opd, gkd and sft) plus the
shared loop settings (``distill.steps``, ``distill.chunk_size``, ``distill.ppo_epochs``...), and
never rewrites another section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from opd.batch import PromptPool
from opd.config import DistillConfig, Params, RolloutConfig
from opd.data import Row
from opd.paths import resolve
from opd.rollout import RolloutBackend
from opd.train import Optimize

Step = Callable[[int], dict[str, float]]
Unit = Callable[[str, Callable[..., Any]], Callable[..., Any]]


def inline(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """The default :data:`Unit` wrapper: run the unit as a plain call."""
    return fn


@dataclass(frozen=True)
class Own:
    """The per-step numbers a method takes from its own section."""

    prompts_per_step: int
    samples_per_prompt: int
    lr: float
    kl_coef: float = 0.0  # KL(pi_S || pi_init): a reference model is loaded when > 0
    fkl_coef: float = 0.0  # the mass-covering term's weight (docs/algorithms.md, section 6)
    fkl_beta: float = 0.0

    @classmethod
    def of(cls, d: DistillConfig) -> Own:
        """The ``distill`` section's numbers (opd, fire, gkd, sft; copsd has its own)."""
        return cls(d.prompts_per_step, d.samples_per_prompt, d.lr, d.kl_coef, d.fkl_coef, d.fkl_beta)


@dataclass
class Context:
    """Everything a method's step is built from; ``distill_stage`` assembles it once."""

    params: Params
    acc: Accelerator
    teachers: dict[str, torch.nn.Module]
    pool: PromptPool
    tok: PreTrainedTokenizerBase
    backend_of: Callable[[torch.nn.Module, RolloutConfig], RolloutBackend]
    ref: torch.nn.Module | None
    unit: Unit
    base: Path  # the teacher stage's folder (manifest, reliability table)


class Method:
    """A distillation method; subclasses override what differs."""

    name = ""
    sampled = False  # a rollout batch makes distill.ppo_epochs x distill.mini_batches optimiser steps

    def own(self, params: Params) -> Own:
        return Own.of(params.distill)

    def teacher_path(self, params: Params, base: Path, cross: Path) -> Path:
        return resolve(base, "teacher")

    def teacher_view(self, params: Params, prepared: Path) -> Callable[[Row], Row]:
        return lambda r: r

    def step(self, ctx: Context, model: torch.nn.Module, optimize: Optimize) -> Step:
        raise NotImplementedError
