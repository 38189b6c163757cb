"""Per-step training metrics: a console line and MLflow metrics sent off the training thread.

A training step never waits on the tracking server: :class:`MetricStream` queues, a background
thread sends, and a server that dies mid-run costs metrics, not the run (the stage still writes its
outputs, then fails naming ``tracking.uri``). A stage that resumes after a kill carries the killed
run's curve (``opd.continues_run``, set by :func:`tasks.tracking.open_stage_run`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
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
        run = mlflow.active_run()
        self._run_id, self._continues = run.info.run_id, run.data.tags.get("opd.continues_run")
        self._uri = mlflow.get_tracking_uri()
        self._client = MlflowClient(self._uri)
        self._queue: queue.SimpleQueue[list[Any] | Callable[[], list[Any]]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._max_pending, self._max_backoff = max_pending, max_backoff
        self.error: Exception | None = None
        self.unsent = self.dropped = 0
        self._thread = threading.Thread(target=self._send_loop, name=f"metrics-{prefix}", daemon=True)
        self._thread.start()

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        if self._continues:  # a resumed run: the killed run's curve up to here comes first
            self._queue.put(lambda run_id=self._continues: self._history_before(run_id, step))  # sent by the thread
            self._continues = None
        ts = int(time.time() * 1000)
        self._queue.put([self._metric(f"{self._prefix}.{k}", float(v), ts, step)
                         for k, v in metrics.items() if k != "step"])

    def _history_before(self, run_id: str, step: int) -> list[Any]:
        """The killed run's metrics of this stream logged before ``step`` (where the resumed run starts),
        so the continuing run tells the whole story; an unreachable server leaves the curve as it is."""
        try:
            keys = [k for k in self._client.get_run(run_id).data.metrics if k.startswith(f"{self._prefix}.")]
            return [m for k in keys for m in self._client.get_metric_history(run_id, k) if m.step < step]
        except Exception:
            return []

    def _send_loop(self) -> None:
        pending: list[Any] = []
        backoff = 1.0
        while True:
            stopping = self._stop.is_set()
            with contextlib.suppress(queue.Empty):
                item = self._queue.get(timeout=0.2)
                while True:
                    pending += item() if callable(item) else item
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

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        if exc_type is None:
            self._stream.close()
        else:
            with contextlib.suppress(TrackingUnavailable):
                self._stream.close()
