"""LoRA students (``student.lora``, opd/lora.py): one step against the same step by hand, the base with the
adapters off as the initial student, adapter-only checkpoints that resume exactly, the merged save."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from opd import lora
from opd.config import LoraConfig, RuntimeConfig
from opd.models import load_model
from opd.params import load
from opd.paths import resolve
from opd.scoring import Sequences, policy_stats, teacher_pass
from opd.stages import distill_stage
from opd.train import LoopSettings, make_accelerator, train
from tests.test_stages import stop_at

SCALE = 8.0 / 4  # alpha / r below
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def small_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))


def adapted(base: torch.nn.Module) -> torch.nn.Module:
    """``base`` with adapters whose B is not zero (at init it is, and A would get no gradient)."""
    model = lora.attach(copy.deepcopy(base), LoraConfig(**LORA), seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def sequences() -> Sequences:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (5, 3, 7)]
    responses = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (4, 6, 2)]
    return Sequences.build(prompts, responses, pad_id=0)


def adapted_weights(model: torch.nn.Module) -> list[str]:
    """The names, in the plain model, of the weights that carry an adapter."""
    return [name.removeprefix("base_model.model.") + ".weight" for name, module in model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A]


def test_one_lora_step_equals_the_step_computed_by_hand():
    """The engine's training pass through a LoRA student and one AdamW step of the loop, against float64
    by hand: the loss on the merged weights W + s B A, its gradient G at each adapted W, the adapters'
    gradients s G A^T (for B) and s B^T G (for A), Adam's first step lr g / (|g| + eps), base untouched."""
    base = small_model()
    model = adapted(base)
    seq = sequences()
    acc = make_accelerator(RuntimeConfig(device="cpu", threads=1, allocator="system"))
    grads: dict[str, torch.Tensor] = {}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def factory(m, _):
        def step(i):
            st = policy_stats(m, seq, chunk=5)
            loss = -(st.logp * seq.targets_mask).sum() / seq.targets_mask.sum()
            acc.backward(loss)
            grads.update({n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None})
            return {"loss": float(loss)}
        return step

    lr = 1e-2
    trained, history = train(acc, model, factory, LoopSettings(steps=1, lr=lr, max_grad_norm=1e9))
    assert set(grads) == lora.trainable(trained) and grads  # the optimiser saw the adapters only

    # by hand: a plain float64 model holding the merged weights, full logits, no chunks
    ref = copy.deepcopy(base).double()
    pieces = adapted_weights(model)
    weights = dict(ref.named_parameters())
    with torch.no_grad():
        for name in pieces:
            weights[name].add_(SCALE * adapter_of(before, name, "B").double() @ adapter_of(before, name, "A").double())
    logits = ref(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, seq.input_ids[:, 1:, None])[..., 0]
    mask = seq.targets_mask.double()
    loss = -(logp * mask).sum() / mask.sum()
    loss.backward()
    assert history[0]["loss"] == pytest.approx(float(loss), rel=1e-5)
    for name in pieces:
        g_w = weights[name].grad
        a0, b0 = adapter_of(before, name, "A").double(), adapter_of(before, name, "B").double()
        want = {"A": SCALE * b0.T @ g_w, "B": SCALE * g_w @ a0.T}
        for part, expected in want.items():
            key = lora_key(before, name, part)
            torch.testing.assert_close(grads[key].double(), expected, rtol=1e-4, atol=1e-7)
            g = grads[key].double()
            step = before[key].double() - lr * g / (g.abs() + 1e-8)  # AdamW's first step (no weight decay)
            torch.testing.assert_close(dict(trained.named_parameters())[key].detach().double(), step, rtol=0, atol=1e-6)
    for name, p in trained.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name]), name  # the base never moves


def lora_key(state: dict[str, torch.Tensor], weight: str, part: str) -> str:
    """The PEFT parameter name of adapter ``part`` (A / B) of the plain model's ``weight``."""
    stem = weight.removesuffix(".weight")
    (key,) = [k for k in state if k.endswith(f"{stem}.lora_{part}.default.weight")]
    return key


def adapter_of(state: dict[str, torch.Tensor], weight: str, part: str) -> torch.Tensor:
    return state[lora_key(state, weight, part)]


def test_the_base_with_adapters_off_is_the_initial_student():
    """The reference model and a self-teacher of a LoRA run: the same bits as the plain base, while the
    adapted student differs; freezing the view does not freeze the student's adapters."""
    base = small_model()
    model = adapted(base)
    seq = sequences()
    off = lora.AdaptersOff(model)
    off.eval().requires_grad_(False)
    assert lora.trainable(model)  # untouched by the view's requires_grad_
    lp_off, ent_off, _ = teacher_pass(off, seq, chunk=4, with_entropy=True)
    lp_base, ent_base, _ = teacher_pass(base.eval(), seq, chunk=4, with_entropy=True)
    assert torch.equal(lp_off, lp_base) and torch.equal(ent_off, ent_base)
    lp_on, _, _ = teacher_pass(model.eval(), seq, chunk=4)
    assert not torch.allclose(lp_on, lp_base)
    assert torch.equal(policy_stats(off, seq, chunk=4).logp, lp_base)  # through the loop's wrapper path too


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tests.test_stages import tiny_project

    root = tmp_path_factory.mktemp("lora")
    return root, *tiny_project(root)


