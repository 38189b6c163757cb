"""Serve ``opd_pipeline`` as a Prefect deployment on the cron schedule in ``params.yaml: schedule``.

Schedules need a real Prefect server (the temporary one a plain flow call starts never fires
them)::

    prefect server start --host 127.0.0.1          # terminal 1 (http://127.0.0.1:4200)
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows serve   # terminal 2

The served process runs the scheduled (and manually triggered) flow runs itself.
"""

from __future__ import annotations

import os

from flows.pipeline import opd_pipeline
from opd.config import ConfigError, load


def serve(params_path: str | None = None) -> None:
    params = load(params_path)
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("serve needs a Prefect server: start one with `prefect server start --host 127.0.0.1` "
                          "and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    opd_pipeline.serve(name=params.schedule.deployment, cron=params.schedule.cron,
                       parameters={"params_path": params_path} if params_path else None)
