"""SFT (``distill.method: sft``; docs/algorithms.md, section 7): cross-entropy on the rows' reference
responses, the supervised baseline (the teacher stage and Cross-SFT train with it too).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from opd.batch import PromptPool, global_count, micro_slices, shard
from opd.losses import masked_mean
from opd.methods.base import Context, Method, Step
from opd.scoring import Sequences, token_stats
from opd.train import Optimize


def sft_step(acc: Accelerator, model: torch.nn.Module, pool: PromptPool, tok: PreTrainedTokenizerBase,
             batch_size: int, grad_accum: int = 1, chunk: int = 1024) -> Callable[[int], dict[str, float]]:
    """Cross-entropy on the rows' reference responses (teacher training, SFT baselines);
    ``batch_size`` is global (sharded over ranks)."""
    with_ref = [e for e in pool.examples if e.reference is not None]
    if not with_ref:
        raise ValueError("SFT needs rows with a reference response; none found")

    def step(i: int) -> dict[str, float]:
        t0 = time.perf_counter()
        idx = torch.randint(len(with_ref), (batch_size,)).tolist()
        ex = shard(acc, [with_ref[j] for j in idx])
        seq = Sequences.build([e.student_prompt for e in ex], [list(e.reference or []) for e in ex],
                              tok.pad_token_id).to(acc.device)
        count = global_count(acc, seq.targets_mask)
        total = 0.0
        for sl in micro_slices(len(ex), grad_accum):
            logp, _ = token_stats(model, seq.select(sl), chunk=chunk)
            loss = masked_mean(-logp, seq.select(sl).targets_mask, count)
            acc.backward(loss)
            total += float(loss.detach())
        n_tok = float(seq.targets_mask.sum())
        return {"loss": total, "tokens_per_s": n_tok / (time.perf_counter() - t0)}

    return step


class SFT(Method):
    """``distill.method: sft``."""

    name = "sft"

    def step(self, ctx: Context, model: torch.nn.Module, optimize: Optimize) -> Step:
        d = ctx.params.distill
        return sft_step(ctx.acc, model, ctx.pool, ctx.tok, d.prompts_per_step, d.grad_accum, d.chunk_size)
