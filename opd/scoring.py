"""Teacher-forced passes over prompt+response sequences: per-token log-probs, entropies, divergences.

Sequences are right-padded ``prompt + response`` rows (:func:`opd.tokens.join`). Token ``t`` is
predicted from position ``t-1``, so every per-token tensor here is ``[B, T-1]`` and aligned with
``targets_mask = response_mask[:, 1:]``; values outside the mask are zero. Only the hidden states
of response positions reach the LM head, in chunks (:func:`opd.losses.head_chunks`), so memory
does not grow with ``sequence_length x vocab``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opd.losses import Divergence, divergence_logprobs, entropy, head_chunks, token_logprobs, topk_with_tail
from opd.tokens import join


@dataclass
class Sequences:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T], 1 on response tokens (EOS included)

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> Sequences:
        """Right-padded ``prompt + response`` rows (see :func:`opd.tokens.join`)."""
        b = join(prompts, responses, pad_id)
        return cls(b["input_ids"], b["attention_mask"], b["response_mask"])

    @property
    def targets_mask(self) -> torch.Tensor:
        return self.response_mask[:, 1:].to(torch.float32)

    def to(self, device: torch.device | str) -> Sequences:
        return Sequences(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))

    def select(self, idx: torch.Tensor | slice) -> Sequences:
        return Sequences(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx])


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 logits are reduced in float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP / accelerate wrappers


def response_hidden(model: torch.nn.Module, seq: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict response tokens: ``([N, H], [N] target ids)``."""
    m = _unwrap(model)
    out = m.base_model(input_ids=seq.input_ids, attention_mask=seq.attention_mask)
    sel = seq.response_mask[:, 1:].bool()
    return out.last_hidden_state[:, :-1][sel], seq.input_ids[:, 1:][sel]


def _scatter(values: torch.Tensor, seq: Sequences) -> torch.Tensor:
    sel = seq.response_mask[:, 1:].bool()
    dense = values.new_zeros(sel.shape)
    dense[sel] = values
    return dense


def token_stats(model: torch.nn.Module, seq: Sequences, chunk: int = 64, temperature: float = 1.0,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-prob of the sequence's own next token (and the full-vocabulary entropy)."""
    head = _unwrap(model).get_output_embeddings()
    h, targets = response_hidden(model, seq)

    def fn(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        logits = _upcast(head(hc)) / temperature
        lp = token_logprobs(logits, tc)
        if with_entropy:
            return torch.stack([lp, entropy(logits).detach()], -1)
        return lp.unsqueeze(-1)

    out = head_chunks(fn, h, targets, chunk=chunk)
    logp = _scatter(out[:, 0], seq)
    return logp, (_scatter(out[:, 1], seq) if with_entropy else None)


def vocab_divergence(student: torch.nn.Module, s_seq: Sequences, teacher: torch.nn.Module, t_seq: Sequences,
                     kind: Divergence, beta: float = 0.5, temperature: float = 1.0, chunk: int = 64,
                     top_k: int = 0) -> torch.Tensor:
    """Per-token full-vocabulary divergence between student and teacher on the same responses.

    The teacher may see a different prompt (its own chat template, a constitution): the two
    sequence sets must hold the same responses in the same order, which is checked.
    """
    s_head = _unwrap(student).get_output_embeddings()
    t_head = _unwrap(teacher).get_output_embeddings()
    s_h, s_tgt = response_hidden(student, s_seq)
    with torch.no_grad():
        t_h, t_tgt = response_hidden(teacher, t_seq)
    if s_tgt.shape != t_tgt.shape or not torch.equal(s_tgt, t_tgt):
        raise ValueError("student and teacher sequences do not hold the same response tokens")

    def fn(sc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        s_logp = torch.log_softmax(_upcast(s_head(sc)) / temperature, -1)
        with torch.no_grad():
            t_logp = torch.log_softmax(_upcast(t_head(tc)) / temperature, -1)
        if top_k:
            t_logp, s_logp = topk_with_tail(t_logp, s_logp, top_k)
        return divergence_logprobs(s_logp, t_logp, kind, beta)

    return _scatter(head_chunks(fn, s_h, t_h, chunk=chunk), s_seq)
