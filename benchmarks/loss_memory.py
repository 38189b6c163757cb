"""Peak memory and time of full-vocabulary divergences: naive full logits vs the engine's chunks.

    python benchmarks/loss_memory.py [--lengths 256 1024 2048 4096] [--vocabs 8192 32768 65536]
                                     [--divergences forward_kl reverse_kl jsd]

For each sequence length T and vocabulary V: hidden states ``[T, H]`` of a student and a teacher
and their LM heads ``[V, H]``; forward + backward of the per-token divergence summed over T.

- naive: ``logits = h @ W.T`` for all T positions, then :func:`opd.losses.divergence`;
- chunked: :func:`opd.losses.head_chunks` (the engine's path), ``chunk`` positions at a time with
  activation checkpointing;
- top-k: the chunked path with the teacher's top-k + tail bucket.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU; on CPU it is the peak growth of the
process's resident memory, sampled every millisecond by a thread, in a fresh subprocess per
measurement (the allocator keeps freed memory, so measurements must not share a process).
Prints a table and writes ``benchmarks/results/loss_memory.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opd.losses import divergence, divergence_logprobs, head_chunks, topk_with_tail  # noqa: E402


class PeakRSS:
    """Peak resident memory above the starting point, sampled every millisecond (CPU)."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def run(kind: str, t: int, v: int, h: int, device: str, chunk: int, k: int, div: str = "jsd") -> tuple[float, float, float]:
    g = torch.Generator(device="cpu").manual_seed(0)
    ws = (torch.randn(v, h, generator=g) * 0.02).to(device).requires_grad_()
    wt = (torch.randn(v, h, generator=g) * 0.02).to(device)
    hs = torch.randn(t, h, generator=g).to(device).requires_grad_()
    ht = torch.randn(t, h, generator=g).to(device)

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        s_logp = torch.log_softmax(a @ ws.T, -1)
        with torch.no_grad():
            t_logp = torch.log_softmax(b @ wt.T, -1)
        if kind == "top-k":
            t_logp, s_logp = topk_with_tail(t_logp, s_logp, k)
        return divergence_logprobs(s_logp, t_logp, div, 0.5)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        if kind == "naive":
            loss = divergence(hs @ ws.T, ht @ wt.T, div, 0.5).sum()
        else:
            loss = head_chunks(fn, hs, ht, chunk=chunk).sum()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else mem.mb
    value = float(loss.detach())
    gc.collect()
    return peak, secs, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[8192, 32768, 65536])
    ap.add_argument("--divergences", nargs="+", default=["forward_kl", "reverse_kl", "jsd"],
                    choices=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loss_memory.json")
    ap.add_argument("--naive-limit", type=int, default=2**28,
                    help="skip the naive path from T*V logits on (it needs ~12 such tensors of memory)")
    ap.add_argument("--one", nargs=4, metavar=("KIND", "T", "V", "DIV"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:  # a single measurement, in its own process
        kind, t, v, div = args.one[0], int(args.one[1]), int(args.one[2]), args.one[3]
        run(kind, 8, 128, args.hidden, device, args.chunk, min(args.top_k, 64), div)  # warm-up: lazy imports, kernels
        print(json.dumps(run(kind, t, v, args.hidden, device, args.chunk, args.top_k, div)))
        return

    def measure(kind: str, t: int, v: int, div: str) -> tuple[float, float, float]:
        cmd = [sys.executable, __file__, "--one", kind, str(t), str(v), div, "--hidden", str(args.hidden),
               "--chunk", str(args.chunk), "--top-k", str(args.top_k)]
        return tuple(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]))

    rows = []
    print(f"device {device}, hidden {args.hidden}, chunk {args.chunk}, JSD at beta=0.5, forward + backward")
    print("| divergence | T | V | naive MB | chunked MB | top-k MB | chunked / naive | naive s | chunked s | top-k s "
          "| rel. value diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for div, v, t in ((d, v, t) for d in args.divergences for v in args.vocabs for t in args.lengths):
        kinds = ("chunked", "top-k") if t * v >= args.naive_limit else ("naive", "chunked", "top-k")
        res = {kind: measure(kind, t, v, div) for kind in kinds}
        res.setdefault("naive", (float("nan"), float("nan"), float("nan")))  # skipped: too large for RAM
        diff = abs(res["naive"][2] - res["chunked"][2]) / max(abs(res["chunked"][2]), 1e-12)
        row = {"divergence": div, "T": t, "V": v, **{f"{k}_mb": round(r[0], 1) for k, r in res.items()},
               **{f"{k}_s": round(r[1], 3) for k, r in res.items()}, "value_diff": diff}
        rows.append(row)
        print(f"| {div} | {t} | {v} | {row['naive_mb']} | {row['chunked_mb']} | {row['top-k_mb']} | "
              f"{row['chunked_mb'] / max(row['naive_mb'], 1e-9):.2f} | {row['naive_s']} | {row['chunked_s']} | "
              f"{row['top-k_s']} | {diff:.2e} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device, "hidden": args.hidden, "chunk": args.chunk, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
