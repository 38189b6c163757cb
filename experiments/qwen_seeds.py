"""Pool the Qwen pair's studies over seeds: paired differences with each prompt's mean over the seeds.

    python experiments/qwen_seeds.py --seeds experiments/results/qwen_study.json \
        experiments/results/qwen_copsd_seed1/qwen_study.json \
        --pair "COPSD self" "student-init" --pair "COPSD self" "constitution OPSD self" \
        --pair "COPSD self" "self teacher (x_c)"

Each ``qwen_study.json`` (written by ``experiments/qwen_study.py``) holds every model's per-prompt
outcomes on the same held-out prompts. For a pair (A, B) and a metric, a prompt's difference is A - B
at each seed, averaged over the seeds that have both; the interval is a 95% bootstrap over prompts
(the prompts are the unit resampled, as in the per-seed tables). Also the per-seed differences, so the
table shows whether the seeds agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.qwen_study import PAIRED, paired_diff  # noqa: E402


def outcomes(samples: list[dict], field: str, task: str) -> dict[str, float]:
    return {s["id"]: float(s[field]) for s in samples if s["task"] == task}


def pooled(studies: list[dict], a: str, b: str, field: str, task: str, resamples: int = 2000,
           seed: int = 0) -> tuple[float, float, float, int]:
    """Mean over prompts of (A - B averaged over the seeds that ran both), with a bootstrap interval."""
    per_prompt: dict[str, list[float]] = {}
    for study in studies:
        if a not in study["samples"] or b not in study["samples"]:
            continue
        left, right = outcomes(study["samples"][b], field, task), outcomes(study["samples"][a], field, task)
        for pid in left.keys() & right.keys():
            per_prompt.setdefault(pid, []).append(right[pid] - left[pid])
    if not per_prompt:
        return float("nan"), float("nan"), float("nan"), 0
    d = np.array([np.mean(v) for _, v in sorted(per_prompt.items())])
    boots = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(1)
    return float(d.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975)), len(d)


def cell(x: tuple[float, float, float, int]) -> str:
    m, lo, hi, n = x
    return "-" if n == 0 else f"{100 * m:+.1f} [{100 * lo:+.0f}, {100 * hi:+.0f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=Path, required=True, help="one qwen_study.json per seed")
    ap.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"))
    args = ap.parse_args()
    studies = [json.loads(p.read_text()) for p in args.seeds]
    print("| A - B | metric | " + " | ".join(f"seed file {i}" for i in range(len(studies))) + " | pooled (prompt means) |")
    print("|---|---|" + "---|" * (len(studies) + 1))
    for a, b in args.pair:
        for metric, field, task in PAIRED[:3]:
            each = [cell(paired_diff(s["samples"][b], s["samples"][a], field, task))
                    if a in s["samples"] and b in s["samples"] else "-" for s in studies]
            print(f"| {a} - {b} | {metric} | " + " | ".join(each) + f" | {cell(pooled(studies, a, b, field, task))} |")


if __name__ == "__main__":
    main()
