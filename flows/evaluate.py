"""Evaluate stage flow (a DVC stage runs it through `python -m flows evaluate`)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from opd import __version__
from opd.config import load
from tasks.evaluate import evaluate_models


@flow(name="evaluate", version=__version__)
def evaluate_flow(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return evaluate_models(load(params_path, overrides))
