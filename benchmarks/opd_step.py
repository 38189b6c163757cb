"""One on-policy distillation step, end to end: the engine vs TRL's ``GKDTrainer``.

    pip install -e '.[bench]'          # trl is a benchmark extra, not a runtime dependency
    python benchmarks/opd_step.py [--rounds 5] [--steps 8] [--warmup 2]
    python benchmarks/opd_step.py --real models/real/teacher --data data/real [--n-layers 8] [--batch 4]

``--real``: the real pair instead of the tiny one: the teacher folder (SmolLM2-135M-Instruct from
``python -m flows import-model``), the student pruned from it to ``--n-layers`` evenly spaced layers
or, with ``--student``, a student folder of its own (the Qwen pair: ``--real models/real/teacher
--student models/real/student`` in the ``make real PAIR=qwen`` work tree), the teacher's tokenizer and
chat template, the train prompts of ``--data`` (``python -m flows real-data``), ``--new-tokens`` (64)
new tokens, and TRL 1.16's ``DistillationTrainer`` (on-policy, chunked generalised JSD at ``beta=1``:
reverse KL) as a fourth side. Writes ``opd_step_real.json`` (``--out`` to name another file).

The comparison setup of docs/peers.md, identical on every side: teacher Llama (hidden 128,
4 layers, intermediate 384, 4 heads), student (hidden 96, 2 layers, intermediate 256), both built
from config with the same seeds and the prepared tokenizer (run ``dvc repro prepare`` first);
batch 16 prompts from the prepared train split; up to 48 new tokens sampled at temperature 1.0;
reverse KL; AdamW; fully on-policy. A step is rollout + teacher scoring + loss + backward +
optimiser step.

- ``engine-gkd``: :func:`opd.methods.gkd.gkd_step` with ``loss: reverse_kl`` over the full vocabulary,
  chunked, run by the engine's training loop (the same loss as TRL's, the fair comparison);
- ``engine-opd``: :func:`opd.methods.sampled.sampled_step`, the sampled-token reverse-KL advantage with
  PPO-clip (the engine's default method: no full-vocabulary teacher distribution at all);
- ``trl-gkd``: ``trl.experimental.gkd.GKDTrainer`` (``lmbda=1``, ``beta=1`` = reverse KL,
  ``temperature=1``) through ``Trainer.train``.
- ``engine-opd-bf16`` and ``trl-distill-bf16`` (ask for them with ``--sides``): each side's bf16
  settings, compared with each other. Both store the teacher in bf16 and run their passes under
  bf16 autocast with fp32 master weights (the engine: ``runtime.mixed_precision: bf16``; TRL:
  ``bf16=True``); the engine also samples from a bf16 copy of the student, refreshed every step
  (``rollout.dtype: bf16``), where TRL's ``generate`` runs outside autocast on the fp32 student. For
  CPUs with bf16 dot products (AVX512-BF16, AMX) and GPUs.
- ``trl-distill-keep`` and ``trl-distill-bf16-keep``: TRL given the engine's allocator
  (``runtime.allocator``, :mod:`opd.allocator`; ``--allocator``, default mimalloc), so a ratio is not
  the allocator's doing. The engine sides and the ``-keep`` sides start with mimalloc preloaded as
  ``python -m flows`` starts a stage; the other TRL sides with glibc as shipped.
- ``engine-opd-system`` and ``engine-opd-bf16-system``: the engine without it (``runtime.allocator:
  system``, glibc as shipped), the allocator setting off on both sides.

Each measurement is a fresh subprocess (an allocator keeps freed memory, and a preloaded one serves
the whole process, so sides must not share a process); sides are interleaved round by round so drift on a shared machine hits all of them.
Throughput is generated response tokens per second over the timed steps (after ``--warmup``);
peak memory is the growth of resident memory (CPU) or ``max_memory_allocated`` (GPU) from just
before the first timed step, and the peak itself (RSS MB, models included: the fair figure when
one side keeps freed memory resident). The script also checks that the engine's generalised JSD equals TRL's
``generalized_jsd_loss`` on the same logits (float64, beta 0 / 0.5 / 1, masked tokens).
Prints a table, the paired ratios (each engine side over each TRL side, either precision, round by
round: median and range over rounds, never "the faster TRL" picked by a median), every side's seconds
per step by unit (engine: rollout, teacher score, shape, update; ``DistillationTrainer``: rollout
(``generate``), teacher score (its backbone forward), student forward + loss, backward + optimiser
step + Trainer), and writes ``benchmarks/results/opd_step.json``. ``benchmarks/roofline.py`` reads a
``--real`` result and adds each side's fraction of this CPU's lower bound on the step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opd.allocator import preload_env  # noqa: E402
from opd.config import ArchConfig, DistillConfig, RolloutConfig, RuntimeConfig  # noqa: E402
from opd.models import build_llama, load_tokenizer  # noqa: E402
from opd.data import load_rows  # noqa: E402

TEACHER = ArchConfig(hidden_size=128, num_layers=4, intermediate_size=384, num_heads=4, max_positions=256)
STUDENT = ArchConfig(hidden_size=96, num_layers=2, intermediate_size=256, num_heads=4, max_positions=256)
BATCH, NEW_TOKENS, LR = 16, 48, 1e-5
SIDES = ("engine-gkd", "engine-opd", "trl-gkd", "trl-distill", "engine-opd-bf16", "trl-distill-bf16", "trl-distill-keep",
         "trl-distill-bf16-keep", "engine-opd-system", "engine-opd-bf16-system")
PREPARED = ROOT / "data" / "prepared"
REAL: dict[str, str] = {}  # --real: {"teacher": folder, "data": folder, "n_layers": str[, "student": folder]}
ALLOCATOR: dict[str, str] = {}  # this measurement's runtime.allocator, and the one in effect


class Peak:
    """Peak memory growth from construction to ``read()``: CUDA allocator, else sampled RSS."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        from benchmarks.loss_memory import PeakRSS

        self.rss = PeakRSS().__enter__()

    def read(self) -> float:
        if self.cuda:
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        self.rss.__exit__()
        return (self.rss.peak - self.rss.base) / 2**20

    def absolute(self) -> float:
        """The peak itself (MB, after :meth:`read`): resident memory at its highest during the timed steps,
        models included. With freed memory kept for reuse (``runtime.keep_freed_memory``) the warmup
        steps' blocks are already resident when the growth is measured, so this is the fair one."""
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return self.rss.peak / 2**20


