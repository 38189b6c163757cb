"""MLflow tracking and lineage for every stage run.

Runs: one *pipeline* (parent) run per pipeline run and one nested run per stage. ``opd_pipeline``
creates its parent run and hands it to the stage flows; under ``dvc repro`` each stage is its own
process, so the parent is found by a *pipeline key* (``$OPD_PIPELINE_KEY`` when set, as ``make run``
does, else a hash of the git commit, the uncommitted diff and params.yaml): the stages of one
``dvc repro`` land under one parent.

Lineage tags on each stage run: git commit and dirty flag, the DVC hashes (from dvc.lock) of the
stage's inputs that an upstream stage produced, a sha256 of each output it wrote, the Prefect flow
run id, the task version, and (through ``mlflow.parentRunId``) the pipeline run. A failing stage
is marked FAILED with the error as the ``opd.error`` tag, and so is its pipeline run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from prefect import task

from opd import __version__
from opd.config import Params, to_flat_dict
from opd.data import digest
from opd.paths import Layout
from tasks import env

PARENT_ENV = "OPD_PARENT_RUN_ID"
KEY_ENV = "OPD_PIPELINE_KEY"
class TrackingUnavailable(RuntimeError):
    """The configured tracking server does not answer; the message names the setting to fix."""


def check_reachable(uri: str, tries: int = 3, timeout: float = 3.0) -> None:
    """An http(s) tracking server must answer ``/health`` within a few tries with backoff (about 20 s at
    most), so a dead server stops a stage before any training work, not minutes into it."""
    if not uri.startswith(("http://", "https://")):
        return
    import time
    import urllib.error
    import urllib.request

    err: Exception | None = None
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return
        except (urllib.error.URLError, OSError) as e:
            err = e
            if attempt + 1 < tries:
                time.sleep(2 ** attempt)
    raise TrackingUnavailable(
        f"the MLflow tracking server {uri} (tracking.uri, or MLFLOW_TRACKING_URI) did not answer after {tries} "
        f"tries ({err}); start it, point tracking.uri at a running server, or set tracking.uri: null for the "
        "project's local SQLite store")


def configure(params: Params) -> str:
    """Point MLflow at the tracking store and select the experiment; returns the experiment id.

    ``MLFLOW_TRACKING_URI`` as set when the process started wins, then ``tracking.uri``, then a
    SQLite store in the project folder. A server that does not answer fails fast (:func:`check_reachable`)."""
    uri = env.USER_TRACKING_URI or params.tracking.uri or f"sqlite:///{Layout.here().root / 'mlruns.db'}"
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = params.tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        local = uri.startswith("sqlite:") or uri.startswith("file:")
        artifacts = (Layout.here().root / "mlartifacts").as_uri() if local else None
        return mlflow.create_experiment(name, artifact_location=artifacts)
    mlflow.set_experiment(name)
    return exp.experiment_id


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=Layout.here().root, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_tags() -> dict[str, str]:
    return {"git.commit": _git("rev-parse", "HEAD") or "unknown",
            "git.dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no")))}


def pipeline_key(params: Params) -> str:
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    h = hashlib.sha256()
    for part in (_git("rev-parse", "HEAD"), _git("diff", "HEAD"), yaml.safe_dump(params.model_dump(), sort_keys=True)):
        h.update(part.encode())
    return h.hexdigest()[:16]


def start_pipeline_run(params: Params, exp_id: str, key: str, name: str = "pipeline") -> str:
    client = MlflowClient()
    run = client.create_run(exp_id, run_name=name, tags={"opd.kind": "pipeline", "opd.pipeline_key": key,
                                                         "opd.version": __version__, **git_tags()})
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def _log_params(client: MlflowClient, run_id: str, params: Params) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in to_flat_dict(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def parent_run(params: Params, exp_id: str) -> str:
    """The pipeline run this stage belongs to (see the module docstring)."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = pipeline_key(params)
    found = mlflow.search_runs([exp_id], filter_string=f"tags.`opd.pipeline_key` = '{key}'", max_results=1,
                               output_format="list")
    return found[0].info.run_id if found else start_pipeline_run(params, exp_id, key)


