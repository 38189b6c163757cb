"""The one place that sets the process environment for every entry point (flows, tasks, tests).

Prefect, MLflow, DVC, GX and Hugging Face all phone home or write into ``~`` unless told not to;
with these values a full run makes no non-loopback connection (docs/stack.md). Values already
set by the user win (``setdefault``), so ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` still point
at real servers when given.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Read once, before anything runs: mlflow.set_tracking_uri writes this variable itself, so a later
# read could not tell the user's server from the store the project chose.
USER_TRACKING_URI: str | None = os.environ.get("MLFLOW_TRACKING_URI")


def apply() -> None:
    defaults = {
        "PREFECT_HOME": str(ROOT / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "WARNING",  # Prefect's own chatter; the project's INFO lines go to the UI:
        "PREFECT_LOGGING_EXTRA_LOGGERS": "opd",  # the "opd" loggers get Prefect's API handler
        # failures once on the console, without tracebacks; everything in $PREFECT_HOME/opd.log (tasks/logs.py)
        "PREFECT_LOGGING_SETTINGS_PATH": str(ROOT / "tasks" / "logging.yml"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # bounded waits on a tracking server (MLflow's defaults retry for minutes)
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(ROOT / ".cache" / "huggingface"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial database tables"
    logging.getLogger("opd").setLevel(logging.INFO)  # step lines: console and the Prefect UI's Logs tab