def train_rows(data: str) -> list:
    """The train split of a data folder (``python -m flows real-data``)."""
    from opd.data import load_user_records, records_to_rows

    return [r for r in records_to_rows(load_user_records("jsonl", data)) if r.split == "train"]


def real_pair(teacher_dir: str, data: str, n_layers: int, student_dir: str | None = None):
    """(tokenizer, student, teacher, train rows): a teacher folder, the student folder or, without one, the
    student pruned from the teacher as the teacher stage prunes (``student.init: {n_layers: K}``), and the
    train split of a data folder."""
    from opd.config import InitConfig
    from opd.models import check_compatible, load_model
    from opd.stages import pruned_student

    tok = load_tokenizer(teacher_dir)
    if student_dir:
        check_compatible(tok, load_tokenizer(student_dir), "--student")
        student = load_model(student_dir)
    else:
        student, _ = pruned_student(Path(teacher_dir), InitConfig(n_layers=n_layers))
    return tok, student, load_model(teacher_dir), train_rows(data)


def _setup():
    """(tokenizer, student, teacher, rows): the tiny pair on the prepared world, or the real pair."""
    if REAL:
        return real_pair(REAL["teacher"], REAL["data"], int(REAL["n_layers"]), REAL.get("student"))
    tok = load_tokenizer(PREPARED / "tokenizer")
    return tok, build_llama(STUDENT, tok, 1), build_llama(TEACHER, tok, 0), load_rows(PREPARED, "train")


