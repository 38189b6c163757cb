"""Teacher-forced passes over prompt+response sequences: per-token log-probs, entropies, divergences.

Sequences are right-padded ``prompt + response`` rows (:func:`opd.tokens.join`). Token ``t`` is
predicted from position ``t-1``, so every per-token tensor here is ``[B, T-1]`` and aligned with
``targets_mask = response_mask[:, 1:]``; values outside the mask are zero. Only the hidden states
of response positions reach the LM head, in chunks (:func:`opd.losses.head_chunks`), so memory
does not grow with ``sequence_length x vocab``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from opd.losses import (Divergence, divergence_logprobs, entropy, head_chunks, soften, token_logprobs, topk_with_tail,
                        with_tail)
from opd.lora import causal_lm
from opd.tokens import join

T = TypeVar("T")

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


def _logits(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Head outputs at ``temperature``; bf16 / fp16 ones are reduced in float32 (float32 and float64
    stay as they are)."""
    return soften(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, temperature)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP / accelerate wrappers (FSDP2 shards in place: no wrapper)


def through(model: torch.nn.Module, fn: Callable[[torch.nn.Module], T]) -> T:
    """Run ``fn(inner_model)`` INSIDE ``model.__call__``, the forward redirection of Lightning and TRL.

    The engine never needs full ``[B, T, V]`` logits, so it calls the backbone and a chunked LM head
    itself. Called directly on the inner module, that would bypass the wrapper: DDP would never
    prepare its gradient all-reduce (ranks silently train different students) and FSDP2 would never
    all-gather the root's sharded weights. Routing the call through the wrapper's ``__call__`` (with the
    inner ``forward`` swapped for ``fn`` for that one call) runs every hook the wrapper needs, and the
    whole chunked computation, backbone and head, happens inside one wrapped forward.
    """
    inner = unwrap(model)
    original = inner.__dict__.get("forward")  # accelerate may have patched an instance-level forward

    def redirected(*_: Any, **__: Any) -> T:
        _restore()
        return fn(inner)

    def _restore() -> None:
        if original is None:
            inner.__dict__.pop("forward", None)
        else:
            inner.forward = original

    inner.forward = redirected
    try:
        return model()
    finally:
        _restore()


def response_hidden(model: torch.nn.Module, seq: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict response tokens: ``([N, H], [N] target ids)``.

    ``model`` is the inner (unwrapped) causal LM (a LoRA student's PEFT wrapper: the model inside it, whose
    layers hold the adapters); call this from inside :func:`through`."""
    out = causal_lm(model).base_model(input_ids=seq.input_ids, attention_mask=seq.attention_mask)
    sel = seq.response_mask[:, 1:].bool()
    return out.last_hidden_state[:, :-1][sel], seq.input_ids[:, 1:][sel]


def _scatter(values: torch.Tensor, seq: Sequences) -> torch.Tensor:
    sel = seq.response_mask[:, 1:].bool()
    dense = values.new_zeros(sel.shape)
    dense[sel] = values
    return dense


@dataclass
class TeacherDist:
    """A teacher's next-token distribution at every response position, rows in order and positions in
    :func:`response_hidden` order: full log-probs ``[N, V]`` (``index`` None), or its top-k log-probs
    plus a tail bucket ``[N, k+1]`` with their token ids ``index`` ``[N, k]``. ``counts[i]`` is row i's
    number of positions, so a micro-batch's rows can be selected."""

    logp: torch.Tensor
    index: torch.Tensor | None
    counts: torch.Tensor  # [B]

    def select(self, rows: torch.Tensor | slice) -> TeacherDist:
        starts = torch.cat([self.counts.new_zeros(1), self.counts.cumsum(0)])
        ids = torch.arange(len(self.counts))[rows].tolist()
        pos = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1])) for i in ids]) if ids else torch.zeros(0, dtype=torch.long)
        return TeacherDist(self.logp[pos], None if self.index is None else self.index[pos], self.counts[ids])

    @staticmethod
    def cat(parts: Sequence[TeacherDist]) -> TeacherDist:
        """The rows of ``parts``, one after the other, on the CPU in float32 (a step's copy for its updates)."""
        return TeacherDist(torch.cat([p.logp.float().cpu() for p in parts]),
                           None if parts[0].index is None else torch.cat([p.index.cpu() for p in parts]),
                           torch.cat([p.counts for p in parts]))


def device_of(teacher: Any) -> torch.device:
    """Where a teacher's inputs go: its weights' device (a view with no weights of its own, the LoRA
    student's base, says it as ``device``); a teacher server takes them from the CPU."""
    if not isinstance(teacher, torch.nn.Module):
        return torch.device("cpu")
    weight = next(teacher.parameters(), None)
    return weight.device if weight is not None else teacher.device


