"""Distill stage task: distil the initial student from the teacher(s) with distill.method."""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import task

from opd import __version__
from opd.config import Params
from opd.paths import Layout
from opd.stages import distill_stage, write_curve, write_json
from tasks.tracking import log_curves, log_dataset, step_logger

CURVES = ["loss", "reverse_kl", "teacher_logprob", "response_length", "kept_frac", "weight_mean",
          "teacher_entropy", "student_entropy", "tokens_per_s"]


@task(name="distill", version=__version__)
def distill_student(params: Params) -> dict[str, Any]:
    lay = Layout.here()
    log_dataset(lay.prepared, "train")
    summary, history = distill_stage(params, lay.prepared, lay.models_base, lay.student, lay.checkpoints / "distill",
                                     step_logger("distill"))
    write_curve(lay.plots / "distill.csv", history)
    write_json(lay.metrics / "distill.json", summary)
    log_curves(history, CURVES, f"distill ({params.distill.method})", "plots/distill.png")
    mlflow.log_metric("distill.seconds", summary["seconds"])
    return summary
