"""The engine installs on its own: ``pip install opd-pipeline`` (no extras) gives ``import opd`` and a
distill step, without Prefect, MLflow, DVC, GX or datasets (the ``pipeline`` extra); the GPU acceptance
table (``benchmarks/gpu_check.py --quick``) runs there too, as on a bare GPU image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv (make install puts it in .venv)")
def test_the_engine_installs_and_steps_without_the_pipeline(tmp_path):
    uv, venv = shutil.which("uv"), tmp_path / "engine"
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    py = venv / "bin" / "python"
    links = ["--find-links", os.environ["PIP_FIND_LINKS"]] if os.environ.get("PIP_FIND_LINKS") else []
    # the packages make install fetched are in uv's cache: no network needed
    r = subprocess.run([uv, "pip", "install", "-q", "--python", str(py), "--offline", *links,
                        "-c", str(REPO / "requirements.lock"), "-e", str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = subprocess.run([str(py), str(REPO / "tests" / "workers" / "engine_only.py")], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loss" in json.loads(run.stdout.strip().splitlines()[-1])
    # the GPU acceptance script with small shapes on CPU, in the same engine-only environment
    out = tmp_path / "results" / "gpu_check.json"
    run = subprocess.run([str(py), str(REPO / "benchmarks" / "gpu_check.py"), "--quick", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(r["row"], r["precision"]): r["status"] for r in json.loads(out.with_name("gpu_check_quick.json").read_text())["rows"]}
    assert len(rows) == 8 and all(status == "ok" for status in rows.values()), rows
    assert "| GKD step, 151,936 vocabulary, chunked head | fp32 |" in run.stdout and "first-step loss: fp32" in run.stdout
