"""COPSD and OPD / FiRe on a real pair: Qwen2.5-Coder-1.5B-Instruct -> Qwen2.5-Coder-0.5B-Instruct.

    make real PAIR=qwen REAL=../opd-qwen STAGES=prepare      # import the pair, write the data, prepare
    python experiments/qwen_study.py --root ../opd-qwen       # resumable; results in experiments/results/

Every run starts from the same initial student (the 0.5B as shipped) with the recipe's settings
(``params.qwen.yaml``), through the pipeline's own stage functions; only the named keys change:

- ``student-init``: the 0.5B on bare prompts; ``self teacher (x_c)``: the same model reading the
  category's constitution (what COPSD's self-teacher sees, measured the way the student is);
- ``COPSD self``: ``distill.method: copsd``, ``copsd.teacher: self`` (the paper's self-distillation),
  with the project's default mass-covering term (``copsd.fkl_coef: 0.5``); ``constitution OPSD self``:
  the same without it (the plain token-level teacher reward of the paper);
- ``COPSD Cross-SFT``: the 1.5B recalibrated by the cross_sft stage (LoRA adapters, merged), reading
  the constitution, as COPSD's teacher; the Cross-SFT teacher itself is also evaluated with the
  constitution (``COPSD Cross-SFT teacher (x_c)``), so the student's over-refusal sits next to its teacher's;
  ``COPSD original``: its control, the same 1.5B reading the constitution without Cross-SFT;
- ``OPD`` / ``FiRe`` (reweight only, the default) / ``GKD``: the 1.5B teaching the 0.5B on the word
  problems alone (``distill.tasks: [reasoning]``), rollouts long enough for a worked solution.

Each model is evaluated on the held-out split (greedy; over-refusal also sampled): HarmBench
behaviours never trained on, look-alike patterns never trained on, word problems, instructions.
Differences to the initial student are paired over prompts, with 95% bootstrap intervals. One
seed: on two CPU cores a run costs 10-20 minutes; the intervals are over prompts, not seeds.
Results are saved after every run; a rerun skips what is there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.common import RESULTS  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tasks  # noqa: E402,F401  (environment)
from opd.params import load  # noqa: E402
from opd.constitution import wrap  # noqa: E402
from opd.data import write_json  # noqa: E402
from opd.evaluate import evaluate_model, load_detector  # noqa: E402
from opd.models import dtype_of, load_model, load_tokenizer  # noqa: E402
from opd.cross_sft import cross_sft_stage, skip_reason  # noqa: E402
from opd.methods.copsd import Copsd  # noqa: E402
from opd.stages import distill_stage, evaluate_stage  # noqa: E402
from opd.constitution import constitutions_of
from opd.data import load_rows

REASONING = {"distill.tasks": ["reasoning"], "rollout.max_new_tokens": 192}
RUNS: dict[str, dict[str, Any]] = {
    "COPSD self": {"distill.method": "copsd", "copsd.teacher": "self"},
    "OPD (reasoning)": {"distill.method": "opd", **REASONING},
    "FiRe (reasoning)": {"distill.method": "fire", **REASONING},
    "constitution OPSD self": {"distill.method": "copsd", "copsd.teacher": "self", "copsd.fkl_coef": 0.0},
    "GKD (reasoning)": {"distill.method": "gkd", **REASONING},
    # the control for Cross-SFT: the same 1.5B reading the constitution, not recalibrated
    "COPSD original": {"distill.method": "copsd", "copsd.teacher": "original"},
    # the 1.5B recalibrated by Cross-SFT (LoRA: a full fine-tune of the 1.5B holds ~28 GB), reading the
    # constitution; LoRA's usual 10x the full fine-tune's lr
    "COPSD Cross-SFT": {"distill.method": "copsd", "copsd.teacher": "cross_sft", "cross_sft.lr": 1.0e-4,
                        "cross_sft.lora": {"r": 16, "alpha": 32.0, "target_modules": "all-linear"}},
}
# (metric, per-sample field, which rows): the paired per-prompt outcomes the differences are taken on
PAIRED = [("harmful refusal", "refused", "safety"), ("over-refusal", "refused", "borderline"),
          ("reasoning", "correct", "reasoning"), ("general help", "correct", "general")]
COLUMNS = [("harmful_refusal", "harmful refusal %", 100), ("over_refusal", "over-refusal greedy %", 100),
           ("over_refusal_sampled", "over-refusal sampled %", 100), ("reasoning_accuracy", "reasoning %", 100),
           ("general_helpfulness", "general help.", 1), ("borderline_helpfulness", "borderline help.", 1),
           ("response_length", "length", 1), ("token_entropy", "entropy", 1)]
WITH_CI = {"harmful_refusal", "over_refusal", "over_refusal_sampled", "reasoning_accuracy"}


def paired_diff(a: list[dict[str, Any]], b: list[dict[str, Any]], field: str, task: str,
                resamples: int = 2000, seed: int = 0) -> tuple[float, float, float, int]:
    """Mean of b - a over the prompts of ``task`` both answered, with a 95% bootstrap interval over prompts."""
    left = {s["id"]: float(s[field]) for s in a if s["task"] == task}
    pairs = [(left[s["id"]], float(s[field])) for s in b if s["task"] == task and s["id"] in left]
    if not pairs:
        return float("nan"), float("nan"), float("nan"), 0
    d = np.array([y - x for x, y in pairs])
    boots = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(1)
    return float(d.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975)), len(d)


def on_constitution(params: Any, prepared: Path, path: Path) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """A model's metrics when every eval prompt is wrapped in its category's constitution (the self-teacher's view)."""
    texts = constitutions_of(params, prepared)
    rows = [dataclasses.replace(r, prompt=wrap(r.prompt, r.category, texts)) for r in load_rows(prepared, "eval")]
    torch.manual_seed(params.seed)
    model = load_model(path, dtype=dtype_of(params.runtime.mixed_precision))
    return evaluate_model(model, load_tokenizer(path), rows, params.evaluate, load_detector(params.evaluate.refusal_detector),
                          params.data.answer_format)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="the recipe's work tree (params.yaml = params.qwen.yaml)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    import yaml

    common = {k: yaml.safe_load(v) for k, v in (s.partition("=")[::2] for s in args.sets)}
    root = args.root.resolve()
    os.chdir(root)  # params.yaml names data and models relative to the work tree
    prepared, work = root / "data" / "prepared", args.out / "qwen_work"
    params = load(root / "params.yaml", common or None)
    base = work / "base"
    base.mkdir(parents=True, exist_ok=True)  # the pair as given: the teacher stage's manifest, without its passes
    student = (root / params.student.path).resolve()
    write_json(base / "manifest.json", {"teacher": str((root / params.teacher.path).resolve()), "student_init": str(student)})
    store = args.out / "qwen_study.json"
    results: dict[str, Any] = json.loads(store.read_text()) if store.is_file() else {"runs": {}, "samples": {}}
    runs, samples = results["runs"], results["samples"]

    def save(name: str, metrics: dict[str, float], gens: list[dict[str, Any]], **extra: Any) -> None:
        runs[name] = {"metrics": metrics, **extra}
        samples[name] = [{k: g[k] for k in ("id", "task", "refused", "correct", "response")} for g in gens]
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(store)
        m = metrics
        print(f"{name}: refusal {m.get('harmful_refusal', float('nan')):.3f} over-refusal {m.get('over_refusal', float('nan')):.3f} "
              f"reasoning {m.get('reasoning_accuracy', float('nan')):.3f} length {m['response_length']:.1f} "
              f"entropy {m['token_entropy']:.3f}" + (f" ({extra['seconds']:.0f} s)" if "seconds" in extra else ""), flush=True)

    if "student-init" not in runs:
        t0 = time.perf_counter()
        table, gens = evaluate_stage(params, prepared, {"s": student})
        save("student-init", table["s"], gens["s"], seconds=time.perf_counter() - t0)
    if "self teacher (x_c)" not in runs:
        t0 = time.perf_counter()
        m, gens = on_constitution(params, prepared, student)
        save("self teacher (x_c)", m, gens, seconds=time.perf_counter() - t0)
    ctx = multiprocessing.get_context("spawn")
    for name in args.runs:
        if name in runs:
            continue
        # each run in a process of its own: a 0.5B student with its AdamW state is ~8 GB, and a process
        # that keeps freed memory (runtime.allocator) would not give it back between runs
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            metrics, gens, secs, curve, extra = pool.submit(run_one, name, str(root), common, str(work)).result()
        if "teacher" in extra:  # the run's COPSD teacher, with the constitution (as the distill stage reads it)
            t_metrics, t_gens, t_secs = extra.pop("teacher")
            save(f"{name} teacher (x_c)", t_metrics, t_gens, seconds=t_secs)
        save(name, metrics, gens, seconds=secs, curve=curve, **extra)
    write(results, args.out)


def run_one(name: str, root: str, common: dict[str, Any], work: str) -> tuple[
        dict[str, float], list[dict[str, Any]], float, list[dict[str, Any]], dict[str, Any]]:
    """Distil the initial student with one run's settings, evaluate it (in a worker process). With
    ``copsd.teacher: cross_sft`` the cross_sft stage runs first (its folder is kept: the teacher is
    evaluated with the constitution too, and a rerun of the distillation reuses it)."""
    os.chdir(root)
    wdir, prepared = Path(work), Path(root) / "data" / "prepared"
    p = load(Path(root) / "params.yaml", {**common, **RUNS[name], "distill.checkpoint_every": 10**6})
    tag = name.replace(" ", "_").replace("(", "").replace(")", "")
    out, ckpt, cross = wdir / f"student-{tag}", wdir / f"ckpt-{tag}", wdir / f"cross-{tag}"
    extra: dict[str, Any] = {}
    if skip_reason(p) is None:  # this run reads the Cross-SFT teacher
        extra["cross_sft"] = {}
        if not (cross / "teacher").is_dir():  # a rerun reuses it, and then has no time of its own to report
            t0 = time.perf_counter()
            cross_sft_stage(p, prepared, wdir / "base", cross, wdir / f"ckpt-cross-{tag}")
            extra["cross_sft"]["seconds"] = time.perf_counter() - t0
        extra["cross_sft"].update(json.loads((cross / "mix.json").read_text()))
    if p.distill.method == "copsd" and p.copsd.teacher != "self":  # (self: the "self teacher (x_c)" row)
        t0 = time.perf_counter()
        t_metrics, t_gens = on_constitution(p, prepared, Copsd().teacher_path(p, wdir / "base", cross))
        extra["teacher"] = (t_metrics, t_gens, time.perf_counter() - t0)
    t0 = time.perf_counter()
    _, history = distill_stage(p, prepared, wdir / "base", cross, out, ckpt)
    secs = time.perf_counter() - t0
    table, gens = evaluate_stage(p, prepared, {"s": out})
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    curve = [{k: h[k] for k in ("step", "loss", "response_length", "student_entropy") if k in h} for h in history]
    return table["s"], gens["s"], secs, curve, extra


def write(results: dict[str, Any], out: Path) -> None:
    """The metric table (95% bootstrap intervals over prompts) and the paired differences to the initial student."""
    runs, samples = results["runs"], results["samples"]
    lines = ["| model | " + " | ".join(h for _, h, _ in COLUMNS) + " | distill s |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, run in runs.items():
        m = run["metrics"]
        cells = []
        for key, _, scale in COLUMNS:
            if key not in m:
                cells.append("-")
                continue
            c = f"{scale * m[key]:.1f}" if scale == 100 else f"{m[key]:.2f}"
            if key in WITH_CI and f"{key}_ci_low" in m:
                c += f" [{scale * m[f'{key}_ci_low']:.0f}, {scale * m[f'{key}_ci_high']:.0f}]"
            cells.append(c)
        secs = f"{run['seconds']:.0f}" if "curve" in run else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {secs} |")
    lines += ["", "Paired differences to the initial student (points, mean over prompts [95% bootstrap interval], n prompts):", "",
              "| model | " + " | ".join(k for k, _, _ in PAIRED) + " |", "|---" * (len(PAIRED) + 1) + "|"]
    for name in runs:
        if name == "student-init":
            continue
        cells = []
        for _, field, task in PAIRED:
            mean, lo, hi, n = paired_diff(samples["student-init"], samples[name], field, task)
            cells.append(f"{100 * mean:+.1f} [{100 * lo:+.0f}, {100 * hi:+.0f}] n={n}" if n else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "qwen_study.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