def run_engine(method: str, steps: int, warmup: int, seed: int, bf16: bool = False) -> dict[str, float]:
    """``bf16``: the engine's half-precision settings: ``runtime.mixed_precision: bf16`` (the teacher stored
    in bf16, every pass under autocast, fp32 master weights) and ``rollout.dtype: bf16`` (a bf16 sampler
    copy of the student)."""
    from opd.batch import PromptPool
    from opd.methods.gkd import gkd_step
    from opd.methods.sampled import sampled_step
    from opd.rollout import TransformersBackend
    from opd.train import LoopSettings, make_accelerator, train

    tok, student, teacher, rows = _setup()
    acc = make_accelerator(RuntimeConfig(mixed_precision="bf16" if bf16 else "fp32", allocator=ALLOCATOR["runtime"]))
    teacher = teacher.to(acc.device, torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False)
    pool = PromptPool(rows, tok)
    rcfg = RolloutConfig(temperature=1.0, max_new_tokens=NEW_TOKENS, batch_size=64, dtype="bf16" if bf16 else "fp32")
    d = DistillConfig(method="gkd" if method == "gkd" else "opd", loss="reverse_kl", lambda_on_policy=1.0, temperature=1.0,
                      prompts_per_step=BATCH, lr=LR)

    units: dict[str, float] = {}  # seconds per unit of the timed opd steps (rollout, score, shape, update)

    def timed(name, fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if peak:  # after the warmup steps
                units[name] = units.get(name, 0.0) + time.perf_counter() - t0
            return out
        return run

    def factory(m, optimize):
        backend = TransformersBackend(m, tok, rcfg)
        if method == "gkd":
            return gkd_step(acc, m, {"default": teacher}, pool, backend, tok, d, rcfg)
        return sampled_step(acc, m, {"default": teacher}, pool, backend, tok, d, rcfg, optimize, unit=timed)

    marks: list[tuple[float, float]] = []  # (time, tokens) after each step
    peak: list[Peak] = []

    def log(step: int, metrics: dict[str, float]) -> None:
        marks.append((time.perf_counter(), metrics["response_length"] * BATCH))
        if step == warmup:
            peak.append(Peak())

    train(acc, student, factory, LoopSettings(steps=warmup + steps, lr=LR, seed=seed, log_every=1), on_log=log)
    timed_marks = marks[warmup:]
    return {"seconds": timed_marks[-1][0] - marks[warmup - 1][0], "tokens": sum(t for _, t in timed_marks),
            "peak_mb": peak[0].read(), "step_rss_mb": peak[0].absolute(), "units": {k: v / steps for k, v in units.items()}}


def run_trl(steps: int, warmup: int, seed: int, trainer: str = "gkd", bf16: bool = False) -> dict[str, float]:
    """TRL's ``GKDTrainer`` (``trainer="gkd"``) or ``DistillationTrainer`` (``"distill"``), fully on-policy;
    ``bf16``: ``bf16=True`` (autocast) with the teacher stored in bf16, as the engine's bf16 side."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok, student, teacher, rows = _setup()
    if bf16:
        teacher = teacher.to(torch.bfloat16)
    tokens: list[float] = []
    if trainer == "gkd":
        data = Dataset.from_list([{"messages": [{"role": "user", "content": r.prompt},
                                                {"role": "assistant", "content": r.reference or ""}]} for r in rows])

        class Counting(GKDTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                loss = super().training_step(model, inputs, num_items_in_batch)
                tokens.append(float((inputs["labels"] != -100).sum()))  # the on-policy completion tokens
                return loss
    else:
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": r.prompt}]} for r in rows])

        class Counting(DistillationTrainer):  # its training_step receives raw prompts and generates inside
            def _generate_and_score_completions(self, inputs):
                t0 = time.perf_counter()
                out = super()._generate_and_score_completions(inputs)
                clock("rollout", t0)
                tokens.append(float(out["completion_mask"].sum()))  # the generated completion tokens
                return out

            def _get_last_hidden_state(self, model, *a, **k):
                t0 = time.perf_counter()
                out = super()._get_last_hidden_state(model, *a, **k)
                if model is self.accelerator.unwrap_model(self.teacher_model):
                    clock("teacher score", t0)
                return out

            def compute_loss(self, *a, **k):
                t0 = time.perf_counter()
                out = super().compute_loss(*a, **k)
                clock("forward + loss", t0)
                return out

    marks: list[float] = []
    peak: list[Peak] = []
    units: dict[str, float] = {}  # seconds of the timed steps by unit (DistillationTrainer)

    def clock(name: str, t0: float) -> None:
        if peak:  # after the warmup steps
            units[name] = units.get(name, 0.0) + time.perf_counter() - t0

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())
            if state.global_step == warmup:
                peak.append(Peak())

    common = {"per_device_train_batch_size": BATCH, "max_steps": warmup + steps, "learning_rate": LR, "beta": 1.0,
              "temperature": 1.0, "logging_steps": 10_000, "save_strategy": "no", "report_to": "none",
              "disable_dropout": True, "seed": seed, "dataloader_num_workers": 0, "bf16": bf16,
              "use_cpu": not torch.cuda.is_available()}
    with tempfile.TemporaryDirectory() as tmp:
        if trainer == "gkd":
            cfg = GKDConfig(output_dir=tmp, lmbda=1.0, max_new_tokens=NEW_TOKENS, max_length=1024, **common)
        else:
            cfg = DistillationConfig(output_dir=tmp, max_completion_length=NEW_TOKENS, **common)
        Counting(model=student, teacher_model=teacher, args=cfg, train_dataset=data, processing_class=tok,
                 callbacks=[Clock()]).train()
    seconds = marks[-1] - marks[warmup - 1]
    if units:  # compute_loss includes the teacher's forward; the rest of a step is backward + optimiser + Trainer
        units["forward + loss"] -= units.get("teacher score", 0.0)
        units["backward + update"] = seconds - sum(units.values())
    return {"seconds": seconds, "tokens": sum(tokens[warmup:]), "peak_mb": peak[0].read(),
            "step_rss_mb": peak[0].absolute(), "units": {k: v / steps for k, v in units.items()}}


def loss_check() -> dict[str, float]:
    """max |engine - TRL| of the generalised JSD on the same float64 logits, per beta."""
    from trl.experimental.gkd import GKDTrainer

    from opd.losses import divergence, masked_mean

    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(4, 9, 512, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    labels = torch.randint(0, 512, (4, 9), generator=g)
    labels[:, :3] = -100
    labels[1, 6:] = -100
    out = {}
    for beta in (0.0, 0.5, 1.0):
        ref = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta)
        ours = masked_mean(divergence(s, t, "jsd", beta), (labels != -100).double())
        out[f"beta={beta}"] = abs(float(ref) - float(ours))
    return out


def report(runs: dict[str, list[dict]], steps: int) -> tuple[dict[str, dict], dict[str, dict[str, float]]]:
    """Print the table, the paired ratios and the step by unit; return (summary by side, paired ratios).

    Paired: every engine side against every TRL side (either precision), round by round: the same
    round ran both within minutes, so drift of a shared machine cancels; the median and range over
    rounds, never a ratio of medians that picks "the faster TRL" after the fact."""
    summary = {}
    for side, rs in runs.items():
        tps = [x["tokens_per_s"] for x in rs]
        summary[side] = {"tokens_per_s": statistics.median(tps), "tokens_per_s_min": min(tps),
                         "tokens_per_s_max": max(tps), "s_per_step": statistics.median(x["s_per_step"] for x in rs),
                         "peak_mb": statistics.median(x["peak_mb"] for x in rs),
                         "step_rss_mb": statistics.median(x["step_rss_mb"] for x in rs),
                         "tokens_per_step": statistics.median(x["tokens"] / steps for x in rs)}
    print(f"\n{'side':22s} | {'tok/s median':>12s} | {'min-max':>13s} | {'s/step':>7s} | {'tok/step':>8s} | "
          f"{'peak MB':>7s} | {'RSS MB':>7s} | allocator")
    print("-" * 105)
    for side, s in summary.items():
        print(f"{side:22s} | {s['tokens_per_s']:12.1f} | {s['tokens_per_s_min']:6.1f}-{s['tokens_per_s_max']:<6.1f} | "
              f"{s['s_per_step']:7.3f} | {s['tokens_per_step']:8.0f} | {s['peak_mb']:7.0f} | {s['step_rss_mb']:7.0f} | "
              f"{runs[side][0]['allocator']}")
    # round by round: each engine side against each TRL side, in the same round
    paired: dict[str, dict[str, float]] = {}
    print("\npaired ratios, engine / TRL tokens/s in the same round (median [min, max] over rounds):")
    for e in (k for k in runs if k.startswith("engine-")):
        for t in (k for k in runs if k.startswith("trl-")):
            ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[e], runs[t], strict=True)]
            paired[f"{e} / {t}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
            print(f"  {e} / {t}: {statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]")
    for side, rs in runs.items():  # where a step's time goes (engine opd: its four units; TRL distill: four)
        per = {k: statistics.median(x["units"][k] for x in rs) for k in rs[0].get("units", {})}
        if per:
            summary[side]["s_per_unit"] = per
            total = sum(per.values())
            print(f"{side} s/step by unit: " + ", ".join(f"{k} {v:.3f} ({v / total:.0%})" for k, v in per.items()))
    return summary, paired


def with_allocator(side: str) -> bool:
    """The engine's sides (but ``-system``) and TRL's ``-keep`` sides run with the engine's allocator."""
    return (side.startswith("engine-") and not side.endswith("-system")) or side.endswith("-keep")


def measure(side: str, steps: int, warmup: int, seed: int, allocator: str) -> dict[str, float]:
    from opd.allocator import use_allocator

    torch.manual_seed(seed)
    bf16 = "-bf16" in side
    ALLOCATOR["runtime"] = allocator if with_allocator(side) else "system"
    ALLOCATOR["used"] = use_allocator(ALLOCATOR["runtime"])  # the engine's make_accelerator applies it again
    if side.startswith("trl-"):
        res = run_trl(steps, warmup, seed, side.split("-")[1], bf16)
    else:
        res = run_engine(side.split("-")[1], steps, warmup, seed, bf16)
    return {**res, "allocator": ALLOCATOR["used"]}


def main() -> None:
    global BATCH, NEW_TOKENS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sides", nargs="+", default=None, choices=SIDES,
                    help="default: the first three (tiny pair), the first four (--real)")
    ap.add_argument("--real", default=None, metavar="TEACHER_DIR", help="benchmark the real pair (see above)")
    ap.add_argument("--data", default="data/real", help="--real: the recipe's data folder")
    ap.add_argument("--n-layers", type=int, default=8, help="--real: the student's layers, pruned from the teacher")
    ap.add_argument("--student", default=None, metavar="STUDENT_DIR", help="--real: a student folder instead of pruning")
    ap.add_argument("--out", type=Path, default=None, help="the result file (default benchmarks/results/opd_step[_real].json)")
    ap.add_argument("--batch", type=int, default=None, help=f"prompts per step (default {BATCH}; --real: 4)")
    ap.add_argument("--new-tokens", type=int, default=None, help=f"new tokens (default {NEW_TOKENS}; --real: 64)")
    ap.add_argument("--allocator", default="mimalloc", choices=["mimalloc", "glibc"],
                    help="runtime.allocator of the engine's and the -keep sides")
    ap.add_argument("--summarize", type=Path, default=None, metavar="RESULT_JSON",
                    help="print the tables of a saved result again (and update its summary), measure nothing")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one measurement
    args = ap.parse_args()
    if args.summarize:
        res = json.loads(args.summarize.read_text())
        res["summary"], res["paired"] = report(res["runs"], res["steps"])
        args.summarize.write_text(json.dumps(res, indent=2) + "\n")
        return
    BATCH = args.batch or (4 if args.real else BATCH)
    NEW_TOKENS = args.new_tokens or (64 if args.real else NEW_TOKENS)
    if args.real:  # absolute: the measurements run as children in ROOT
        args.real, args.data = str(Path(args.real).resolve()), str(Path(args.data).resolve())
        REAL.update(teacher=args.real, data=args.data, n_layers=str(args.n_layers))
        if args.student:
            REAL["student"] = str(Path(args.student).resolve())
    sides = args.sides or list(SIDES[:4] if args.real else SIDES[:3])
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.warmup, args.rounds, args.allocator)))
        return
    if not args.real and not (PREPARED / "tokenizer").is_dir():
        sys.exit("run `dvc repro prepare` first (the benchmark uses the prepared tokenizer and prompts)")
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for side in sides:  # interleaved: every round runs every side once
            cmd = [sys.executable, __file__, "--one", side, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--rounds", str(r), "--batch", str(BATCH), "--new-tokens", str(NEW_TOKENS), "--allocator", args.allocator]
            if args.real:
                cmd += ["--real", args.real, "--data", args.data, "--n-layers", str(args.n_layers)]
                cmd += ["--student", REAL["student"]] if "student" in REAL else []
            env = preload_env(args.allocator) if with_allocator(side) else None  # as python -m flows starts a stage
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["tokens_per_s"] = res["tokens"] / res["seconds"]
            res["s_per_step"] = res["seconds"] / args.steps
            runs[side].append(res)
            print(f"round {r + 1}/{args.rounds} {side:21s} {res['tokens_per_s']:8.0f} tok/s "
                  f"{res['s_per_step']:.3f} s/step  peak {res['peak_mb']:.0f} MB, RSS {res['step_rss_mb']:.0f} MB "
                  f"({res['allocator']})",
                  flush=True)
    check = loss_check()
    summary, paired = report(runs, args.steps)
    print("\nengine GKD loss vs TRL generalized_jsd_loss, max |diff| (float64):",
          ", ".join(f"{k}: {v:.1e}" for k, v in check.items()))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    out = args.out or ROOT / "benchmarks" / "results" / ("opd_step_real.json" if args.real else "opd_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "rounds": args.rounds,
                               "steps": args.steps, "batch": BATCH, "new_tokens": NEW_TOKENS, "real": REAL or None,
                               "summary": summary, "paired": paired, "runs": runs, "loss_check": check},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
