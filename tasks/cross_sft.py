"""Cross-SFT stage task: recalibrate the teacher on the crossed mix (COPSD's cold start)."""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import task

from opd import __version__
from opd.config import Params
from opd.cross_sft import cross_sft_stage
from opd.paths import Layout
from tasks.outputs import plot_curves, write_metrics, write_steps
from tasks.step_log import StepLog
from tasks.tracking import log_dataset


@task(name="cross-sft", version=__version__)
def recalibrate_teacher(params: Params) -> dict[str, Any]:
    lay = Layout.here()
    log_dataset(lay.prepared, "train")
    with StepLog("cross_sft") as log:
        summary, history = cross_sft_stage(params, lay.prepared, lay.models_base, lay.cross_sft,
                                           lay.checkpoints / "cross_sft", log)
        write_steps(lay.plots / "cross_sft.csv", history)
        write_metrics(lay.metrics / "cross_sft.json", summary)
        plot_curves(lay.plots / "cross_sft.png", history, ["loss", "grad_norm"], "Cross-SFT of the teacher")
    mlflow.log_artifact(str(lay.plots / "cross_sft.png"), "plots")
    if "skipped" in summary:
        mlflow.set_tag("opd.skipped", summary["skipped"])
        return summary
    mlflow.log_metrics({f"mix.{k}": v for k, v in summary["mix"].items()}
                       | {f"mix.task.{k}": v for k, v in summary["mix_by_task"].items()}
                       | {f"self_sampling.{k}": v for k, v in summary["self_sampling"].items()})
    mlflow.log_dict(summary, "cross_sft_mix.json")
    return summary
