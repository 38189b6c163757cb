"""Sampled-token OPD (``distill.method: opd``; docs/algorithms.md, section 1), and the step that FiRe and
COPSD share: sample, score the sampled tokens with the teacher, shape advantages, update.

Each method differs only in its advantage shaping (:data:`AdvantageFn`): this module's
:func:`reverse_kl_advantage`, :func:`opd.methods.fire.fire_shaping`, :func:`opd.methods.copsd.copsd_shaping`.
Every forward of the student that carries a gradient goes through the prepared (DDP / FSDP) module
(:func:`opd.scoring.through`), so gradients are reduced across ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from opd.batch import Example, PromptPool, global_count, micro_slices, shard
from opd.config import DistillConfig, RolloutConfig
from opd.losses import kl_k3, masked_mean, pg_plain, pg_ppo_clip
from opd.methods.base import Context, Method, Own, Step, Unit, inline
from opd.rollout import Rollout, RolloutBackend, rollout, sampler_gap
from opd.scoring import PolicyStats, Sequences, TeacherDist, device_of, policy_stats, teacher_pass, token_stats
from opd.train import Optimize


@dataclass
class TeacherScores:
    """The teachers' view of a batch of samples, in the student's ``[B, T-1]`` layout: log-probs of
    the sampled tokens, entropies when asked, and the full (or top-k) distributions when a
    mass-covering term needs them."""

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    dist: TeacherDist | None = None


def teacher_logprobs(teachers: dict[str, torch.nn.Module], examples: Sequence[Example], responses: Sequence[list[int]],
                     pad_id: int, chunk: int = 1024, with_entropy: bool = False,
                     temperature: float = 1.0, dist_top_k: int | None = None) -> TeacherScores:
    """Per-token log-probs (and entropies) of ``responses`` under each sample's own teacher, at the
    rollout ``temperature`` (as both reference implementations score the teacher), and with
    ``dist_top_k`` not None their distributions (0: full vocabulary), all from one teacher pass.

    Samples are grouped by teacher, scored on the teacher's view of the prompt, and scattered back
    into the student's ``[B, T-1]`` layout (responses are identical, so target positions align by
    order within each row).
    """
    names = [e.teacher for e in examples]
    sel = Sequences.build([e.student_prompt for e in examples], responses, pad_id).response_mask[:, 1:].bool()
    logp = torch.zeros(sel.shape)
    ent = torch.zeros(sel.shape) if with_entropy else None
    dists: list[TeacherDist] = []
    order: list[int] = []  # the rows of dists, teacher by teacher
    for name in sorted(set(names)):
        rows = [i for i, n in enumerate(names) if n == name]
        model = teachers[name]
        device = device_of(model)
        t_seq = Sequences.build([examples[i].teacher_prompt for i in rows], [responses[i] for i in rows],
                                pad_id).to(device)
        lp, en, dist = teacher_pass(model, t_seq, chunk=chunk, temperature=temperature, with_entropy=with_entropy,
                                    top_k=dist_top_k)
        t_sel = t_seq.response_mask[:, 1:].bool()
        for j, i in enumerate(rows):
            logp[i, sel[i]] = lp[j, t_sel[j]].float().cpu()
            if ent is not None and en is not None:
                ent[i, sel[i]] = en[j, t_sel[j]].float().cpu()
        if dist is not None:
            dists.append(dist)
            order += rows
    merged = TeacherDist.cat(dists).select(torch.tensor(order).argsort()) if dists else None  # back in sample order
    return TeacherScores(logp, ent, merged)


@dataclass
class Shaped:
    """Advantages and the token mask after method-specific shaping (FiRe, COPSD)."""

    adv: torch.Tensor
    mask: torch.Tensor
    metrics: dict[str, float]


AdvantageFn = Callable[[Rollout, list[Example], torch.Tensor, torch.Tensor, torch.Tensor | None], Shaped]


def reverse_kl_advantage(ro: Rollout, examples: list[Example], t_logp: torch.Tensor, mask: torch.Tensor,
                         t_ent: torch.Tensor | None) -> Shaped:
    """Vanilla OPD: ``A_t = log pi_T(y_t) - log pi_old(y_t)`` (the negative reverse-KL sample)."""
    return Shaped((t_logp - ro.old_logprobs.cpu()) * mask, mask, {})


def sampled_step(acc: Accelerator, model: torch.nn.Module, teachers: dict[str, torch.nn.Module], pool: PromptPool,
                 backend: RolloutBackend, tok: PreTrainedTokenizerBase, cfg: DistillConfig, rcfg: RolloutConfig,
                 optimize: Optimize, ref_model: torch.nn.Module | None = None, shape: AdvantageFn = reverse_kl_advantage,
                 need_entropy: bool = False, unit: Unit = inline, own: Own | None = None) -> Step:
    """One sampled-token step: PPO-clip policy gradient on the shaped advantages (+ optional KL to the
    initial student and mass-covering term). ``cfg`` gives the shared loop settings, ``own`` the
    method's per-step numbers (default: ``distill``'s).

    A step is four units of work, each passed through ``unit(name, fn)`` so an orchestrator can run
    them as its own tasks (``tasks/distill.py`` makes them Prefect tasks) without this module
    importing one: ``rollout`` (sample), ``score`` (teacher log-probs), ``shape`` (the method's
    advantages) and ``update`` (loss, backward and optimiser steps).

    One rollout batch makes ``ppo_epochs x mini_batches`` optimiser steps (the COPSD reference takes
    4, so the PPO ratio leaves 1 and the clips act). With exactly one (the default) the behaviour
    policy IS the policy being updated, so the behaviour log-probs (and entropies) come from the
    update's own forward, detached, instead of a separate teacher-forced pass: the ratio is exactly 1,
    the gradient is the same, one student forward per step is saved.
    """
    own = own or Own.of(cfg)
    updates = cfg.ppo_epochs * cfg.mini_batches
    fused = updates == 1 and cfg.grad_accum == 1  # the update's forward is the behaviour pass
    mass_covering = own.fkl_coef > 0

    def do_rollout(examples: list[Example]) -> Rollout:
        if hasattr(backend, "sync"):  # an engine holding its own weights (vLLM, a bf16 sampler) must sample from the current student
            backend.sync(model)
        return rollout(backend, model, [e.student_prompt for e in examples], own.samples_per_prompt, tok.pad_token_id,
                       chunk=cfg.chunk_size, temperature=rcfg.temperature, mask_truncated=rcfg.truncated == "mask",
                       with_entropy=need_entropy, behaviour=not fused)

    def do_score(per_sample: list[Example], ro: Rollout) -> TeacherScores:
        return teacher_logprobs(teachers, per_sample, ro.responses, tok.pad_token_id, cfg.chunk_size,
                                with_entropy=need_entropy, temperature=rcfg.temperature,
                                dist_top_k=cfg.top_k if mass_covering else None)

    def token_loss(seq: Sequences, st: PolicyStats, old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        loss = (pg_plain(st.logp, adv) if cfg.pg_loss == "plain"
                else pg_ppo_clip(st.logp, old, adv, cfg.clip_eps, cfg.dual_clip))
        if own.kl_coef and ref_model is not None:
            with torch.no_grad():
                ref_logp, _ = token_stats(ref_model, seq, chunk=cfg.chunk_size, temperature=rcfg.temperature)
            loss = loss + own.kl_coef * kl_k3(st.logp, ref_logp)
        if st.divergence is not None:  # the mass-covering term: the teacher's whole distribution, every token
            loss = loss + own.fkl_coef * st.divergence
        return loss

    def do_update(ro: Rollout, per_sample: list[Example], scores: TeacherScores,
                  mask: torch.Tensor) -> tuple[float, Shaped, float]:
        """Returns the loss, the shaped advantages and the mean mass-covering divergence (0 when off)."""
        def placed(s: Shaped) -> tuple[torch.Tensor, torch.Tensor]:
            return s.adv.to(acc.device), s.mask.to(acc.device)

        shaped = None if fused else units["shape"](ro, per_sample, scores.logp, mask, scores.entropy)
        adv, loss_mask = placed(shaped) if shaped is not None else (None, None)
        total, fkl = 0.0, torch.zeros(())
        for _ in range(cfg.ppo_epochs):
            for mb in _mini(len(ro.responses), cfg.mini_batches):
                loss_mb, count = 0.0, None
                for sl in _sub(mb, cfg.grad_accum):
                    seq = ro.seq.select(sl)
                    st = policy_stats(model, seq, chunk=cfg.chunk_size, temperature=rcfg.temperature,
                                      with_entropy=fused and need_entropy, beta=own.fkl_beta,
                                      teacher=scores.dist.select(sl) if scores.dist is not None else None)
                    if shaped is None:  # fused: shape on this forward's (detached) behaviour log-probs
                        ro.old_logprobs, ro.entropy = st.logp.detach(), st.entropy
                        shaped = units["shape"](ro, per_sample, scores.logp, mask, scores.entropy)
                        adv, loss_mask = placed(shaped)
                    count = global_count(acc, loss_mask[mb]) if count is None else count
                    loss = masked_mean(token_loss(seq, st, ro.old_logprobs[sl], adv[sl]), loss_mask[sl], count)
                    acc.backward(loss)
                    loss_mb += float(loss.detach())
                    if st.divergence is not None:
                        fkl = fkl + (st.divergence.detach().cpu() * mask[sl]).sum() / mask.sum().clamp(min=1) / cfg.ppo_epochs
                optimize(loss_mb)
                total += loss_mb / updates
        assert shaped is not None
        return total, shaped, float(fkl)

    units = {"rollout": unit("rollout", do_rollout), "score": unit("score", do_score),
             "shape": unit("shape", shape), "update": unit("update", do_update)}

    def step(i: int) -> dict[str, float]:
        t0 = time.perf_counter()
        examples = shard(acc, pool.draw(own.prompts_per_step))
        ro = units["rollout"](examples)
        per_sample = [e for e in examples for _ in range(own.samples_per_prompt)]
        scores = units["score"](per_sample, ro)
        mask = ro.seq.targets_mask.cpu()
        total, shaped, fkl = units["update"](ro, per_sample, scores, mask)
        n_tok = float(mask.sum())
        return {
            "loss": total,
            "reverse_kl": float(masked_mean(ro.old_logprobs.cpu() - scores.logp, mask)),
            "teacher_logprob": float(masked_mean(scores.logp, mask)),
            "response_length": float(mask.sum(1).float().mean()),
            "truncated_frac": float(ro.truncated.float().mean()),
            "tokens_per_s": n_tok / (time.perf_counter() - t0),
            **({"sampler_logprob_gap": sampler_gap(backend.last_logprobs, ro.responses, ro.old_logprobs.cpu(), mask)}
               if getattr(backend, "last_logprobs", None) else {}),
            **({"fkl": fkl} if mass_covering else {}),
            **shaped.metrics,
        }

    return step


def _mini(n: int, parts: int) -> list[torch.Tensor]:
    """``parts`` mini-batches of a rollout batch of ``n`` samples, strided (sample i goes to i mod parts).

    Strided, not shuffled: with each rank's shard a multiple of ``parts`` long, the union of the ranks'
    j-th mini-batches is exactly the j-th mini-batch of one process over the global batch, so N
    processes take the same optimiser steps as one (a per-rank shuffle would not)."""
    return [torch.arange(j, n, parts) for j in range(min(parts, n))]


def _sub(idx: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return [idx[sl] for sl in micro_slices(len(idx), parts)]


class SampledOPD(Method):
    """``distill.method: opd``: the reverse-KL advantage of the sampled token."""

    name = "opd"
    sampled = True

    def shaping(self, ctx: Context) -> tuple[AdvantageFn, bool]:
        """The advantage shaping, and whether it needs entropies (teacher and student)."""
        return reverse_kl_advantage, False

    def step(self, ctx: Context, model: torch.nn.Module, optimize: Optimize) -> Step:
        shape, need_entropy = self.shaping(ctx)
        return sampled_step(ctx.acc, model, ctx.teachers, ctx.pool, ctx.backend_of(model, ctx.params.rollout), ctx.tok,
                            ctx.params.distill, ctx.params.rollout, optimize, ref_model=ctx.ref, shape=shape,
                            need_entropy=need_entropy, unit=ctx.unit, own=self.own(ctx.params))
