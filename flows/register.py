"""Register stage: the distilled student becomes a new `challenger` version, then the promotion gate."""

from __future__ import annotations

import json
from typing import Any

from prefect import flow

from opd import __version__
from opd.params import load
from opd.paths import Layout
from opd.data import write_json
from tasks.register import promote, register_challenger
from tasks.tracking import stage_run


INPUTS = ["models/student", "metrics/eval.json"]


@flow(name="register", version=__version__)
def register_flow(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = load(params_path, overrides)
    lay = Layout.here()
    with stage_run("register", params, inputs=INPUTS, outputs=["metrics/registry.json"]):
        evaluation = json.loads((lay.metrics / "eval.json").read_text())
        version = register_challenger(params, lay.student, evaluation)
        decision = promote(params)
        result = {"registered_model": params.tracking.registered_model, "version": version, **decision}
        write_json(lay.metrics / "registry.json", result)
    return result
