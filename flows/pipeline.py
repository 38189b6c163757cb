"""``opd_pipeline``: every stage in order, as subflows of one Prefect flow run."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.distill import distill_flow
from flows.evaluate import evaluate_flow
from flows.prepare import prepare_flow
from flows.teacher import teacher_flow
from opd import __version__
from opd.config import load


@flow(name="opd_pipeline", version=__version__)
def opd_pipeline(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    load(params_path, overrides)  # fail before any stage runs on a bad setting
    kw = {"params_path": params_path, "overrides": overrides}
    return {
        "prepare": prepare_flow(**kw),
        "teacher": teacher_flow(**kw),
        "distill": distill_flow(**kw),
        "evaluate": evaluate_flow(**kw),
    }
