"""Distillation objectives: one optimisation step of OPD, GKD or SFT (docs/algorithms.md, sections 1-2).

Each ``*_step`` function builds the step function the training loop calls. A step draws the GLOBAL
batch of prompts from a :class:`PromptPool` (with the global RNG, which the loop reseeds per step
identically on every rank), makes any other shared random choice, then takes its rank's shard
(:func:`shard`); it samples from the current student when on-policy, scores the samples with the
row's teacher on the teacher's own view of the prompt, and back-propagates a token-mean loss
normalised by the global count of valid tokens over all micro-batches and processes. Every forward
of the student that carries a gradient goes through the prepared (DDP / FSDP) module
(:func:`opd.scoring.through`), so gradients are reduced across ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import PreTrainedTokenizerBase

from opd.config import DistillConfig, FireConfig, RolloutConfig
from opd.data import Row
from opd.copsd import group_advantages, response_means, sequence_advantages, token_rewards
from opd.fire import fire_advantages, filter_audit
from opd.losses import kl_k3, masked_mean, pg_plain, pg_ppo_clip
from opd.rollout import Rollout, RolloutBackend, rollout, sampler_gap
from opd.scoring import PolicyStats, Sequences, TeacherDist, policy_stats, teacher_pass, token_stats, vocab_divergence
from opd.tokens import response_ids, row_prompt_ids
from opd.train import Optimize

DEFAULT_TEACHER = "default"


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
    n, world, rank = len(items), acc.num_processes, acc.process_index
    if world == 1:
        return list(items)
    if n % world:
        raise ValueError(f"the global batch of {n} prompts does not split over {world} processes: set "
                         f"distill.prompts_per_step (copsd.prompts_per_step for copsd) to a multiple of {world}")
    if rank:
        set_seed(torch.initial_seed() + 7919 * rank)
    return list(items[rank * n // world:(rank + 1) * n // world])


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
        device = next(model.parameters()).device
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


def global_count(acc: Accelerator, mask: torch.Tensor) -> torch.Tensor:
    """Valid tokens per process, averaged so DDP's gradient mean gives a global token mean."""
    total = acc.reduce(mask.sum().to(acc.device), reduction="sum")
    return total / acc.num_processes


