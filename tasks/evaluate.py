"""Evaluate stage task: teacher, initial student and distilled student side by side."""

from __future__ import annotations

from typing import Any

from prefect import task

from opd import __version__
from opd.config import Params
from opd.paths import Layout
from opd.stages import evaluate_stage, resolve, write_json


@task(name="evaluate", version=__version__)
def evaluate_models(params: Params) -> dict[str, Any]:
    lay = Layout.here()
    models = {"teacher": resolve(lay.models_base, "teacher"), "student_init": resolve(lay.models_base, "student_init"),
              "student": lay.student}
    table, samples = evaluate_stage(params, lay.prepared, models)
    write_json(lay.metrics / "eval.json", table)
    k = params.evaluate.generations_logged
    write_json(lay.plots / "eval_samples.json",  # spread over all tasks
               {name: rows[:: max(1, len(rows) // max(k, 1))][:k] for name, rows in samples.items()})
    return table
