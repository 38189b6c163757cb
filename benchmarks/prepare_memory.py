"""Peak memory and time of the prepare stage on user JSONL files of growing size.

Why: prepare streams the user's file (read line by line, validated by GX in chunks after one pass
that gathers the cross-row facts, written and tokenized in batches), so its peak should stay near
the process's import footprint whatever the file size. Each size runs ``python -m flows prepare``
in a fresh process in a copy of the project, with the real model's tokenizer when one is imported
(``make real``), else with the embedded tokenizer trained on the file.

    python benchmarks/prepare_memory.py [--sizes 5 50 100] [--tokenizer models/real/teacher]

Prints a table (file MB, rows, wall s, peak RSS MB) and writes benchmarks/results/prepare_memory.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROBE = """
import resource, sys
from flows.__main__ import main
code = main(sys.argv[1:])
print("peak_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def make_file(path: Path, megabytes: float) -> int:
    """Embedded-world rows with unique ids and prompts, 10% of them in the eval split."""
    import tasks  # noqa: F401  (environment)
    from opd.params import load
    from opd.data import rows_to_records
    from opd.world import build_world

    params = load(REPO / "params.yaml")
    records = rows_to_records(build_world(params.world, params.seed))
    rng, n, size = random.Random(0), 0, 0
    with path.open("w") as f:
        while size < megabytes * 1e6:
            n += 1
            rec = {k: v for k, v in rng.choice(records).items() if v is not None}
            rec.update(id=f"row-{n:08d}", split="eval" if n % 10 == 0 else "train", prompt=f"[{n}] {rec['prompt']}")
            line = json.dumps(rec) + "\n"
            size += len(line)
            f.write(line)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[5, 50, 100], help="file sizes in MB")
    ap.add_argument("--tokenizer", default=str(REPO / "models/real/teacher"))
    args = ap.parse_args()
    from tests.test_prepare import copy_repo

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proj = Path(tmp) / "proj"
        copy_repo(proj)
        for mb in args.sizes:
            data = Path(tmp) / f"data-{mb:g}mb.jsonl"
            n = make_file(data, mb)
            sets = ["--set", "data.source=jsonl", "--set", f"data.path={data}"]
            if Path(args.tokenizer).is_dir():
                sets += ["--set", f"data.tokenizer_path={Path(args.tokenizer).resolve()}"]
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", PROBE, "prepare", *sets], cwd=proj, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode:
                sys.exit(f"prepare failed on {mb} MB:\n{r.stderr[-3000:]}")
            peak = int(next(line.split()[1] for line in r.stderr.splitlines() if line.startswith("peak_kb")))
            rows.append({"file_mb": round(data.stat().st_size / 1e6, 1), "rows": n, "wall_s": round(wall, 1),
                         "peak_rss_mb": round(peak / 1024), "tokenizer": "model" if "data.tokenizer_path" in " ".join(sets) else "trained"})
            print(rows[-1], flush=True)
    print("\n| file MB | rows | wall s | peak RSS MB |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['file_mb']} | {row['rows']:,} | {row['wall_s']} | {row['peak_rss_mb']:,} |")
    out = REPO / "benchmarks/results/prepare_memory.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
