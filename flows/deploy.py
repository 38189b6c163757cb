"""Put ``opd_pipeline`` on a Prefect work pool: ``python -m flows deploy [--source URL] [--set k=v ...]``.

Where ``serve`` keeps one process running the schedule, a deployment on a work pool is run by any
``prefect worker start --pool NAME`` on any machine that can reach the Prefect server: the worker
fetches the code from ``--source`` (this folder by default; a git URL of the repository for workers
elsewhere), and runs the pipeline with the deployment's parameters, so every worker runs the same
settings (``--params`` and the ``--set`` overrides travel with it). The pool (``schedule.work_pool``)
is created as a ``process`` pool when it does not exist; ``docker`` and ``kubernetes`` pools are the
next step (docs/deploy.md). One run at a time (a concurrency limit of one): two would train into the
same folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.pipeline import opd_pipeline
from flows.serve import require_server
from opd.config import Params

ENTRYPOINT = "flows/pipeline.py:opd_pipeline"
ROOT = Path(__file__).resolve().parent.parent


def ensure_pool(name: str) -> str:
    """The pool's type; a missing pool is created as a ``process`` pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type
        except ObjectNotFound:
            return client.create_work_pool(WorkPoolCreate(name=name, type="process")).type


def deploy(params: Params, params_path: str | None = None, overrides: dict[str, Any] | None = None,
           source: str | None = None) -> str:
    """Create or update the deployment of ``params`` (read from ``params_path`` with ``overrides``, which
    travel to the workers); returns its id."""
    require_server("deploy")
    s = params.schedule
    pool_type = ensure_pool(s.work_pool)
    flow = opd_pipeline.from_source(source=source or str(ROOT), entrypoint=ENTRYPOINT)
    return str(flow.deploy(name=s.deployment, work_pool_name=s.work_pool, cron=s.cron, concurrency_limit=1,
                           parameters={"params_path": params_path, "overrides": overrides or None},
                           description=f"opd_pipeline on the {pool_type} pool {s.work_pool!r}", build=False,
                           push=False, print_next_steps=False))
