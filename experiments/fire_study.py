"""FiRe-OPD: when does the filter help? Teacher reliability x method, paired seeds, on the embedded world.

    .venv/bin/dvc repro prepare && .venv/bin/python experiments/fire_study.py   # ~75 min on 2 cores

Teachers of controlled reliability come from the teacher stage's own setting
``teacher.sft.wrong_answer_categories``: the teacher is trained with a wrong final answer (right + 1..9,
varied by row) on a fraction rho of the six reasoning problem types (the item a problem counts), and
is right on the rest. Its reliability per type is measured on the eval split (``reliability.json``).
Every level distils the SAME initial student (trained once, at level 0).

For each level and method the student is distilled with ``distill.steps`` (default 200 here, half
of params.yaml's 400, to fit the grid in the CI machine's 90 minutes) and evaluated greedily on the
held-out reasoning problems. Seeds are paired: seed s gives every method the same prompt draws and
the same sampling stream up to where their updates differ. Reported per run: accuracy overall, on
the types the teacher gets right and on those it gets wrong; the filter's kept fraction and the
teacher's reliability on kept vs dropped trajectories (the filter audit); the weight statistics.
A learning-rate check runs vanilla OPD and FiRe at three learning rates at the middle level.

Runs go to ``--workers`` processes of one torch thread each (on 2 cores, two one-thread runs do
about twice the work of one two-thread run for models this small). Results are saved after every
run and a rerun skips what is there. Writes ``experiments/results/fire_study.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.common import quiet, RESULTS, T975  # noqa: E402

TYPES = ("apples", "coins", "pens", "books", "cards", "shells")  # the embedded world's reasoning types
LEVELS: dict[str, list[str]] = {"rho=0": [], "rho=1/3": list(TYPES[:2]), "rho=2/3": list(TYPES[:4])}
FIRE_OFF = {"distill.method": "fire", "fire.filter": False, "fire.reweight": False, "fire.token_select": False,
            "fire.filter_quantile": 0.2, "fire.normalize": "trajectory", "fire.alpha": 1.0, "fire.beta": 1.0}
METHODS: dict[str, dict[str, Any]] = {  # every FiRe key set: the study does not follow params.yaml's fire defaults
    "vanilla OPD": {"distill.method": "opd"},
    "filter q=0.1": {**FIRE_OFF, "fire.filter": True, "fire.filter_quantile": 0.1},
    "filter q=0.2": {**FIRE_OFF, "fire.filter": True, "fire.filter_quantile": 0.2},
    "filter q=0.4": {**FIRE_OFF, "fire.filter": True, "fire.filter_quantile": 0.4},
    "reweight (trajectory)": {**FIRE_OFF, "fire.reweight": True},
    "reweight (batch)": {**FIRE_OFF, "fire.reweight": True, "fire.normalize": "batch"},
    "FiRe (q=0.2 + reweight)": {**FIRE_OFF, "fire.filter": True, "fire.reweight": True},
    "hard selection (TIP-like)": {**FIRE_OFF, "fire.token_select": True, "fire.select_rho": 0.5},
}
LR_LEVEL, LR_METHODS, LRS = "rho=1/3", ("vanilla OPD", "FiRe (q=0.2 + reweight)"), (5e-4, 1e-3, 2e-3)
AUDIT = ("kept_frac", "kept_reliability", "dropped_reliability", "weight_mean", "weight_p90", "weight_max")


def key_of(level: str, method: str, seed: int, lr: float) -> str:
    return f"{level}|{method}|{seed}|{lr:g}"


# ----------------------------------------------------------------------------- work (in worker processes)
def build_teacher(level: str, work: str, steps_override: dict[str, Any]) -> dict[str, Any]:
    """The level's teacher (and, at level 0, the shared initial student) in ``work/base-<level>``."""
    quiet()
    import tasks  # noqa: F401  (environment)
    from opd.params import load
    from opd.paths import Layout
    from opd.paths import RELIABILITY
    from opd.stages import teacher_stage
    from opd.paths import resolve

    lay, base = Layout(ROOT), Path(work) / f"base-{LEVELS_DIR[level]}"
    if not (base / "manifest.json").is_file():
        # level 0 is built alone (both cores), the others side by side (one thread each)
        over: dict[str, Any] = {"teacher.sft.wrong_answer_categories": LEVELS[level],
                                "runtime.threads": 0 if level == "rho=0" else 1, **steps_override}
        if level != "rho=0":
            over["student.path"] = str(resolve(Path(work) / f"base-{LEVELS_DIR['rho=0']}", "student_init"))
        teacher_stage(load(lay.params, over), lay.prepared, base, Path(work) / f"ckpt-teacher-{LEVELS_DIR[level]}")
    table = json.loads((base / RELIABILITY).read_text())["teacher"]
    return {t: table[f"reasoning/{t}"] for t in TYPES}


