"""Registry tasks: log the distilled student (transformers flavour), register it as `challenger`,
and promote it to `champion` when it passes the gate. Only these calls retry (a tracking server
can fail transiently); the gate itself is deterministic (opd/promotion.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task

from opd import __version__
from opd.config import Params
from opd.data import digest
from opd.models import load_model, load_tokenizer
from opd.promotion import gate

CHALLENGER, CHAMPION = "challenger", "champion"
STUDENT_SHA = "opd.student_sha256"  # the version tag that names the exact student (opd.data.digest of its folder)


def _requirements() -> list[str]:
    import accelerate
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"accelerate=={accelerate.__version__}", "safetensors"]


def log_student_model(path: Path, trust_remote_code: bool = False) -> str:
    """The student in MLflow's transformers flavour, as an artifact of the active run; returns its URI."""
    model, tok = load_model(path, trust_remote_code), load_tokenizer(path, trust_remote_code)
    info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tok}, name="student",
                                         task="text-generation", pip_requirements=_requirements())
    return info.model_uri


def registered_version(name: str, student_sha: str) -> str | None:
    """The version of ``name`` that holds exactly this student (by content hash), if any."""
    try:
        found = MlflowClient().search_model_versions(f"name = '{name}' and tags.`{STUDENT_SHA}` = '{student_sha}'")
    except MlflowException:  # no such registered model yet
        return None
    return str(min(int(v.version) for v in found)) if found else None


@task(name="register-challenger", version=__version__, retries=2, retry_delay_seconds=5)
def register_challenger(params: Params, student: Path, metrics: dict[str, float], trust_remote_code: bool = False) -> str:
    """The student as the `challenger` version: a new version, unless one already holds this very
    student (same content hash: a rerun, a scheduled run of unchanged inputs), which is reused."""
    name, sha = params.tracking.registered_model, digest(student)
    version = registered_version(name, sha)
    if version is None:
        run = mlflow.active_run()
        tags = {f"eval.{k}": f"{v:.6f}" for k, v in metrics.items()} | {
            "opd.version": __version__, "opd.method": params.distill.method,
            "opd.source_run": run.info.run_id if run else "", STUDENT_SHA: sha}
        version = str(mlflow.register_model(log_student_model(student, trust_remote_code), name, tags=tags).version)
    MlflowClient().set_registered_model_alias(name, CHALLENGER, version)
    return version


def _by_alias(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def eval_metrics(version: Any) -> dict[str, float]:
    return {k[len("eval."):]: float(v) for k, v in version.tags.items() if k.startswith("eval.")}


@task(name="promote", version=__version__, retries=2, retry_delay_seconds=5)
def promote(params: Params) -> dict[str, Any]:
    """Move `champion` to the challenger when the gate passes; record why on the version either way."""
    client, name = MlflowClient(), params.tracking.registered_model
    challenger = _by_alias(client, name, CHALLENGER)
    if challenger is None:
        raise RuntimeError(f"registered model {name!r} has no '{CHALLENGER}' version: run the register stage first")
    champion = _by_alias(client, name, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        return {"version": challenger.version, "promoted": True, "reason": "already champion"}
    ok, reason = gate(eval_metrics(challenger), eval_metrics(champion) if champion else None, params.promote)
    client.set_model_version_tag(name, challenger.version, "promotion", "promoted" if ok else "rejected")
    client.set_model_version_tag(name, challenger.version, "promotion.reason", reason)
    if ok:
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
    return {"version": challenger.version, "promoted": ok, "reason": reason,
            "previous_champion": champion.version if champion else None}
