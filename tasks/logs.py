"""Console and file handlers of the project's logging config (tasks/logging.yml).

A failing stage used to print 60-116 lines: Prefect reports the failure of the task run and of the
flow run, each with its traceback, around the one line ``python -m flows`` ends with. On the console a
failure now reads as that line alone; the whole record, traceback included, goes to the project's log
file (``$PREFECT_HOME/opd.log``), which the error line names.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from prefect.logging.handlers import PrefectConsoleHandler

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class ConsoleWithoutTracebacks(PrefectConsoleHandler):
    """Prefect's console handler, minus tracebacks, minus the run loggers' failure reports (the command
    line prints the failure itself, once)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(RUN_LOGGERS) and record.levelno >= logging.ERROR:
            return
        if record.exc_info or record.exc_text or record.stack_info:
            record = copy.copy(record)  # the file handler still gets the traceback
            record.exc_info = record.exc_text = record.stack_info = None
        super().emit(record)


class ProjectLogFile(logging.FileHandler):
    """Every record with its traceback, appended to one file per project; opened on first use."""

    def __init__(self, filename: str, **kwargs: object) -> None:
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(filename, delay=True, encoding="utf-8", **kwargs)
