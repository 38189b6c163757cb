"""A lower bound on one OPD step of ``benchmarks/opd_step.py --real``, from this machine's measured
memory bandwidth and matmul rate, next to each side's measured step time.

    python benchmarks/roofline.py [--result benchmarks/results/opd_step_real.json] [--out benchmarks/results/roofline.json]

The bound adds three parts, each the larger of its bytes / bandwidth and its FLOPs / FLOP rate:
rollout (every decode step reads all of the student's weights once: ``new_tokens x weight bytes``;
decoding at batch 4 is bound by that read), teacher scoring (one forward over prompt + response:
``2 x teacher parameters x tokens`` FLOPs, the weights read once), and the update (forward and
backward of the student: ``6 x student parameters x tokens`` FLOPs; weights, gradients and AdamW's
two moments read and written: 16 bytes a parameter plus a bf16 copy when there is one). Bandwidth is
the best of 5 sums over a 1 GiB tensor; FLOP rate the best of 5 square matmuls (n 2048) in the side's
precision, on the threads the benchmark used. Writes ``benchmarks/results/roofline.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.opd_step import real_pair  # noqa: E402
from opd.batch import PromptPool  # noqa: E402
from opd.models import count_parameters  # noqa: E402


def best(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bandwidth() -> float:
    """Bytes per second read by a reduction over 1 GiB (fp32)."""
    x = torch.ones(2**28)
    x.sum()
    return x.numel() * 4 / best(lambda: x.sum())


def flop_rate(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    return 2 * n**3 / best(lambda: a @ b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", type=Path, default=ROOT / "benchmarks" / "results" / "opd_step_real.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "roofline.json")
    args = ap.parse_args()
    res = json.loads(args.result.read_text())
    real = res["real"]
    torch.set_num_threads(int(res["device"].split(",")[1].split()[0]) if "threads" in res["device"] else torch.get_num_threads())
    tok, student, teacher, rows = real_pair(real["teacher"], real["data"], int(real["n_layers"]), real.get("student"))
    p_s, p_t = count_parameters(student), count_parameters(teacher)
    pool = PromptPool(rows, tok)
    prompt = sum(len(e.student_prompt) for e in pool.examples) / len(pool.examples)
    batch, new = res["batch"], res["new_tokens"]
    tokens = batch * (prompt + new)  # positions a forward over prompt + response covers
    bw = bandwidth()
    rate = {"fp32": flop_rate(torch.float32), "bf16": flop_rate(torch.bfloat16)}
    out = {"bandwidth_gb_s": bw / 1e9, "gflop_s": {k: v / 1e9 for k, v in rate.items()},
           "student_params": p_s, "teacher_params": p_t, "prompt_tokens": prompt, "sides": {}}
    print(f"bandwidth {bw / 1e9:.1f} GB/s; matmul fp32 {rate['fp32'] / 1e9:.0f} GFLOP/s, bf16 {rate['bf16'] / 1e9:.0f} GFLOP/s; "
          f"student {p_s / 1e6:.1f}M, teacher {p_t / 1e6:.1f}M parameters, {prompt:.0f} prompt tokens, batch {batch} x {new} new")
    print(f"\n{'side':22s} | measured s/step | bound s/step (rollout + score + update) | fraction of the bound")
    for side, s in res["summary"].items():
        prec = "bf16" if "bf16" in side else "fp32"
        wbytes = 2 if prec == "bf16" else 4
        rollout = new * p_s * wbytes / bw
        score = max(2 * p_t * tokens / rate[prec], p_t * wbytes / bw)
        update = max(6 * p_s * tokens / rate[prec], p_s * (16 + (2 if prec == "bf16" else 0)) / bw)
        bound = rollout + score + update
        out["sides"][side] = {"measured_s": s["s_per_step"], "bound_s": bound, "rollout_s": rollout, "score_s": score,
                              "update_s": update, "fraction": bound / s["s_per_step"]}
        print(f"{side:22s} | {s['s_per_step']:15.2f} | {bound:.3f} ({rollout:.3f} + {score:.3f} + {update:.3f}) | "
              f"{bound / s['s_per_step']:.1%}")
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
