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
import queue
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
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
    the tracking server that open and close it are Prefect tasks with retries. When the stage failed
    because the server is gone, the stage's own error is what surfaces, not a failed bookkeeping call."""
    run_id, parent = open_stage_run(stage, params, inputs)
    run = mlflow.start_run(run_id=run_id)
    try:
        yield run
    except BaseException as err:
        if not isinstance(err, TrackingUnavailable):  # else the server is known to be gone: do not wait on it
            try:
                close_stage_run(run_id, parent, {"opd.error": f"{type(err).__name__}: {err}"[:4000]}, "FAILED")
            except Exception as close_err:
                warnings.warn(f"could not mark the {stage} run {run_id} FAILED: {close_err}", stacklevel=2)
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        raise
    root = Layout.here().root
    close_stage_run(run_id, parent, {f"opd.out.{o}.sha256": digest(root / o) for o in outputs
                                     if (root / o).exists()}, "FINISHED")
    mlflow.end_run()


def log_dataset(prepared: Path, split: str) -> None:
    """Attach a prepared split to the active run (MLflow computes its digest)."""
    import pandas as pd

    path = prepared / f"{split}.jsonl"
    ds = mlflow.data.from_pandas(pd.read_json(path, lines=True), source=str(path), name=f"prompts-{split}")
    mlflow.log_input(ds, context="training" if split == "train" else "evaluation")


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


class MetricStream:
    """Step metrics sent to the tracking server by a background thread.

    Why: a training step must never wait on the network. ``__call__`` only queues; the thread sends
    batches and, while the server fails, keeps them (at most ``max_pending``, oldest dropped first),
    backs off and tries again. ``close`` waits a bounded time and raises :class:`TrackingUnavailable`
    if metrics could not be sent, so the caller fails the stage only after its outputs are written.
    """

    def __init__(self, prefix: str, max_pending: int = 100_000, max_backoff: float = 30.0) -> None:
        from mlflow.entities import Metric

        self._metric, self._prefix = Metric, prefix
        self._run_id = mlflow.active_run().info.run_id
        self._uri = mlflow.get_tracking_uri()
        self._client = MlflowClient(self._uri)
        self._queue: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._max_pending, self._max_backoff = max_pending, max_backoff
        self.error: Exception | None = None
        self.unsent = self.dropped = 0
        self._thread = threading.Thread(target=self._send_loop, name=f"metrics-{prefix}", daemon=True)
        self._thread.start()

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        ts = int(time.time() * 1000)
        self._queue.put([self._metric(f"{self._prefix}.{k}", float(v), ts, step)
                         for k, v in metrics.items() if k != "step"])

    def _send_loop(self) -> None:
        pending: list[Any] = []
        backoff = 1.0
        while True:
            stopping = self._stop.is_set()
            with contextlib.suppress(queue.Empty):
                pending += self._queue.get(timeout=0.2)
                while True:
                    pending += self._queue.get_nowait()
            if len(pending) > self._max_pending:
                self.dropped += len(pending) - self._max_pending
                pending = pending[-self._max_pending:]
            try:
                while pending:  # MLflow takes at most 1,000 metrics per batch
                    self._client.log_batch(self._run_id, metrics=pending[:1000])
                    pending = pending[1000:]
                self.error, backoff = None, 1.0
            except Exception as err:  # the server is down or refusing: keep the metrics, retry later
                self.error = err
                if not stopping:
                    self._stop.wait(backoff)
                    backoff = min(2 * backoff, self._max_backoff)
            if stopping and (self._queue.empty() or self.error is not None):
                self.unsent = len(pending)
                return

    def close(self, timeout: float = 60.0) -> None:
        """Send what is left (one last try); raise :class:`TrackingUnavailable` naming the server if
        any metric was not sent."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive() or self.error is not None or self.dropped:
            lost = "an unknown number of" if self._thread.is_alive() else str(self.unsent + self.dropped)
            raise TrackingUnavailable(
                f"{lost} {self._prefix} step metrics could not be logged to the MLflow tracking server "
                f"{self._uri} (tracking.uri, or MLFLOW_TRACKING_URI): {self.error}; training was not "
                "interrupted and the stage's outputs are written")


class StepLog:
    """Training-loop callback: a compact console line (Prefect's run logger) and MLflow metrics
    through a :class:`MetricStream`. Used as a context around training and the writing of the stage's
    outputs: leaving it sends what is left, and raises :class:`TrackingUnavailable` only when the
    block itself succeeded (a training error is never masked by a tracking one)."""

    def __init__(self, stage: str) -> None:
        from prefect.logging import get_run_logger

        self._stage, self._logger, self._stream = stage, get_run_logger(), MetricStream(stage)

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        self._logger.info(f"{self._stage} step {step}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("step", "lr")))
        self._stream(step, metrics)

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        if exc_type is None:
            self._stream.close()
        else:
            with contextlib.suppress(TrackingUnavailable):
                self._stream.close()
