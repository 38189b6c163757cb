"""Teacher stage flow (a DVC stage runs it through `python -m flows teacher`)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from opd import __version__
from opd.params import load
from tasks.teacher import train_base_models
from tasks.tracking import stage_run


@flow(name="teacher", version=__version__)
def teacher_flow(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = load(params_path, overrides)
    with stage_run("teacher", params, inputs=["data/prepared"], outputs=["models/base"]):
        return train_base_models(params)