LEVELS_DIR = {name: name.replace("=", "").replace("/", "of") for name in LEVELS}


def run_one(level: str, method: str, seed: int, lr: float, steps: int, work: str) -> dict[str, Any]:
    """Distil the shared initial student from the level's teacher; evaluate on held-out reasoning."""
    quiet()
    import tasks  # noqa: F401
    from opd.params import load
    from opd.evaluate import load_detector, reliability
    from opd.models import load_model, load_tokenizer
    from opd.paths import Layout
    from opd.stages import distill_stage
    from opd.data import load_rows

    lay, wdir = Layout(ROOT), Path(work)
    params = load(lay.params, {**METHODS[method], "seed": seed, "distill.lr": lr, "distill.steps": steps,
                               "runtime.threads": 1, "distill.checkpoint_every": 10**6, "distill.log_every": 10**6})
    tag = f"{LEVELS_DIR[level]}-{method.split()[0]}-{seed}-{lr:g}-{os.getpid()}"
    out = wdir / f"student-{tag}"
    t0 = time.perf_counter()
    _, history = distill_stage(params, lay.prepared, wdir / f"base-{LEVELS_DIR[level]}", wdir / "cross_sft", out,
                               wdir / f"ckpt-{tag}")
    secs = time.perf_counter() - t0
    rows = [r for r in load_rows(lay.prepared, "eval") if r.task == "reasoning"]
    by_type = reliability(load_model(out), load_tokenizer(out), rows, params.evaluate,
                          load_detector(params.evaluate.refusal_detector), params.data.answer_format)
    shutil.rmtree(out, ignore_errors=True)
    counts = {t: sum(r.category == t for r in rows) for t in TYPES}
    acc = {t: by_type[f"reasoning/{t}"] for t in TYPES}
    wrong = LEVELS[level]

    def pooled(types: list[str]) -> float | None:
        n = sum(counts[t] for t in types)
        return sum(acc[t] * counts[t] for t in types) / n if n else None

    audit = {k: statistics.mean(h[k] for h in history if k in h) for k in AUDIT if any(k in h for h in history)}
    return {"accuracy": pooled(list(TYPES)), "acc_clean_types": pooled([t for t in TYPES if t not in wrong]),
            "acc_wrong_types": pooled(wrong), "by_type": acc, "seconds": round(secs, 1), **audit}


