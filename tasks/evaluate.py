"""Evaluate stage task: teacher, initial student and distilled student side by side."""

from __future__ import annotations

import json
from typing import Any

import mlflow
from prefect import task

from opd import __version__
from opd.config import Params
from opd.paths import Layout
from opd.data import write_json
from opd.stages import evaluate_stage, resolve
from tasks.outputs import write_metrics
from tasks.tracking import log_dataset

BARS = ["reasoning_accuracy", "reasoning_pass1", "harmful_refusal", "over_refusal", "general_helpfulness",
        "borderline_helpfulness"]


@task(name="evaluate", version=__version__)
def evaluate_models(params: Params) -> dict[str, Any]:
    lay = Layout.here()
    log_dataset(lay.prepared, "eval")
    models = {"teacher": resolve(lay.models_base, "teacher"), "student_init": resolve(lay.models_base, "student_init"),
              "student": lay.student}
    table, samples = evaluate_stage(params, lay.prepared, models)
    write_metrics(lay.metrics / "eval.json", table)
    k = params.evaluate.generations_logged
    picked = {name: rows[:: max(1, len(rows) // max(k, 1))][:k] for name, rows in samples.items()}  # all tasks
    write_json(lay.plots / "eval_samples.json", picked)
    log_evaluation(table, picked)
    return table


def log_evaluation(table: dict[str, dict[str, float]], picked: dict[str, list[dict[str, Any]]]) -> None:
    """Metrics per model, the generations table and the bar plot, on the active run."""
    mlflow.log_metrics({f"{name}.{m}": v for name, ms in table.items() for m, v in ms.items()})
    rows = [{"model": name, **s} for name, ss in picked.items() for s in ss]
    if rows:
        mlflow.log_table({c: [r[c] for r in rows] for c in rows[0]}, artifact_file="generations.json")
    _bars(table)


@task(name="restore-evaluation", version=__version__)
def restore_evaluation() -> dict[str, Any]:
    """Log an evaluation DVC did not rerun (its outputs were up to date) from the files it wrote:
    ``metrics/eval.json`` and ``plots/eval_samples.json``; nothing is evaluated again."""
    lay = Layout.here()
    table = json.loads((lay.metrics / "eval.json").read_text())
    log_evaluation(table, json.loads((lay.plots / "eval_samples.json").read_text()))
    mlflow.set_tag("opd.restored", "logged from metrics/eval.json and plots/eval_samples.json: the evaluate "
                                   "stage was up to date, this store lacked its run")
    return table


def _bars(table: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in BARS if all(k in m for m in table.values())]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    width = 0.8 / max(len(table), 1)
    for i, (name, m) in enumerate(table.items()):
        ax.bar([j + i * width for j in range(len(keys))], [m[k] for k in keys], width, label=name)
    ax.set_xticks([j + width * (len(table) - 1) / 2 for j in range(len(keys))], keys, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("eval split")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/eval.png")
    plt.close(fig)