def dvc_input_hashes(inputs: list[str]) -> dict[str, str]:
    """md5 of each input as recorded in dvc.lock by the stage that produced it."""
    lock = Layout.here().root / "dvc.lock"
    if not lock.is_file():
        return {}
    outs: dict[str, str] = {}
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for o in stage.get("outs", []):
            if "md5" in o:
                outs[o["path"]] = o["md5"]
    return {f"dvc.in.{p}": outs[p] for p in inputs if p in outs}


def _prefect_flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "")
    except Exception:  # outside a flow
        return ""


@task(name="open-stage-run", version=__version__, retries=3, retry_delay_seconds=[2, 5, 10])
def open_stage_run(stage: str, params: Params, inputs: list[str]) -> tuple[str, str]:
    """Create the stage's nested run with params and lineage tags; returns (run id, parent run id).
    Retried: every call here goes to the tracking server."""
    exp_id = configure(params)
    parent = parent_run(params, exp_id)
    client = MlflowClient()
    tags = {"opd.stage": stage, "opd.version": __version__, "prefect.flow_run_id": _prefect_flow_run_id(),
            "opd.parent_run_id": parent, "mlflow.parentRunId": parent, **git_tags(), **dvc_input_hashes(inputs)}
    run = client.create_run(exp_id, run_name=stage, tags=tags)
    _log_params(client, run.info.run_id, params)
    return run.info.run_id, parent


@task(name="close-stage-run", version=__version__, retries=3, retry_delay_seconds=[2, 5, 10])
def close_stage_run(run_id: str, parent: str, tags: dict[str, str], status: str) -> None:
    """Output digests or the error as tags, then the final status of the stage and pipeline runs."""
    from mlflow.entities import RunTag

    client = MlflowClient()
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run_id, status)
    client.set_terminated(parent, status)


@contextlib.contextmanager
def stage_run(stage: str, params: Params, inputs: list[str], outputs: list[str]) -> Iterator[mlflow.ActiveRun]:
    """A nested MLflow run for one stage, with params, lineage tags and failure marking; the calls to
    the tracking server that open and close it are Prefect tasks with retries."""
    run_id, parent = open_stage_run(stage, params, inputs)
    with mlflow.start_run(run_id=run_id) as run:
        try:
            yield run
        except BaseException as err:
            close_stage_run(run_id, parent, {"opd.error": f"{type(err).__name__}: {err}"[:4000]}, "FAILED")
            raise
        root = Layout.here().root
        close_stage_run(run_id, parent, {f"opd.out.{o}.sha256": digest(root / o) for o in outputs
                                         if (root / o).exists()}, "FINISHED")


def log_dataset(prepared: Path, split: str) -> None:
    """Attach a prepared split to the active run (MLflow computes its digest)."""
    import pandas as pd

    path = prepared / f"{split}.jsonl"
    ds = mlflow.data.from_pandas(pd.read_json(path, lines=True), source=str(path), name=f"prompts-{split}")
    mlflow.log_input(ds, context="training" if split == "train" else "evaluation")


def step_metrics(prefix: str) -> Callable[[int, dict[str, float]], None]:
    """A training-loop callback that logs each step's metrics to the active run."""

    def log(step: int, metrics: dict[str, Any]) -> None:
        mlflow.log_metrics({f"{prefix}.{k}": float(v) for k, v in metrics.items() if k != "step"}, step=step)

    return log


def log_curves(history: list[dict[str, Any]], keys: list[str], title: str, artifact: str) -> None:
    """A PNG of per-step curves, for the MLflow UI (dvc plots HTML needs a CDN offline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in h for h in history)]
    if not history or not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, k in zip(axes[0], keys):
        ax.plot(steps, [h.get(k, float("nan")) for h in history])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    mlflow.log_figure(fig, artifact)
    plt.close(fig)


def step_logger(stage: str) -> Callable[[int, dict[str, float]], None]:
    """Training-loop callback: a compact console line (Prefect's run logger) and MLflow metrics."""
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    to_mlflow = step_metrics(stage)

    def log(step: int, metrics: dict[str, Any]) -> None:
        logger.info(f"{stage} step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                          if k not in ("step", "lr")))
        to_mlflow(step, metrics)

    return log
