"""Prepare stage: rows (embedded world or user data) -> GX validation -> data/prepared/."""

from __future__ import annotations

from typing import Any

from prefect import flow

from opd import __version__
from opd.params import load
from opd.paths import Layout
from tasks.prepare import log_prepared, validate, write_prepared
from tasks.tracking import stage_run


@flow(name="prepare", version=__version__)
def prepare_flow(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = load(params_path, overrides)
    out = Layout.here().prepared
    with stage_run("prepare", params, inputs=[], outputs=["data/prepared"]):
        validation = validate(params)  # the tasks stream the rows themselves: no table passes between them
        stats = write_prepared(validation, params, out)
        log_prepared(out, stats)
    return {"validation": validation["summary"], **stats}
