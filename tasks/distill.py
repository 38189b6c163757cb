"""Distill stage task: distil the initial student from the teacher(s) with distill.method."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlflow
from prefect import task
from prefect.cache_policies import NO_CACHE

from opd import __version__
from opd.config import Params
from opd.methods.base import inline
from opd.paths import Layout
from opd.stages import distill_stage
from tasks.outputs import plot_curves, write_metrics, write_steps
from tasks.step_log import StepLog
from tasks.tracking import log_dataset

CURVES = ["loss", "reverse_kl", "teacher_logprob", "response_length", "kept_frac", "weight_mean",
          "teacher_entropy", "student_entropy", "reward_mean", "tokens_per_s"]


def step_task(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """One unit of a distillation step (rollout, score, shape, update) as a Prefect task: visible in
    the flow run's task graph with its own state and timing. No retries (a failure here is
    deterministic), no caching or result persistence (inputs are tensors and models)."""
    return task(fn, name=name, version=__version__, cache_policy=NO_CACHE, persist_result=False)


@task(name="distill", version=__version__)
def distill_student(params: Params) -> dict[str, Any]:
    lay = Layout.here()
    log_dataset(lay.prepared, "train")
    with StepLog("distill") as log:
        summary, history = distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, lay.student,
                                         lay.checkpoints / "distill", log,
                                         unit=step_task if params.distill.step_tasks else inline)
        write_steps(lay.plots / "distill.csv", history)
        write_metrics(lay.metrics / "distill.json", summary)
        plot_curves(lay.plots / "distill.png", history, CURVES, f"distill ({params.distill.method})")
    mlflow.log_artifact(str(lay.plots / "distill.png"), "plots")
    mlflow.log_metric("distill.seconds", summary["seconds"])
    mlflow.log_metrics({f"distill.{k}": v for k, v in summary["template"].items()})
    for name, identity in summary.get("teacher_servers", {}).items():  # the teacher as its server described it
        mlflow.set_tags({f"opd.teacher_server.{name}.{k}": v for k, v in identity.items()})
    return summary
