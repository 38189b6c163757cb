"""Teacher stage task: train (or point at) the teacher(s) and the initial student."""

from __future__ import annotations

import contextlib
from typing import Any

import mlflow
from prefect import task

from opd import __version__
from opd.config import Params
from opd.paths import Layout
from opd.stages import teacher_stage
from tasks.outputs import plot_curves, write_metrics, write_steps
from tasks.step_log import StepLog
from tasks.tracking import log_dataset


@task(name="train-teacher-and-student", version=__version__)
def train_base_models(params: Params) -> dict[str, Any]:
    lay = Layout.here()
    log_dataset(lay.prepared, "train")
    with contextlib.ExitStack() as logs:  # metrics teacher_sft.*, student_init_sft.*: one curve per model
        summary, curves = teacher_stage(params, lay.prepared, lay.models_base, lay.checkpoints / "teacher",
                                        lambda name: logs.enter_context(StepLog(f"{name}_sft")))
        for name, history in curves.items():
            write_steps(lay.plots / f"{name}_sft.csv", history)
            plot_curves(lay.plots / f"{name}_sft.png", history, ["loss", "grad_norm"], f"SFT of {name}")
        write_metrics(lay.metrics / "teacher.json", summary)
    for name in curves:
        mlflow.log_artifact(str(lay.plots / f"{name}_sft.png"), "plots")
    mlflow.log_metrics({f"{n}.{k}": float(v) for n, s in summary.items() for k, v in s.items()
                        if isinstance(v, (int, float)) and v is not None})
    return summary
