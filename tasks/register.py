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
from opd.models import load_model, load_tokenizer
from opd.promotion import gate

CHALLENGER, CHAMPION = "challenger", "champion"


def _requirements() -> list[str]:
    import accelerate
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"accelerate=={accelerate.__version__}", "safetensors"]


@task(name="log-student-model", version=__version__, retries=2, retry_delay_seconds=5)
def log_student_model(path: Path, trust_remote_code: bool = False) -> str:
    model, tok = load_model(path, trust_remote_code), load_tokenizer(path, trust_remote_code)
    info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tok}, name="student",
                                         task="text-generation", pip_requirements=_requirements())
    return info.model_uri


@task(name="register-challenger", version=__version__, retries=2, retry_delay_seconds=5)
def register_challenger(params: Params, model_uri: str, metrics: dict[str, float]) -> str:
    name = params.tracking.registered_model
    run = mlflow.active_run()
    tags = {f"eval.{k}": f"{v:.6f}" for k, v in metrics.items()} | {
        "opd.version": __version__, "opd.method": params.distill.method,
        "opd.source_run": run.info.run_id if run else ""}
    mv = mlflow.register_model(model_uri, name, tags=tags)
    MlflowClient().set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version)


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
