"""Per-step training metrics: a console line and MLflow metrics sent off the training thread.

A training step never waits on the tracking server: :class:`MetricStream` queues, a background
thread sends, and a server that dies mid-run costs metrics, not the run (the stage still writes its
outputs, then fails naming ``tracking.uri``). A stage that resumes from a checkpoint after a kill
carries the curve up to that checkpoint, read from the checkpoint itself (the killed run, linked as
``opd.continues_run`` by :func:`tasks.tracking.open_stage_run`, may not have sent its last steps).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any

import mlflow
from mlflow import MlflowClient

from tasks.tracking import TrackingUnavailable


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
                item = self._queue.get(timeout=0.2)
                while True:
                    pending += item
                    item = self._queue.get_nowait()
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


LOGGER = "opd.steps"  # Prefect attaches its API handler (PREFECT_LOGGING_EXTRA_LOGGERS, tasks/env.py)


class StepLog:
    """Training-loop callback: a compact line (console, and the run's logs in the Prefect UI) and MLflow metrics
    through a :class:`MetricStream`. Used as a context around training and the writing of the stage's
    outputs: leaving it sends what is left, and raises :class:`TrackingUnavailable` only when the
    block itself succeeded (a training error is never masked by a tracking one)."""

    def __init__(self, stage: str) -> None:
        self._stage, self._logger, self._stream = stage, logging.getLogger(LOGGER), MetricStream(stage)

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        self._logger.info(f"{self._stage} step {step}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("step", "lr")))
        self._stream(step, metrics)

    def resume(self, logged: list[dict[str, Any]]) -> None:
        """Training resumed from a checkpoint: its logged steps start this run's curve."""
        self._logger.info(f"{self._stage}: resumed after step {logged[-1]['step'] if logged else 0}; "
                          f"{len(logged)} logged steps carried from the checkpoint")
        for metrics in logged:
            self._stream(metrics["step"], metrics)

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        if exc_type is None:
            self._stream.close()
        else:
            with contextlib.suppress(TrackingUnavailable):
                self._stream.close()
