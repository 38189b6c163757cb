"""Engine entry points of the pipeline stages: plain functions of (params, folders).

Prefect tasks call these and log what they return; a notebook or another orchestrator can call
them directly. Each writes its outputs atomically and returns a summary dict.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import torch

from opd.answers import extract_answer, replace_answer
from opd.config import DEFAULT_TEACHER, InitConfig, ModelConfig, Params, ServerConfig, SFTConfig
from opd.params import to_flat_dict
from opd.constitution import constitutions_of
from opd.data import Row, atomic_dir, atomic_write_text, content_of, load_rows, write_json
from opd.batch import PromptPool
from opd.methods import METHODS
from opd.methods.base import Context, Unit, inline
from opd.methods.sft import sft_step
from opd import lora
from opd.evaluate import evaluate_model, load_detector, reliability, safety_tax
from opd.models import (build_llama, check_compatible, count_parameters, dtype_of, evenly_spaced, load_model,
                        load_tokenizer, prune_layers, save_model)
from opd.rollout import RolloutBackend, TransformersBackend, VLLMBackend, stop_ids
from opd.model_card import model_card, shown
from opd.paths import MANIFEST, RELIABILITY, Layout, resolve
from opd.remote import RemoteTeacher
from opd.templates import template_gap
from opd.world.behaviour import cautious_rows
from opd.train import LoopSettings, fingerprint_of, make_accelerator, save_trained, train


def write_curve(path: Path, history: list[dict[str, Any]]) -> None:
    """Per-step metrics as CSV (dvc plots); columns are the union of all keys. A model that was not
    trained (a folder given by the user) gets a header-only curve, so the DVC output always exists."""
    keys = sorted({k for h in history for k in h}, key=lambda k: (k != "step", k)) or ["step", "loss"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------- teacher stage
def _model_configs(params: Params) -> dict[str, ModelConfig]:
    """Every model the teacher stage provides, by manifest name."""
    named = {f"teacher_{n}": m for n, m in params.teachers.items()}
    return {"teacher": params.teacher, "student_init": params.student, **named}


def wrong_answer(row: Row, answer_format: str) -> Row:
    """``row`` with a wrong final answer in its reference: the right one plus 1..9, the offset drawn
    from the row id (deterministic, varied, so a model trained on such rows is unsure there rather
    than consistently off by a constant: an unreliable teacher on that problem type)."""
    right = extract_answer(row.reference or "", answer_format)
    if right is None:
        raise ValueError(f"row {row.id}: sft.wrong_answer_categories needs a final answer in its reference")
    offset = 1 + int(hashlib.md5(row.id.encode()).hexdigest(), 16) % 9
    return replace(row, reference=replace_answer(row.reference or "", str(Decimal(right) + offset), answer_format))


def sft_rows(rows: list[Row], sft: SFTConfig, constitutions: dict[str, str], answer_format: str = "auto") -> list[Row]:
    """A from-scratch model's SFT corpus: its tasks and harm categories, wrong answers on the reasoning
    types of ``wrong_answer_categories``, plus the constitution-wrapped over-cautious copies when
    ``constitution_mode`` is ``cautious``."""
    picked = [r for r in rows if r.task in sft.tasks and r.reference
              and (r.task != "safety" or sft.safety_categories is None or r.category in sft.safety_categories)]
    wrong = set(sft.wrong_answer_categories)
    picked = [wrong_answer(r, answer_format) if r.task == "reasoning" and r.category in wrong else r for r in picked]
    return picked + (cautious_rows(picked, constitutions) if sft.constitution_mode == "cautious" else [])


def _sft(params: Params, name: str, mcfg: ModelConfig, tok: Any, rows: list[Row], constitutions: dict[str, str],
         ckpt_root: Path, log: Any = None, initial: torch.nn.Module | None = None,
         inputs: dict[str, str] | None = None) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    seed = params.seed + list(_model_configs(params)).index(name)  # teacher +0, student +1, named +2...
    model = initial if initial is not None else build_llama(mcfg.arch, tok, seed)
    if not mcfg.sft.steps:
        return model, []
    train_rows = sft_rows(rows, mcfg.sft, constitutions, params.data.answer_format)
    pool = PromptPool(train_rows, tok)
    acc = make_accelerator(params.runtime)
    s = mcfg.sft
    settings = LoopSettings(steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
                            checkpoint_every=max(1, s.steps // 4), resume="auto", seed=seed, log_every=25,
                            label=f"SFT {name}")
    fp = fingerprint_of(model=name, settings=mcfg.model_dump(exclude={"lora"}), seed=params.seed, rows=len(train_rows), **(inputs or {}))
    return train(acc, model, lambda m, _: sft_step(acc, m, pool, tok, s.batch_size), settings,
                 ckpt_dir=ckpt_root / name, fingerprint=fp, on_log=log)


def pruned_student(teacher_dir: Path, init: InitConfig, trust_remote_code: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``student.init``: the teacher with only the chosen decoder layers (see :func:`opd.models.prune_layers`)."""
    teacher = load_model(teacher_dir, trust_remote_code)
    n = teacher.config.num_hidden_layers
    keep = init.keep_layers if init.keep_layers is not None else evenly_spaced(n, init.n_layers or n)
    return prune_layers(teacher, keep), {"pruned_from": str(teacher_dir), "kept_layers": keep, "teacher_layers": n}


