"""Teacher stage task: train (or point at) the teacher and the initial student."""

from __future__ import annotations

from typing import Any

from prefect import task

from opd import __version__
from opd.config import Params
from opd.paths import Layout
from opd.stages import teacher_stage, write_curve, write_json
from tasks.logs import step_logger


@task(name="train-teacher-and-student", version=__version__)
def train_base_models(params: Params) -> dict[str, Any]:
    lay = Layout.here()
    summary, curves = teacher_stage(params, lay.prepared, lay.models_base, lay.checkpoints / "teacher",
                                    step_logger("teacher"))
    for name, history in curves.items():
        write_curve(lay.plots / f"{name}_sft.csv", history)
    write_json(lay.metrics / "teacher.json", summary)
    return summary
