"""GKD (``distill.method: gkd``; docs/algorithms.md, section 2): a full-vocabulary divergence (forward KL,
reverse KL or generalised JSD, chunked, optionally over the teacher's top-k plus a tail bucket) on
student samples with probability ``distill.lambda_on_policy``, else on the dataset's references.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from opd.batch import PromptPool, global_count, micro_slices, shard
from opd.config import DistillConfig, RolloutConfig
from opd.losses import masked_mean
from opd.methods.base import Context, Method, Step
from opd.rollout import RolloutBackend
from opd.scoring import Sequences, policy_stats, teacher_pass, vocab_divergence
from opd.train import Optimize


def gkd_step(acc: Accelerator, model: torch.nn.Module, teachers: dict[str, Any], pool: PromptPool,
             backend: RolloutBackend, tok: PreTrainedTokenizerBase, cfg: DistillConfig, rcfg: RolloutConfig
             ) -> Callable[[int], dict[str, float]]:
    """GKD: full-vocabulary divergence on student samples (prob. lambda) or dataset responses.
    The on-policy coin is tossed once per step for the global batch, so every rank agrees."""
    if len(teachers) != 1:
        raise ValueError("distill.method gkd takes one teacher; multi-teacher routing is for sampled-token methods")
    teacher = next(iter(teachers.values()))

    def step(i: int) -> dict[str, float]:
        t0 = time.perf_counter()
        examples = pool.draw(cfg.prompts_per_step)
        on_policy = bool(torch.rand(()) < cfg.lambda_on_policy) or any(e.reference is None for e in examples)
        examples = shard(acc, examples)
        if on_policy and hasattr(backend, "sync"):
            backend.sync(model)
        if on_policy:
            responses, _ = backend.sample([e.student_prompt for e in examples], 1)
        else:
            responses = [list(e.reference or []) for e in examples]
        s_seq = Sequences.build([e.student_prompt for e in examples], responses, tok.pad_token_id).to(acc.device)
        t_seq = Sequences.build([e.teacher_prompt for e in examples], responses, tok.pad_token_id).to(acc.device)
        count = global_count(acc, s_seq.targets_mask)
        # a teacher server sends its top-k and a tail bucket (opd/remote.py), scored once for the step
        served = None if isinstance(teacher, torch.nn.Module) else teacher_pass(teacher, t_seq, temperature=cfg.temperature,
                                                                                top_k=cfg.top_k)[2]
        total = 0.0
        for sl in micro_slices(len(responses), cfg.grad_accum):
            if served is None:
                div = vocab_divergence(model, s_seq.select(sl), teacher, t_seq.select(sl), cfg.loss, cfg.beta,
                                       cfg.temperature, cfg.chunk_size, cfg.top_k)
            else:
                div = policy_stats(model, s_seq.select(sl), cfg.chunk_size, cfg.temperature, teacher=served.select(sl),
                                   beta=cfg.beta, kind=cfg.loss).divergence
            loss = masked_mean(div, s_seq.select(sl).targets_mask, count)
            acc.backward(loss)
            total += float(loss.detach())
        n_tok = float(s_seq.targets_mask.sum())
        return {"loss": total, "on_policy": float(on_policy), "tokens_per_s": n_tok / (time.perf_counter() - t0),
                "response_length": n_tok / len(responses)}

    return step


class GKD(Method):
    """``distill.method: gkd``; one temperature (``distill.temperature``) for its sampling and its loss."""

    name = "gkd"

    def step(self, ctx: Context, model: torch.nn.Module, optimize: Optimize) -> Step:
        d = ctx.params.distill
        rcfg = ctx.params.rollout.model_copy(update={"temperature": d.temperature})
        return gkd_step(ctx.acc, model, ctx.teachers, ctx.pool, ctx.backend_of(model, rcfg), ctx.tok, d, rcfg)