# ----------------------------------------------------------------------------- report
def _ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    m = statistics.mean(xs)
    return m, (T975[len(xs) - 1] * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def _pct(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def report(results: dict[str, Any], out: Path, seeds: list[int], steps: int) -> str:
    runs, teachers = results["runs"], results["teachers"]
    lr0 = 1e-3

    def acc(level: str, method: str, lr: float, field: str = "accuracy") -> dict[int, float]:
        got = {s: runs[key_of(level, method, s, lr)] for s in seeds if key_of(level, method, s, lr) in runs}
        return {s: r[field] for s, r in got.items() if r.get(field) is not None}

    lines = [f"Held-out reasoning accuracy (greedy, %), {len(seeds)} paired seeds, {steps} distill steps, lr {lr0:g}. "
             "Δ = paired difference to vanilla OPD with its 95% t-interval; **bold**: the interval excludes 0.", "",
             "| teacher (types wrong) | teacher acc. right / wrong types | method | accuracy (mean ± sd) | Δ vs vanilla "
             "| acc. on the teacher's right / wrong types | kept frac. | teacher reliability kept / dropped "
             "| weight mean / p90 / max |", "|---|---|---|---|---|---|---|---|---|"]
    for level in LEVELS:
        if level not in teachers:
            continue
        t = teachers[level]
        right = [t[x] for x in TYPES if x not in LEVELS[level]]
        wrong = [t[x] for x in LEVELS[level]]
        teacher_cell = f"{_pct(statistics.mean(right))} / {_pct(statistics.mean(wrong)) if wrong else '-'}"
        base = acc(level, "vanilla OPD", lr0)
        for method in METHODS:
            a = acc(level, method, lr0)
            if not a:
                continue
            vals = list(a.values())
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            delta = ""
            if method != "vanilla OPD":
                paired = [a[s] - base[s] for s in a if s in base]
                if len(paired) > 1:
                    m, h = _ci(paired)
                    cell = f"{100 * m:+.1f} [{100 * (m - h):+.1f}, {100 * (m + h):+.1f}]"
                    delta = f"**{cell}**" if (m - h) * (m + h) > 0 else cell
            rs = [runs[key_of(level, method, s, lr0)] for s in a]

            def mean_of(field: str, rs: list[dict[str, Any]] = rs) -> float | None:
                xs = [r[field] for r in rs if r.get(field) is not None]
                return statistics.mean(xs) if xs else None

            wr = mean_of("acc_wrong_types")
            split = f"{_pct(mean_of('acc_clean_types'))} / {_pct(wr) if wr is not None else '-'}"
            kept = mean_of("kept_frac")
            audit = (f"{_pct(mean_of('kept_reliability'))} / {_pct(mean_of('dropped_reliability'))}"
                     if kept is not None and mean_of("dropped_reliability") is not None else "")
            weights = (" / ".join(f"{mean_of(k):.2f}" for k in ("weight_mean", "weight_p90", "weight_max"))
                       if METHODS[method].get("fire.reweight") and mean_of("weight_p90") is not None else "")
            lines.append(f"| {level} ({len(LEVELS[level])}/6) | {teacher_cell} | {method} | "
                         f"{100 * statistics.mean(vals):.1f} ± {100 * sd:.1f} | {delta} | {split} | "
                         f"{_pct(kept) if kept is not None else ''} | {audit} | {weights} |")
    lines += ["", f"Learning-rate check at {LR_LEVEL} (accuracy %, mean ± sd over the seeds run at every lr):", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " | best |", "|---|" + "---|" * (len(LRS) + 1)]
    for method in LR_METHODS:
        per = {lr: acc(LR_LEVEL, method, lr) for lr in LRS}
        common = sorted(set.intersection(*(set(p) for p in per.values()))) if all(per.values()) else []
        if not common:
            continue
        means = {lr: statistics.mean(per[lr][s] for s in common) for lr in LRS}
        cells = [f"{100 * means[lr]:.1f} ± {100 * statistics.stdev([per[lr][s] for s in common]):.1f}"
                 if len(common) > 1 else f"{100 * means[lr]:.1f}" for lr in LRS]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | lr {max(means, key=means.get):g} (seeds {common}) |")
    secs = [r["seconds"] for r in runs.values()]
    lines += ["", f"{len(runs)} runs, {statistics.mean(secs):.0f} s of distillation each on one thread; "
              f"the whole study took {results.get('wall_minutes', float('nan')):.0f} min of wall time."]
    table = "\n".join(lines)
    (out / "fire_study.md").write_text(table + "\n")
    plot(results, out, seeds, lr0)
    return table


def plot(results: dict[str, Any], out: Path, seeds: list[int], lr: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    levels = [lv for lv in LEVELS if lv in results["teachers"]]
    xs = [len(LEVELS[lv]) / len(TYPES) for lv in levels]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, method in enumerate(METHODS):
        ms, es = [], []
        for lv in levels:
            a = [runs[k]["accuracy"] for s in seeds if (k := key_of(lv, method, s, lr)) in runs]
            ms.append(100 * statistics.mean(a) if a else float("nan"))
            es.append(100 * statistics.stdev(a) / math.sqrt(len(a)) if len(a) > 1 else 0.0)
        ax.errorbar([x + 0.006 * (i - 3.5) for x in xs], ms, yerr=es, marker="o", capsize=3, label=method,
                    linewidth=2.5 if method in ("vanilla OPD", "FiRe (q=0.2 + reweight)") else 1.2)
    ax.set_xticks(xs, [f"{lv}\n({len(LEVELS[lv])}/6 types wrong)" for lv in levels])
    ax.set_xlabel("teacher unreliability: fraction of problem types it was trained to get wrong")
    ax.set_ylabel("held-out reasoning accuracy (%)")
    ax.set_title(f"FiRe-OPD vs teacher reliability ({len(seeds)} paired seeds, mean ± s.e.)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "fire_study.png", dpi=120, metadata={"Software": None})


# ----------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--lr-seeds", type=int, nargs="+", default=[0, 1], help="seeds of the learning-rate check")
    ap.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=200, help="distill.steps of every run")
    ap.add_argument("--teacher-steps", type=int, default=None, help="teacher.sft.steps (default: params.yaml)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (ROOT / "data" / "prepared" / "train.jsonl").is_file():
        sys.exit("data/prepared missing: run `dvc repro prepare` first")
    work, store = args.out / "fire_study_work", args.out / "fire_study.json"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(store.read_text()) if store.is_file() else {}
    if results.get("steps", args.steps) != args.steps:
        sys.exit(f"{store} holds runs of {results['steps']} steps: move it aside to run {args.steps}")
    results |= {"steps": args.steps, "runs": results.get("runs", {}), "teachers": results.get("teachers", {})}
    t_start = time.perf_counter() - 60 * results.get("wall_minutes", 0.0)

    def save() -> None:
        results["wall_minutes"] = (time.perf_counter() - t_start) / 60
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(store)

    t_over = {"teacher.sft.steps": args.teacher_steps} if args.teacher_steps else {}
    ctx = multiprocessing.get_context("spawn")
    levels = [lv for lv in LEVELS if lv in args.levels or lv == "rho=0"]  # level 0 makes the shared student
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        results["teachers"]["rho=0"] = pool.submit(build_teacher, "rho=0", str(work), t_over).result()
        futs = {pool.submit(build_teacher, lv, str(work), t_over): lv for lv in levels if lv != "rho=0"}
        for f in as_completed(futs):
            results["teachers"][futs[f]] = f.result()
        save()
        print("teacher accuracy per type:", json.dumps(results["teachers"]), flush=True)
        jobs = [(lv, m, s, 1e-3) for s in args.seeds for lv in args.levels for m in args.methods]
        jobs += [(LR_LEVEL, m, s, lr) for s in args.lr_seeds for m in LR_METHODS for lr in LRS
                 if lr != 1e-3 and LR_LEVEL in args.levels and m in args.methods]
        todo = [j for j in jobs if key_of(*j) not in results["runs"]]
        print(f"{len(jobs)} runs, {len(todo)} to do", flush=True)
        futs = {pool.submit(run_one, *j, args.steps, str(work)): j for j in todo}
        for f in as_completed(futs):
            j = futs[f]
            results["runs"][key_of(*j)] = f.result()
            save()
            print(f"{key_of(*j)}: accuracy {results['runs'][key_of(*j)]['accuracy']:.3f} "
                  f"({results['runs'][key_of(*j)]['seconds']:.0f} s)", flush=True)
    print(report(results, args.out, args.seeds, args.steps))


if __name__ == "__main__":
    main()
