"""Multi-process launch of the distill stage (``runtime.num_processes``), and what ranks other than 0 run.

``python -m flows distill`` with ``runtime.num_processes: N > 1`` re-runs itself under ``torchrun``
(``torch.distributed.run --standalone``): N processes, gloo on CPU, NCCL on GPUs. Rank 0 runs the
Prefect flow, opens the MLflow run and writes every output; the other ranks run the same engine
function without any orchestration or tracking (:func:`worker`), taking part in its collectives. A
user's own launch (``torchrun --nproc_per_node N -m flows distill`` or ``accelerate launch
--multi_gpu --num_processes N -m flows distill``) takes the same path. ``accelerate launch --cpu
--num_processes N`` starts only one process in accelerate 1.15: it is not a way to get N.
"""

from __future__ import annotations

import os
import subprocess
import sys

from opd.config import Params

DISTRIBUTED_STAGES = ("distill",)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def in_launch() -> bool:
    """True inside a torchrun / accelerate launch of several processes."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def relaunch(stage: str, params: Params, argv: list[str]) -> int:
    """Run ``python -m flows <argv>`` as ``runtime.num_processes`` processes; returns the launch's exit code."""
    n = params.runtime.num_processes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "flows", *argv]
    print(f"{stage}: launching {n} processes: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def run_stage_processes(stage: str, params: Params, params_path: str | None, overrides: dict | None) -> None:
    """From inside a running flow (the pipeline): the stage as its own multi-process launch, which
    inherits the pipeline's MLflow parent run through the environment."""
    import yaml

    argv = [stage] + (["--params", params_path] if params_path else [])
    for key, value in (overrides or {}).items():
        argv += ["--set", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    code = relaunch(stage, params, argv)
    if code:
        raise RuntimeError(f"{stage} under {params.runtime.num_processes} processes exited with code {code}")


def worker(params: Params) -> None:
    """A rank other than 0 of the distill stage: the engine function only (no Prefect flow, no MLflow
    run, no writes); ``python -m flows`` has checked that the stage is one that runs distributed."""
    from opd.paths import Layout
    from opd.stages import distill_stage

    lay = Layout.here()
    distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, lay.student, lay.checkpoints / "distill")
