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
from opd.model_card import with_evaluation
from opd.models import load_model, load_tokenizer
from opd.paths import Layout
from opd.promotion import gate
from opd.rollout import stop_ids
from tasks.tracking import dvc_remote, git_tags

CHALLENGER, CHAMPION = "challenger", "champion"
STUDENT_MD5 = "opd.student_md5"  # the version tag naming the exact student: its folder's DVC md5 (as in dvc.lock)


def _requirements() -> list[str]:
    import accelerate
    import torch
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"accelerate=={accelerate.__version__}", "safetensors"]


def log_student_model(path: Path, params: Params, card: str, metrics: dict[str, float]) -> str:
    """The student in MLflow's transformers flavour, as a chat model (``llm/v1/chat``: the pyfunc
    applies the tokenizer's chat template to ``messages`` and decodes as the evaluation did, greedy,
    ``evaluate.max_new_tokens``, stopping at the model's stop ids), with its card and its evaluation
    as the logged model's metrics (shown and sortable on the registered version). Returns its URI."""
    from huggingface_hub import ModelCard

    trust = params.runtime.trust_remote_code
    model, tok = load_model(path, trust), load_tokenizer(path, trust)
    generation = {"max_new_tokens": params.evaluate.max_new_tokens, "do_sample": False,
                  "eos_token_id": stop_ids(tok, model), "pad_token_id": tok.pad_token_id}
    info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tok}, name="student",
                                         task="llm/v1/chat", model_config=generation, model_card=ModelCard(card),
                                         pip_requirements=_requirements())
    mlflow.log_metrics({f"eval.{k}": v for k, v in metrics.items()}, model_id=info.model_id)
    return info.model_uri


def registered_version(name: str, student_md5: str) -> str | None:
    """The version of ``name`` that holds exactly this student (by content hash), if any."""
    try:
        found = MlflowClient().search_model_versions(f"name = '{name}' and tags.`{STUDENT_MD5}` = '{student_md5}'")
    except MlflowException:  # no such registered model yet
        return None
    return str(min(int(v.version) for v in found)) if found else None


@task(name="register-challenger", version=__version__, retries=2, retry_delay_seconds=5)
def register_challenger(params: Params, student: Path, evaluation: dict[str, dict[str, float]]) -> str:
    """The student as the `challenger` version: a new version, unless one already holds this very
    student (same content hash: a rerun, a scheduled run of unchanged inputs), which is reused. The
    version's description is the student's model card with ``evaluation`` (``metrics/eval.json``)."""
    name, md5 = params.tracking.registered_model, digest(student)
    version = registered_version(name, md5)
    if version is None:
        run, metrics = mlflow.active_run(), evaluation["student"]
        readme = student / "README.md"
        git = git_tags()
        card = with_evaluation(readme.read_text() if readme.is_file() else "", params, evaluation, {
            "`models/student` (md5)": md5, "MLflow run": run.info.run_id if run else "",
            "git commit": git["git.commit"] + (" (with uncommitted changes)" if git["git.dirty"] == "True" else "")})
        uri = log_student_model(student, params, card, metrics)
        tags = {f"eval.{k}": f"{v:.6f}" for k, v in metrics.items()} | {
            "opd.version": __version__, "opd.method": params.distill.method,
            "opd.source_run": run.info.run_id if run else "", STUDENT_MD5: md5,
            # where `dvc pull` finds that md5 from any clone (none: the outputs live in this clone's cache only)
            "opd.dvc_remote": dvc_remote(Layout.here().root) or "none"}
        registered = mlflow.register_model(uri, name, tags=tags)
        version = str(registered.version)
        MlflowClient().update_model_version(name, version, description=card)
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
