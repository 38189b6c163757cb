"""Run under ``torchrun`` by tests/test_processes.py (and once as a single process, for reference).

    python tests/workers/ranks.py MODE PROJECT OUT

MODE ``methods``: one short distill_stage per method with a deterministic sampler (the same responses
for a prompt whatever rank samples it), each rank saving its own final parameters; ``fsdp2``: one OPD
step on a student sharded with FSDP2 (``fully_shard``, gloo), full parameters saved by rank 0;
``nan``: a step whose loss is NaN on rank 1 only, each rank writing what stopped it; ``remote``: one OPD
step with the teacher on a server (``$TEACHER_URL``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import tasks  # noqa: E402,F401  (environment)
from opd import stages  # noqa: E402
from opd.params import load  # noqa: E402
from opd.data import load_rows  # noqa: E402
from opd.paths import Layout, resolve  # noqa: E402

METHODS = {
    "opd": {"distill.method": "opd"},
    "fire": {"distill.method": "fire", "fire.filter": True, "fire.filter_quantile": 0.2},  # the cross-rank quantile
    "gkd": {"distill.method": "gkd", "distill.lambda_on_policy": 0.5},
    "copsd": {"distill.method": "copsd", "copsd.teacher": "original", "copsd.prompts_per_step": 4},
    "opd_ppo": {"distill.method": "opd", "distill.ppo_epochs": 2, "distill.mini_batches": 2},
    "opd_2steps": {"distill.method": "opd", "distill.steps": 2},
    # LoRA students: DDP over the adapters; the reference model / self-teacher is the base, adapters off
    "lora_opd": {"distill.method": "opd", "distill.kl_coef": 0.1, "student.lora": {"r": 4, "alpha": 8.0}},
    "lora_copsd": {"distill.method": "copsd", "copsd.teacher": "self", "copsd.prompts_per_step": 4,
                   "student.lora": {"r": 4, "alpha": 8.0}},
}


class Replay:
    """Responses that depend only on the prompt and the sample index: any sharding samples the same."""

    def __init__(self, vocab: int, eos: int):
        self.vocab, self.eos = vocab, eos

    def sample(self, prompts, n):
        out = []
        for p in prompts:
            for j in range(n):
                g = torch.Generator().manual_seed((hash(tuple(p)) * 31 + j) % 2**31)
                toks = torch.randint(0, self.vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
                out.append([t for t in toks if t != self.eos] + [self.eos])
        return out, [False] * len(out)


def methods(root: Path, out: Path) -> None:
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    lay = Layout(root)
    for name, ov in METHODS.items():
        params = load(root / "params.yaml", {"distill.steps": 1, "distill.prompts_per_step": 8,
                                             "distill.checkpoint_every": 100, "distill.warmup_steps": 0, **ov})
        saved = {}
        real = stages.save_trained

        def keep(acc, model, tok, path, files=None, finish=None, saved=saved, real=real):
            saved["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            saved["rank"] = acc.process_index
            real(acc, model, tok, path, files, finish)

        stages.save_trained = keep
        from opd.models import load_tokenizer

        tok = load_tokenizer(resolve(lay.models_base, "student_init"))
        summary, history = stages.distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft,
                                                out / f"{name}-w{world}", out / f"ckpt-{name}-w{world}",
                                                sampler=lambda m: Replay(len(tok), tok.eos_token_id))
        stages.save_trained = real
        torch.save({"state": saved["state"], "history": history},
                   out / f"{name}-w{world}-rank{saved['rank']}.pt")


def fsdp2(root: Path, out: Path) -> None:
    """One OPD step, student sharded with FSDP2 on CPU (accelerate would fall back to DDP here, so
    ``fully_shard`` is applied directly); the same optimiser as opd.train."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.distributed.fsdp import fully_shard

    from opd.config import DistillConfig
    from opd.batch import PromptPool
    from opd.methods.sampled import sampled_step
    from opd.models import load_model, load_tokenizer

    lay = Layout(root)
    params = load(root / "params.yaml", {"distill.prompts_per_step": 8, "distill.warmup_steps": 0})
    acc = Accelerator(cpu=True)
    s_path, t_path = resolve(lay.models_base, "student_init"), resolve(lay.models_base, "teacher")
    tok = load_tokenizer(s_path)
    student = load_model(s_path)
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)
    teacher = load_model(t_path).eval().requires_grad_(False)
    pool = PromptPool(load_rows(lay.prepared, "train"), tok)
    opt = torch.optim.AdamW(student.parameters(), lr=params.distill.lr, betas=(0.9, 0.98), weight_decay=0.0)
    d: DistillConfig = params.distill
    step = sampled_step(acc, student, {"default": teacher}, pool, Replay(len(tok), tok.eos_token_id), tok, d,
                    params.rollout, lambda loss: {})
    student.train()
    set_seed(params.seed * 1_000_003)  # what opd.train does before step 0
    step(0)
    torch.nn.utils.clip_grad_norm_(student.parameters(), d.max_grad_norm)
    opt.step()
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in student.state_dict().items()}
    if acc.is_main_process:
        torch.save({"state": full}, out / "fsdp2.pt")


