"""Peak memory of a GKD step at real vocabularies: 49,152 (SmolLM2) and 151,936 (Qwen2-shaped).

    python benchmarks/vocab_memory.py --teacher models/real/teacher --data data/real [--batch 8]

Each measurement is two training steps of :func:`opd.methods.gkd.gkd_step` (generalised JSD, beta 0.5,
full vocabulary or teacher top-k + tail bucket) through the engine's loop, in a fresh subprocess:

- ``smollm2``: the imported SmolLM2-135M-Instruct as teacher, an 8-layer student pruned from it,
  fully on-policy (``lambda_on_policy: 1``: rollout, teacher pass, loss, backward);
- ``qwen2-151k``: randomly initialised Qwen2-shaped models (vocabulary 151,936, hidden 896, tied
  embeddings, 14 heads / 2 KV heads; teacher 2 layers, student 1: the vocabulary is what is measured)
  on the references (``lambda_on_policy: 0``: a random model's samples say nothing), prompts
  tokenised by the SmolLM2 tokenizer (its ids are valid in the larger vocabulary).

``chunk`` is ``distill.chunk_size``, the response positions projected to the vocabulary at a time;
a chunk larger than the batch's tokens is the unchunked baseline. Peak is the growth of resident
memory from just before the first step (sampled every ms) and the process's maximum RSS.
Prints a table and writes ``benchmarks/results/vocab_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loss_memory import PeakRSS  # noqa: E402
from benchmarks.opd_step import real_pair, train_rows  # noqa: E402
from opd.config import DistillConfig, RolloutConfig, RuntimeConfig  # noqa: E402
from opd.models import load_tokenizer  # noqa: E402

CASES = [("smollm2", 100_000, 0), ("smollm2", 64, 0), ("smollm2", 64, 64),
         ("qwen2-151k", 100_000, 0), ("qwen2-151k", 64, 0), ("qwen2-151k", 64, 64)]


def qwen2(layers: int, seed: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=4096, eos_token_id=2, pad_token_id=2)
    return Qwen2ForCausalLM(cfg)


def one(model: str, chunk: int, top_k: int, teacher_dir: str, data: str, batch: int, new_tokens: int) -> dict[str, float]:
    from opd.batch import PromptPool
    from opd.methods.gkd import gkd_step
    from opd.rollout import TransformersBackend
    from opd.train import LoopSettings, make_accelerator, train

    if model == "smollm2":
        tok, student, teacher, rows = real_pair(teacher_dir, data, 8)
    else:  # only the tokenizer and the prompts of the real pair
        tok, rows = load_tokenizer(teacher_dir), train_rows(data)
        teacher, student = qwen2(2, 0), qwen2(1, 1)
    rows = [r for r in rows if r.reference]
    acc = make_accelerator(RuntimeConfig())
    teacher = teacher.eval().requires_grad_(False)
    pool = PromptPool(rows, tok)
    rcfg = RolloutConfig(temperature=0.9, max_new_tokens=new_tokens, batch_size=batch)
    d = DistillConfig(method="gkd", loss="jsd", beta=0.5, lambda_on_policy=1.0 if model == "smollm2" else 0.0,
                      temperature=0.9, chunk_size=chunk, top_k=top_k, prompts_per_step=batch, lr=1e-6)
    times: list[float] = []
    mem = PeakRSS().__enter__()
    t0 = time.perf_counter()
    train(acc, student, lambda m, _: gkd_step(acc, m, {"default": teacher}, pool, TransformersBackend(m, tok, rcfg), tok, d, rcfg),
          LoopSettings(steps=2, lr=1e-6, seed=0, log_every=1), on_log=lambda s, m: times.append(time.perf_counter()))
    mem.__exit__()
    return {"peak_growth_mb": round(mem.mb), "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "s_per_step": round((times[-1] - t0) / 2, 2), "vocab": int(student.config.vocab_size),
            "params_m": round(sum(p.numel() for p in student.parameters()) / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="models/real/teacher")
    ap.add_argument("--data", default="data/real")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "CHUNK", "TOPK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        m, c, k = args.one
        print(json.dumps(one(m, int(c), int(k), args.teacher, args.data, args.batch, args.new_tokens)))
        return
    args.teacher, args.data = str(Path(args.teacher).resolve()), str(Path(args.data).resolve())  # children run in ROOT
    rows = []
    print(f"GKD (JSD, beta 0.5), {args.batch} prompts x {args.new_tokens} new tokens, 2 steps, CPU "
          f"{torch.get_num_threads()} threads")
    print("| model | vocab | student params | chunk | top-k | peak growth MB | max RSS MB | s/step |")
    print("|---|---|---|---|---|---|---|---|")
    for model, chunk, top_k in CASES:
        cmd = [sys.executable, __file__, "--one", model, str(chunk), str(top_k), "--teacher", args.teacher,
               "--data", args.data, "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"{model} chunk {chunk} top-k {top_k} failed:\n{proc.stderr[-3000:]}")
        r = {"model": model, "chunk": chunk, "top_k": top_k, **json.loads(proc.stdout.strip().splitlines()[-1])}
        rows.append(r)
        print(f"| {model} | {r['vocab']:,} | {r['params_m']}M | {'all' if chunk >= 100_000 else chunk} | "
              f"{top_k or 'full'} | {r['peak_growth_mb']:,} | {r['max_rss_mb']:,} | {r['s_per_step']} |", flush=True)
    out = ROOT / "benchmarks" / "results" / "vocab_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch": args.batch, "new_tokens": args.new_tokens, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
