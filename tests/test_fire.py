"""FiRe-OPD: filter, weights, multi-teacher routing, and equivalence with vanilla OPD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.config import ArchConfig, DistillConfig, FireConfig, RolloutConfig, WorldConfig
from opd.batch import PromptPool
from opd.methods.fire import fire_shaping
from opd.methods.sampled import reverse_kl_advantage, sampled_step, teacher_logprobs
from opd.fire import confidence_weights, filter_audit, fire_advantages, normalise_weights, trajectory_filter, trajectory_scores
from opd.models import build_llama, load_tokenizer
from opd.rollout import TransformersBackend
from opd.scoring import Sequences, token_stats
from opd.train import make_accelerator
from opd.config import RuntimeConfig
from opd.world import build_world, train_tokenizer


def rand(*shape, seed=0, low=0.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64) * (high - low) + low


def ragged_mask(b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    return (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).double()


@pytest.mark.parametrize("n", [5, 10, 16, 37])
@pytest.mark.parametrize("q", [0.2, 0.5])
def test_filter_drops_floor_or_ceil_of_the_quantile_fraction(n, q):
    scores = rand(n, seed=n) * -3
    keep, tau = trajectory_filter(scores, q)
    dropped = int((keep == 0).sum())
    pos = q * (n - 1)
    assert dropped in {math.floor(pos), math.ceil(pos)}
    assert torch.all(scores[keep == 1] >= tau) and torch.all(scores[keep == 0] < tau)
    assert math.isclose(tau.item(), float(np.quantile(scores.numpy(), q)), rel_tol=1e-12)


def test_trajectory_scores_are_teacher_mean_logprobs():
    t_logp, mask = -rand(4, 6, seed=1, high=3), ragged_mask(4, 6, seed=2)
    got = trajectory_scores(t_logp, mask)
    for i in range(4):
        vals = [t_logp[i, t].item() for t in range(6) if mask[i, t]]
        assert math.isclose(got[i].item(), sum(vals) / len(vals), rel_tol=1e-12)


def test_global_quantile_across_processes():
    """Two 'processes' of 5: the threshold is the quantile of all 10 scores, not of each half."""
    a, b = rand(5, seed=3) * -3, rand(5, seed=4) * -3 - 1.0
    mask = torch.ones(5, 4, dtype=torch.float64)
    t_a = a.unsqueeze(1).expand(5, 4).contiguous()
    out = fire_advantages(torch.ones(5, 4, dtype=torch.float64), t_a, None, None, mask, filter_on=True, q=0.5,
                          reweight=False, alpha=1, beta=1, normalize="trajectory",
                          gather=lambda x: torch.cat([x, b if x.dtype == torch.float64 else torch.ones_like(x)]))
    tau = float(np.quantile(torch.cat([a, b]).numpy(), 0.5))
    assert math.isclose(out.tau.item(), tau, rel_tol=1e-12)
    assert torch.equal(out.keep.bool(), a >= tau)


def ref_weights(t_ent, s_ent, mask, alpha, beta):
    valid = [(i, t) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    t_max = max(t_ent[i, t].item() for i, t in valid)
    s_max = max(s_ent[i, t].item() for i, t in valid)
    w = np.zeros(mask.shape)
    for i, t in valid:
        ct = min(max(1 - t_ent[i, t].item() / t_max, 0), 1)
        cs = min(max(s_ent[i, t].item() / s_max, 0), 1)
        w[i, t] = (1 + alpha * ct) * (1 + beta * cs)
    return w


@given(st.integers(0, 10_000), st.floats(0, 2), st.floats(0, 2))
@settings(max_examples=30, deadline=None)
def test_weights_match_reference_and_bounds(seed, alpha, beta):
    t_ent, s_ent, mask = rand(3, 7, seed=seed, high=4), rand(3, 7, seed=seed + 1, high=4), ragged_mask(3, 7, seed)
    w = confidence_weights(t_ent, s_ent, mask, alpha, beta)
    np.testing.assert_allclose(w.numpy(), ref_weights(t_ent, s_ent, mask, alpha, beta), rtol=1e-12, atol=1e-12)
    valid = w[mask.bool()]
    assert torch.all(valid >= 1 - 1e-12) and torch.all(valid <= (1 + alpha) * (1 + beta) + 1e-12)


def test_default_weights_in_one_to_four_and_normalised_to_mean_one():
    t_ent, s_ent, mask = rand(6, 9, seed=5, high=5), rand(6, 9, seed=6, high=5), ragged_mask(6, 9, 7)
    w = confidence_weights(t_ent, s_ent, mask, 1.0, 1.0)
    assert torch.all(w[mask.bool()] >= 1) and torch.all(w[mask.bool()] <= 4)
    per_traj = normalise_weights(w, mask, "trajectory")
    means = (per_traj * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(means, torch.ones(6, dtype=torch.float64))
    batch = normalise_weights(w, mask, "batch")
    assert math.isclose(((batch * mask).sum() / mask.sum()).item(), 1.0, rel_tol=1e-12)
    assert torch.all(per_traj[mask == 0] == 0) and torch.all(batch[mask == 0] == 0)


def test_no_gradient_through_weights_or_advantages():
    t_ent = rand(2, 5, seed=8, high=3).requires_grad_()
    s_ent = rand(2, 5, seed=9, high=3).requires_grad_()
    adv = rand(2, 5, seed=10, low=-1).requires_grad_()
    t_logp = (-rand(2, 5, seed=11, high=3)).requires_grad_()
    out = fire_advantages(adv, t_logp, t_ent, s_ent, torch.ones(2, 5, dtype=torch.float64), filter_on=True, q=0.2,
                          reweight=True, alpha=1, beta=1, normalize="trajectory")
    assert not out.adv.requires_grad and not out.weights.requires_grad


def test_filter_off_and_zero_alpha_beta_is_vanilla():
    adv, t_logp = rand(4, 6, seed=12, low=-2, high=2), -rand(4, 6, seed=13, high=3)
    t_ent, s_ent, mask = rand(4, 6, seed=14, high=3), rand(4, 6, seed=15, high=3), ragged_mask(4, 6, 16)
    for how in ("trajectory", "batch"):
        out = fire_advantages(adv * mask, t_logp, t_ent, s_ent, mask, filter_on=False, q=0.2, reweight=True,
                              alpha=0.0, beta=0.0, normalize=how)
        torch.testing.assert_close(out.adv, adv * mask)
        torch.testing.assert_close(out.mask, mask)


# ----------------------------------------------------------------------------- with real (tiny) models
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rows = [r for r in build_world(WorldConfig(n_reasoning=60, n_safety=20, n_borderline=20, n_general=20), 0)
            if r.split == "train"]
    tok = train_tokenizer([r.prompt + (r.reference or "") for r in rows], 300)
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    tok = load_tokenizer(path)
    arch = ArchConfig(hidden_size=16, num_layers=1, intermediate_size=32, num_heads=2)
    return rows, tok, arch


def grads_of_one_step(setup, shape_of, grad_accum, n_prompts=8):
    rows, tok, arch = setup
    acc = make_accelerator(RuntimeConfig(device="cpu"))
    student, teacher = build_llama(arch, tok, 0), build_llama(arch, tok, 1).eval()
    cfg = DistillConfig(prompts_per_step=n_prompts, grad_accum=grad_accum)
    rcfg = RolloutConfig(max_new_tokens=8, batch_size=8)
    torch.manual_seed(0)
    shape, need = shape_of(acc)
    step = sampled_step(acc, student, {"default": teacher}, PromptPool(rows, tok), TransformersBackend(student, tok, rcfg),
                    tok, cfg, rcfg, lambda loss: {}, shape=shape, need_entropy=need)  # keep the gradient: no update
    metrics = step(0)
    return metrics, torch.cat([p.grad.flatten() for p in student.parameters()])


def test_micro_batch_size_does_not_change_the_filter(setup):
    """The reference code's bug: a per-micro-batch quantile at micro-batch 1 keeps everything.
    Here the quantile is over the whole batch, so micro-batches of 1 and of 4 give one result."""
    fire = lambda acc: (fire_shaping(acc, FireConfig(filter=True, filter_quantile=0.2)), True)  # noqa: E731
    m1, g1 = grads_of_one_step(setup, fire, grad_accum=8)  # micro-batch size 1
    m4, g4 = grads_of_one_step(setup, fire, grad_accum=2)  # micro-batch size 4
    m8, g8 = grads_of_one_step(setup, fire, grad_accum=1)
    assert m1["kept_frac"] == m4["kept_frac"] == m8["kept_frac"]
    assert 8 - round(m1["kept_frac"] * 8) in {math.floor(0.2 * 7), math.ceil(0.2 * 7)}  # 1 or 2 of 8 dropped
    torch.testing.assert_close(g1, g8, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g4, g8, rtol=1e-4, atol=1e-6)


def test_fire_with_filter_off_and_zero_weights_equals_vanilla_opd_step(setup):
    plain = lambda acc: (reverse_kl_advantage, False)  # noqa: E731
    neutral = lambda acc: (fire_shaping(acc, FireConfig(filter=False, alpha=0.0, beta=0.0)), True)  # noqa: E731
    m_a, g_a = grads_of_one_step(setup, plain, 1)
    m_b, g_b = grads_of_one_step(setup, neutral, 1)
    assert math.isclose(m_a["loss"], m_b["loss"], rel_tol=1e-5, abs_tol=1e-7)
    torch.testing.assert_close(g_a, g_b, rtol=1e-5, atol=1e-7)


def test_rows_are_scored_by_their_own_teacher(setup):
    rows, tok, arch = setup
    t_a, t_b = build_llama(arch, tok, 10).eval(), build_llama(arch, tok, 20).eval()
    mixed = [r for r in rows if r.task == "reasoning"][:3] + [r for r in rows if r.task != "reasoning"][:3]
    pool = PromptPool(mixed, tok, {"a": tok, "b": tok}, route=lambda r: "a" if r.task == "reasoning" else "b")
    examples = pool.examples
    assert {e.teacher for e in examples} == {"a", "b"}
    responses = [list(e.reference) for e in examples]
    got = teacher_logprobs({"a": t_a, "b": t_b}, examples, responses, tok.pad_token_id).logp
    seq = Sequences.build([e.student_prompt for e in examples], responses, tok.pad_token_id)
    with torch.no_grad():
        lp_a, _ = token_stats(t_a, seq)
        lp_b, _ = token_stats(t_b, seq)
    assert not torch.allclose(lp_a, lp_b)  # the two teachers disagree
    for i, e in enumerate(examples):
        want = lp_a[i] if e.teacher == "a" else lp_b[i]
        torch.testing.assert_close(got[i], want)


def test_unknown_teacher_name_fails_clearly(setup):
    rows, tok, _ = setup
    with pytest.raises(ValueError, match="names teacher 'zzz'"):
        PromptPool(rows[:3], tok, {"default": tok}, route=lambda r: "zzz")


def test_filter_audit_against_a_loop():
    """Mean teacher reliability of kept vs dropped valid trajectories; NaN (unmeasured) and invalid rows
    take no part; a side with no trajectory has no key; gathered across processes it is global."""
    g = torch.Generator().manual_seed(3)
    keep = (torch.rand(40, generator=g) > 0.3).float()
    valid = torch.rand(40, generator=g) > 0.1
    rel = torch.rand(40, generator=g)
    rel[::7] = float("nan")
    got = filter_audit(keep, valid, rel)
    for key, side in (("kept_reliability", 1.0), ("dropped_reliability", 0.0)):
        vals = [float(rel[i]) for i in range(40) if valid[i] and keep[i] == side and not math.isnan(rel[i])]
        assert got[key] == pytest.approx(sum(vals) / len(vals), abs=1e-6)
    assert set(filter_audit(torch.ones(4), torch.ones(4, dtype=torch.bool), torch.rand(4))) == {"kept_reliability"}
    halves = [slice(0, 20), slice(20, 40)]
    gathered = lambda x: torch.cat([x, x])  # noqa: E731  two identical ranks: the global mean is the local one
    assert filter_audit(keep[halves[0]], valid[halves[0]], rel[halves[0]], gathered) == pytest.approx(
        filter_audit(keep[halves[0]], valid[halves[0]], rel[halves[0]]))


def test_routing_noise_sends_the_given_fraction_of_rows_to_another_teacher():
    """distill.routing_noise: a teacher out of its domain on some rows (a reliability setting), drawn per row
    id and seed: the same rows every run, about the given fraction, each to a teacher that is not its own."""
    from opd.data import Row
    from opd.stages import router

    rows = [Row(id=f"r{i}", split="train", task="reasoning", category="none", prompt="p", reference="r",
                teacher=("reasoning", "general", "")[i % 3]) for i in range(3000)]
    names = ["default", "general", "reasoning"]
    clean = router("by_row", names)
    assert [clean(r) for r in rows[:3]] == ["reasoning", "general", "default"]
    assert router("single", names, 0.5)(rows[0]) == "default"
    noisy = router("by_row", names, 0.3, seed=1)
    moved = [r for r in rows if noisy(r) != clean(r)]
    assert abs(len(moved) / len(rows) - 0.3) < 0.03
    assert {noisy(r) for r in moved} == set(names) and [noisy(r) for r in rows] == [router("by_row", names, 0.3, 1)(r) for r in rows]
    assert [noisy(r) for r in rows] != [router("by_row", names, 0.3, 2)(r) for r in rows]
