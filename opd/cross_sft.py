"""The cross_sft stage: COPSD's cold start, which recalibrates the teacher before distillation.

The teacher is fine-tuned on two crossed sources, both with the constitution in its input
(docs/algorithms.md, sections 4-5):

(a) ``cross_sft.self_tasks`` prompts answered by the INITIAL STUDENT's own samples, kept only when
    the checker accepts them (not a refusal; the right final answer for reasoning, token F1 against
    the reference >= ``min_f1`` otherwise). This pulls the constitution-conditioned teacher back to
    helpful answers in the student's own style and length;
(b) safety prompts answered by the oracle: the rows' reference refusals, or a stronger local model
    named by ``cross_sft.oracle`` answering the constitution-wrapped prompt.

The result is its own model folder (``models/cross_sft/teacher``) plus ``mix.json`` with the counts
per source, so COPSD and the "constitution OPSD" baseline can be run against either teacher.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from opd import lora
from opd.config import CrossSFTConfig, Params, RolloutConfig
from opd.copsd import cross_sft_rows
from opd.constitution import teacher_view
from opd.data import Row, atomic_dir, write_json
from opd.batch import PromptPool
from opd.methods.sft import sft_step
from opd.answers import check_answer
from opd.evaluate import load_detector, token_f1
from opd.models import check_compatible, load_model, load_tokenizer
from opd.rollout import TransformersBackend
from opd.constitution import constitutions_of
from opd.data import content_of, load_rows
from opd.paths import resolve
from opd.tokens import row_prompt_ids
from opd.train import LoopSettings, fingerprint_of, make_accelerator, train

TEACHER_DIR = "teacher"


def acceptable(row: Row, answer: str, refusal: Callable[[str], bool], min_f1: float, answer_format: str = "auto") -> bool:
    """The checker of source (a): a non-refusal that is right (reasoning) or close to the reference."""
    if refusal(answer) or not row.reference:
        return False
    if row.task == "reasoning":
        return check_answer(answer, row.reference, answer_format)
    return token_f1(answer, row.reference) >= min_f1


def pick(row: Row, texts: Sequence[str], refusal: Callable[[str], bool], cfg: CrossSFTConfig,
         answer_format: str = "auto") -> str | None:
    """One accepted answer among a prompt's samples (``cfg.keep``), or None when none is accepted.

    ``first`` is an unbiased draw of the student's acceptable answers; ``best`` the one closest to
    the reference (token F1), which concentrates the recalibrated teacher on the student's best style.
    """
    ok = [t for t in texts if acceptable(row, t, refusal, cfg.min_f1, answer_format)]
    if not ok:
        return None
    return ok[0] if cfg.keep == "first" else max(ok, key=lambda t: token_f1(t, row.reference or ""))


def self_answers(model: torch.nn.Module, tok: PreTrainedTokenizerBase, rows: Sequence[Row], cfg: CrossSFTConfig,
                 rcfg: RolloutConfig, refusal: Callable[[str], bool],
                 answer_format: str = "auto") -> tuple[list[tuple[Row, str]], dict[str, Any]]:
    """Sample ``cfg.samples`` answers per prompt from the student; keep one accepted answer per prompt."""
    if not rows:
        return [], {"candidates": 0}
    model.eval()
    samples, _ = TransformersBackend(model, tok, rcfg, progress="cross-SFT: sampling the student").sample(
        [row_prompt_ids(tok, r) for r in rows], cfg.samples)
    kept: list[tuple[Row, str]] = []
    for i, r in enumerate(rows):
        texts = [tok.decode(s, skip_special_tokens=True) for s in samples[i * cfg.samples:(i + 1) * cfg.samples]]
        ok = pick(r, texts, refusal, cfg, answer_format)
        if ok is not None:
            kept.append((r, ok))
    by_task = Counter(r.task for r, _ in kept)
    asked = Counter(r.task for r in rows)
    return kept, {"candidates": len(rows), **{f"accepted_{t}": by_task[t] / asked[t] for t in sorted(asked)}}


def oracle_answers(path: str, rows: Sequence[Row], constitutions: dict[str, str], tok: PreTrainedTokenizerBase,
                   rcfg: RolloutConfig, trust_remote_code: bool, role: str = "user") -> list[Row]:
    """Safety rows answered (greedy) by a stronger local model that reads the constitution (as the teacher will)."""
    oracle = load_model(path, trust_remote_code)
    check_compatible(load_tokenizer(path, trust_remote_code), tok, "cross_sft.oracle")
    oracle.eval()
    prompts = [row_prompt_ids(tok, teacher_view(r, constitutions, role)) for r in rows]
    out, _ = TransformersBackend(oracle, tok, rcfg, progress="cross-SFT: oracle answers", greedy=True).sample(prompts, 1)
    return [replace(r, reference=tok.decode(o, skip_special_tokens=True)) for r, o in zip(rows, out, strict=True)]


def skip_reason(params: Params) -> str | None:
    """Why the stage has nothing to do: only COPSD with the recalibrated teacher reads its output."""
    if params.distill.method != "copsd":
        return f"distill.method is {params.distill.method!r}: only copsd uses the Cross-SFT teacher"
    if params.copsd.teacher != "cross_sft":
        return f"copsd.teacher is {params.copsd.teacher!r}: no Cross-SFT teacher is read"
    return None


def cross_sft_stage(params: Params, prepared: Path, base: Path, out: Path, ckpt_dir: Path,
                    log: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build the crossed mix, fine-tune the teacher on it, save ``out/teacher`` and ``out/mix.json``.

    Skipped (a ``skipped.json`` marker, in milliseconds) when the configured distillation does not
    use the recalibrated teacher: a full fine-tune and a cached copy of the teacher would be waste."""
    reason = skip_reason(params)
    if reason:
        with atomic_dir(out) as tmp:
            write_json(tmp / "skipped.json", {"skipped": reason})
        return {"skipped": reason}, []
    rt, c = params.runtime, params.cross_sft
    s_path, t_path = resolve(base, "student_init"), resolve(base, "teacher")
    tok = load_tokenizer(t_path, rt.trust_remote_code)
    check_compatible(tok, load_tokenizer(s_path, rt.trust_remote_code), "teacher")
    texts = constitutions_of(params, prepared)
    rows = load_rows(prepared, "train")
    acc = make_accelerator(rt)
    torch.manual_seed(params.seed)
    answers: list[tuple[Row, str]] = []
    stats: dict[str, Any] = {}
    if c.include_self:
        student = load_model(s_path, rt.trust_remote_code).to(acc.device)
        answers, stats = self_answers(student, tok, [r for r in rows if r.task in c.self_tasks], c, params.rollout,
                                      load_detector(params.evaluate.refusal_detector), params.data.answer_format)
        del student
        if not answers:  # without source (a) this is the "w/o self" ablation in disguise: stop, do not run it
            rates = ", ".join(f"{k} {v:.0%}" for k, v in stats.items() if k.startswith("accepted_"))
            raise ValueError(
                f"cross_sft: none of the initial student's {stats.get('candidates', 0)} sampled prompts gave an "
                f"accepted answer (acceptance: {rates or 'no prompts of cross_sft.self_tasks'}), so source (a) is "
                "empty and the teacher would be recalibrated on oracle refusals only (the 'w/o self' ablation). "
                "Check the refusal detector and data.answer_format against the student's answers, lower "
                "cross_sft.min_f1, raise cross_sft.samples, or set cross_sft.include_self: false on purpose.")
    safety = [r for r in rows if r.task == "safety"]
    if c.oracle:
        safety = oracle_answers(c.oracle, safety, texts, tok, params.rollout, rt.trust_remote_code,
                                params.copsd.constitution_role)
    mix = cross_sft_rows(answers, safety, texts, include_self=c.include_self, role=params.copsd.constitution_role)
    if not mix.rows:
        raise ValueError("cross_sft: the mix is empty (no accepted student answers and no safety rows)")
    steps = math.ceil(c.epochs * len(mix.rows) / c.batch_size)
    settings = LoopSettings(steps=steps, lr=c.lr, warmup_steps=c.warmup_steps, checkpoint_every=max(1, steps // 4),
                            resume="auto", seed=params.seed, log_every=max(1, steps // 20), label="cross-SFT")
    pool = PromptPool(mix.rows, tok)
    fp = fingerprint_of(settings=c.model_dump(), seed=params.seed, rows=len(mix.rows),
                        **content_of(prepared / "train.jsonl", prepared / "tokenizer", t_path, s_path))
    teacher = load_model(t_path, rt.trust_remote_code)
    if c.lora is not None:
        teacher = lora.attach(teacher, c.lora, params.seed)
        lora.adapter_checkpoints(acc)
    teacher, history = train(acc, teacher, lambda m, _: sft_step(acc, m, pool, tok, c.batch_size), settings,
                             ckpt_dir=ckpt_dir, fingerprint=fp, on_log=log)
    summary = {"mix": mix.counts, "steps": steps, "self_sampling": stats,
               "mix_by_task": dict(Counter(r.task for r in mix.rows)),
               "final_loss": history[-1]["loss"] if history else None}
    with atomic_dir(out) as tmp:
        folder = tmp / TEACHER_DIR
        if c.lora is not None:  # merged: a plain folder the distill stage loads as any teacher (+ adapter/ if kept)
            teacher = lora.merged(c.lora.keep_adapter)(teacher, folder)
        teacher.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        write_json(tmp / "mix.json", summary)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return summary, history
