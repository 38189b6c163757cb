"""Every formula against a brute-force float64 reference on random inputs."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.losses import (divergence, divergence_logprobs, entropy, head_chunks, kl_k3, masked_mean, pg_plain,
                        pg_ppo_clip, token_logprobs, topk_with_tail)

RTOL = 1e-5


def rand_logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)


def softmax_np(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def ref_divergence(s_row, t_row, kind, beta, temp=1.0):
    s, t = softmax_np(np.asarray(s_row) / temp), softmax_np(np.asarray(t_row) / temp)
    if kind == "forward_kl":
        return ref_kl(t, s)
    if kind == "reverse_kl":
        return ref_kl(s, t)
    m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t)]
    return beta * ref_kl(t, m) + (1 - beta) * ref_kl(s, m)


def test_token_logprobs_and_entropy():
    logits, ids = rand_logits(3, 5, 11), torch.randint(11, (3, 5), generator=torch.Generator().manual_seed(1))
    lp, ent = token_logprobs(logits, ids), entropy(logits)
    for b in range(3):
        for t in range(5):
            p = softmax_np(logits[b, t].numpy())
            assert math.isclose(lp[b, t].item(), math.log(p[ids[b, t]]), rel_tol=RTOL)
            assert math.isclose(ent[b, t].item(), -sum(pi * math.log(pi) for pi in p), rel_tol=RTOL)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                       ("jsd", 0.9)])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_divergences_match_reference(kind, beta, temp):
    s, t = rand_logits(2, 4, 13, seed=2), rand_logits(2, 4, 13, seed=3)
    got = divergence(s, t, kind, beta, temp)
    for b in range(2):
        for i in range(4):
            want = ref_divergence(s[b, i].numpy(), t[b, i].numpy(), kind, beta, temp)
            assert math.isclose(got[b, i].item(), want, rel_tol=RTOL, abs_tol=1e-12)


def test_jsd_limits():
    s, t = rand_logits(6, 17, seed=4), rand_logits(6, 17, seed=5)
    fwd, rev = divergence(s, t, "forward_kl"), divergence(s, t, "reverse_kl")
    torch.testing.assert_close(divergence(s, t, "jsd", 0.0), fwd, rtol=RTOL, atol=0)  # GKD convention
    torch.testing.assert_close(divergence(s, t, "jsd", 1.0), rev, rtol=RTOL, atol=0)
    # the raw formula: JSD_beta / beta -> forward KL as beta -> 0 (the next term is
    # O(beta * chi^2(T || S)), so moderate logits keep it small)
    s1, t1 = rand_logits(6, 17, seed=4, scale=1.0), rand_logits(6, 17, seed=5, scale=1.0)
    s_lp, t_lp = torch.log_softmax(s1, -1), torch.log_softmax(t1, -1)
    small = 1e-7
    torch.testing.assert_close(divergence_logprobs(s_lp, t_lp, "jsd", small) / small,
                               divergence(s1, t1, "forward_kl"), rtol=1e-4, atol=0)
    assert torch.all(divergence(s, t, "jsd", 0.5) >= 0)
    assert torch.allclose(divergence(s, s, "jsd", 0.5), torch.zeros(6, dtype=torch.float64), atol=1e-12)


def test_topk_tail_sums_to_one_and_matches_reference():
    s, t = rand_logits(4, 20, seed=6), rand_logits(4, 20, seed=7)
    t_k, s_k = topk_with_tail(torch.log_softmax(t, -1), torch.log_softmax(s, -1), 5)
    torch.testing.assert_close(t_k.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(s_k.exp().sum(-1), torch.ones(4, dtype=torch.float64))
    for b in range(4):
        pt, ps = softmax_np(t[b].numpy()), softmax_np(s[b].numpy())
        idx = np.argsort(-pt)[:5]
        rt, rs = list(pt[idx]) + [1 - pt[idx].sum()], list(ps[idx]) + [1 - ps[idx].sum()]
        assert math.isclose(divergence_logprobs(s_k[b], t_k[b], "forward_kl").item(), ref_kl(rt, rs), rel_tol=RTOL)
    # with k = V the tail is empty and the divergence equals the full one
    t_all, s_all = topk_with_tail(torch.log_softmax(t, -1), torch.log_softmax(s, -1), 20)
    torch.testing.assert_close(divergence_logprobs(s_all, t_all, "reverse_kl"), divergence(s, t, "reverse_kl"),
                               rtol=1e-4, atol=1e-6)


def ref_ppo(lp, old, a, eps, dual):
    r = math.exp(lp - old)
    loss = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
    if dual is not None and a < 0:
        loss = min(loss, -a * dual)
    return loss


@given(st.lists(st.tuples(st.floats(-4, 0), st.floats(-4, 0), st.floats(-5, 5)), min_size=1, max_size=30),
       st.sampled_from([None, 3.0]))
@settings(max_examples=60, deadline=None)
def test_ppo_clip_matches_reference(rows, dual):
    lp, old, adv = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    got = pg_ppo_clip(lp, old, adv, 0.2, dual)
    for i, (a, b, c) in enumerate(rows):
        assert math.isclose(got[i].item(), ref_ppo(a, b, c, 0.2, dual), rel_tol=RTOL, abs_tol=1e-12)


def test_ppo_equals_plain_gradient_on_policy():
    lp = rand_logits(10, seed=8).clamp(max=-0.01).requires_grad_()
    adv = rand_logits(10, seed=9)
    g_ppo, = torch.autograd.grad(pg_ppo_clip(lp, lp.detach(), adv).sum(), lp)
    g_plain, = torch.autograd.grad(pg_plain(lp, adv).sum(), lp)
    torch.testing.assert_close(g_ppo, g_plain)


def test_kl_k3_reference_and_unbiased():
    lp, ref = -rand_logits(50, seed=10).abs(), -rand_logits(50, seed=11).abs()
    got = kl_k3(lp, ref)
    for i in range(50):
        d = min(max(ref[i].item() - lp[i].item(), -20.0), 20.0)
        assert math.isclose(got[i].item(), min(math.exp(d) - d - 1, 10.0), rel_tol=RTOL, abs_tol=1e-12)
    assert torch.all(got >= 0)
    # without verl's clamps, k3 is an unbiased estimator of KL(p || q) for samples from p
    p_logits, q_logits = rand_logits(8, seed=12, scale=1.0), rand_logits(8, seed=13, scale=1.0)
    p_lp, q_lp = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    exact = (p_lp.exp() * (p_lp - q_lp)).sum()
    mc = (p_lp.exp() * kl_k3(p_lp, q_lp, math.inf, math.inf)).sum()  # expectation over p, in closed form
    torch.testing.assert_close(mc, exact)


def test_masked_mean_uses_the_given_global_count():
    x, m = torch.arange(6.0), torch.tensor([1.0, 1, 0, 1, 0, 0])
    assert masked_mean(x, m).item() == pytest.approx((0 + 1 + 3) / 3)
    assert masked_mean(x, m, 8).item() == pytest.approx(4 / 8)


def test_no_gradient_through_teacher_or_advantages():
    s = rand_logits(3, 9, seed=14).requires_grad_()
    t = rand_logits(3, 9, seed=15).requires_grad_()
    divergence(s, t, "jsd", 0.3).sum().backward()
    assert s.grad is not None and t.grad is None
    lp, adv = rand_logits(5, seed=16).requires_grad_(), rand_logits(5, seed=17).requires_grad_()
    (pg_ppo_clip(lp, lp.detach(), adv).sum() + pg_plain(lp, adv).sum()).backward()
    assert lp.grad is not None and adv.grad is None


def test_head_chunks_equal_unchunked_values_and_gradients():
    g = torch.Generator().manual_seed(18)
    w = torch.randn(23, 8, dtype=torch.float64, generator=g, requires_grad=True)
    wt = torch.randn(23, 8, dtype=torch.float64, generator=g)
    h = torch.randn(37, 8, dtype=torch.float64, generator=g, requires_grad=True)
    ht = torch.randn(37, 8, dtype=torch.float64, generator=g)

    def fn(hc, tc):
        return divergence(hc @ w.T, tc @ wt.T, "jsd", 0.4)

    full = fn(h, ht)
    gw_full, gh_full = torch.autograd.grad(full.sum(), [w, h])
    chunked = head_chunks(fn, h, ht, chunk=5)
    gw, gh = torch.autograd.grad(chunked.sum(), [w, h])
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(gw, gw_full)
    torch.testing.assert_close(gh, gh_full)


def test_masked_mean_of_a_boolean_is_a_fraction():
    """COPSD's reward_clipped_frac once logged a count (the bool dtype leaked into the denominator)."""
    hits = torch.tensor([[True, False, True], [False, False, True]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert float(masked_mean(hits, mask)) == pytest.approx(2 / 5)


def test_kl_k3_is_finite_for_extreme_gaps_and_clamped_as_verl():
    logp = torch.tensor([-200.0, -1.0, -0.1, -90.0], dtype=torch.float32)
    ref = torch.tensor([-0.1, -1.0, -200.0, -0.5], dtype=torch.float32)
    got = kl_k3(logp, ref)
    assert torch.isfinite(got).all()  # unclamped: exp(199.9) = inf in float32
    d = (ref - logp).double().clamp(-20, 20)
    torch.testing.assert_close(got.double(), (d.exp() - d - 1).clamp(-10, 10), rtol=1e-6, atol=1e-6)
    assert float(got[1]) == 0.0 and float(got[0]) == 10.0