def teacher_stage(params: Params, prepared: Path, out: Path, ckpt_root: Path,
                  log_for: Callable[[str], Any] | None = None) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Train the teacher and the initial student from scratch (embedded world), or point at the
    user's model folders. Writes ``out/manifest.json`` naming the two folders; returns a summary
    and the per-step SFT metrics of each trained model. ``log_for(name)`` gives the step callback of
    the model ``name`` (each model's curve is its own, not one curve restarting at step 1)."""
    summary: dict[str, Any] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    tok = load_tokenizer(prepared / "tokenizer", params.runtime.trust_remote_code)
    rows = load_rows(prepared, "train")
    constitutions = constitutions_of(params, prepared)
    inputs = content_of(prepared / "train.jsonl", prepared / "tokenizer")
    eval_split = load_rows(prepared, "eval")
    detector = load_detector(params.evaluate.refusal_detector)
    reliable: dict[str, dict[str, float]] = {}

    def measure(name: str, model: torch.nn.Module) -> dict[str, float]:
        """A teacher's reliability per task / category (student_init is no teacher: not measured)."""
        if name == "student_init":
            return {}
        torch.manual_seed(params.seed)
        reliable[name] = reliability(model, tok, eval_split, params.evaluate, detector, params.data.answer_format)
        return {f"reliability.{k.replace('/', '.')}": v for k, v in reliable[name].items()}

    with atomic_dir(out) as tmp:
        manifest: dict[str, str] = {}
        for name, mcfg in _model_configs(params).items():
            if mcfg.path:
                other = load_tokenizer(mcfg.path, params.runtime.trust_remote_code)
                check_compatible(other, tok, name)
                manifest[name] = str(Path(mcfg.path).resolve())
                server = getattr(mcfg, "server", None)
                if server is not None:  # its weights live on the server: the folder gives the tokenizer only
                    summary[name] = {"path": manifest[name], "server": server.url}
                else:
                    given = load_model(mcfg.path, params.runtime.trust_remote_code,  # fail early on a bad folder
                                       dtype_of(params.runtime.mixed_precision))  # measured frozen, as evaluate does
                    summary[name] = {"path": manifest[name], **measure(name, given)}
                curves[name] = []  # not trained: an empty curve keeps the stage's declared outputs
                continue
            t0 = time.perf_counter()
            initial, pruned = None, {}
            if mcfg.init:  # derived from the teacher this stage just trained or was given
                teacher_dir = Path(manifest["teacher"]) if Path(manifest["teacher"]).is_absolute() else tmp / "teacher"
                initial, pruned = pruned_student(teacher_dir, mcfg.init, params.runtime.trust_remote_code)
            model, history = _sft(params, name, mcfg, tok, rows, constitutions, ckpt_root,
                                  log_for(name) if log_for else None, initial,
                                  inputs | (content_of(teacher_dir) if mcfg.init else {}))
            save_model(model, tok, tmp / name)
            manifest[name] = name
            summary[name] = {**pruned, "parameters": count_parameters(model), "steps": len(history),
                             "final_loss": history[-1]["loss"] if history else None,
                             "seconds": round(time.perf_counter() - t0, 1), **measure(name, model)}
            curves[name] = history
        write_json(tmp / MANIFEST, manifest)
        write_json(tmp / RELIABILITY, reliable)
    shutil.rmtree(ckpt_root, ignore_errors=True)  # the models are saved; checkpoints only served resume
    return summary, curves


# ----------------------------------------------------------------------------- distill stage
def _frozen(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.eval().requires_grad_(False)
    return model.to(device)


def served_teachers(params: Params) -> dict[str, tuple[str, ServerConfig]]:
    """The teachers scored by a server: name -> (the setting's dotted name, its settings)."""
    named = {DEFAULT_TEACHER: ("teacher.server", params.teacher)} | {n: (f"teachers.{n}.server", m)
                                                                   for n, m in params.teachers.items()}
    return {n: (key, m.server) for n, (key, m) in named.items() if m.server is not None}


def context_of(model: torch.nn.Module | RemoteTeacher) -> int:
    """The positions a model can attend over, from its config (no assumed length), or as its server says."""
    if isinstance(model, RemoteTeacher):
        return model.context
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 10**9)


def router(routing: str, names: list[str], noise: float = 0.0, seed: int = 0) -> Callable[[Row], str]:
    """Which teacher scores a row: ``default`` (single), or the row's ``teacher`` field (by_row), except
    for a ``noise`` fraction of rows, drawn from a hash of (seed, row id), sent to another teacher."""
    if routing != "by_row":
        return lambda r: DEFAULT_TEACHER

    def route(r: Row) -> str:
        own = r.teacher or DEFAULT_TEACHER
        h = int(hashlib.md5(f"{seed}:{r.id}".encode()).hexdigest(), 16)
        others = [n for n in names if n != own]
        if noise and others and (h % 10**6) / 10**6 < noise:
            return others[(h // 10**6) % len(others)]
        return own

    return route


def distill_stage(params: Params, prepared: Path, base: Path, cross: Path, out: Path, ckpt_dir: Path,
                  log: Any = None, unit: Unit = inline,
                  sampler: Callable[[torch.nn.Module], RolloutBackend] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Distil the initial student from the teacher with ``distill.method``; save to ``out``.
    ``unit`` wraps each unit of a sampled-token step (see :func:`opd.methods.sampled.sampled_step`); ``sampler``
    replaces the configured rollout backend (a remote sampler, or a deterministic one in tests).
    Under several processes every rank calls this; only rank 0 writes."""
    rt = params.runtime
    d = params.distill
    method = METHODS[d.method]
    own = method.own(params)
    s_path = resolve(base, "student_init")
    t_path = method.teacher_path(params, base, cross)
    tok = load_tokenizer(s_path, rt.trust_remote_code)
    acc = make_accelerator(rt)
    student = load_model(s_path, rt.trust_remote_code)
    if rt.gradient_checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora_cfg = params.student.lora
    if lora_cfg is not None:
        student = lora.attach(student, lora_cfg, params.seed)
        lora.adapter_checkpoints(acc)
    frozen = dtype_of(rt.mixed_precision)
    paths = {DEFAULT_TEACHER: t_path}
    if d.routing == "by_row":
        paths |= {n: resolve(base, f"teacher_{n}") for n in params.teachers}
    toks = {n: load_tokenizer(p, rt.trust_remote_code) for n, p in paths.items()}
    for n, t in toks.items():
        check_compatible(t, tok, f"teacher {n!r}")
    servers = served_teachers(params)
    # loaded once, eval mode, no gradients; or a client of the teacher's server (its folder gives the tokenizer)
    # a LoRA student's base is the initial student: a self-teacher is that base, adapters off (no second copy)
    initial = lora.AdaptersOff(student) if lora_cfg is not None else None
    teachers = {n: RemoteTeacher(servers[n][1], servers[n][0]) if n in servers
                else initial if initial is not None and p.resolve() == s_path.resolve()
                else _frozen(load_model(p, rt.trust_remote_code, frozen), acc.device) for n, p in paths.items()}
    rows = [r for r in load_rows(prepared, "train") if r.task in d.tasks]
    route = router(d.routing, sorted(paths), d.routing_noise, params.seed)
    pool = PromptPool(rows, tok, toks, teacher_view=method.teacher_view(params, prepared), route=route)
    pool.check_fits(context_of(student), {n: context_of(t) for n, t in teachers.items()}, params.rollout.max_new_tokens)
    temperatures = {params.rollout.temperature} | ({d.temperature} if d.method == "gkd" else set())
    for t in teachers.values():
        if isinstance(t, RemoteTeacher):  # before any training: the student's vocabulary, the temperature applied
            t.check(tok, temperatures)
    template: dict[str, float] = {}  # the default teacher's keys as they are, a routed teacher's as "<name>.<key>"
    for name, teacher in teachers.items():
        routed = [r for r in rows if route(r) == name]
        if not routed:
            continue
        gap = template_gap(teacher, toks[name], tok, routed, chunk=d.chunk_size)
        template |= gap if name == DEFAULT_TEACHER else {f"{name}.{k}": v for k, v in gap.items()}
        if not gap["template_match"] and acc.is_main_process:
            warnings.warn(f"teacher {name!r} and the student have different chat templates: each reads prompts through "
                          f"its own; the teacher's mean log-prob of reference answers is "
                          f"{gap['teacher_logprob_own_template']} after its own template and "
                          f"{gap['teacher_logprob_student_template']} after the student's", stacklevel=1)
    ref = None if not own.kl_coef else initial if initial is not None else _frozen(copy.deepcopy(student).to(frozen), acc.device)
    sharded = acc.is_fsdp2

    def backend_of(m: torch.nn.Module, rcfg: Any = params.rollout) -> Any:
        if sampler is not None:
            return sampler(m)
        if rcfg.backend == "vllm":
            return VLLMBackend(m, acc, tok, rcfg, rt.trust_remote_code)
        return TransformersBackend(m, tok, rcfg, synced=sharded)

    ctx = Context(params, acc, teachers, pool, tok, backend_of, ref, unit, base)
    settings = LoopSettings(steps=d.steps, lr=own.lr, warmup_steps=d.warmup_steps, max_grad_norm=d.max_grad_norm,
                            checkpoint_every=d.checkpoint_every, keep_checkpoints=d.keep_checkpoints,
                            resume=d.resume, seed=params.seed, log_every=d.log_every, label=f"distill ({d.method})",
                            updates_per_step=d.ppo_epochs * d.mini_batches if method.sampled else 1)
    read = [prepared / "train.jsonl", prepared / "tokenizer", s_path, *paths.values()]
    hashes = content_of(*read)
    served = {n: t.identity for n, t in teachers.items() if isinstance(t, RemoteTeacher)}  # what each server said it is
    fp = fingerprint_of(settings=to_flat_dict(params), **hashes,
                        **{f"server:{n}": json.dumps(i, sort_keys=True) for n, i in served.items()})
    t0 = time.perf_counter()
    model, history = train(acc, student, lambda m, optimize: method.step(ctx, m, optimize), settings,
                           ckpt_dir=ckpt_dir, fingerprint=fp, on_log=log)
    summary = {"method": d.method, "teacher": str(t_path), "steps": len(history), "seconds": round(time.perf_counter() - t0, 1),
               "processes": acc.num_processes, "template": template, "final": history[-1] if history else {}}
    if lora_cfg is not None:
        summary["lora"] = lora.counts(model)
    if served:
        summary["teacher_servers"] = served
    root = Layout.here().root
    lineage = {f"`{shown(p, root)}` (md5)": h for p, h in zip(read, hashes.values(), strict=True)}
    lineage |= {f"teacher server `{n}`": f"{i['model']} at {i['url']}, revision {i['revision'] or 'not reported'}"
                for n, i in served.items()}
    card = model_card(params, t_path, s_path, summary, root=root, lineage=lineage,
                      stop_tokens=tok.convert_ids_to_tokens(stop_ids(tok, student)))
    save_trained(acc, model, tok, out, files={"README.md": card},
                 finish=lora.merged(lora_cfg.keep_adapter) if lora_cfg is not None else None)
    if acc.is_main_process:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return summary, history


# ----------------------------------------------------------------------------- evaluate stage
def evaluate_stage(params: Params, prepared: Path, models: dict[str, Path]) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, Any]]]]:
    """Evaluate several models side by side on the eval split."""
    rows = load_rows(prepared, "eval")
    detector = load_detector(params.evaluate.refusal_detector)
    acc = make_accelerator(params.runtime)  # threads and the configured device
    table, samples = {}, {}
    for name, path in models.items():
        tok = load_tokenizer(path, params.runtime.trust_remote_code)
        model = load_model(path, params.runtime.trust_remote_code, dtype_of(params.runtime.mixed_precision)).to(acc.device)
        torch.manual_seed(params.seed)
        table[name], samples[name] = evaluate_model(model, tok, rows, params.evaluate, detector,
                                                    params.data.answer_format, name)
    if "student" in table and "student_init" in table:
        table["student"] |= safety_tax(table["student_init"], table["student"])
    return table, samples
