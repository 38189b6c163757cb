"""Serve ``opd_pipeline`` as a Prefect deployment on the cron schedule in ``params.yaml: schedule``.

Schedules need a real Prefect server (the temporary one a plain flow call starts never fires
them)::

    prefect server start --host 127.0.0.1          # terminal 1 (http://127.0.0.1:4200)
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows serve   # terminal 2

The served process runs the scheduled (and manually triggered) flow runs itself, one at a time (a
deployment concurrency limit of one). A nightly run of unchanged inputs registers no new model
version: the register stage reuses the version that holds the same student.
"""

from __future__ import annotations

import os

from flows.pipeline import opd_pipeline
from opd.config import ConfigError
from opd.params import load


def require_server(what: str) -> None:
    """Schedules and workers need a real Prefect server (a temporary one never fires them)."""
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(f"{what} needs a Prefect server: start one with `prefect server start --host 127.0.0.1` "
                          "and set PREFECT_API_URL=http://127.0.0.1:4200/api (docs/deploy.md)")


def serve(params_path: str | None = None) -> None:
    params = load(params_path)
    require_server("serve")
    # one pipeline run at a time: two would train into the same folders and race for the registry
    opd_pipeline.serve(name=params.schedule.deployment, cron=params.schedule.cron, global_limit=1,
                       parameters={"params_path": params_path} if params_path else None)
