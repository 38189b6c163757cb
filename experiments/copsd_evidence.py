"""COPSD evidence: safety gain next to the safety tax, 3 seeds, on the embedded world.

    python experiments/copsd_evidence.py            # after `dvc repro teacher` (or `make run`)

Every variant starts from the same initial student (a partly aligned model: it was taught refusals
for violence and illegal requests only) and the same teacher, with the project's settings; only
``seed`` changes between repeats, and seeds are paired: seed s gives every variant the same
Cross-SFT teacher, prompt draws and sampling stream. Variants, all in the pipeline's own code path:

- plain OPD: ``distill.method: opd``, the teacher sees the bare prompt (no constitution);
- constitution OPSD: ``distill.method: copsd`` with ``copsd.teacher: original`` (no Cross-SFT);
- COPSD: the ``cross_sft`` stage, then ``distill.method: copsd`` against the recalibrated teacher;
- COPSD + outcome: the reference's outcome path (``copsd.outcome_tasks``: reasoning, borderline and
  general rows get the checker's group-normalised sequence reward; safety rows the token reward);
- COPSD + sequence credit (``copsd.credit: sequence``), + forward KL (``copsd.fkl_coef: 0.5``,
  beta 0: params.yaml's default since this study) and + JSD (``copsd.fkl_beta: 0.5``): the credit
  and mass-covering levers one at a time;
- combinations: outcome + forward KL, and the outcome path on borderline rows alone, with and
  without JSD.

The default is the student with the best net score (safety gain - over-refusal rise - reasoning tax,
in points against the initial student), printed in a selection table with paired differences to COPSD.

Runs go to ``--workers`` processes of one torch thread each (on 2 cores, two one-thread runs do
more work per second than one two-thread run); the Cross-SFT teacher of a seed is trained once,
before that seed's COPSD variants.

The teachers themselves are evaluated on constitution-wrapped prompts too (``teacher (x_c)``), to
show the problem the world is built to have: the constitution-conditioned teacher is safe but
over-cautious, and Cross-SFT is meant to fix that before distillation.

Writes ``experiments/results/copsd_evidence.{json,md,png}``: a table (harmful refusal, over-refusal
greedy and sampled with their 95% bootstrap intervals over prompts, reasoning, helpfulness, length,
entropy, safety gain and safety tax against the initial student; mean ± sd over seeds) and a figure (safety vs helpfulness per run; response length and student
entropy along training). Results are saved after every run; a rerun skips what is there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tasks  # noqa: E402,F401  (environment)
import torch  # noqa: E402

from experiments.common import RESULTS, T975, quiet  # noqa: E402  (one worker set-up, one t table)
from opd.params import load  # noqa: E402
from opd.constitution import wrap  # noqa: E402
from opd.cross_sft import cross_sft_stage  # noqa: E402
from opd.evaluate import evaluate_model, load_detector, safety_tax  # noqa: E402
from opd.models import load_model, load_tokenizer  # noqa: E402
from opd.paths import Layout  # noqa: E402
from opd.stages import distill_stage, evaluate_stage  # noqa: E402
from opd.constitution import constitutions_of
from opd.data import load_rows
from opd.paths import resolve

OUTCOME = ["reasoning", "borderline", "general"]  # the reference's general-ability sources; safety keeps the token reward
NO_FKL = {"copsd.fkl_coef": 0.0}  # COPSD's mass-covering term off: every variant as it was measured
VARIANTS: dict[str, dict[str, Any]] = {
    "plain OPD": {"distill.method": "opd"},
    "constitution OPSD": {"distill.method": "copsd", "copsd.teacher": "original", **NO_FKL},
    "COPSD": {"distill.method": "copsd", **NO_FKL},
    "COPSD + outcome": {"distill.method": "copsd", "copsd.outcome_tasks": OUTCOME, **NO_FKL},
    "COPSD + sequence credit": {"distill.method": "copsd", "copsd.credit": "sequence", **NO_FKL},
    "COPSD + forward KL": {"distill.method": "copsd", "copsd.fkl_coef": 0.5, "copsd.fkl_beta": 0.0},  # = params.yaml
    "COPSD + JSD": {"distill.method": "copsd", "copsd.fkl_coef": 0.5, "copsd.fkl_beta": 0.5},
    "COPSD + outcome + forward KL": {"distill.method": "copsd", "copsd.outcome_tasks": OUTCOME,
                                     "copsd.fkl_coef": 0.5, "copsd.fkl_beta": 0.0},
    # after the grid above: the outcome path on the over-refusal probes alone (reasoning and general rows
    # keep the teacher's dense token reward), with and without the mass-covering term
    "COPSD + outcome on borderline": {"distill.method": "copsd", "copsd.outcome_tasks": ["borderline"], **NO_FKL},
    "COPSD + outcome on borderline + JSD": {"distill.method": "copsd", "copsd.outcome_tasks": ["borderline"],
                                            "copsd.fkl_coef": 0.5, "copsd.fkl_beta": 0.5},
}
BASELINE = "COPSD"  # the paired differences of the selection table are against it
SMOOTH = 20  # steps in the moving average of the training curves
COLUMNS = [("harmful_refusal", "harmful refusal %", 100), ("over_refusal", "over-refusal greedy %", 100),
           ("over_refusal_sampled", "over-refusal sampled %", 100), ("reasoning_accuracy", "reasoning %", 100),
           ("general_helpfulness", "general help.", 1), ("borderline_helpfulness", "borderline help.", 1),
           ("response_length", "length", 1), ("token_entropy", "entropy", 1), ("safety_gain", "safety gain (pts)", 100),
           ("safety_tax_reasoning_accuracy", "tax: reasoning (pts)", 100),
           ("safety_tax_general_helpfulness", "tax: general help.", 1)]
WITH_CI = {"over_refusal", "over_refusal_sampled"}  # cells that also show the mean 95% bootstrap interval over prompts


def teacher_on_constitution(params: Any, prepared: Path, path: Path) -> dict[str, float]:
    """A teacher's metrics when every eval prompt is wrapped in its category's constitution."""
    texts = constitutions_of(params, prepared)
    rows = [dataclasses.replace(r, prompt=wrap(r.prompt, r.category, texts)) for r in load_rows(prepared, "eval")]
    torch.manual_seed(params.seed)
    metrics, _ = evaluate_model(load_model(path), load_tokenizer(path), rows, params.evaluate,
                                load_detector(params.evaluate.refusal_detector))
    return metrics


# ----------------------------------------------------------------------------- work (in worker processes)
ONE_THREAD = {"runtime.threads": 1, "distill.checkpoint_every": 10**6}


def run_reference(work: str) -> dict[str, Any]:
    """The initial student on bare prompts and the original teacher on constitution-wrapped ones."""
    quiet()
    lay, base = Layout(ROOT), Path(work) / "base"
    params = load(lay.params, ONE_THREAD)
    table, _ = evaluate_stage(params, lay.prepared, {"s": resolve(base, "student_init")})
    return {"student-init": table["s"], "teacher (x_c)": teacher_on_constitution(params, lay.prepared,
                                                                                   resolve(base, "teacher"))}


def run_cross(seed: int, work: str) -> dict[str, Any]:
    """Cross-SFT of the teacher for one seed (shared by every COPSD variant of that seed), and the
    recalibrated teacher evaluated on constitution-wrapped prompts."""
    quiet()
    lay, wdir = Layout(ROOT), Path(work)
    p = load(lay.params, {"distill.method": "copsd", "seed": seed, **ONE_THREAD})
    mix, _ = cross_sft_stage(p, lay.prepared, wdir / "base", wdir / f"cross-{seed}", wdir / f"ckpt-cross-{seed}")
    return {"metrics": teacher_on_constitution(p, lay.prepared, wdir / f"cross-{seed}" / "teacher"), "mix": mix["mix"]}


def run_variant(name: str, seed: int, work: str, init: dict[str, float]) -> dict[str, Any]:
    """Distil the initial student with one variant and seed, evaluate it, return its metrics and curves."""
    quiet()
    lay, wdir = Layout(ROOT), Path(work)
    p = load(lay.params, {**VARIANTS[name], "seed": seed, **ONE_THREAD})
    tag = f"{name.replace(' ', '_').replace('+', 'p')}-{seed}-{os.getpid()}"
    out = wdir / f"student-{tag}"
    t0 = time.perf_counter()
    _, history = distill_stage(p, lay.prepared, wdir / "base", wdir / f"cross-{seed}", out, wdir / f"ckpt-{tag}")
    secs = time.perf_counter() - t0
    table, _ = evaluate_stage(p, lay.prepared, {"s": out})
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(wdir / f"ckpt-{tag}", ignore_errors=True)
    curve = [{k: h[k] for k in ("step", "response_length", "student_entropy") if k in h} for h in history]
    return {"metrics": table["s"] | safety_tax(init, table["s"]), "seconds": round(secs, 1), "curve": curve}


# ----------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    lay = Layout(ROOT)
    if not (lay.models_base / "manifest.json").is_file():
        sys.exit("models/base missing: run `dvc repro teacher` (or `make run`) first")
    work = args.out / "copsd_work"
    store = args.out / "copsd_evidence.json"
    results: dict[str, Any] = json.loads(store.read_text()) if store.is_file() else {}
    runs: dict[str, dict[str, Any]] = results.setdefault("runs", {})
    curves: dict[str, list[dict[str, float]]] = results.setdefault("curves", {})
    t_start = time.perf_counter() - 60 * results.get("wall_minutes", 0.0)

    def save() -> None:
        results["wall_minutes"] = (time.perf_counter() - t_start) / 60
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(store)

    def add(name: str, seed: int | None, **fields: Any) -> None:
        run = runs.setdefault(name, {"seeds": []})
        run["seeds"].append(seed)
        for k, v in fields.items():
            run.setdefault(k, []).append(v)

    base = work / "base"
    if not (base / "manifest.json").is_file():
        shutil.copytree(lay.models_base, base)
    needs_cross = {n for n in args.variants if load(lay.params, VARIANTS[n]).copsd.teacher == "cross_sft"
                   and VARIANTS[n].get("distill.method") == "copsd"}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        if "student-init" not in runs:
            ref = pool.submit(run_reference, str(work)).result()
            for name, m in ref.items():
                add(name, None, metrics=m)
            save()
        init = runs["student-init"]["metrics"][0]
        crossed = set(runs.get("Cross-SFT teacher (x_c)", {}).get("seeds", []))
        pending: dict[Any, tuple[str, int]] = {}

        def submit_variants(seed: int, with_cross: bool) -> None:
            for name in args.variants:
                if (name in needs_cross) == with_cross and seed not in runs.get(name, {}).get("seeds", []):
                    pending[pool.submit(run_variant, name, seed, str(work), init)] = (name, seed)

        for seed in args.seeds:
            if seed in crossed:
                submit_variants(seed, True)
            elif needs_cross:
                pending[pool.submit(run_cross, seed, str(work))] = ("Cross-SFT teacher (x_c)", seed)
        for seed in args.seeds:
            submit_variants(seed, False)
        print(f"{len(pending)} jobs queued", flush=True)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                name, seed = pending.pop(fut)
                res = fut.result()
                if name == "Cross-SFT teacher (x_c)":
                    add(name, seed, metrics=res["metrics"], mix=res["mix"])
                    submit_variants(seed, True)
                else:
                    add(name, seed, metrics=res["metrics"], seconds=res["seconds"])
                    curves[f"{name}/{seed}"] = res["curve"]
                save()
                m = res["metrics"]
                print(f"{name} seed {seed}: refusal {m['harmful_refusal']:.3f} over-refusal {m['over_refusal']:.3f} "
                      f"sampled {m.get('over_refusal_sampled', float('nan')):.3f} reasoning {m['reasoning_accuracy']:.3f} "
                      f"length {m['response_length']:.1f} entropy {m['token_entropy']:.3f}"
                      + (f" ({res['seconds']:.0f} s)" if "seconds" in res else ""), flush=True)
    write(results, args.out)


def cell(run: dict[str, Any], key: str, scale: float) -> str:
    """mean ± sd over seeds (one value: as is); for WITH_CI keys also the per-seed bootstrap interval,
    averaged over seeds."""
    xs = [m[key] * scale for m in run["metrics"] if key in m]
    if not xs:
        return "-"
    digits = 1 if scale == 100 or key == "response_length" else 2
    text = f"{xs[0]:.{digits}f}" if len(xs) == 1 else f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"
    bounds = [(m[f"{key}_ci_low"], m[f"{key}_ci_high"]) for m in run["metrics"] if f"{key}_ci_low" in m]
    if key in WITH_CI and bounds:
        lo, hi = (statistics.mean(b[i] for b in bounds) * scale for i in (0, 1))
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text


def net(m: dict[str, float], init: dict[str, float], over: str) -> float:
    """The selection score, in points: safety gain minus over-refusal rise minus reasoning tax, each
    against the initial student (``over``: the greedy or the sampled over-refusal)."""
    return 100 * ((m["harmful_refusal"] - init["harmful_refusal"]) - (m[over] - init[over])
                  - (init["reasoning_accuracy"] - m["reasoning_accuracy"]))


def selection(runs: dict[str, dict[str, Any]]) -> str:
    """How the default was chosen: each student's net score (greedy and sampled over-refusal), and its
    paired difference to COPSD seed by seed with a 95% t-interval."""
    init = runs["student-init"]["metrics"][0]
    base = dict(zip(runs[BASELINE]["seeds"], runs[BASELINE]["metrics"], strict=True))
    lines = ["Selection: net = safety gain - over-refusal rise - reasoning tax (points, against the initial "
             f"student); Δ = paired difference to {BASELINE} over the seeds, with its 95% t-interval.", "",
             "| student | net (greedy over-refusal) | Δ | net (sampled over-refusal) | Δ |", "|---|---|---|---|---|"]
    for name, run in runs.items():
        if run["seeds"][0] is None or "x_c" in name:
            continue
        cells = []
        for over in ("over_refusal", "over_refusal_sampled"):
            nets = [net(m, init, over) for m in run["metrics"]]
            deltas = [net(m, init, over) - net(base[s], init, over) for s, m in zip(run["seeds"], run["metrics"], strict=True)
                      if s in base]
            half = T975[len(deltas) - 1] * statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else 0.0
            cells += [f"{statistics.mean(nets):+.1f}", "" if name == BASELINE else f"{statistics.mean(deltas):+.1f} ± {half:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> None:
    runs = results["runs"]
    head = "| model | " + " | ".join(c[1] for c in COLUMNS) + " | seeds |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, run in runs.items():
        lines.append(f"| {name} | " + " | ".join(cell(run, k, s) for k, _, s in COLUMNS)
                     + f" | {len(run['metrics'])} |")
    table = "\n".join(lines)
    print(table)
    cats = sorted({k for r in runs.values() for m in r["metrics"] for k in m
                   if k.startswith("harmful_refusal_") and not k.endswith(("_ci_low", "_ci_high"))})
    per_cat = ["| model | " + " | ".join(c.removeprefix("harmful_refusal_") for c in cats) + " |",
               "|" + "---|" * (len(cats) + 1)]
    per_cat += [f"| {n} | " + " | ".join(cell(r, c, 100) for c in cats) + " |" for n, r in runs.items()]
    select = selection(runs)
    (out / "copsd_evidence.md").write_text(table + "\n\n" + select + "\n\nHarmful refusal % per category:\n\n"
                                           + "\n".join(per_cat) + "\n")
    print(select)
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