def teacher_pass(model: Any, seq: Sequences, chunk: int = 64, temperature: float = 1.0,
                 with_entropy: bool = False, top_k: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, TeacherDist | None]:
    """A frozen model's per-token log-probs (and entropies) of the sequence's tokens, and with
    ``top_k`` not None its distribution at each response position (0: the full vocabulary; k: top-k
    and a tail bucket), from ONE forward: what a mass-covering term needs beside the sampled-token
    reward, without a second teacher pass. A teacher server (:class:`opd.remote.RemoteTeacher`) answers
    the same question through its API: the log-probs exactly, entropies and distributions from its top-k."""
    if not isinstance(model, torch.nn.Module):
        return model.teacher_pass(seq, temperature, with_entropy, top_k)
    with torch.no_grad():
        inner = unwrap(model)
        h, targets = response_hidden(inner, seq)
        head = inner.get_output_embeddings()
        lps, ents, dists, idxs = [], [], [], []
        for start in range(0, max(1, h.shape[0]), chunk):
            logits = _logits(head(h[start:start + chunk]), temperature)
            lps.append(token_logprobs(logits, targets[start:start + chunk]))
            if with_entropy:
                ents.append(entropy(logits))
            if top_k is not None:
                full = torch.log_softmax(logits, -1)
                if top_k:
                    top, idx = full.topk(top_k, dim=-1)
                    full = with_tail(top)
                    idxs.append(idx)
                dists.append(full)
    dist = None
    if top_k is not None:
        dist = TeacherDist(torch.cat(dists), torch.cat(idxs) if top_k else None, seq.response_mask[:, 1:].sum(1).cpu())
    return _scatter(torch.cat(lps), seq), (_scatter(torch.cat(ents), seq) if with_entropy else None), dist


@dataclass
class PolicyStats:
    logp: torch.Tensor  # [B, T-1]
    entropy: torch.Tensor | None  # [B, T-1], detached
    divergence: torch.Tensor | None  # [B, T-1], to the teacher distribution given


def policy_stats(model: torch.nn.Module, seq: Sequences, chunk: int = 64, temperature: float = 1.0,
                 with_entropy: bool = False, teacher: TeacherDist | None = None, beta: float = 0.0,
                 kind: Divergence = "jsd") -> PolicyStats:
    """Per-token log-prob of the sequence's own next token (and the full-vocabulary entropy), at
    ``temperature`` (the sampling temperature: the policy that sampled is ``softmax(logits / T)``);
    with ``teacher``, also the divergence ``kind`` to it at each position (the generalised JSD(beta) by
    default; beta 0 = forward KL, the mass-covering term), from the same chunked LM-head pass. ``model`` may be a DDP / FSDP-prepared
    module: the pass runs through its forward."""
    extra = teacher is not None
    cols = 1 + with_entropy + extra

    def fn(hc: torch.Tensor, tc: torch.Tensor, head: torch.nn.Module, *dist: torch.Tensor) -> torch.Tensor:
        logits = _logits(head(hc), temperature)
        out = [token_logprobs(logits, tc)]
        if with_entropy:
            out.append(entropy(logits).detach())
        if extra:
            s_logp = torch.log_softmax(logits, -1)
            t_logp = dist[0]
            if len(dist) == 2:  # top-k: the student's mass on the teacher's top-k ids, plus its tail
                s_logp = with_tail(s_logp.gather(-1, dist[1]))
            out.append(divergence_logprobs(s_logp, t_logp, kind, beta))
        return torch.stack(out, -1)

    def run(m: torch.nn.Module) -> torch.Tensor:
        h, targets = response_hidden(m, seq)
        head = m.get_output_embeddings()
        dist = [] if teacher is None else [teacher.logp.to(h.device)] + ([] if teacher.index is None else [teacher.index.to(h.device)])
        return head_chunks(lambda hc, tc, *d: fn(hc, tc, head, *d), h, targets, *dist, chunk=chunk)

    out = through(model, run).reshape(-1, cols)
    return PolicyStats(_scatter(out[:, 0], seq), _scatter(out[:, 1].detach(), seq) if with_entropy else None,
                       _scatter(out[:, -1], seq) if extra else None)


def token_stats(model: torch.nn.Module, seq: Sequences, chunk: int = 64, temperature: float = 1.0,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log-probs, entropies)`` of :func:`policy_stats`."""
    st = policy_stats(model, seq, chunk, temperature, with_entropy)
    return st.logp, st.entropy


def vocab_divergence(student: torch.nn.Module, s_seq: Sequences, teacher: torch.nn.Module, t_seq: Sequences,
                     kind: Divergence, beta: float = 0.5, temperature: float = 1.0, chunk: int = 64,
                     top_k: int = 0) -> torch.Tensor:
    """Per-token full-vocabulary divergence between student and teacher on the same responses.

    The teacher may see a different prompt (its own chat template, a constitution): the two
    sequence sets must hold the same responses in the same order, which is checked.
    """
    t_inner = unwrap(teacher)
    t_head = t_inner.get_output_embeddings()
    with torch.no_grad():
        t_h, t_tgt = response_hidden(t_inner, t_seq)

    def run(m: torch.nn.Module) -> torch.Tensor:
        s_head = m.get_output_embeddings()
        s_h, s_tgt = response_hidden(m, s_seq)
        if s_tgt.shape != t_tgt.shape or not torch.equal(s_tgt, t_tgt.to(s_tgt.device)):
            raise ValueError("student and teacher sequences do not hold the same response tokens")

        def fn(sc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
            s_logp = torch.log_softmax(_logits(s_head(sc), temperature), -1)
            with torch.no_grad():
                t_logp = torch.log_softmax(_logits(t_head(tc), temperature), -1)
            if top_k:
                t_logp, s_logp = topk_with_tail(t_logp, s_logp, top_k)
            return divergence_logprobs(s_logp, t_logp, kind, beta)

        return head_chunks(fn, s_h, t_h.to(s_h.device), chunk=chunk)

    return _scatter(through(student, run), s_seq)
