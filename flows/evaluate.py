"""Evaluate stage flow (a DVC stage runs it through `python -m flows evaluate`)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from opd import __version__
from opd.params import load
from tasks.evaluate import evaluate_models
from tasks.tracking import stage_run


INPUTS = ["data/prepared", "models/base", "models/student"]


@flow(name="evaluate", version=__version__)
def evaluate_flow(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = load(params_path, overrides)
    with stage_run("evaluate", params, inputs=INPUTS, outputs=["metrics/eval.json"]):
        return evaluate_models(params)
