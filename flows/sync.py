"""Fill the tracking store from the pipeline's DVC outputs when DVC skipped the stages that log them.

Why: DVC decides from files whether a stage must run, and the MLflow store is a side effect it
cannot see. On a fresh clone (or with a new or emptied store, or another ``tracking.uri``), ``dvc
repro`` rebuilds bit-identical models and then skips evaluate and register, whose outputs are
committed: the store would hold no evaluation and no registered model. The ``sync_store`` stage
(always run, last, a few seconds when nothing is missing) looks for an evaluate run of exactly these
outputs and a registered version of exactly this student; what is missing is logged from the files
DVC produced. Nothing is retrained or evaluated again.
"""

from __future__ import annotations

import json
from typing import Any

from mlflow import MlflowClient
from prefect import flow

from flows import evaluate, register
from opd import __version__
from opd.params import load
from opd.data import digest
from opd.paths import Layout
from tasks.evaluate import restore_evaluation
from tasks.register import promote, register_challenger, registered_version
from tasks.tracking import configure, stage_run

@flow(name="sync-store", version=__version__)
def sync_store_flow(params_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = load(params_path, overrides)
    lay = Layout.here()
    exp_id = configure(params)
    logged = MlflowClient().search_runs(
        [exp_id], max_results=1, filter_string="tags.`opd.stage` = 'evaluate' and attributes.status = 'FINISHED' "
                                               f"and tags.`dvc.out.metrics/eval.json` = '{digest(lay.metrics / 'eval.json')}'")
    done: dict[str, Any] = {"evaluate": "in the store" if logged else "logged from metrics/eval.json"}
    if not logged:
        with stage_run("evaluate", params, inputs=evaluate.INPUTS, outputs=["metrics/eval.json"]):
            restore_evaluation()
    version = registered_version(params.tracking.registered_model, digest(lay.student))
    done["register"] = f"version {version} in the store" if version else "registered from models/student"
    if version is None:
        with stage_run("register", params, inputs=register.INPUTS, outputs=[]):
            evaluation = json.loads((lay.metrics / "eval.json").read_text())
            done["version"] = register_challenger(params, lay.student, evaluation)
            done.update(promote(params))
    return done
