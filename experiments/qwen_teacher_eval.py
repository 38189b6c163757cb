"""The Qwen pair's teacher (1.5B) on the held-out word problems, measured as the students are
(greedy plus pass@1 samples, the recipe's evaluation settings): is the teacher right where its
students go wrong?

    python experiments/qwen_teacher_eval.py --root ../opd-qwen --set 'evaluate.max_new_tokens_by_task={reasoning: 320}'

Writes ``experiments/results/qwen_reasoning320/teacher_reasoning.json`` (metrics and responses).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tasks  # noqa: E402,F401  (environment)
from experiments.common import RESULTS  # noqa: E402
from opd.data import load_rows  # noqa: E402
from opd.evaluate import evaluate_model, load_detector  # noqa: E402
from opd.models import dtype_of, load_model, load_tokenizer  # noqa: E402
from opd.params import load, yaml_load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="the recipe's work tree (make real PAIR=qwen)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=RESULTS / "qwen_reasoning320" / "teacher_reasoning.json")
    args = ap.parse_args()
    root = args.root.resolve()
    os.chdir(root)
    params = load(root / "params.yaml", {k: yaml_load(v) for k, v in (s.partition("=")[::2] for s in args.sets)} or None)
    rows = [r for r in load_rows(root / "data" / "prepared", "eval") if r.task == "reasoning"]
    torch.manual_seed(params.seed)
    t0 = time.perf_counter()
    path = root / params.teacher.path
    model = load_model(path, dtype=dtype_of(params.runtime.mixed_precision))
    metrics, gens = evaluate_model(model, load_tokenizer(path), rows, params.evaluate,
                                   load_detector(params.evaluate.refusal_detector), params.data.answer_format)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"metrics": metrics, "seconds": time.perf_counter() - t0, "samples": [
        {k: g[k] for k in ("id", "task", "refused", "correct", "response")} for g in gens]}, indent=1))
    print(json.dumps({k: round(v, 4) for k, v in metrics.items() if k.startswith("reasoning")}))


if __name__ == "__main__":
    main()
