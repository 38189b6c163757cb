"""What a stage commits to git (``metrics/*.json``, ``plots/*``) is the same on every machine.

Why: DVC records these files' hashes in dvc.lock, and git tracks both. Wall-clock fields (seconds,
tokens per second) and absolute paths differ between machines, so a second machine's ``make run``
left ``git status`` dirty although every model was bit-identical. Here they are dropped (timings go
to MLflow only: step metrics and stage metrics) and paths inside the project are made relative.
The plots are PNG files (DVC image plots): ``dvc plots show`` renders them without a network, where
its vega pages load their scripts from a CDN.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from opd.paths import Layout
from opd.data import atomic_write_bytes, write_json
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


def _save_png(fig: Any, path: Path) -> None:
    """Write the figure atomically as a PNG (the caller logs it to MLflow once every output is written)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})  # no version string: same bytes
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: Path, history: list[dict[str, Any]], keys: list[str], title: str) -> None:
    """Per-step curves, one panel per key (``portable`` drops the wall-clock keys: the bytes must not
    depend on the machine)."""
    history = portable(history)
    keys = [k for k in keys if any(k in h for h in history)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, k in zip(axes[0], keys):
        ax.plot(steps, [h.get(k, float("nan")) for h in history])
        ax.set_title(k)
        ax.set_xlabel("step")
    if not keys:  # a model that was not trained (the user's folder): the output still exists
        axes[0][0].text(0.5, 0.5, "no training steps", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    _save_png(fig, path)


def plot_bars(path: Path, table: dict[str, dict[str, float]], keys: list[str], title: str) -> None:
    """Grouped bars: one group per metric, one bar per model, with the metric's 95% interval
    (``<key>_ci_low`` / ``<key>_ci_high``) as an error bar when it has one."""
    plt = _pyplot()
    keys = [k for k in keys if all(k in m for m in table.values())]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    width = 0.8 / max(len(table), 1)
    for i, (name, m) in enumerate(table.items()):
        err = [[m[k] - m.get(f"{k}_ci_low", m[k]) for k in keys], [m.get(f"{k}_ci_high", m[k]) - m[k] for k in keys]]
        ax.bar([j + i * width for j in range(len(keys))], [m[k] for k in keys], width, label=name, yerr=err, capsize=2)
    ax.set_xticks([j + width * (len(table) - 1) / 2 for j in range(len(keys))], keys, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    _save_png(fig, path)
