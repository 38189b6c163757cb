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
from opd.stages import evaluate_stage
from opd.paths import resolve
from tasks.outputs import plot_bars, write_metrics
from tasks.tracking import log_dataset

BARS = ["reasoning_accuracy", "reasoning_pass1", "harmful_refusal", "over_refusal", "over_refusal_sampled",
        "general_helpfulness", "borderline_helpfulness"]


@task(name="evaluate", version=__version__)
def evaluate_models(params: Params) -> dict[str, Any]:
    lay = Layout.here()
    log_dataset(lay.prepared, "eval")
    models = {"teacher": resolve(lay.models_base, "teacher"), "student_init": resolve(lay.models_base, "student_init"),
              "student": lay.student}
    if params.teacher.server is not None:  # a served teacher scores; evaluating it would need it to generate here
        del models["teacher"]
    table, samples = evaluate_stage(params, lay.prepared, models)
    write_metrics(lay.metrics / "eval.json", table)
    k = params.evaluate.generations_logged
    picked = {name: rows[:: max(1, len(rows) // max(k, 1))][:k] for name, rows in samples.items()}  # all tasks
    write_json(lay.plots / "eval_samples.json", picked)
    plot_bars(lay.plots / "eval.png", table, BARS, "eval split")
    log_evaluation(lay, table, picked)
    return table


def log_evaluation(lay: Layout, table: dict[str, dict[str, float]], picked: dict[str, list[dict[str, Any]]]) -> None:
    """Metrics per model, the generations table and the bar plot (``plots/eval.png``), on the active run."""
    mlflow.log_metrics({f"{name}.{m}": v for name, ms in table.items() for m, v in ms.items()})
    rows = [{"model": name, **s} for name, ss in picked.items() for s in ss]
    if rows:
        mlflow.log_table({c: [r.get(c) for r in rows] for c in rows[0]}, artifact_file="generations.json")
    mlflow.log_artifact(str(lay.plots / "eval.png"), "plots")


@task(name="restore-evaluation", version=__version__)
def restore_evaluation() -> dict[str, Any]:
    """Log an evaluation DVC did not rerun (its outputs were up to date) from the files it wrote:
    ``metrics/eval.json``, ``plots/eval_samples.json`` and ``plots/eval.png``; nothing is evaluated again."""
    lay = Layout.here()
    table = json.loads((lay.metrics / "eval.json").read_text())
    log_evaluation(lay, table, json.loads((lay.plots / "eval_samples.json").read_text()))
    mlflow.set_tag("opd.restored", "logged from metrics/eval.json and plots/eval_samples.json: the evaluate "
                                   "stage was up to date, this store lacked its run")
    return table
