"""Shared fixtures: a tiny configuration, a project folder in tmp, the Prefect test harness."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import os
import subprocess

import pytest
import yaml

os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests never log to the developer's own server
os.environ.pop("PREFECT_API_URL", None)
import tasks  # noqa: E402,F401  (sets the environment before prefect / mlflow are imported)

REPO = Path(__file__).resolve().parent.parent

TINY: dict[str, Any] = {
    "seed": 0,
    "world": {"n_reasoning": 80, "n_safety": 48, "n_borderline": 48, "n_borderline_eval": 10, "n_general": 48, "eval_fraction": 0.25,
              "vocab_size": 300},
    "teacher": {"arch": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 64, "num_heads": 2},
                "sft": {"steps": 12, "batch_size": 16, "warmup_steps": 2}},
    "student": {"arch": {"hidden_size": 16, "num_layers": 1, "intermediate_size": 32, "num_heads": 2},
                "sft": {"steps": 4, "batch_size": 16, "warmup_steps": 1}},
    "rollout": {"max_new_tokens": 12, "batch_size": 16},
    "distill": {"steps": 4, "prompts_per_step": 6, "checkpoint_every": 2, "warmup_steps": 1, "log_every": 1},
    "cross_sft": {"batch_size": 16, "samples": 2, "min_f1": 0.0},
    "copsd": {"n": 3, "prompts_per_step": 2},
    "evaluate": {"max_new_tokens": 12, "samples": 2, "limit_per_task": 6, "batch_size": 32},
    "runtime": {"device": "cpu", "threads": 1},
    "promote": {"min_metric": 0.0, "min_harmful_refusal": 0.0, "max_over_refusal": 1.0},  # tiny models are weak
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def committed_params(name: str = "params.yaml") -> dict[str, Any]:
    """A params file as committed (git HEAD), not the workspace's copy, which the README's
    ``dvc exp run -S ...`` recipes edit; the file itself outside a git checkout."""
    shown = subprocess.run(["git", "show", f"HEAD:{name}"], cwd=REPO, capture_output=True, text=True)
    return yaml.safe_load(shown.stdout if shown.returncode == 0 else (REPO / name).read_text())


def recipe_params(overlay: str) -> dict[str, Any]:
    """A recipe (``params.qwen.yaml``, an overlay) merged onto the committed params.yaml, as
    ``python -m flows merge-params`` merges them for ``make real``."""
    from opd.params import merge_overlay

    return merge_overlay(committed_params(), committed_params(overlay))


def tiny(**overrides: Any) -> dict[str, Any]:
    """The project's committed params.yaml shrunk by TINY, with dotted-key overrides (every section
    present, as DVC requires)."""
    cfg = _merge(committed_params(), TINY)
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project folder with the tiny params.yaml; stages write under it."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny()))
    monkeypatch.setenv("OPD_ROOT", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def prefect_api():
    """A real, temporary local Prefect API for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
