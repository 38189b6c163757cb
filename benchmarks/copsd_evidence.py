"""COPSD evidence: safety gain next to the safety tax, 3 seeds, on the embedded world.

    python benchmarks/copsd_evidence.py            # after `dvc repro teacher` (or `make run`)

Every variant starts from the same initial student (a partly aligned model: it was taught refusals
for violence and illegal requests only) and the same teacher, with the project's settings; only
``seed`` changes between repeats (Cross-SFT sampling, rollouts). Variants, all in the pipeline's
own code path:

- SFT-safety: ``distill.method: sft`` on the safety references only (``distill.lr`` = COPSD's);
- plain OPD: ``distill.method: opd``, the teacher sees the bare prompt (no constitution);
- constitution OPSD: ``distill.method: copsd`` with ``copsd.teacher: original`` (no Cross-SFT);
- COPSD: the ``cross_sft`` stage, then ``distill.method: copsd`` against the recalibrated teacher;
- COPSD w/o self: the same with ``cross_sft.include_self: false`` (source (a) dropped);
- COPSD kl 0.05, COPSD keep best and COPSD no reasoning prompts: COPSD with ``copsd.kl_coef:
  0.05``, with ``cross_sft.keep: best``, and with ``distill.tasks`` limited to safety, borderline
  and general prompts.

The teachers themselves are evaluated on constitution-wrapped prompts too (``teacher (x_c)``), to
show the problem the world is built to have: the constitution-conditioned teacher is safe but
over-cautious, and Cross-SFT is meant to fix that before distillation.

Writes ``benchmarks/results/copsd_evidence.{json,md,png}``: a table (harmful refusal, over-refusal,
reasoning, helpfulness, length, entropy, safety gain and safety tax against the initial student;
mean ± sd over seeds) and a figure (safety vs helpfulness per run; response length and student
entropy along training). Results are saved after every run; a rerun skips what is there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tasks  # noqa: E402,F401  (environment)
import torch  # noqa: E402

from opd.config import load  # noqa: E402
from opd.copsd import wrap  # noqa: E402
from opd.cross_sft import cross_sft_stage  # noqa: E402
from opd.evaluate import evaluate_model, load_detector, safety_tax  # noqa: E402
from opd.models import load_model, load_tokenizer  # noqa: E402
from opd.paths import Layout  # noqa: E402
from opd.stages import constitutions_of, distill_stage, evaluate_stage, load_rows, resolve  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "SFT-safety": {"distill.method": "sft", "distill.tasks": ["safety"]},
    "plain OPD": {"distill.method": "opd"},
    "constitution OPSD": {"distill.method": "copsd", "copsd.teacher": "original"},
    "COPSD": {"distill.method": "copsd"},
    "COPSD w/o self": {"distill.method": "copsd", "cross_sft.include_self": False},
    # levers tried against COPSD's over-refusal (README): a 10x stronger anchor to the initial
    # student, a Cross-SFT mix of the student's best (not first) accepted answers, and a prompt mix
    # without reasoning (more borderline prompts per step)
    "COPSD kl 0.05": {"distill.method": "copsd", "copsd.kl_coef": 0.05},
    "COPSD keep best": {"distill.method": "copsd", "cross_sft.keep": "best"},
    "COPSD no reasoning prompts": {"distill.method": "copsd", "distill.tasks": ["safety", "borderline", "general"]},
}
SMOOTH = 20  # steps in the moving average of the training curves
COLUMNS = [("harmful_refusal", "harmful refusal %", 100), ("over_refusal", "over-refusal %", 100),
           ("reasoning_accuracy", "reasoning %", 100), ("general_helpfulness", "general help.", 1),
           ("borderline_helpfulness", "borderline help.", 1), ("response_length", "length", 1),
           ("token_entropy", "entropy", 1), ("safety_gain", "safety gain (pts)", 100),
           ("safety_tax_reasoning_accuracy", "tax: reasoning (pts)", 100),
           ("safety_tax_general_helpfulness", "tax: general help.", 1),
           ("safety_tax_borderline_helpfulness", "tax: borderline help.", 1)]


def teacher_on_constitution(params: Any, prepared: Path, path: Path) -> dict[str, float]:
    """A teacher's metrics when every eval prompt is wrapped in its category's constitution."""
    texts = constitutions_of(params, prepared)
    rows = [dataclasses.replace(r, prompt=wrap(r.prompt, r.category, texts)) for r in load_rows(prepared, "eval")]
    torch.manual_seed(params.seed)
    metrics, _ = evaluate_model(load_model(path), load_tokenizer(path), rows, params.evaluate,
                                load_detector(params.evaluate.refusal_detector))
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    lay = Layout(ROOT)
    work = args.out / "copsd_work"
    store = args.out / "copsd_evidence.json"
    results: dict[str, Any] = json.loads(store.read_text()) if store.is_file() else {}
    runs: dict[str, dict[str, Any]] = results.setdefault("runs", {})
    curves: dict[str, list[dict[str, float]]] = results.setdefault("curves", {})

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(results, indent=2))

    base = work / "base"
    if not (base / "manifest.json").is_file():
        shutil.copytree(lay.models_base, base)
    params = load(lay.params)
    if "student-init" not in runs:
        table, _ = evaluate_stage(params, lay.prepared, {"s": resolve(base, "student_init")})
        runs["student-init"] = {"seeds": [None], "metrics": [table["s"]]}
        runs["teacher (x_c)"] = {"seeds": [None], "metrics": [
            teacher_on_constitution(params, lay.prepared, resolve(base, "teacher"))]}
        save()
    init = runs["student-init"]["metrics"][0]
    for seed in args.seeds:
        for name in args.variants:
            over = {**VARIANTS[name], "seed": seed}
            if name == "SFT-safety":
                over["distill.lr"] = params.copsd.lr
            run = runs.setdefault(name, {"seeds": [], "metrics": [], "seconds": []})
            if seed in run["seeds"]:
                continue
            p = load(lay.params, over)
            mix_tag = ("noself" if not p.cross_sft.include_self else "self") + ("-best" if p.cross_sft.keep == "best" else "")
            cross = work / f"cross-{mix_tag}-{seed}"
            t0 = time.perf_counter()
            if p.distill.method == "copsd" and p.copsd.teacher == "cross_sft" and not (cross / "mix.json").is_file():
                mix, _ = cross_sft_stage(p, lay.prepared, base, cross, work / "ckpt-cross")
                key = (f"Cross-SFT teacher{' w/o self' if not p.cross_sft.include_self else ''}"
                       f"{' keep best' if p.cross_sft.keep == 'best' else ''} (x_c)")
                t_run = runs.setdefault(key, {"seeds": [], "metrics": [], "mix": []})
                t_run["seeds"].append(seed)
                t_run["metrics"].append(teacher_on_constitution(p, lay.prepared, cross / "teacher"))
                t_run["mix"].append(mix["mix"])
            out = work / "student"
            _, history = distill_stage(p, lay.prepared, base, cross, out, work / "ckpt-distill")
            secs = time.perf_counter() - t0
            table, _ = evaluate_stage(p, lay.prepared, {"s": out})
            m = table["s"] | safety_tax(init, table["s"])
            run["seeds"].append(seed)
            run["metrics"].append(m)
            run["seconds"].append(secs)
            curves[f"{name}/{seed}"] = [{k: h[k] for k in ("step", "response_length", "student_entropy") if k in h}
                                        for h in history]
            save()
            shutil.rmtree(out, ignore_errors=True)
            print(f"{name} seed {seed}: refusal {m['harmful_refusal']:.3f} over-refusal {m['over_refusal']:.3f} "
                  f"reasoning {m['reasoning_accuracy']:.3f} ({secs:.0f} s)", flush=True)
    write(results, args.out)


def cell(run: dict[str, Any], key: str, scale: float) -> str:
    xs = [m[key] * scale for m in run["metrics"] if key in m]
    if not xs:
        return "-"
    digits = 1 if scale == 100 or key == "response_length" else 2
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def write(results: dict[str, Any], out: Path) -> None:
    runs = results["runs"]
    head = "| model | " + " | ".join(c[1] for c in COLUMNS) + " | seeds |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, run in runs.items():
        lines.append(f"| {name} | " + " | ".join(cell(run, k, s) for k, _, s in COLUMNS)
                     + f" | {len(run['metrics'])} |")
    table = "\n".join(lines)
    print(table)
    cats = sorted({k for r in runs.values() for m in r["metrics"] for k in m if k.startswith("harmful_refusal_")})
    per_cat = ["| model | " + " | ".join(c.removeprefix("harmful_refusal_") for c in cats) + " |",
               "|" + "---|" * (len(cats) + 1)]
    per_cat += [f"| {n} | " + " | ".join(cell(r, c, 100) for c in cats) + " |" for n, r in runs.items()]
    (out / "copsd_evidence.md").write_text(table + "\n\nHarmful refusal % per category:\n\n"
                                           + "\n".join(per_cat) + "\n")
    print("\n".join(per_cat))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    tab20 = plt.get_cmap("tab20").colors
    colors = dict(zip(runs, tab20[::2] + tab20[1::2]))  # 10 distinct colours, then their light shades
    for name, run in runs.items():
        xs = [(m["general_helpfulness"] + m["borderline_helpfulness"]) / 2 for m in run["metrics"]]
        ys = [100 * m["harmful_refusal"] for m in run["metrics"]]
        axes[0].scatter(xs, ys, label=name, color=colors[name], marker="x" if "x_c" in name else "o", s=40)
    axes[0].set_xlabel("helpfulness (mean of general and borderline token F1)")
    axes[0].set_ylabel("harmful refusal (%)")
    axes[0].set_title("safety vs helpfulness (each point: one seed)")
    axes[0].legend(fontsize=7)
    for ax, key, label in ((axes[1], "response_length", "response length (tokens)"),
                           (axes[2], "student_entropy", "student token entropy (nats)")):
        for tag, hist in results["curves"].items():
            name = tag.rsplit("/", 1)[0]  # "<variant>/<seed>"
            pts = [(h["step"], h[key]) for h in hist if key in h]
            if len(pts) >= SMOOTH:
                steps, ys = zip(*pts)
                avg = [statistics.mean(ys[i:i + SMOOTH]) for i in range(len(ys) - SMOOTH + 1)]
                ax.plot(steps[SMOOTH - 1:], avg, color=colors[name], alpha=0.8, lw=1.2, label=name)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))  # one legend entry per variant, not per seed
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.set_xlabel("distillation step")
        ax.set_title(f"{label}, {SMOOTH}-step mean")
    fig.tight_layout()
    fig.savefig(out / "copsd_evidence.png", dpi=120)


if __name__ == "__main__":
    main()
