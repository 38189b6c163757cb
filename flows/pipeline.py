"""``opd_pipeline``: every stage in order, as subflows of one Prefect flow run and one MLflow parent run."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from mlflow import MlflowClient

from flows.cross_sft import cross_sft_flow
from flows.distill import distill_flow
from flows.evaluate import evaluate_flow
from flows.launch import run_stage_processes
from flows.prepare import prepare_flow
from flows.register import register_flow
from flows.teacher import teacher_flow
from opd import __version__
from opd.params import load
from tasks.tracking import PARENT_ENV, configure, pipeline_key, start_pipeline_run


@flow(name="opd_pipeline", version=__version__)
def opd_pipeline(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = load(params_path, overrides)  # fail before any stage runs on a bad setting
    # the parent run names this flow run (a worker's, a schedule's): the MLflow run found from the Prefect UI
    parent = start_pipeline_run(params, configure(params), pipeline_key(params), name="opd_pipeline",
                                tags={"prefect.flow_run_id": str(flow_run.id)})
    previous = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = parent
    kw = {"params_path": params_path, "overrides": overrides}
    try:
        result = {"mlflow_run_id": parent}
        for name, stage in (("prepare", prepare_flow), ("teacher", teacher_flow), ("cross_sft", cross_sft_flow),
                            ("distill", distill_flow),
                            ("evaluate", evaluate_flow), ("register", register_flow)):
            if name == "distill" and params.runtime.num_processes > 1:  # its own launch of N processes
                run_stage_processes(name, params, params_path, overrides)
                result[name] = {"processes": params.runtime.num_processes}
                continue
            result[name] = stage(**kw)
        return result
    except BaseException:
        MlflowClient().set_terminated(parent, "FAILED")
        raise
    finally:
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous
