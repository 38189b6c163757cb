"""Scale-out check: one short distill per rollout backend x precision x process count, as a table.

    python benchmarks/gpu_check.py [--project .] [--steps 20] [--processes 2] [--method opd]
    python benchmarks/gpu_check.py --quick [--device cpu]     # the GPU acceptance table (benchmarks/acceptance.py)

``--quick`` needs no project and only the engine's packages: real-shaped Qwen2 models built from config
(``benchmarks/acceptance.py``), one table in a few minutes on one GPU; ``--device cpu`` shrinks the shapes.

Runs :func:`opd.stages.distill_stage` on the project's prepared data and base models (``make run``
first, or any project folder with ``data/prepared`` and ``models/base``), each configuration a fresh
``torchrun`` launch of ``--processes`` processes (or one plain process). Per row: generated tokens per
second over the steps after the first (global: summed over ranks), peak memory (CUDA
``max_memory_allocated`` on GPUs, the resident set growth of rank 0 on CPU), the sampler-vs-trainer
log-prob gap (vLLM only), and rank agreement: the largest difference of any parameter between rank 0
and every other rank after training (0 means one model was trained, not N).

On a GPU machine it covers transformers and vLLM rollouts, fp32 and bf16, 1 and N processes; on a
CPU machine it skips what needs CUDA (vLLM, and bf16, which CPUs run but slowly) and says so. Writes
``benchmarks/results/gpu_check.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One configuration, inside the launch: every rank trains; rank 0 writes the row."""
    import resource

    import torch
    import torch.distributed as dist

    import tasks  # noqa: F401  (environment)
    from opd import stages
    from opd.params import load
    from opd.paths import Layout

    lay = Layout(Path(args.project).resolve())
    params = load(lay.params, {"distill.method": args.method, "distill.steps": args.steps,
                               "distill.checkpoint_every": 10**6, "distill.log_every": 1,
                               "rollout.backend": args.backend, "runtime.mixed_precision": args.precision,
                               "runtime.num_processes": int(os.environ.get("WORLD_SIZE", "1"))})
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    captured: dict = {}
    real = stages.save_trained

    def keep(acc, model, tok, out, files=None, finish=None):
        flat = torch.cat([p.detach().float().flatten().cpu() for p in acc.unwrap_model(model).parameters()])
        if acc.num_processes > 1:
            others = [torch.zeros_like(flat) for _ in range(acc.num_processes)]
            dist.all_gather(others, flat.to(acc.device))
            captured["rank_diff"] = max(float((o.cpu() - flat).abs().max()) for o in others)
        else:
            captured["rank_diff"] = 0.0
        real(acc, model, tok, out, files, finish)

    stages.save_trained = keep
    with tempfile.TemporaryDirectory() as tmp:
        summary, history = stages.distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft,
                                                Path(tmp) / "student", Path(tmp) / "ckpt")
    if int(os.environ.get("RANK", "0")) != 0:
        return
    timed = history[1:] or history
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
    row = {"backend": args.backend, "precision": args.precision, "processes": summary["processes"],
           "device": "cuda" if cuda else "cpu", "tokens_per_s": sum(h["tokens_per_s"] for h in timed) / len(timed),
           "s_per_step": summary["seconds"] / max(1, len(history)), "peak_mb": peak,
           "sampler_gap": sum(h.get("sampler_logprob_gap", 0.0) for h in timed) / len(timed),
           "rank_max_param_diff": captured["rank_diff"], "final_loss": history[-1]["loss"]}
    Path(args.row).write_text(json.dumps(row))


def configurations(processes: int) -> tuple[list[tuple[str, str, int]], list[str]]:
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    skipped = []
    backends = ["transformers"]
    if cuda and importlib.util.find_spec("vllm"):
        backends.append("vllm")
    else:
        skipped.append("vllm (needs CUDA and the vllm package: pip install -e '.[vllm]')")
    precisions = ["fp32"] + (["bf16"] if cuda else [])
    if not cuda:
        skipped.append("bf16 (CPU autocast works, but is only a correctness check here: see tests/test_processes.py)")
    counts = [1] + ([processes] if processes > 1 else [])
    return [(b, p, n) for b in backends for p in precisions for n in counts], skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", default=str(ROOT))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--method", default="opd")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    ap.add_argument("--quick", action="store_true", help="the acceptance table on real-shaped models from config")
    ap.add_argument("--device", default=None, help="--quick: cuda (default when available) or cpu")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="transformers", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        import torch

        from benchmarks.acceptance import run, table

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        rows = run(device)
        print(table(rows, device))
        out = Path(args.out).with_name("gpu_check_quick.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")
        return
    rows, (configs, skipped) = [], configurations(args.processes)
    for backend, precision, n in configs:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [__file__, "--worker", "--project", args.project, "--steps", str(args.steps), "--method",
                   args.method, "--backend", backend, "--precision", precision, "--row", f.name]
            launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
                      if n > 1 else [sys.executable])
            t0 = time.perf_counter()
            r = subprocess.run(launch + cmd, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"{backend}/{precision}/{n} failed:\n{r.stderr[-3000:]}")
            rows.append({**json.loads(Path(f.name).read_text()), "wall_s": time.perf_counter() - t0})
    head = "| backend | precision | processes | device | tokens/s | s/step | peak MB (rank 0) | sampler gap | rank max param diff |"
    print(head + "\n|" + "---|" * 9)
    for r in rows:
        print(f"| {r['backend']} | {r['precision']} | {r['processes']} | {r['device']} | {r['tokens_per_s']:.0f} | "
              f"{r['s_per_step']:.3f} | {r['peak_mb']:.0f} | {r['sampler_gap']:.2e} | {r['rank_max_param_diff']:.1e} |")
    for s in skipped:
        print(f"skipped: {s}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "skipped": skipped, "steps": args.steps,
                                          "method": args.method}, indent=2) + "\n")


if __name__ == "__main__":
    main()
