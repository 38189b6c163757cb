"""Distill stage task: distil the initial student from the teacher with distill.method."""

from __future__ import annotations

from typing import Any

from prefect import task

from opd import __version__
from opd.config import Params
from opd.paths import Layout
from opd.stages import distill_stage, write_curve, write_json
from tasks.logs import step_logger


@task(name="distill", version=__version__)
def distill_student(params: Params) -> dict[str, Any]:
    lay = Layout.here()
    summary, history = distill_stage(params, lay.prepared, lay.models_base, lay.student, lay.checkpoints / "distill",
                                     step_logger("distill"))
    write_curve(lay.plots / "distill.csv", history)
    write_json(lay.metrics / "distill.json", summary)
    return summary
