"""GPU acceptance in one table: ``python benchmarks/gpu_check.py --quick [--device cpu]``.

Sized for one GPU and an offline machine: real-shaped Qwen2 models built from config with random
weights (a ~0.5B student, a ~1.5B teacher, the 151,936-token vocabulary; no download), the engine
alone (torch, transformers, accelerate; no Prefect, MLflow, DVC, GX, TRL or vLLM), and a tokenizer
trained here on the embedded world's texts (the models' vocabulary is larger; only ids matter). Each
row runs in a try: one that cannot run says why and the others go on. With ``--device cpu`` the
shapes shrink (the vocabulary does not), so CI runs it in a minute or two and the script cannot rot.

Rows: OPD steps in fp32 and bf16 (the bf16-vs-fp32 agreement of the first step's loss, on the same
replayed samples), the inverse-CDF sampler (``model.generate`` through the engine's backend), fused
AdamW, gradient checkpointing, LoRA, FSDP2 on one device, and a GKD step at the full vocabulary with
the chunked LM head. Per row: seconds per step, tokens/s, peak memory.
"""

from __future__ import annotations

import resource
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

GPU_SHAPES = {"student": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                              intermediate_size=4864),
              "teacher": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                              intermediate_size=8960)}
CPU_SHAPES = {"student": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=128),
              "teacher": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=192)}
VOCAB = 151_936


class Replay:
    """Responses that depend only on the prompt: the fp32 and bf16 steps score the same samples."""

    def __init__(self, vocab: int, eos: int, length: int):
        self.vocab, self.eos, self.length = vocab, eos, length

    def sample(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[bool]]:
        out = []
        for p in prompts:
            for j in range(n):
                g = torch.Generator().manual_seed((sum(p) * 31 + j) % 2**31)
                out.append(torch.randint(0, self.vocab, (self.length,), generator=g).tolist() + [self.eos])
        return out, [False] * len(out)


class Bench:
    def __init__(self, device: str, quick_cpu: bool, steps: int = 3, prompts: int = 4, new_tokens: int = 64):
        from opd.config import WorldConfig
        from opd.world.generate import build_world
        from opd.world.tokenizer import train_tokenizer

        self.device, self.steps, self.prompts, self.new_tokens = device, steps, prompts, new_tokens
        self.shapes = CPU_SHAPES if quick_cpu else GPU_SHAPES
        rows = build_world(WorldConfig(n_reasoning=40, n_safety=24, n_borderline=24, n_borderline_eval=5, n_general=24), 0)
        self.rows = [r for r in rows if r.split == "train"]
        self.tok = train_tokenizer([t for r in rows for t in (r.prompt, r.reference or "")], 300)

    def model(self, which: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0 if which == "student" else 1)
        cfg = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=which == "student",
                          bos_token_id=self.tok.bos_token_id, eos_token_id=self.tok.eos_token_id,
                          pad_token_id=self.tok.pad_token_id, **self.shapes[which])
        return Qwen2ForCausalLM(cfg).to(dtype).to(self.device)

    def peak_mb(self) -> float:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def reset(self) -> None:
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def opd(self, precision: str = "fp32", checkpointing: bool = False, fsdp: bool = False,
            sampler: Any = None, lora: bool = False) -> dict[str, float]:
        """``steps`` OPD steps (rollout, teacher scoring, update with fused AdamW) of a fresh student; with
        ``lora``, of LoRA adapters (r 16 on every linear layer) with a KL term to the base, adapters off."""
        from opd.batch import PromptPool
        from opd.config import DistillConfig, RolloutConfig, RuntimeConfig
        from opd.methods.sampled import sampled_step
        from opd.models import dtype_of
        from opd.train import make_accelerator

        self.reset()
        acc = make_accelerator(RuntimeConfig(device=self.device, mixed_precision=precision, threads=0))
        student = self.model("student")
        if checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in student.model.layers:
                fully_shard(layer)
            fully_shard(student)
        ref = None
        if lora:
            from opd.config import LoraConfig
            from opd.lora import AdaptersOff, attach

            student = attach(student, LoraConfig(), seed=0)
            ref = AdaptersOff(student)
        teacher = self.model("teacher", dtype_of(precision)).eval().requires_grad_(False)
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5, fused=True)
        student, opt = (student, opt) if fsdp else acc.prepare(student, opt)
        cfg = DistillConfig(prompts_per_step=self.prompts, chunk_size=1024, kl_coef=0.01 if lora else 0.0)
        rcfg = RolloutConfig(max_new_tokens=self.new_tokens, batch_size=self.prompts)
        pool = PromptPool(self.rows, self.tok)
        backend = sampler or Replay(VOCAB, self.tok.eos_token_id, self.new_tokens)
        step = sampled_step(acc, student, {"default": teacher}, pool, backend, self.tok, cfg, rcfg, lambda loss: {},
                            ref_model=ref)
        student.train()
        times, losses, tokens = [], [], 0.0
        for i in range(self.steps):
            torch.manual_seed(i)
            t0 = time.perf_counter()
            metrics = step(i)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(metrics["loss"])
            tokens = metrics["response_length"] * self.prompts
        timed = times[1:] or times
        return {"s_per_step": sum(timed) / len(timed), "tokens_per_s": tokens / (sum(timed) / len(timed)),
                "peak_mb": self.peak_mb(), "first_loss": losses[0]}

    def sampler(self) -> dict[str, float]:
        """The engine's rollout backend (``model.generate`` with the inverse-CDF logits processor)."""
        from opd.batch import PromptPool
        from opd.config import RolloutConfig
        from opd.rollout import TransformersBackend

        self.reset()
        student = self.model("student").eval()
        backend = TransformersBackend(student, self.tok, RolloutConfig(max_new_tokens=self.new_tokens, batch_size=self.prompts))
        prompts = [e.student_prompt for e in PromptPool(self.rows, self.tok).draw(self.prompts)]
        backend.sample(prompts, 1)  # warm-up
        t0 = time.perf_counter()
        out, _ = backend.sample(prompts, 1)
        if self.device == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        return {"s_per_step": s, "tokens_per_s": sum(map(len, out)) / s, "peak_mb": self.peak_mb()}

    def adamw(self) -> dict[str, float]:
        """Fused AdamW steps over the student's parameters (gradients set to ones)."""
        self.reset()
        student = self.model("student")
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
        for p in student.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        t0 = time.perf_counter()
        for _ in range(self.steps):
            opt.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        assert opt.defaults["fused"]
        return {"s_per_step": (time.perf_counter() - t0) / self.steps, "peak_mb": self.peak_mb()}

    def gkd(self) -> dict[str, float]:
        """One GKD forward + backward (JSD) over the full 151,936-token vocabulary, LM head in chunks of 1024."""
        from opd.scoring import Sequences, vocab_divergence

        self.reset()
        student, teacher = self.model("student"), self.model("teacher").eval().requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(5, 300, (48,), generator=g).tolist() for _ in range(self.prompts)]
        responses = [torch.randint(5, VOCAB, (self.new_tokens,), generator=g).tolist() for _ in range(self.prompts)]
        seq = Sequences.build(prompts, responses, self.tok.pad_token_id).to(self.device)
        t0 = time.perf_counter()
        div = vocab_divergence(student, seq, teacher, seq, "jsd", 0.5, chunk=1024)
        (div.sum() / seq.targets_mask.sum()).backward()
        if self.device == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        full_gb = 3 * len(responses) * self.new_tokens * VOCAB * 4 / 2**30  # student + teacher + gradient logits
        return {"s_per_step": s, "tokens_per_s": len(responses) * self.new_tokens / s, "peak_mb": self.peak_mb(),
                "note": f"unchunked logits would need {full_gb:.1f} GB more"}


