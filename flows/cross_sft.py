"""Cross-SFT stage flow (a DVC stage runs it through `python -m flows cross_sft`)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from opd import __version__
from opd.params import load
from tasks.cross_sft import recalibrate_teacher
from tasks.tracking import stage_run


@flow(name="cross_sft", version=__version__)
def cross_sft_flow(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = load(params_path, overrides)
    with stage_run("cross_sft", params, inputs=["data/prepared", "models/base"], outputs=["models/cross_sft"]):
        return recalibrate_teacher(params)
