"""The training loop (Hugging Face accelerate): steps, clipping, schedule, checkpoints, resume, NaN stop.

One loop serves every method: a *step function* does the forward and backward passes of one
optimisation step (rollout, scoring and micro-batches included) and returns its metrics; this
module owns everything around it.

Exact resume without data-loader state: each step reseeds every RNG from ``(seed, step)`` before it
runs, identically on every process, so the GLOBAL batch a step draws (and any other shared random
choice) agrees across ranks; :func:`opd.batch.shard` then hands each rank its slice and moves ranks
other than 0 onto their own stream for sampling. What a step does therefore depends only on the step
number, the world size and the weights. A checkpoint therefore needs only model, optimiser and scheduler state (saved by
``accelerator.save_state`` into a temp folder renamed into place), and a run killed at any point
resumes from its last complete checkpoint to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from opd.allocator import use_allocator
from opd.config import RuntimeConfig
from opd.data import atomic_dir

StepFn = Callable[[int], dict[str, float]]
Optimize = Callable[[float], dict[str, float]]
StepLogger = Callable[[int, dict[str, float]], None]
"""Called with (step, metrics) every ``log_every`` steps. It may also have ``resume(logged)``: called
once on resume with the logged steps the checkpoint holds, so a tracker can carry the curve up to
the checkpoint into the new run (from the checkpoint itself: a killed run may not have sent them)."""
STATE_FILE = "trainer_state.json"
SUMMED = ("tokens_per_s",)  # per-rank rates add up; every other metric is averaged over ranks


class NonFiniteLoss(RuntimeError):
    """Raised before the optimiser step when a loss or gradient is NaN / inf (on any rank)."""


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
    label: str = "train"  # the progress bar's name: what is being trained
    updates_per_step: int = 1  # optimiser steps per loop step (PPO epochs x mini-batches): sizes the schedule


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(processes: int) -> int:
    """``runtime.threads: 0``: the process's cores shared evenly by the processes of one launch."""
    return max(1, available_cores() // max(1, processes))


def process_count() -> int:
    """Processes of this launch (torchrun / accelerate launch set WORLD_SIZE), before any Accelerator."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def make_accelerator(runtime: RuntimeConfig) -> Accelerator:
    """One process here, or one rank of a ``torchrun`` / ``accelerate launch`` (DDP over gloo on CPU,
    NCCL on GPUs; FSDP2 with ``runtime.strategy: fsdp2`` on GPUs)."""
    torch.set_num_threads(runtime.threads or default_threads(process_count()))
    use_allocator(runtime.allocator)
    cpu = runtime.device == "cpu" or (runtime.device == "auto" and not torch.cuda.is_available())
    precision = "no" if runtime.mixed_precision == "fp32" else runtime.mixed_precision
    if torch.cuda.is_available() and not cpu:  # fp32 matmuls on tensor cores (TF32), as TRL / torchtune do
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    plugin = None
    if runtime.strategy == "fsdp2":
        if cpu:
            raise ValueError("runtime.strategy: fsdp2 needs CUDA devices (accelerate falls back to DDP on CPU); "
                             "use runtime.strategy: ddp here")
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
                                                cpu_ram_efficient_loading=False)
    # accelerate keeps one process-wide state and refuses a second Accelerator with another precision; the
    # stages of one process (the pipeline flow, a notebook) each configure their own, so the precision
    # part of that state is cleared first (the distributed part, PartialState, is kept).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cpu, mixed_precision=precision, fsdp_plugin=plugin)


def reduce_metrics(acc: Accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Global step metrics: the mean over ranks (the sum for rates); identity on one process."""
    if acc.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    vals = acc.reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=acc.device), "sum")
    return {k: float(v) if k in SUMMED else float(v) / acc.num_processes for k, v in zip(keys, vals.cpu(), strict=True)}


def save_trained(acc: Accelerator, model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: str | Path,
                 files: dict[str, str] | None = None,
                 finish: Callable[[torch.nn.Module, Path], torch.nn.Module] | None = None) -> None:
    """Write the trained model (safetensors), tokenizer and any text ``files`` (a model card) from the
    main process only, through one atomic folder swap. The full state dict is gathered on every rank
    first (a collective under FSDP). ``finish(model, folder)`` returns the model to save instead (a LoRA
    student's merged model, :func:`opd.lora.merged`), on the main process, which it may change."""
    state = acc.get_state_dict(model) if finish is None else None
    if acc.is_main_process:
        with atomic_dir(out) as tmp:
            inner = acc.unwrap_model(model)
            if finish is not None:
                inner = finish(inner, Path(tmp))
            inner.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tok.save_pretrained(tmp)
            for name, text in (files or {}).items():
                (Path(tmp) / name).write_text(text, encoding="utf-8")
    acc.wait_for_everyone()


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / STATE_FILE).is_file():  # the state file is written last and removed first
            found.append((int(m.group(1)), p))
    return sorted(found)


