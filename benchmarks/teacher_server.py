"""The teacher in the student's process vs on a teacher server (``python -m flows serve-teacher``), same machine.

    python benchmarks/teacher_server.py --root PROJECT [--base MODELS_BASE] [--steps 4] [--set key=value ...]

``PROJECT`` is a work tree after the teacher stage (``data/prepared``, ``models/base``): the embedded
default after ``make run``, or the Qwen pair's (``--base experiments/results/qwen_work/base``, the
study's manifest). Each side runs ``distill_stage`` for ``--steps`` steps in a fresh process; the
table gives the mean step time after the first step, the student process's peak RSS, and for the
remote side the server's peak RSS too. One process at a time; ``--threads`` torch threads each (the
server and the student alternate: scoring is synchronous).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one_side(root: str, base: str, overrides: dict[str, Any], steps: int) -> dict[str, float]:
    """distill_stage in this (fresh) process: step seconds after the first, peak RSS."""
    os.chdir(root)
    import tasks  # noqa: F401  (environment)
    from opd.params import load
    from opd.stages import distill_stage

    params = load(Path(root) / "params.yaml", {**overrides, "distill.steps": steps, "distill.checkpoint_every": 10**6,
                                               "distill.warmup_steps": 0, "distill.log_every": 1})
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        distill_stage(params, Path(root) / "data" / "prepared", Path(base), Path(tmp) / "cross", Path(tmp) / "student",
                      Path(tmp) / "ck", lambda step, metrics: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"step_s": sum(gaps) / max(1, len(gaps)), "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def peak_rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--base", type=Path, default=None, help="the teacher stage's folder (default ROOT/models/base)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--dtype", default="fp32", help="the server's weights (bf16 where runtime.mixed_precision is bf16)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    root = args.root.resolve()
    base = (args.base or root / "models" / "base").resolve()
    common = {k: yaml.safe_load(v) for k, v in (s.partition("=")[::2] for s in args.sets)}
    common["runtime.threads"] = args.threads
    import json

    teacher = Path(json.loads((base / "manifest.json").read_text())["teacher"])
    teacher = teacher if teacher.is_absolute() else base / teacher
    ctx = multiprocessing.get_context("spawn")
    rows = {}
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        rows["teacher in process"] = pool.apply(one_side, (str(root), str(base), common, args.steps))
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, "-m", "flows", "serve-teacher", str(teacher), "--port", str(args.port),
                               "--threads", str(args.threads), "--dtype", args.dtype], cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "the teacher server did not start"
                time.sleep(1)
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            rows["teacher on a server"] = pool.apply(one_side, (str(root), str(base),
                                                                {**common, "teacher.server": {"url": url}}, args.steps))
        rows["teacher on a server"]["server_rss_gb"] = peak_rss_gb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    local, remote = rows["teacher in process"], rows["teacher on a server"]
    method = common.get("distill.method") or yaml.safe_load((root / "params.yaml").read_text())["distill"]["method"]
    print(f"\n{root.name}: {args.steps} steps of {method}, {args.threads} threads per process, server {args.dtype}\n")
    print("| teacher | step s (after the first) | student process peak RSS GB | server peak RSS GB |")
    print("|---|---|---|---|")
    print(f"| in the student's process | {local['step_s']:.2f} | {local['rss_gb']:.2f} | - |")
    print(f"| on a server (127.0.0.1) | {remote['step_s']:.2f} | {remote['rss_gb']:.2f} | {remote['server_rss_gb']:.2f} |")
    print(f"\nstudent-process memory saved: {local['rss_gb'] - remote['rss_gb']:.2f} GB; "
          f"step time x{remote['step_s'] / local['step_s']:.2f}")


if __name__ == "__main__":
    main()
