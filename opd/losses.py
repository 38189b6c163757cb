"""Every divergence and per-token loss, each a small pure function (docs/algorithms.md, sections 1-2).

Conventions: ``logits`` are ``[..., V]``; per-token results are ``[...]``; ``mask`` is 1 on tokens
that count. Aggregation is separate (:func:`masked_mean`) so the caller can divide by the *global*
number of valid tokens across micro-batches and processes (docs/peers.md, complaint 6).

Full-vocabulary terms never hold ``sequence_length x vocab`` logits at once: :func:`head_chunks`
applies the LM head to a chunk of positions at a time, under activation checkpointing when a
gradient is needed, so the backward pass recomputes each chunk's logits instead of storing them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


# ----------------------------------------------------------------------------- token statistics
def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids], through the fused log-softmax kernel: ``picked - logsumexp`` holds a
    temporary of the same size and, on CPU, took twice as long forward and backward (logsumexp is
    five ops there, log-softmax and its backward one each)."""
    return torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) over the last axis."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``, skipped at 1 (a ``chunk x vocab`` division and its backward saved)."""
    return logits if temperature == 1.0 else logits / temperature


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: float | torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``x`` over ``mask`` divided by ``count`` (default: the local number of valid tokens)."""
    total = (x * mask).sum()  # a bool x (a rate) becomes float here; the count must follow total's dtype
    denom = mask.sum() if count is None else count
    return total / torch.clamp(torch.as_tensor(denom, dtype=total.dtype, device=x.device), min=1.0)


# ----------------------------------------------------------------------------- policy gradient
def pg_plain(logp: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Per-token ``-A * log pi``: the on-policy gradient when each batch makes one update."""
    return -adv.detach() * logp


def pg_ppo_clip(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_eps: float = 0.2,
                dual_clip: float | None = 3.0) -> torch.Tensor:
    """Per-token PPO-clip loss with optional dual-clip (Ye et al. 2020) for negative advantages.

    ``loss = max(-A r, -A clip(r, 1-eps, 1+eps))``; where ``A < 0`` it is further capped at
    ``-A * dual_clip`` so one token with a huge ratio cannot dominate the batch.
    """
    adv = adv.detach()
    ratio = torch.exp(logp - old_logp.detach())
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, log_ratio_clip: float = 20.0, value_clip: float = 10.0) -> torch.Tensor:
    """Low-variance, non-negative estimator of KL(pi || ref) on sampled tokens (Schulman's k3):
    ``exp(ref - logp) - (ref - logp) - 1``, with verl's clamps (``low_var_kl``): the log-ratio to +-20
    and the value to +-10, so a token the student has all but abandoned cannot overflow float32 to inf."""
    d = (ref_logp.detach() - logp).clamp(-log_ratio_clip, log_ratio_clip)
    return (torch.exp(d) - d - 1.0).clamp(-value_clip, value_clip)


# ----------------------------------------------------------------------------- full-vocabulary divergences
def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from (finite) log-probabilities over the last axis."""
    return (logp.exp() * (logp - logq)).sum(-1)


def divergence_logprobs(s_logp: torch.Tensor, t_logp: torch.Tensor, kind: Divergence, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between student and teacher log-distributions.

    ``jsd`` is GKD's generalised JSD: ``beta KL(T || M) + (1-beta) KL(S || M)`` with
    ``M = beta T + (1-beta) S``; as in GKD / TRL, ``beta = 0`` is forward KL and ``beta = 1``
    reverse KL (the raw formula is 0 at both ends).
    """
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(t_logp, s_logp)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(s_logp, t_logp)
    if kind != "jsd":
        raise ValueError(f"unknown divergence {kind!r}")
    m = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(t_logp, m) + (1.0 - beta) * _kl(s_logp, m)


def divergence(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: Divergence, beta: float = 0.5,
               temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence from raw logits, both softened by ``temperature``."""
    return divergence_logprobs(F.log_softmax(soften(s_logits, temperature), -1),
                               F.log_softmax(soften(t_logits.detach(), temperature), -1), kind, beta)


def topk_with_tail(t_logp: torch.Tensor, s_logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict both distributions to the teacher's top-k tokens plus one tail bucket.

    The tail holds ``log(1 - sum top-k p)`` so each truncated distribution still sums to one and
    the student is still pushed to move mass out of the tail (docs/peers.md, complaint 7).
    """
    t_top, idx = t_logp.topk(k, dim=-1)
    return with_tail(t_top), with_tail(s_logp.gather(-1, idx))


def with_tail(top: torch.Tensor) -> torch.Tensor:
    """Log-probs of some tokens plus one bucket for the rest: ``log(1 - exp(logsumexp(top)))``,
    computed stably; the clamp keeps the log finite when the tokens cover (numerically) everything."""
    lse = torch.logsumexp(top, -1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([top, torch.log(-torch.expm1(lse))], -1)


# ----------------------------------------------------------------------------- chunked LM-head evaluation
def head_chunks(fn: Callable[..., torch.Tensor], hidden: torch.Tensor, *others: torch.Tensor,
                chunk: int = 64) -> torch.Tensor:
    """Apply ``fn(hidden_chunk, *other_chunks)`` to row-chunks of ``[N, ...]`` inputs and concatenate.

    ``fn`` turns hidden states into logits and reduces them to a per-position value, so only one
    chunk of ``chunk x vocab`` logits exists at a time. When ``hidden`` needs a gradient each chunk
    runs under activation checkpointing, so backward recomputes the chunk instead of storing it.
    """
    if hidden.shape[0] == 0:  # still run fn: an empty result stays in the graph (DDP needs every rank's backward)
        return fn(hidden, *others)
    outs = []
    for start in range(0, hidden.shape[0], chunk):
        parts = [hidden[start:start + chunk]] + [o[start:start + chunk] for o in others]
        if hidden.requires_grad and torch.is_grad_enabled():
            outs.append(checkpoint(fn, *parts, use_reentrant=False))
        else:
            outs.append(fn(*parts))
    return torch.cat(outs, 0)
