"""The prompt pool and the global batch: what every distillation method draws from.

A step draws the GLOBAL batch of prompts from a :class:`PromptPool` (with the global RNG, which the
training loop reseeds per step identically on every rank), makes any other shared random choice,
then takes its rank's shard (:func:`shard`). Token means are normalised by the global count of valid
tokens over all micro-batches and processes (:func:`global_count`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase

from opd.config import DEFAULT_TEACHER
from opd.data import Row
from opd.tokens import response_ids, row_prompt_ids


@dataclass(frozen=True)
class Example:
    row: Row
    student_prompt: list[int]
    teacher_prompt: list[int]
    reference: list[int] | None
    teacher: str


class PromptPool:
    """Rows of the train split, tokenised once for the student's and the teacher's views.

    ``teacher_view`` maps a row to the row the teacher reads (the row itself by default; COPSD adds
    its constitution). ``route`` maps a row to a teacher name (multi-teacher).
    """

    def __init__(self, rows: Sequence[Row], student_tok: PreTrainedTokenizerBase,
                 teacher_toks: dict[str, PreTrainedTokenizerBase] | None = None,
                 teacher_view: Callable[[Row], Row] = lambda r: r,
                 route: Callable[[Row], str] = lambda r: DEFAULT_TEACHER):
        if not rows:
            raise ValueError("no training rows for distillation (check distill.tasks and the train split)")
        teacher_toks = teacher_toks or {DEFAULT_TEACHER: student_tok}
        self.examples = []
        for r in rows:
            name = route(r)
            if name not in teacher_toks:
                raise ValueError(f"row {r.id} names teacher {name!r}, but the configured teachers are {sorted(teacher_toks)}")
            self.examples.append(Example(
                row=r, student_prompt=row_prompt_ids(student_tok, r),
                teacher_prompt=row_prompt_ids(teacher_toks[name], teacher_view(r)),
                reference=response_ids(student_tok, r.reference) if r.reference else None, teacher=name))

    def check_fits(self, student_positions: int, teacher_positions: dict[str, int], new_tokens: int) -> None:
        """Every prompt plus ``new_tokens`` fits the context of the models that read it (from their configs)."""
        for e in self.examples:
            for who, n, limit in (("student", len(e.student_prompt), student_positions),
                                  (f"teacher {e.teacher!r}", len(e.teacher_prompt), teacher_positions[e.teacher])):
                if n + new_tokens > limit:
                    raise ValueError(f"row {e.row.id}: its {who} prompt is {n} tokens; with rollout.max_new_tokens "
                                     f"{new_tokens} that exceeds the model's context of {limit} positions. Shorten "
                                     "the prompts (data.max_prompt_chars) or lower rollout.max_new_tokens.")

    def draw(self, k: int) -> list[Example]:
        idx = torch.randint(len(self.examples), (k,)).tolist()
        return [self.examples[i] for i in idx]


def shard(acc: Accelerator, items: Sequence[Any]) -> list[Any]:
    """This rank's contiguous slice of a global batch, then this rank's own random stream.

    Everything drawn before the call (the batch, GKD's on-policy coin) agrees across ranks, because
    the loop seeds every rank alike; what is drawn after it (sampling) must differ, so ranks other
    than 0 reseed. Rank 0 keeps the shared stream, so a one-process run draws exactly what it always did.
    """
    n, procs, rank = len(items), acc.num_processes, acc.process_index
    if procs == 1:
        return list(items)
    if n % procs:
        raise ValueError(f"the global batch of {n} prompts does not split over {procs} processes: set "
                         f"distill.prompts_per_step (copsd.prompts_per_step for copsd) to a multiple of {procs}")
    if rank:
        set_seed(torch.initial_seed() + 7919 * rank)
    return list(items[rank * n // procs:(rank + 1) * n // procs])


def global_count(acc: Accelerator, mask: torch.Tensor) -> torch.Tensor:
    """Valid tokens per process, averaged so DDP's gradient mean gives a global token mean."""
    total = acc.reduce(mask.sum().to(acc.device), reduction="sum")
    return total / acc.num_processes


def micro_slices(n: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices of ``n`` items (gradient-accumulation micro-batches)."""
    size = -(-n // parts)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