def lora_params(root, **more):
    return load(root / "params.yaml", {"distill.method": "copsd", "copsd.teacher": "self", "copsd.kl_coef": 0.1,
                                       "distill.steps": 4, "distill.checkpoint_every": 1,
                                       "student.lora": {**LORA, "keep_adapter": True}, **more})


def test_copsd_self_with_lora_checkpoints_adapters_only_resumes_exactly_and_saves_the_merged_model(base, tmp_path, capsys):
    root, lay, _, _ = base
    params = lora_params(root)
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "a", ck, stop_at(3))
    saved = load_file(ck / "step-000002" / "model.safetensors")  # stopped at step 3, before its checkpoint
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # no frozen base in a checkpoint
    summary, history = distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "a", ck)
    assert "resumed from" in capsys.readouterr().out and [h["step"] for h in history] == [1, 2, 3, 4]
    _, straight = distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "b", tmp_path / "ck-b")
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert [h["loss"] for h in history] == [h["loss"] for h in straight]
    counts = json.loads(json.dumps(summary))["lora"]
    assert 0 < counts["trainable_parameters"] < counts["parameters"] / 5

    # the merged save: a plain folder, W + (alpha / r) B A on the adapted layers, every other weight the base's
    out = tmp_path / "a"
    assert not (out / "adapter_config.json").exists() and (out / "adapter" / "adapter_config.json").is_file()
    merged = load_file(out / "model.safetensors")
    initial = load_file(resolve(lay.models_base, "student_init") / "model.safetensors")
    pieces = load_file(out / "adapter" / "adapter_model.safetensors")
    assert merged.keys() == initial.keys()
    changed = 0
    for name, w in initial.items():
        stem = name.removesuffix(".weight")
        a = pieces.get(f"base_model.model.{stem}.lora_A.weight")
        if a is None:
            assert torch.equal(merged[name], w), name
            continue
        b = pieces[f"base_model.model.{stem}.lora_B.weight"]
        torch.testing.assert_close(merged[name], w + SCALE * b @ a, rtol=0, atol=1e-6)
        changed += int(not torch.equal(merged[name], w))
    assert changed == 3  # q, v and down projections of the tiny student's one layer
    assert type(load_model(out)).__name__ == "LlamaForCausalLM"  # plain from_pretrained, no PEFT
    card = (out / "README.md").read_text()
    assert "LoRA adapters (" in card and "merged into this folder's weights" in card and "| student.lora.r | 4 |" in card


def test_lora_settings_are_checked_at_start(base):
    from opd.config import ConfigError

    root = base[0]
    with pytest.raises(ConfigError, match="student.lora.r"):
        load(root / "params.yaml", {"student.lora": {"r": 0}})
    with pytest.raises(ConfigError, match="student.lora.rank"):
        load(root / "params.yaml", {"student.lora": {"rank": 8}})
    with pytest.raises(ConfigError, match="fsdp2"):
        load(root / "params.yaml", {"student.lora": {}, "runtime.strategy": "fsdp2"})


def test_target_modules_the_student_lacks_are_named(base, tmp_path):
    root, lay, _, _ = base
    params = load(root / "params.yaml", {"student.lora": {"target_modules": ["c_attn"]}})
    with pytest.raises(ValueError, match=r"student.lora: .*c_attn"):
        distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "s", tmp_path / "ck")


def test_cross_sft_with_lora_saves_the_teacher_merged(base, tmp_path):
    """``cross_sft.lora``: the recalibrated teacher differs from the original on the adapted layers only,
    and is a plain folder (the distill stage loads it as any teacher)."""
    from opd.cross_sft import TEACHER_DIR, cross_sft_stage

    root, lay, _, _ = base
    params = load(root / "params.yaml", {"distill.method": "copsd", "cross_sft.epochs": 1,
                                         "cross_sft.lora": {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"],
                                                            "keep_adapter": True}})
    summary, history = cross_sft_stage(params, lay.prepared, lay.models_base, tmp_path / "cross", tmp_path / "ck")
    assert history and not (tmp_path / "ck").exists()
    tuned = load_file(tmp_path / "cross" / TEACHER_DIR / "model.safetensors")
    original = load_file(resolve(lay.models_base, "teacher") / "model.safetensors")
    assert tuned.keys() == original.keys()
    moved = sorted(k for k in original if not torch.equal(tuned[k], original[k]))
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved), moved
    assert type(load_model(tmp_path / "cross" / TEACHER_DIR)).__name__ == "LlamaForCausalLM"
    assert (tmp_path / "cross" / TEACHER_DIR / "adapter" / "adapter_model.safetensors").is_file()
