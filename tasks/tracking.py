"""MLflow tracking and lineage for every stage run.

Runs: one *pipeline* (parent) run per pipeline run and one nested run per stage. ``opd_pipeline``
creates its parent run and hands it to the stage flows; under ``dvc repro`` each stage is its own
process, so the parent is found by a *pipeline key* (``$OPD_PIPELINE_KEY`` when set, as ``make run``
does, else a hash of the git commit, the uncommitted diff and params.yaml): the stages of one
``dvc repro`` land under one parent.

Lineage tags on each stage run: git commit and dirty flag, the DVC hashes (from dvc.lock) of the
stage's inputs (``dvc.in.*``) and of each output it wrote (``dvc.out.*``), the Prefect flow
run id, the task version, and (through ``mlflow.parentRunId``) the pipeline run. A failing stage
is marked FAILED with the error as the ``opd.error`` tag, and so is its pipeline run. A run left
RUNNING by a killed process (its host and pid are tags) is closed as KILLED by the next run of its
stage, which links it (``opd.continues_run``) when the settings match.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
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
from opd.allocator import in_effect
from opd.config import Params, redact
from opd.params import to_flat_dict
from opd.data import COLUMNS, REQUIRED, digest
from opd.paths import Layout
from tasks import env

PARENT_ENV = "OPD_PARENT_RUN_ID"
KEY_ENV = "OPD_PIPELINE_KEY"
class TrackingUnavailable(RuntimeError):
    """The configured tracking server does not answer; the message names the setting to fix."""


def tracking_uri(params: Params) -> str:
    """The store this process logs to: ``MLFLOW_TRACKING_URI`` as set when the process started, then
    ``tracking.uri``, then the project's SQLite store. A user (and password) inside the environment's URI
    move to MLflow's own ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (values already set
    there win), so the URI that is logged, printed and passed on carries no secret."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    uri = env.USER_TRACKING_URI or params.tracking.uri or f"sqlite:///{store_root() / 'mlruns.db'}"
    parts = urlsplit(uri)
    if not uri.startswith(("http://", "https://")) or "@" not in parts.netloc:
        return uri
    if parts.username:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username))
    if parts.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    clean = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if env.USER_TRACKING_URI:
        os.environ["MLFLOW_TRACKING_URI"] = clean  # the stages this process starts read the clean one
    return clean


def _auth_headers() -> dict[str, str]:
    """MLflow's own credential variables as an HTTP header (the /health check goes around MLflow's client)."""
    import base64

    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password is not None:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


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
            with urllib.request.urlopen(urllib.request.Request(uri.rstrip("/") + "/health", headers=_auth_headers()),
                                        timeout=timeout):
                return
        except (urllib.error.URLError, OSError) as e:
            err = e
            if attempt + 1 < tries:
                time.sleep(2 ** attempt)
    raise TrackingUnavailable(redact(
        f"the MLflow tracking server {uri} (tracking.uri, or MLFLOW_TRACKING_URI) did not answer after {tries} "
        f"tries ({err}); start it, point tracking.uri at a running server, or set tracking.uri: null for the "
        "project's local SQLite store"))


def store_root() -> Path:
    """The folder of the default (SQLite) store: the project's, also when DVC runs an experiment in a
    temporary copy (``dvc exp run --temp`` / ``--queue``): DVC then sets ``DVC_ROOT`` to the project,
    and a store in the copy would be deleted with it."""
    return Path(os.environ.get("DVC_ROOT") or Layout.here().root).resolve()


def configure(params: Params) -> str:
    """Point MLflow at the tracking store and select the experiment; returns the experiment id.

    ``MLFLOW_TRACKING_URI`` as set when the process started wins, then ``tracking.uri``, then a
    SQLite store in the project folder (:func:`store_root`); credentials go through MLflow's own
    variables (:func:`tracking_uri`). A server that does not answer fails fast (:func:`check_reachable`)."""
    uri = tracking_uri(params)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = params.tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        local = uri.startswith("sqlite:") or uri.startswith("file:")
        artifacts = (store_root() / "mlartifacts").as_uri() if local else None
        return mlflow.create_experiment(name, artifact_location=artifacts)
    mlflow.set_experiment(name)
    return exp.experiment_id


# what the pipeline writes and commits: a stage changing them neither dirties the
# commit nor starts a new pipeline run
OUTPUTS = ("dvc.lock", "metrics", "plots", "data/user_inputs.json")
SOURCES = (".", *(f":(exclude){o}" for o in OUTPUTS))  # git pathspec: the project but the outputs


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=Layout.here().root, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_tags() -> dict[str, str]:
    """The commit, and whether anything but the pipeline's own outputs (:data:`OUTPUTS`) differs from it."""
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", *SOURCES)
    return {"git.commit": _git("rev-parse", "HEAD") or "unknown", "git.dirty": str(bool(changed))}


def dvc_remote(root: Path) -> str | None:
    """The project's default DVC remote (``dvc remote add -d NAME URL``) as a URL with any user and
    password removed, read from ``.dvc/config`` and ``.dvc/config.local`` (no DVC process: ~3 s each);
    None without one. A registered version records it next to its student's md5, so ``dvc pull`` from
    any clone fetches that student (docs/deploy.md)."""
    import configparser

    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read([root / ".dvc" / "config", root / ".dvc" / "config.local"])
    name = cfg.get("core", "remote", fallback=None)
    # DVC (configobj) writes the section as ['remote "NAME"']
    url = next((cfg.get(sec, "url", fallback=None) for sec in cfg.sections() if sec.strip("'") == f'remote "{name}"'), None)
    return redact(url) if name and url else None


