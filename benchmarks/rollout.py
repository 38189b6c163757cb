"""New tokens per second of the engine's rollout vs a no-cache decoding loop vs plain ``generate``.

    python benchmarks/rollout.py [--batches 1 4 16 64] [--new-tokens 48] [--repeats 3]

Model: the benchmark student of docs/peers.md (Llama, hidden 96, 2 layers, intermediate 256,
4 heads) built from config with the prepared tokenizer (run ``dvc repro prepare`` first); prompts
from the prepared train split; sampling at temperature 1.0 to a fixed number of new tokens (EOS
suppressed so every side decodes the same number of tokens).

- engine: :class:`opd.rollout.TransformersBackend` (KV cache, length-sorted left-padded batches);
- generate: ``model.generate`` on the prompts in their given order, default settings otherwise;
- no-cache: a Python loop that re-runs the full forward pass on the whole sequence every step.

Prints medians (and min-max) over interleaved repeats and writes ``benchmarks/results/rollout.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opd.config import ArchConfig, RolloutConfig  # noqa: E402
from opd.models import build_llama, load_tokenizer  # noqa: E402
from opd.rollout import TransformersBackend  # noqa: E402
from opd.data import load_rows  # noqa: E402
from opd.tokens import pad, prompt_ids  # noqa: E402

STUDENT = ArchConfig(hidden_size=96, num_layers=2, intermediate_size=256, num_heads=4, max_positions=256)


@torch.no_grad()
def no_cache(model: torch.nn.Module, prompts: list[list[int]], new: int, pad_id: int) -> None:
    ids, mask = pad(prompts, pad_id, "left")
    for _ in range(new):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
        nxt = torch.multinomial(torch.softmax(logits, -1), 1)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)


@torch.no_grad()
def plain_generate(model: torch.nn.Module, prompts: list[list[int]], new: int, pad_id: int) -> None:
    ids, mask = pad(prompts, pad_id, "left")
    model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new, min_new_tokens=new,
                   pad_token_id=pad_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rollout.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    prepared = ROOT / "data" / "prepared"
    tok = load_tokenizer(prepared / "tokenizer")
    model = build_llama(STUDENT, tok, 0).eval()
    model.generation_config.eos_token_id = None  # decode exactly new-tokens on every side
    rows = load_rows(prepared, "train")
    cfg = RolloutConfig(max_new_tokens=args.new_tokens, batch_size=max(args.batches))
    engine = TransformersBackend(model, tok, cfg)
    engine.tok = type("NoEOS", (), {"eos_token_id": None, "pad_token_id": tok.pad_token_id})()  # never stops early
    sides = {
        "engine": lambda p: engine.sample(p, 1),
        "generate": lambda p: plain_generate(model, p, args.new_tokens, tok.pad_token_id),
        "no-cache": lambda p: no_cache(model, p, args.new_tokens, tok.pad_token_id),
    }
    results = []
    print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
    print("| batch | engine tok/s | generate tok/s | no-cache tok/s | engine / no-cache |")
    print("|---|---|---|---|---|")
    for b in args.batches:
        prompts = [prompt_ids(tok, r.prompt) for r in rows[:b]]
        times: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                t0 = time.perf_counter()
                fn(prompts)
                times[name].append(time.perf_counter() - t0)
        tps = {k: [b * args.new_tokens / t for t in v] for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in tps.items()}
        results.append({"batch": b, **{f"{k}_tok_s": v for k, v in tps.items()}})
        print(f"| {b} | {med['engine']:.0f} ({min(tps['engine']):.0f}-{max(tps['engine']):.0f}) | "
              f"{med['generate']:.0f} | {med['no-cache']:.0f} | {med['engine'] / med['no-cache']:.1f}x |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"new_tokens": args.new_tokens, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