def _sha256(path: Path) -> str:
    """The file's SHA-256, streamed (a checkpoint of a real model is gigabytes: at the ~1.1 GB/s of one core
    here, about 5 s to write and 5 s to verify a full fine-tune of a 0.5B student, weights and AdamW state)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _files(path: Path) -> dict[str, dict[str, Any]]:
    return {str(f.relative_to(path)): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != STATE_FILE}


def damage(path: Path) -> str | None:
    """Why a checkpoint cannot be trusted (a file its state lists is missing, has another size or other
    content than was written), or None. Sizes first: a truncated file is found without reading it."""
    try:
        listed = json.loads((path / STATE_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"{STATE_FILE} unreadable or without a file list"
    for name, want in listed.items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        size = want["bytes"] if isinstance(want, dict) else want  # older states recorded sizes only
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    for name, want in listed.items():
        if isinstance(want, dict) and _sha256(path / name) != want["sha256"]:
            return f"{name} does not hold the bytes that were written (sha256 differs)"
    return None


def _differs(old: dict[str, str], new: dict[str, str]) -> str:
    """What changed between two fingerprints' parts, in words."""
    names = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(n.split(":", 1)[-1] for n in names) or "the process count"


def checkpoints_to_resume(ckpt_dir: Path, fingerprint: str, parts: dict[str, str] | None = None) -> list[tuple[int, Path]]:
    """Checkpoints of this very run (same fingerprint) whose files are all there, newest first; a damaged
    one is reported by path and skipped, so the previous complete one is used. When the newest was
    written for other settings or inputs, it says so once, naming what differs (``parts``)."""
    good, said = [], False
    for step, path in reversed(_checkpoints(ckpt_dir)):
        try:
            state = json.loads((path / STATE_FILE).read_text())
            if state.get("fingerprint") != fingerprint:
                if not said and not good:
                    what = _differs(state.get("fingerprint_parts", {}), parts or {}) if parts else "other settings or inputs"
                    warnings.warn(f"checkpoint {path.name} was written for another run (changed: {what}); "
                                  "not resumed: starting from step 0", stacklevel=2)
                    said = True
                continue
        except (OSError, ValueError):
            pass
        why = damage(path)
        if why:
            warnings.warn(f"checkpoint {path} is damaged ({why}); falling back to the previous one", stacklevel=2)
            continue
        good.append((step, path))
    return good