def _micro(n: int, parts: int) -> list[slice]:
    size = -(-n // parts)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


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


def fire_shaping(acc: Accelerator, f: FireConfig, reliability_of: Callable[[Example], float] | None = None) -> AdvantageFn:
    """FiRe-OPD's filter and weights on top of the reverse-KL advantage, with global statistics.
    ``reliability_of`` (the teacher's measured correctness on a sample's task / problem type, NaN when
    unknown) adds the filter audit: the mean reliability of kept and of dropped trajectories."""
    gather = lambda x: acc.gather(x.to(acc.device)).cpu()  # noqa: E731

    def shape(ro: Rollout, examples: list[Example], t_logp: torch.Tensor, mask: torch.Tensor,
              t_ent: torch.Tensor | None) -> Shaped:
        old = ro.old_logprobs.cpu()
        s_ent = ro.entropy.cpu() if ro.entropy is not None else None
        out = fire_advantages((t_logp - old) * mask, t_logp, t_ent, s_ent, mask, filter_on=f.filter,
                              q=f.filter_quantile, reweight=f.reweight, alpha=f.alpha, beta=f.beta,
                              normalize=f.normalize, token_select=f.token_select, rho=f.select_rho,
                              divergence=(old - t_logp) * mask, gather=gather)
        w = out.weights[mask.bool()]
        metrics = {"kept_frac": float(out.keep.mean()), "filter_tau": float(out.tau),
                   "token_kept_frac": float(out.mask.sum() / mask.sum().clamp(min=1)),
                   "weight_mean": float(w.mean()) if w.numel() else 0.0,
                   "weight_max": float(w.max()) if w.numel() else 0.0,
                   "weight_p90": float(w.quantile(0.9)) if w.numel() else 0.0}
        if t_ent is not None and s_ent is not None:
            metrics["teacher_entropy"] = float(masked_mean(t_ent, mask))
            metrics["student_entropy"] = float(masked_mean(s_ent, mask))
        if reliability_of is not None and f.filter:
            rel = torch.tensor([reliability_of(e) for e in examples], dtype=torch.float32)
            metrics |= filter_audit(out.keep, mask.sum(-1) > 0, rel, gather)
        return Shaped(out.adv, out.mask, metrics)

    return shape


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


Unit = Callable[[str, Callable[..., Any]], Callable[..., Any]]


def inline(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """The default :data:`Unit` wrapper: run the unit as a plain call."""
    return fn


def opd_step(acc: Accelerator, model: torch.nn.Module, teachers: dict[str, torch.nn.Module], pool: PromptPool,
             backend: RolloutBackend, tok: PreTrainedTokenizerBase, cfg: DistillConfig, rcfg: RolloutConfig,
             optimize: Optimize, ref_model: torch.nn.Module | None = None, shape: AdvantageFn = reverse_kl_advantage,
             need_entropy: bool = False, unit: Unit = inline) -> Callable[[int], dict[str, float]]:
    """Sampled-token OPD with a PPO-clip policy-gradient loss (+ optional KL to the initial student).

    A step is four units of work, each passed through ``unit(name, fn)`` so an orchestrator can run
    them as its own tasks (``tasks/distill.py`` makes them Prefect tasks) without this module
    importing one: ``rollout`` (sample), ``score`` (teacher log-probs), ``shape`` (the method's
    advantages: FiRe filter and weights, COPSD group advantages) and ``update`` (policy-gradient loss,
    backward and optimiser steps).

    One rollout batch makes ``ppo_epochs x mini_batches`` optimiser steps (the COPSD reference takes
    4, so the PPO ratio leaves 1 and the clips act). With exactly one (the default) the behaviour
    policy IS the policy being updated, so the behaviour log-probs (and entropies) are taken from
    the update's own forward, detached, instead of from a separate teacher-forced pass: the ratio is
    exactly 1, the gradient is the same, one student forward per step is saved. With several updates
    (or gradient accumulation, which would have to keep every micro-batch's graph) the behaviour pass
    runs once after sampling, as before.
    """
    updates = cfg.ppo_epochs * cfg.mini_batches
    fused = updates == 1 and cfg.grad_accum == 1

    def do_rollout(examples: list[Example]) -> Rollout:
        if hasattr(backend, "sync"):  # an engine holding its own weights (vLLM, a bf16 sampler) must sample from the current student
            backend.sync(model)
        return rollout(backend, model, [e.student_prompt for e in examples], cfg.samples_per_prompt, tok.pad_token_id,
                       chunk=cfg.chunk_size, temperature=rcfg.temperature, mask_truncated=rcfg.truncated == "mask",
                       with_entropy=need_entropy, behaviour=not fused)

    mass_covering = cfg.fkl_coef > 0

    def do_score(per_sample: list[Example], ro: Rollout) -> TeacherScores:
        return teacher_logprobs(teachers, per_sample, ro.responses, tok.pad_token_id, cfg.chunk_size,
                                with_entropy=need_entropy, temperature=rcfg.temperature,
                                dist_top_k=cfg.top_k if mass_covering else None)

    def student_pass(seq: Sequences, dist: TeacherDist | None, with_entropy: bool = False) -> PolicyStats:
        return policy_stats(model, seq, chunk=cfg.chunk_size, temperature=rcfg.temperature, with_entropy=with_entropy,
                            teacher=dist, beta=cfg.fkl_beta)

    def token_loss(seq: Sequences, st: PolicyStats, old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        loss = (pg_plain(st.logp, adv) if cfg.pg_loss == "plain"
                else pg_ppo_clip(st.logp, old, adv, cfg.clip_eps, cfg.dual_clip))
        if cfg.kl_coef and ref_model is not None:
            with torch.no_grad():
                ref_logp, _ = token_stats(ref_model, seq, chunk=cfg.chunk_size, temperature=rcfg.temperature)
            loss = loss + cfg.kl_coef * kl_k3(st.logp, ref_logp)
        if st.divergence is not None:  # the mass-covering term: the teacher's whole distribution, every token
            loss = loss + cfg.fkl_coef * st.divergence
        return loss

    def do_update(ro: Rollout, per_sample: list[Example], scores: TeacherScores,
                  mask: torch.Tensor) -> tuple[float, Shaped, float]:
        """Returns the loss, the shaped advantages and the mean mass-covering divergence (0 when off)."""
        fkl = torch.zeros(())
        if fused:  # one forward: behaviour log-probs = this forward's, detached (ratio exactly 1)
            st = student_pass(ro.seq, scores.dist, need_entropy)
            ro.old_logprobs, ro.entropy = st.logp.detach(), st.entropy
            shaped = units["shape"](ro, per_sample, scores.logp, mask, scores.entropy)
            adv, loss_mask = shaped.adv.to(acc.device), shaped.mask.to(acc.device)
            loss = masked_mean(token_loss(ro.seq, st, ro.old_logprobs, adv), loss_mask, global_count(acc, loss_mask))
            acc.backward(loss)
            optimize(float(loss.detach()))
            if st.divergence is not None:
                fkl = masked_mean(st.divergence.detach().cpu(), mask)
            return float(loss.detach()), shaped, float(fkl)
        shaped = units["shape"](ro, per_sample, scores.logp, mask, scores.entropy)
        adv, loss_mask = shaped.adv.to(acc.device), shaped.mask.to(acc.device)
        total = 0.0
        for _ in range(cfg.ppo_epochs):
            for mb in _mini(len(ro.responses), cfg.mini_batches):
                count = global_count(acc, loss_mask[mb])
                loss_mb = 0.0
                for sl in _sub(mb, cfg.grad_accum):
                    seq = ro.seq.select(sl)
                    st = student_pass(seq, scores.dist.select(sl) if scores.dist is not None else None)
                    loss = masked_mean(token_loss(seq, st, ro.old_logprobs[sl], adv[sl]), loss_mask[sl], count)
                    acc.backward(loss)
                    loss_mb += float(loss.detach())
                    if st.divergence is not None:
                        fkl = fkl + (st.divergence.detach().cpu() * mask[sl]).sum() / mask.sum().clamp(min=1) / cfg.ppo_epochs
                optimize(loss_mb)
                total += loss_mb / updates
        return total, shaped, float(fkl)

    units = {"rollout": unit("rollout", do_rollout), "score": unit("score", do_score),
             "shape": unit("shape", shape), "update": unit("update", do_update)}

    def step(i: int) -> dict[str, float]:
        t0 = time.perf_counter()
        examples = shard(acc, pool.draw(cfg.prompts_per_step))
        ro = units["rollout"](examples)
        per_sample = [e for e in examples for _ in range(cfg.samples_per_prompt)]
        scores = units["score"](per_sample, ro)
        t_logp = scores.logp
        mask = ro.seq.targets_mask.cpu()
        total, shaped, fkl = units["update"](ro, per_sample, scores, mask)
        lengths = mask.sum(1)
        n_tok = float(mask.sum())
        dt = time.perf_counter() - t0
        return {
            "loss": total,
            "reverse_kl": float(masked_mean(ro.old_logprobs.cpu() - t_logp, mask)),
            "teacher_logprob": float(masked_mean(t_logp, mask)),
            "response_length": float(lengths.float().mean()),
            "truncated_frac": float(ro.truncated.float().mean()),
            "tokens_per_s": n_tok / dt,
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
    return [idx[sl] for sl in _micro(len(idx), parts)]


def gkd_step(acc: Accelerator, model: torch.nn.Module, teachers: dict[str, torch.nn.Module], pool: PromptPool,
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
        total = 0.0
        for sl in _micro(len(responses), cfg.grad_accum):
            div = vocab_divergence(model, s_seq.select(sl), teacher, t_seq.select(sl), cfg.loss, cfg.beta,
                                   cfg.temperature, cfg.chunk_size, cfg.top_k)
            loss = masked_mean(div, s_seq.select(sl).targets_mask, count)
            acc.backward(loss)
            total += float(loss.detach())
        n_tok = float(s_seq.targets_mask.sum())
        return {"loss": total, "on_policy": float(on_policy), "tokens_per_s": n_tok / (time.perf_counter() - t0),
                "response_length": n_tok / len(responses)}

    return step


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
        for sl in _micro(len(ex), grad_accum):
            logp, _ = token_stats(model, seq.select(sl), chunk=chunk)
            loss = masked_mean(-logp, seq.select(sl).targets_mask, count)
            acc.backward(loss)
            total += float(loss.detach())
        n_tok = float(seq.targets_mask.sum())
        return {"loss": total, "tokens_per_s": n_tok / (time.perf_counter() - t0)}

    return step
