"""Logging helpers shared by the tasks (console via Prefect's run logger)."""

from __future__ import annotations

from collections.abc import Callable

from prefect.logging import get_run_logger


def step_logger(stage: str) -> Callable[[int, dict[str, float]], None]:
    """A training-loop callback that prints a compact line of the step's metrics."""
    logger = get_run_logger()

    def log(step: int, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("step", "lr"))
        logger.warning(f"{stage} step {step}: {shown}")

    return log