def fsdp_one_device(bench: Bench) -> dict[str, float]:
    """FSDP2 (``fully_shard``) on a one-process group: the sharded code path on one device."""
    import os

    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl" if bench.device == "cuda" else "gloo", rank=0, world_size=1)
    return bench.opd(fsdp=True)


def run(device: str, quick: bool = True) -> list[dict[str, Any]]:
    """Every row, each in a try; returns the rows (``status`` ok, or why not)."""
    bench = Bench(device, quick_cpu=device == "cpu")
    rows: list[dict[str, Any]] = []
    cases: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
        ("OPD step", "fp32", lambda: bench.opd("fp32")),
        ("OPD step", "bf16", lambda: bench.opd("bf16")),
        ("inverse-CDF sampler (generate)", "fp32", bench.sampler),
        ("fused AdamW", "fp32", bench.adamw),
        ("OPD step, gradient checkpointing", "fp32", lambda: bench.opd("fp32", checkpointing=True)),
        ("OPD step, LoRA student (r 16, all linear), KL to the base", "fp32", lambda: bench.opd("fp32", lora=True)),
        ("OPD step, FSDP2 on one device", "fp32", lambda: fsdp_one_device(bench)),
        ("GKD step, 151,936 vocabulary, chunked head", "fp32", bench.gkd),
    ]
    for name, precision, fn in cases:
        t0 = time.perf_counter()
        try:
            row = {"row": name, "precision": precision, "status": "ok", **fn()}
        except Exception as err:  # noqa: BLE001 - a row that fails says why; the others still run
            last = traceback.format_exc().strip().splitlines()[-1]
            row = {"row": name, "precision": precision, "status": f"failed: {type(err).__name__}: {err}"[:300], "trace": last}
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{name} ({precision}): {row['status']} in {row['wall_s']:.1f} s", flush=True)
    return rows


def table(rows: list[dict[str, Any]], device: str) -> str:
    fmt = lambda r, k, f: f.format(r[k]) if k in r else "-"  # noqa: E731
    lines = [f"device: {device} ({torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}), torch {torch.__version__}",
             "", "| row | precision | s/step | tokens/s | peak MB | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (f" ({r['note']})" if "note" in r else "")
        lines.append(f"| {r['row']} | {r['precision']} | {fmt(r, 's_per_step', '{:.3f}')} | "
                     f"{fmt(r, 'tokens_per_s', '{:.0f}')} | {fmt(r, 'peak_mb', '{:.0f}')} | {status} |")
    fp32, bf16 = (next((r for r in rows if r["row"] == "OPD step" and r["precision"] == p and "first_loss" in r), None)
                  for p in ("fp32", "bf16"))
    if fp32 and bf16:
        rel = abs(bf16["first_loss"] - fp32["first_loss"]) / max(abs(fp32["first_loss"]), 1e-12)
        lines += ["", f"first-step loss: fp32 {fp32['first_loss']:.6f}, bf16 {bf16['first_loss']:.6f} "
                      f"(relative difference {rel:.2e}, same replayed samples)"]
    return "\n".join(lines)
