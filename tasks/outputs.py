"""What a stage commits to git (``metrics/*.json``, ``plots/*.csv``) is the same on every machine.

Why: DVC records these files' hashes in dvc.lock, and git tracks both. Wall-clock fields (seconds,
tokens per second) and absolute paths differ between machines, so a second machine's ``make run``
left ``git status`` dirty although every model was bit-identical. Here they are dropped (timings go
to MLflow only: step metrics and stage metrics) and paths inside the project are made relative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opd.paths import Layout
from opd.data import write_json
from opd.stages import write_curve

CLOCK = frozenset({"seconds", "tokens_per_s"})


def portable(obj: Any, root: Path | None = None) -> Any:
    """``obj`` without wall-clock fields, with absolute paths under the project root made relative."""
    root = root or Layout.here().root
    if isinstance(obj, dict):
        return {k: portable(v, root) for k, v in obj.items() if k not in CLOCK}
    if isinstance(obj, list):
        return [portable(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith("/"):
        path = Path(obj)
        return str(path.relative_to(root.resolve())) if path.is_relative_to(root.resolve()) else obj
    return obj


def write_metrics(path: Path, summary: dict[str, Any]) -> None:
    write_json(path, portable(summary))


def write_steps(path: Path, history: list[dict[str, Any]]) -> None:
    write_curve(path, portable(history))