def on_every_rank(acc: Accelerator, found: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """Of this rank's resumable checkpoints, those every rank has. Only global rank 0 writes the model and
    optimiser state, so a node that does not share the checkpoint folder's file system sees none (or old
    ones); ranks that resumed from different steps would train different models and hang at the first
    collective that differs. So all ranks take the newest step they all see, and say so when that is
    not rank 0's newest."""
    if acc.num_processes == 1:
        return found
    from accelerate.utils import gather_object

    seen = gather_object([[step for step, _ in found]])
    common = set.intersection(*(set(steps) for steps in seen))
    mine = [(step, path) for step, path in found if step in common]
    if acc.is_main_process and found and (not mine or mine[0][0] != found[0][0]):
        then = f"resuming from step {mine[0][0]}" if mine else "starting from step 0"
        warnings.warn(f"checkpoint {found[0][1]} is not on every rank (steps each rank sees: {seen}): put "
                      f"{found[0][1].parent} on a file system every node shares to resume multi-node runs; {then}",
                      stacklevel=2)
    return mine


def _save(acc: Accelerator, ckpt_dir: Path, step: int, fingerprint: str, history: list[dict[str, Any]], keep: int,
          parts: dict[str, str] | None = None) -> Path:
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".tmp-step-{step:06d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    acc.wait_for_everyone()  # every rank's files (its RNG state) are written before rank 0 lists their sizes
    if acc.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "fingerprint": fingerprint, "fingerprint_parts": parts or {},
                                                  "history": history, "files": _files(tmp)}))
        if final.exists():
            (final / STATE_FILE).unlink(missing_ok=True)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in _checkpoints(ckpt_dir)[:-keep]:
            (old / STATE_FILE).unlink(missing_ok=True)  # first: a kill while deleting leaves no "complete" husk
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def train(acc: Accelerator, model: torch.nn.Module, step_fn_factory: Callable[[torch.nn.Module, Optimize], StepFn],
          s: LoopSettings, ckpt_dir: Path | None = None, fingerprint: str | dict[str, str] = "",
          on_log: StepLogger | None = None) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Run ``s.steps`` steps; returns the unwrapped model and the per-step metrics (global over ranks).

    ``step_fn_factory(prepared_model, optimize)`` builds the step function around the accelerate-
    prepared model. A step calls ``acc.backward`` itself, once per micro-batch; it may call
    ``optimize(loss)`` to take optimiser steps itself (several PPO updates per rollout batch), and
    when it does not, the loop takes one after it. Every step runs under the accelerator's autocast
    (bf16 / fp16 when ``runtime.mixed_precision`` says so). Checkpoints belong to one world size: the
    fingerprint includes it.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters; on CPU the default is a Python loop of ~6 ops per tensor
    # (4x slower at 55M parameters). DTensor (FSDP2) has the fused op too.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.98), fused=fused or None)
    sched = get_cosine_schedule_with_warmup(opt, s.warmup_steps * s.updates_per_step,
                                            max(s.steps * s.updates_per_step, 1))
    model, opt, sched = acc.prepare(model, opt, sched)
    parts = {**fingerprint, "processes": str(acc.num_processes)} if isinstance(fingerprint, dict) else None
    fingerprint = f"{fingerprint_id(fingerprint) if parts else fingerprint}-world{acc.num_processes}"
    history: list[dict[str, Any]] = []
    start = 0
    last_good: Path | None = None
    step = 0
    updates = 0
    last_update: dict[str, float] = {}

    def optimize(loss: float) -> dict[str, float]:
        """Clip, check, step: the same decision on every rank (loss and grad norm are global)."""
        nonlocal updates, last_update
        loss = float(acc.reduce(torch.tensor(loss, dtype=torch.float64, device=acc.device), "mean")) \
            if acc.num_processes > 1 else loss
        grad_norm = acc.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            opt.zero_grad(set_to_none=True)
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint written yet"
            raise NonFiniteLoss(f"non-finite loss at step {step + 1} (loss={loss}, grad_norm={grad_norm}, "
                                f"over {acc.num_processes} process(es)); stopped before the update, {where}. "
                                "Lower the learning rate or check the data.")
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        updates += 1
        last_update = {"grad_norm": grad_norm, "lr": sched.get_last_lr()[0]}
        return last_update

    if ckpt_dir is not None and s.resume == "auto":
        for found_step, path in on_every_rank(acc, checkpoints_to_resume(ckpt_dir, fingerprint, parts)):
            try:
                acc.load_state(str(path))  # after prepare, as accelerate requires for exact resume
            except Exception as err:  # noqa: BLE001 - any unreadable state: report the path, try the previous
                warnings.warn(f"checkpoint {path} could not be loaded ({type(err).__name__}: {err}); "
                              "falling back to the previous one", stacklevel=2)
                continue
            start, last_good = found_step, path
            history = json.loads((path / STATE_FILE).read_text())["history"]
            acc.print(f"resumed from {path} (step {start})")
            if (resume := getattr(on_log, "resume", None)) is not None:
                resume([h for h in history if h["step"] % s.log_every == 0])
            break
        if acc.num_processes > 1:  # a checkpoint that loaded on some ranks only: stop now, not hang later
            from accelerate.utils import gather_object

            if len(starts := set(gather_object([start]))) > 1:
                raise RuntimeError(f"ranks resumed from different steps {sorted(starts)}: a checkpoint in {ckpt_dir} "
                                   "did not load on every rank (see the warnings above)")
    step_fn = step_fn_factory(model, optimize)
    model.train()
    bar = tqdm(total=s.steps, initial=start, desc=s.label, disable=not acc.is_main_process, leave=False)
    for step in range(start, s.steps):
        set_seed(s.seed * 1_000_003 + step * 101)  # the same on every rank: see the module docstring
        before = updates
        with acc.autocast():
            metrics = step_fn(step)
        if updates == before:
            optimize(metrics.get("loss", 0.0))
        metrics = {**reduce_metrics(acc, metrics), **last_update, "step": step + 1}
        history.append(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.get('loss', 0.0):.4g}", refresh=False)
        if on_log and ((step + 1) % s.log_every == 0 or step + 1 == s.steps):
            on_log(step + 1, metrics)
        if ckpt_dir is not None and s.checkpoint_every and (step + 1) % s.checkpoint_every == 0 and step + 1 < s.steps:
            last_good = _save(acc, ckpt_dir, step + 1, fingerprint, history, s.keep_checkpoints, parts)
    bar.close()
    return acc.unwrap_model(model), history


def fingerprint_of(**parts: Any) -> dict[str, str]:
    """What a checkpoint belongs to, part by named part (settings, seed, each input's content hash), each
    part a stable hash: resume only into the same run, and say which part differs when it is not."""
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for k, v in sorted(parts.items())}


def fingerprint_id(parts: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
