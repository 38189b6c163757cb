"""Models, scoring and rollout against direct transformers computations."""

import pytest
import torch

from opd.config import ArchConfig, RolloutConfig, WorldConfig
from opd.losses import divergence, token_logprobs
from opd.models import ModelError, build_llama, check_compatible, load_model, load_tokenizer, save_model
from opd.rollout import TransformersBackend, cut_at_eos, rollout
from opd.scoring import Sequences, token_stats, vocab_divergence
from opd.tokens import prompt_ids, response_ids
from opd.world import build_world, train_tokenizer

ARCH_T = ArchConfig(hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2)
ARCH_S = ArchConfig(hidden_size=16, num_layers=1, intermediate_size=32, num_heads=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rows = build_world(WorldConfig(n_reasoning=40, n_safety=20, n_borderline=20, n_general=20), 0)
    tok = train_tokenizer([r.prompt + (r.reference or "") for r in rows], 300)
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return rows, load_tokenizer(path)


def batch_of(rows, tok, n=5):
    return Sequences.build([prompt_ids(tok, r.prompt) for r in rows[:n]],
                           [response_ids(tok, r.reference) for r in rows[:n]], tok.pad_token_id)


def full_logprobs(model, seq):
    logits = model(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits[:, :-1].double()
    return token_logprobs(logits, seq.input_ids[:, 1:]) * seq.targets_mask, logits


def test_token_stats_equal_full_forward_pass(world):
    rows, tok = world
    model = build_llama(ARCH_S, tok, 0).double()
    seq = batch_of(rows, tok)
    want, logits = full_logprobs(model, seq)
    for chunk in (3, 10_000):
        got, ent = token_stats(model, seq, chunk=chunk, with_entropy=True)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    p = torch.softmax(logits, -1)
    want_ent = -(p * torch.log(p)).sum(-1) * seq.targets_mask
    torch.testing.assert_close(ent, want_ent, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("top_k", [0, 7])
def test_vocab_divergence_chunked_equals_unchunked(world, top_k):
    rows, tok = world
    student, teacher = build_llama(ARCH_S, tok, 0).double(), build_llama(ARCH_T, tok, 1).double()
    seq = batch_of(rows, tok)
    grads = []
    outs = []
    for chunk in (4, 10_000):
        student.zero_grad()
        d = vocab_divergence(student, seq, teacher, seq, "jsd", 0.3, 0.9, chunk=chunk, top_k=top_k)
        d.sum().backward()
        outs.append(d.detach())
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert all(p.grad is None for p in teacher.parameters())
    if top_k == 0:  # and against the divergence of the full logits
        s_logits = student(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits[:, :-1]
        t_logits = teacher(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits[:, :-1]
        want = divergence(s_logits, t_logits, "jsd", 0.3, 0.9) * seq.targets_mask
        torch.testing.assert_close(outs[0], want.detach())


def test_rollout_masks_and_logprobs(world):
    rows, tok = world
    torch.manual_seed(0)
    model = build_llama(ARCH_S, tok, 0)
    prompts = [prompt_ids(tok, r.prompt) for r in rows[:6]]
    cfg = RolloutConfig(max_new_tokens=10, batch_size=4)
    ro = rollout(TransformersBackend(model, tok, cfg), model, prompts, 2, tok.pad_token_id)
    assert len(ro.responses) == 12 and ro.prompt_index.tolist() == [i // 2 for i in range(12)]
    eos = tok.eos_token_id
    for b, (p, r) in enumerate(zip(ro.prompts, ro.responses)):
        assert p == prompts[b // 2]
        # the mask covers exactly the generated tokens, up to and including the first EOS
        assert ro.seq.response_mask[b].tolist() == [0] * len(p) + [1] * len(r) + [0] * (ro.seq.input_ids.shape[1] - len(p) - len(r))
        assert ro.seq.input_ids[b, len(p):len(p) + len(r)].tolist() == r
        assert (eos in r) == (not ro.truncated[b].item())
        assert eos not in r[:-1]
        assert 1 <= len(r) <= 10
    fresh, _ = full_logprobs(model, ro.seq)
    torch.testing.assert_close(ro.old_logprobs.double(), fresh, rtol=1e-5, atol=1e-5)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 1, 0, 0], 1) == ([5, 6, 1], False)
    assert cut_at_eos([5, 6, 7], 1) == ([5, 6, 7], True)


def test_mask_truncated_drops_unfinished_samples(world):
    rows, tok = world
    model = build_llama(ARCH_S, tok, 0)
    cfg = RolloutConfig(max_new_tokens=2, batch_size=8)  # an untrained model rarely stops in 2 tokens
    ro = rollout(TransformersBackend(model, tok, cfg), model, [prompt_ids(tok, r.prompt) for r in rows[:8]], 1,
                 tok.pad_token_id, mask_truncated=True)
    for b in range(8):
        if ro.truncated[b]:
            assert ro.seq.response_mask[b].sum() == 0


def test_save_load_roundtrip_and_errors(world, tmp_path):
    rows, tok = world
    model = build_llama(ARCH_S, tok, 0)
    save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded = load_model(tmp_path / "m")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "pickle").mkdir()
    torch.save(model.state_dict(), tmp_path / "pickle" / "pytorch_model.bin")
    with pytest.raises(ModelError, match="no .safetensors"):
        load_model(tmp_path / "pickle")


def test_tokenizer_mismatch_is_reported(world):
    rows, tok = world
    other = train_tokenizer([r.prompt for r in rows[:10]], 280)
    check_compatible(tok, tok)
    with pytest.raises(ModelError) as e:
        check_compatible(other, tok)
    msg = str(e.value)
    assert "vocabulary sizes 280 vs 300" in msg and "differing (token, id)" in msg
