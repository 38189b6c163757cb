"""The bad inputs of the hardening rounds, each run as a user runs it: one table of (case, exit code,
first line printed, seconds). Every case runs ``python -m flows ...`` in a fresh project folder with
the committed params.yaml (data cases point ``data.source: jsonl`` at a file of ``tests/data/``).

    python experiments/robustness_cases.py        # ~3 minutes on 2 cores; prints a Markdown table
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"


def big_prompt(folder: Path) -> Path:
    """A 10 MB prompt in an otherwise valid file."""
    rows = [{"id": "a", "split": "train", "task": "general", "category": "none", "prompt": "x" * 10_000_000, "reference": "y"},
            {"id": "b", "split": "eval", "task": "general", "category": "none", "prompt": "hi", "reference": "hello"}]
    path = folder / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cases(folder: Path, closed_port: int) -> list[tuple[str, list[str]]]:
    data = lambda f: ["prepare", "--set", "data.source=jsonl", "--set", f"data.path={f}"]  # noqa: E731
    return [
        ("chat control tokens in the system column", data(DATA / "system_tokens.jsonl")),
        ("train/eval leak through a zero-width space", data(DATA / "zero_width_leak.jsonl")),
        ("no eval rows", data(DATA / "no_eval_rows.jsonl")),
        ("unknown teacher, by_row routing", data(DATA / "unknown_teacher.jsonl") + ["--set", "distill.routing=by_row",
                                                                                   "--set", "teachers={math: {path: m}}"]),
        ("lone surrogate", data(DATA / "lone_surrogate.jsonl")),
        ("200k-deep nesting", data(DATA / "deep_nesting.jsonl")),
        ("10 MB prompt", data(big_prompt(folder))),
        ("README's --set distill.lr=5e-4 (accepted)", ["user-inputs", "--set", "distill.lr=5e-4"]),
        ("a bad --set value", ["user-inputs", "--set", "distill.lr=fast"]),
        ("password in tracking.uri", ["prepare", "--set", "tracking.uri=http://opd:s3cret@127.0.0.1:9"]),
        ("tracking server not listening", ["prepare", "--set", f"tracking.uri=http://127.0.0.1:{closed_port}"]),
    ]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, never listening: nothing else can answer on it
        for name, args in cases(Path(tmp), held.getsockname()[1]):
            project = Path(tmp) / f"p{len(rows)}"
            project.mkdir()
            (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
            env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "flows", *args], cwd=ROOT, capture_output=True, text=True,
                               env={**env, "OPD_ROOT": str(project)}, timeout=600)
            secs = time.perf_counter() - t0
            lines = [x for x in (r.stderr + r.stdout).splitlines() if x.strip()]
            first = lines[0][:160] if lines else ""
            leaked = "s3cret" in r.stderr + r.stdout
            rows.append((name, r.returncode, first.replace("|", "\\|"), secs, len(r.stderr), leaked))
            print(f"{name}: rc {r.returncode}, {secs:.1f} s", file=sys.stderr, flush=True)
    print("| case | rc | first line printed | s | stderr bytes | secret printed |\n|---|---|---|---|---|---|")
    for name, rc, first, secs, n, leaked in rows:
        print(f"| {name} | {rc} | {first} | {secs:.1f} | {n:,} | {'yes' if leaked else 'no'} |")


if __name__ == "__main__":
    main()
