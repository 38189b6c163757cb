"""Distill stage flow (a DVC stage runs it through `python -m flows distill`)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from opd import __version__
from opd.params import load
from tasks.distill import distill_student
from tasks.tracking import stage_run


@flow(name="distill", version=__version__)
def distill_flow(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = load(params_path, overrides)
    with stage_run("distill", params, inputs=["data/prepared", "models/base", "models/cross_sft"], outputs=["models/student"]):
        return distill_student(params)
