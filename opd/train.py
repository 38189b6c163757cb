"""The training loop (Hugging Face accelerate): steps, clipping, schedule, checkpoints, resume, NaN stop.

One loop serves every method: a *step function* does the forward and backward passes of one
optimisation step (rollout, scoring and micro-batches included) and returns its metrics; this
module owns everything around it.

Exact resume without data-loader state: each step reseeds every RNG from ``(seed, step, rank)``
before it runs, so which prompts a step draws and what it samples depend only on the step number
and the weights. A checkpoint therefore needs only model, optimiser and scheduler state (saved by
``accelerator.save_state`` into a temp folder renamed into place), and a run killed at any point
resumes from its last complete checkpoint to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from opd.config import RuntimeConfig

StepFn = Callable[[int], dict[str, float]]
STATE_FILE = "trainer_state.json"


class NonFiniteLoss(RuntimeError):
    """Raised before the optimiser step when a loss or gradient is NaN / inf."""


@dataclass
class LoopSettings:
    steps: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0  # 0: never
    keep_checkpoints: int = 2
    resume: str = "auto"
    seed: int = 0
    log_every: int = 10


def make_accelerator(runtime: RuntimeConfig) -> Accelerator:
    """CPU here; ``accelerate launch`` on GPUs gives DDP / FSDP / DeepSpeed with the same code."""
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    cpu = runtime.device == "cpu" or (runtime.device == "auto" and not torch.cuda.is_available())
    precision = "no" if runtime.mixed_precision == "fp32" else runtime.mixed_precision
    return Accelerator(cpu=cpu, mixed_precision=precision)


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / STATE_FILE).is_file():  # the state file is written last: its presence = complete
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: Path, fingerprint: str) -> tuple[int, Path] | None:
    """The last complete checkpoint written by a run with the same settings, if any."""
    for step, path in reversed(_checkpoints(ckpt_dir)):
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("fingerprint") == fingerprint:
            return step, path
    return None


def _save(acc: Accelerator, ckpt_dir: Path, step: int, fingerprint: str, history: list[dict[str, Any]], keep: int) -> Path:
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-step-{step:06d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    if acc.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "fingerprint": fingerprint, "history": history}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in _checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def train(acc: Accelerator, model: torch.nn.Module, step_fn_factory: Callable[[torch.nn.Module], StepFn],
          s: LoopSettings, ckpt_dir: Path | None = None, fingerprint: str = "",
          on_log: Callable[[int, dict[str, float]], None] | None = None) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Run ``s.steps`` optimisation steps; returns the unwrapped model and the per-step metrics.

    ``step_fn_factory(prepared_model)`` builds the step function around the accelerate-wrapped
    model (it calls ``acc.backward`` itself, once per micro-batch).
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.98))
    sched = get_cosine_schedule_with_warmup(opt, s.warmup_steps, max(s.steps, 1))
    model, opt, sched = acc.prepare(model, opt, sched)
    history: list[dict[str, Any]] = []
    start = 0
    last_good: Path | None = None
    if ckpt_dir is not None and s.resume == "auto":
        found = latest_checkpoint(ckpt_dir, fingerprint)
        if found:
            start, last_good = found
            acc.load_state(str(last_good))  # after prepare, as accelerate requires for exact resume
            history = json.loads((last_good / STATE_FILE).read_text())["history"]
            acc.print(f"resumed from {last_good} (step {start})")
    step_fn = step_fn_factory(model)
    model.train()
    bar = tqdm(total=s.steps, initial=start, desc="train", disable=not acc.is_main_process, leave=False)
    for step in range(start, s.steps):
        set_seed(s.seed * 1_000_003 + step * 101 + acc.process_index)
        metrics = step_fn(step)
        loss = metrics.get("loss", 0.0)
        grad_norm = acc.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            opt.zero_grad(set_to_none=True)
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint written yet"
            raise NonFiniteLoss(f"non-finite loss at step {step + 1} (loss={loss}, grad_norm={grad_norm}); "
                                f"stopped before the update, {where}. Lower the learning rate or check the data.")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        metrics = {**metrics, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0], "step": step + 1}
        history.append(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        if on_log and ((step + 1) % s.log_every == 0 or step + 1 == s.steps):
            on_log(step + 1, metrics)
        if ckpt_dir is not None and s.checkpoint_every and (step + 1) % s.checkpoint_every == 0 and step + 1 < s.steps:
            last_good = _save(acc, ckpt_dir, step + 1, fingerprint, history, s.keep_checkpoints)
    bar.close()
    return acc.unwrap_model(model), history


def fingerprint_of(*parts: Any) -> str:
    """A stable hash of the settings a checkpoint belongs to (resume only into the same run)."""
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
