"""Promote: move the `champion` alias to the current `challenger` when it passes the gate."""

from __future__ import annotations

from typing import Any

from prefect import flow

from opd import __version__
from opd.params import load
from tasks.register import promote
from tasks.tracking import configure


@flow(name="promote", version=__version__)
def promote_flow(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = load(params_path, overrides)
    configure(params)
    return promote(params)
