"""Run in a venv that has only the engine's dependencies: import opd, then one sampled-token OPD step
on a tiny world, with no orchestration or tracking package installed (tests/test_install.py)."""

import importlib.util
import json

import torch

absent = [m for m in ("prefect", "mlflow", "dvc", "great_expectations", "datasets", "matplotlib")
          if importlib.util.find_spec(m) is not None]
assert not absent, f"the engine install pulled in {absent}"

from opd.batch import PromptPool  # noqa: E402
from opd.config import ArchConfig, DistillConfig, RolloutConfig, RuntimeConfig, WorldConfig  # noqa: E402
from opd.methods.sampled import sampled_step  # noqa: E402
from opd.models import build_llama  # noqa: E402
from opd.rollout import TransformersBackend  # noqa: E402
from opd.train import LoopSettings, make_accelerator, train  # noqa: E402
from opd.world import build_world, train_tokenizer  # noqa: E402

rows = build_world(WorldConfig(n_reasoning=40, n_safety=20, n_borderline=20, n_general=20), 0)
tok = train_tokenizer([r.prompt + (r.reference or "") for r in rows], 300)
teacher = build_llama(ArchConfig(hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2), tok, 0).eval()
student = build_llama(ArchConfig(hidden_size=16, num_layers=1, intermediate_size=32, num_heads=2), tok, 1)
acc = make_accelerator(RuntimeConfig(device="cpu", allocator="system"))
rcfg = RolloutConfig(max_new_tokens=8)
d = DistillConfig(prompts_per_step=4)
pool = PromptPool([r for r in rows if r.split == "train"], tok)


def factory(m, optimize):
    return sampled_step(acc, m, {"default": teacher}, pool, TransformersBackend(m, tok, rcfg), tok, d, rcfg, optimize)


_, history = train(acc, student, factory, LoopSettings(steps=1, lr=1e-3))
assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))
print(json.dumps(history[0]))
