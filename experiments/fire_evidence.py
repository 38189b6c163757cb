"""FiRe-OPD evidence: student-init, vanilla OPD, FiRe and its ablations, 3 seeds, on the embedded world.

    python experiments/fire_evidence.py            # after `dvc repro teacher` (or `make run`)

Every variant distils the same initial student from the same teacher(s) with the project's
``distill`` settings; only ``seed`` (the rollout / sampling RNG) changes between repeats. Settings:

- single: one teacher for every row (strong-to-weak);
- multi: rows routed by their ``teacher`` field to a reasoning teacher and a safety/general teacher,
  each trained in the teacher stage on its own tasks only.

Prints a markdown table of eval reasoning accuracy (greedy exact match; mean and spread over
seeds) and writes ``experiments/results/fire_evidence.{json,md,png}``. Results are saved after
every run and a rerun skips what is already there, so an interrupted sweep resumes. The base
models are copied into the work folder first: a concurrent ``dvc repro`` deletes ``models/base``
while it re-runs the teacher stage.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.common import RESULTS  # noqa: E402

import tasks  # noqa: E402,F401  (environment)
from opd.params import load  # noqa: E402
from opd.paths import Layout  # noqa: E402
from opd.stages import distill_stage, evaluate_stage, teacher_stage  # noqa: E402
from opd.paths import resolve

VARIANTS: dict[str, dict[str, object]] = {
    "vanilla OPD": {"distill.method": "opd"},
    "FiRe": {"distill.method": "fire"},
    "filter only": {"distill.method": "fire", "fire.reweight": False},
    "reweight only": {"distill.method": "fire", "fire.filter": False},
    "hard selection (TIP-like)": {"distill.method": "fire", "fire.filter": False, "fire.reweight": False,
                                  "fire.token_select": True},
}
MULTI_TEACHERS = {
    "reasoning": {"sft": {"tasks": ["reasoning"]}},
    "general": {"sft": {"tasks": ["safety", "borderline", "general"], "steps": 250}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=["single", "multi"], choices=["single", "multi"])
    ap.add_argument("--steps", type=int, default=None, help="distill.steps (default: params.yaml)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    lay = Layout(ROOT)
    work = args.out / "fire_work"
    store = args.out / "fire_evidence.json"
    results: dict[str, dict[str, list[float]]] = json.loads(store.read_text()) if store.is_file() else {}

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(results, indent=2))

    base_over: dict[str, object] = {"distill.steps": args.steps} if args.steps else {}
    for setting in args.settings:
        base, over = work / "single_base", dict(base_over)
        if setting == "single" and not (base / "manifest.json").is_file():
            shutil.copytree(lay.models_base, base)
        if setting == "multi":
            base = work / "multi_base"
            if not (base / "manifest.json").is_file():
                params = load(lay.params, {"teachers": MULTI_TEACHERS})  # arch: the default teacher's
                teacher_stage(params, lay.prepared, base, work / "ckpt")
            over = {**over, "distill.routing": "by_row", "teachers": MULTI_TEACHERS}
        if f"{setting}/student-init" not in results:
            init = load(lay.params, over)
            table, _ = evaluate_stage(init, lay.prepared, {"student-init": resolve(base, "student_init")})
            results[f"{setting}/student-init"] = {"reasoning_accuracy": [table["student-init"]["reasoning_accuracy"]],
                                                  "seconds": [0.0], "seeds": [None]}
            save()
        for name, v_over in VARIANTS.items():
            key = f"{setting}/{name}"
            results.setdefault(key, {"reasoning_accuracy": [], "seconds": [], "seeds": []})
            for seed in args.seeds:
                if seed in results[key]["seeds"]:
                    continue
                params = load(lay.params, {**over, **v_over, "seed": seed})
                t0 = time.perf_counter()
                out = work / f"{setting}-{name.split()[0]}-{seed}"
                distill_stage(params, lay.prepared, base, work / "cross_sft", out, work / "ckpt-distill")
                secs = time.perf_counter() - t0
                table, _ = evaluate_stage(params, lay.prepared, {"s": out})
                results[key]["reasoning_accuracy"].append(table["s"]["reasoning_accuracy"])
                results[key]["seconds"].append(secs)
                results[key]["seeds"].append(seed)
                save()
                shutil.rmtree(out, ignore_errors=True)
                print(f"{key} seed {seed}: reasoning {table['s']['reasoning_accuracy']:.3f} ({secs:.0f} s)", flush=True)
    write(results, args.out, args.seeds)


def fmt(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def write(results: dict[str, dict[str, list[float]]], out: Path, seeds: list[int]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| setting | method | eval reasoning acc. % (mean ± sd) | per-seed % | s / run |",
             "|---|---|---|---|---|"]
    for key, r in results.items():
        setting, name = key.split("/", 1)
        acc = r["reasoning_accuracy"]
        if not acc:
            continue
        lines.append(f"| {setting} | {name} | {fmt(acc)} | {', '.join(f'{100 * a:.1f}' for a in acc)} | "
                     f"{statistics.mean(r['seconds']):.0f} |")
    table = "\n".join(lines)
    print(table)
    (out / "fire_evidence.md").write_text(table + f"\n\nseeds: {seeds}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({k.split("/")[0] for k in results}, key=["single", "multi"].index)
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        keys = [k for k in results if k.startswith(setting + "/") and results[k]["reasoning_accuracy"]]
        means = [100 * statistics.mean(results[k]["reasoning_accuracy"]) for k in keys]
        sds = [100 * statistics.stdev(results[k]["reasoning_accuracy"]) if len(results[k]["reasoning_accuracy"]) > 1
               else 0 for k in keys]
        ax.bar(range(len(keys)), means, yerr=sds, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(keys)), [k.split("/", 1)[1] for k in keys], rotation=30, ha="right")
        ax.set_ylabel("eval reasoning accuracy (%)")
        ax.set_title(f"{setting}-teacher, {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(out / "fire_evidence.png", dpi=120)


if __name__ == "__main__":
    main()