def pipeline_key(params: Params) -> str:
    """What groups the stage runs of one pipeline under one parent run: ``$OPD_PIPELINE_KEY`` (``make
    run`` sets one per run), else the DVC experiment's name (``dvc exp run``, also ``--temp`` and
    ``--queue``), else a hash of the commit, the uncommitted changes to anything but the pipeline's
    own outputs, and the settings (plain ``dvc repro``: every stage sees the same key)."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    if os.environ.get("DVC_EXP_NAME"):
        return f"exp-{os.environ['DVC_EXP_NAME']}-{os.environ.get('DVC_EXP_BASELINE_REV', '')[:8]}"
    h = hashlib.sha256()
    diff = _git("diff", "HEAD", "--", *SOURCES)
    for part in (_git("rev-parse", "HEAD"), diff, yaml.safe_dump(params.model_dump(), sort_keys=True)):
        h.update(part.encode())
    return h.hexdigest()[:16]


def start_pipeline_run(params: Params, exp_id: str, key: str, name: str = "pipeline",
                       tags: dict[str, str] | None = None) -> str:
    client = MlflowClient()
    run = client.create_run(exp_id, run_name=name, tags={"opd.kind": "pipeline", "opd.pipeline_key": key,
                                                         "opd.version": __version__, **git_tags(), **(tags or {})})
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


def dvc_hashes(kind: str, paths: list[str]) -> dict[str, str]:
    """``dvc.<kind>.<path>``: the DVC md5 (:func:`opd.data.digest`) of each path as it is now, so a
    stage's inputs match the outputs of the stage that wrote them and dvc.lock, also when the stage
    runs outside DVC (the Prefect pipeline, a schedule) and dvc.lock describes another state."""
    root = Layout.here().root
    return {f"dvc.{kind}.{p}": digest(root / p) for p in paths if (root / p).exists()}


def _prefect_flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "")
    except Exception:  # outside a flow
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def params_hash(params: Params) -> str:
    return hashlib.sha256(yaml.safe_dump(params.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def close_killed_runs(client: MlflowClient, exp_id: str, stage: str, settings: str, by: str) -> str | None:
    """Runs of ``stage`` left RUNNING by a process of this machine that no longer exists (kill -9, the
    OOM killer, a lost node) are closed as KILLED, with ``opd.killed`` saying so and naming ``by``,
    the run that found them. Returns the newest one with the same settings: the run a resumed stage
    continues (a run of another machine, or of a live process, is left alone)."""
    host = socket.gethostname()
    runs = client.search_runs([exp_id], order_by=["attributes.start_time DESC"], max_results=100,
                              filter_string=f"tags.`opd.stage` = '{stage}' and attributes.status = 'RUNNING' "
                                            f"and tags.`opd.host` = '{host}'")
    continued = None
    for run in runs:
        pid = int(run.data.tags.get("opd.pid", "0") or 0)
        if run.info.run_id == by or not pid or _alive(pid):
            continue
        client.set_tag(run.info.run_id, "opd.killed", f"process {pid} on {host} ended without closing this run; "
                                                      f"closed by run {by}")
        client.set_terminated(run.info.run_id, "KILLED")
        if continued is None and run.data.tags.get("opd.params_sha") == settings:
            continued = run.info.run_id
    return continued


def _retry_unless_unreachable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: a server that did not answer its health check (already tried with
    backoff) is not tried again; other tracking errors are."""
    try:
        state.result()
    except TrackingUnavailable:
        return False
    except Exception:  # noqa: BLE001  (any other failure: retried)
        return True
    return True


@task(name="open-stage-run", version=__version__, retries=3, retry_delay_seconds=[2, 5, 10],
      retry_condition_fn=_retry_unless_unreachable)
def open_stage_run(stage: str, params: Params, inputs: list[str]) -> tuple[str, str]:
    """Create the stage's nested run with params and lineage tags; returns (run id, parent run id).
    A run of this stage that a killed process left RUNNING is closed, and linked from the new one
    (``opd.continues_run``) when the settings are the same. Retried: every call here goes to the
    tracking server."""
    exp_id = configure(params)
    parent = parent_run(params, exp_id)
    client = MlflowClient()
    settings = params_hash(params)
    tags = {"opd.stage": stage, "opd.version": __version__, "prefect.flow_run_id": _prefect_flow_run_id(),
            "opd.parent_run_id": parent, "mlflow.parentRunId": parent, "opd.host": socket.gethostname(),
            "opd.pid": str(os.getpid()), "opd.params_sha": settings,
            "opd.allocator": in_effect(params.runtime.allocator), **git_tags(), **dvc_hashes("in", inputs)}
    run = client.create_run(exp_id, run_name=stage, tags=tags)
    killed = close_killed_runs(client, exp_id, stage, settings, run.info.run_id)
    if killed:
        client.set_tag(run.info.run_id, "opd.continues_run", killed)
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
    close_stage_run(run_id, parent, dvc_hashes("out", outputs), "FINISHED")
    mlflow.end_run()


def log_dataset(prepared: Path, split: str) -> None:
    """Attach a prepared split to the active run: its source, the row schema and the DVC md5 of
    the file (read in blocks: a large split is never loaded to be logged)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    path = prepared / f"{split}.jsonl"
    schema = Schema([ColSpec("string", c, required=c in REQUIRED) for c in COLUMNS])
    ds = MetaDataset(resolve_dataset_source(str(path)), name=f"prompts-{split}", digest=digest(path)[:16], schema=schema)
    mlflow.log_input(ds, context="training" if split == "train" else "evaluation")