def resume(root: Path, out: Path) -> None:
    """distill_stage (6 steps, a checkpoint every 2) into ``out/student``; with ``$KILL_AT`` set, rank 0
    kills itself with SIGKILL after that step (torchrun then stops the other rank). With ``$CKPT_PER_RANK``
    each rank has its own checkpoint folder, as nodes without a shared file system have."""
    import os
    import signal

    kill_at = int(os.environ.get("KILL_AT", "0"))
    lay = Layout(root)
    params = load(root / "params.yaml", {"distill.steps": 6, "distill.checkpoint_every": 2, "distill.log_every": 1,
                                         "distill.prompts_per_step": 8})

    def log(step, metrics):
        if step == kill_at and int(os.environ.get("RANK", "0")) == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt = out / (f"ckpt-rank{os.environ.get('RANK', '0')}" if os.environ.get("CKPT_PER_RANK") else "ckpt")
    stages.distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, out / "student", ckpt, log)


def remote(root: Path, out: Path) -> None:
    """One OPD step scored by the teacher server at ``$TEACHER_URL`` (every rank a client of the same
    server), the deterministic sampler; each rank saves its final parameters."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    lay = Layout(root)
    params = load(root / "params.yaml", {"distill.steps": 1, "distill.prompts_per_step": 8, "distill.warmup_steps": 0,
                                         "teacher.server": {"url": os.environ["TEACHER_URL"]}})
    saved = {}
    real = stages.save_trained

    def keep(acc, model, tok, path, files=None, finish=None):
        saved["state"], saved["rank"] = {k: v.detach().clone() for k, v in model.state_dict().items()}, acc.process_index
        real(acc, model, tok, path, files, finish)

    stages.save_trained = keep
    from opd.models import load_tokenizer

    tok = load_tokenizer(resolve(lay.models_base, "student_init"))
    stages.distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, out / f"remote-w{world}",
                         out / f"ckpt-remote-w{world}", sampler=lambda m: Replay(len(tok), tok.eos_token_id))
    torch.save(saved["state"], out / f"remote-w{world}-rank{saved['rank']}.pt")


def nan(root: Path, out: Path) -> None:
    """Rank 1 reports a NaN loss (its gradient stays finite): without a global decision rank 0 would
    step on and wait forever for rank 1 at the next all-reduce."""
    from opd.batch import PromptPool
    from opd.methods.sft import sft_step
    from opd.models import load_model, load_tokenizer
    from opd.train import LoopSettings, NonFiniteLoss, make_accelerator, train

    lay = Layout(root)
    params = load(root / "params.yaml")
    acc = make_accelerator(params.runtime)
    s_path = resolve(lay.models_base, "student_init")
    tok = load_tokenizer(s_path)
    pool = PromptPool(load_rows(lay.prepared, "train"), tok)

    def factory(m, _):
        real = sft_step(acc, m, pool, tok, 8)

        def step(i):
            metrics = real(i)
            return {**metrics, "loss": float("nan")} if i == 1 and acc.process_index == 1 else metrics
        return step

    try:
        train(acc, load_model(s_path), factory, LoopSettings(steps=4, lr=1e-3))
        (out / f"nan-rank{acc.process_index}.txt").write_text("finished")
    except NonFiniteLoss as err:
        (out / f"nan-rank{acc.process_index}.txt").write_text(str(err))


if __name__ == "__main__":
    mode, root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    {"methods": methods, "fsdp2": fsdp2, "nan": nan, "resume": resume, "remote": remote}[mode](root, out)
    print(json.dumps({"mode": mode, "done": True}))
