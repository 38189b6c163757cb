"""Models, scoring and rollout against direct transformers computations."""

import subprocess
import sys
from pathlib import Path

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


def test_default_threads_follow_the_cpu_affinity_and_the_process_count(monkeypatch):
    from opd import train

    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert train.default_threads(1) == 4 and train.default_threads(2) == 2 and train.default_threads(8) == 1
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert train.default_threads(1) == 1  # a process pinned to one core of a big machine


def test_sampling_ignores_the_model_generation_config_and_draws_from_the_pure_policy(world):
    """A folder's generation_config (repetition penalty, top-k, ...) must not change what is sampled:
    one-token samples follow softmax(logits / T) exactly."""
    import math
    from collections import Counter

    rows, tok = world
    torch.manual_seed(0)
    model = build_llama(ARCH_S, tok, 3)
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.top_k = 2
    model.generation_config.no_repeat_ngram_size = 1
    prompt = prompt_ids(tok, rows[0].prompt)
    cfg = RolloutConfig(max_new_tokens=1, batch_size=512, temperature=0.7)
    samples, _ = TransformersBackend(model, tok, cfg).sample([prompt], 4000)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    p = torch.softmax(logits / 0.7, -1)
    counts = Counter(s[0] for s in samples)
    assert len(counts) > 2  # top-k 2 would allow two tokens only
    # total variation over a few buckets (each of the 10 likeliest tokens, the prompt's tokens, which the
    # repetition penalty would push down, and the rest): sampling noise at n=4000 is ~0.02
    top = p.topk(10).indices.tolist()
    penalised = set(prompt) - set(top)
    buckets = [[t] for t in top] + [sorted(penalised), [t for t in range(len(p)) if t not in penalised and t not in top]]
    tv = 0.5 * sum(abs(sum(counts.get(t, 0) for t in b) / 4000 - float(p[b].sum())) for b in buckets)
    assert tv < 0.05, tv
    assert model.generation_config.repetition_penalty == 5.0  # the model's own config is left as it was
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_inverse_cdf_sampling_draws_softmax_of_the_tempered_logits(top_p):
    """The rollout's sampler against a float64 reference: the frequencies of 200k draws follow
    softmax(logits / T) (renormalised over the nucleus with top-p), a -inf logit is never drawn, and
    the row handed to generate's argmax is one-hot on the drawn token."""
    from opd.rollout import InverseCDFSampling

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, generator=g, dtype=torch.float64) * 2
    logits[3] = -torch.inf
    p = torch.softmax(logits / 0.7, -1)
    if top_p < 1.0:  # brute force: the smallest set of likeliest tokens whose mass reaches top_p
        order = p.argsort(descending=True)
        keep = order[: int((p[order].cumsum(0) < top_p).sum()) + 1]
        p = torch.zeros_like(p).index_put_((keep,), p[keep] / p[keep].sum())
    n = 200_000
    torch.manual_seed(1)
    scores = InverseCDFSampling(0.7, top_p)(torch.zeros(n, 1, dtype=torch.long), logits.float().expand(n, -1).clone())
    assert torch.isfinite(scores).sum(1).eq(1).all() and scores.max(1).values.eq(0).all()
    freq = torch.bincount(scores.argmax(1), minlength=12).double() / n
    assert freq[3] == 0 and (freq[p == 0] == 0).all()
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)


def test_a_bf16_sampler_samples_from_its_copy_and_sync_refreshes_it(world):
    """rollout.dtype bf16: the sampler is a bf16 copy of the student (parameters only; the rotary
    frequencies keep float32), generation reads the copy, and ``sync`` brings the student's current
    weights into it, so the next rollout samples the updated policy."""
    import copy

    from opd.rollout import half_copy

    rows, tok = world
    torch.manual_seed(0)
    student = build_llama(ARCH_S, tok, 3)
    backend = TransformersBackend(student, tok, RolloutConfig(max_new_tokens=6, batch_size=8, dtype="bf16"), greedy=True)
    assert {p.dtype for p in backend.twin.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in backend.twin.buffers()} == {b.dtype for b in student.buffers()}
    assert backend.twin.get_output_embeddings().weight is backend.twin.get_input_embeddings().weight  # tie kept
    prompts = [prompt_ids(tok, r.prompt) for r in rows[:6]]

    def greedy_of(model):
        return TransformersBackend(model, tok, RolloutConfig(max_new_tokens=6, batch_size=8), greedy=True).sample(prompts, 1)

    before = greedy_of(half_copy(student, torch.bfloat16))
    assert backend.sample(prompts, 1) == before
    old = copy.deepcopy(student)
    with torch.no_grad():  # an optimiser step that changes the policy
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = greedy_of(half_copy(student, torch.bfloat16))
    assert after != before
    assert backend.sample(prompts, 1) == before  # not refreshed yet: still the old weights
    backend.sync(student)
    assert backend.sample(prompts, 1) == after
    for tw, s in zip(backend.twin.parameters(), student.parameters(), strict=True):
        assert torch.equal(tw, s.detach().to(torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(old.buffers(), student.buffers(), strict=True))
    assert TransformersBackend(student, tok, RolloutConfig()).twin is None  # fp32: the student itself


def test_a_response_ends_at_any_stop_id(world):
    rows, tok = world
    model = build_llama(ARCH_S, tok, 0)
    model.generation_config.eos_token_id = [tok.eos_token_id, 7]
    from opd.rollout import stop_ids

    assert stop_ids(tok, model) == [tok.eos_token_id, 7]
    assert cut_at_eos([5, 7, 9, tok.eos_token_id], [tok.eos_token_id, 7]) == ([5, 7], False)


def test_pruning_keeps_the_chosen_layers_and_all_layers_give_the_same_logits(world):
    from opd.models import evenly_spaced, prune_layers

    rows, tok = world
    teacher = build_llama(ArchConfig(hidden_size=16, num_layers=4, intermediate_size=32, num_heads=2), tok, 0).eval()
    ids = torch.tensor([prompt_ids(tok, rows[0].prompt)])
    full = prune_layers(teacher, [0, 1, 2, 3]).eval()
    assert torch.equal(full(input_ids=ids).logits, teacher(input_ids=ids).logits)
    small = prune_layers(teacher, [0, 3])
    assert small.config.num_hidden_layers == 2 and small.model.layers[1].self_attn.layer_idx == 1
    for mine, theirs in ((small.model.layers[0], teacher.model.layers[0]), (small.model.layers[1], teacher.model.layers[3])):
        for (n, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), n
    assert torch.equal(small.lm_head.weight, teacher.lm_head.weight)
    assert evenly_spaced(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29] and evenly_spaced(4, 1) == [0]
    with pytest.raises(ModelError, match="keep_layers"):
        prune_layers(teacher, [3, 1])
    with pytest.raises(ModelError, match="not at model.layers"):
        prune_layers(torch.nn.Linear(2, 2), [0])


def test_teacher_is_scored_at_the_rollout_temperature(world):
    """Both references score the teacher at the sampling temperature: log_softmax(logits / T)."""
    from opd.batch import Example
    from opd.methods.sampled import teacher_logprobs

    rows, tok = world
    teacher = build_llama(ARCH_T, tok, 1).double().eval()
    ex = [Example(r, prompt_ids(tok, r.prompt), prompt_ids(tok, r.prompt), None, "default") for r in rows[:3]]
    responses = [response_ids(tok, r.reference) for r in rows[:3]]
    got = teacher_logprobs({"default": teacher}, ex, responses, tok.pad_token_id, temperature=0.7).logp
    seq = Sequences.build([e.student_prompt for e in ex], responses, tok.pad_token_id)
    logits = teacher(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits[:, :-1]
    want = token_logprobs(logits / 0.7, seq.input_ids[:, 1:]) * seq.targets_mask
    torch.testing.assert_close(got.double(), want.detach().float().double(), rtol=1e-5, atol=1e-5)


def test_bad_model_folders_are_named_with_what_to_do(world, tmp_path):
    import json

    rows, tok = world
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="has no tokenizer files"):
        load_tokenizer(empty)
    with pytest.raises(ModelError, match="has no .safetensors weights"):
        load_model(empty)
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(empty)
    save_model(build_llama(ARCH_S, tok, 0), tok, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(ModelError, match=r"model.safetensors is damaged or incomplete"):
        load_model(tmp_path / "m")
    weights.write_bytes(data)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    with pytest.warns(UserWarning, match="not run: the standard transformers class for model_type 'llama'"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Y"},
                                                            "model_type": "my_own_arch"}))
    with pytest.raises(ModelError, match="needs custom code .* is not run"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("top_k, beta", [(0, 0.0), (0, 0.3), (7, 0.0)])
@pytest.mark.parametrize("chunk", [1, 1024])
def test_mass_covering_term_against_float64_full_logits(world, top_k, beta, chunk):
    """distill.fkl_coef's per-token JSD_beta(teacher || student) (beta 0: forward KL) from the teacher's one
    scoring pass and the student's update pass equals opd/losses.py on full float64 logits (top-k: the
    teacher's top-k plus a tail bucket), chunked or not, with a gradient to the student only; the teacher
    sees its own prompt (a constitution), the positions still align."""
    from opd.batch import Example
    from opd.methods.sampled import teacher_logprobs
    from opd.losses import divergence_logprobs, topk_with_tail
    from opd.scoring import policy_stats

    rows, tok = world
    teacher = build_llama(ARCH_T, tok, 1).double().eval()
    student = build_llama(ARCH_S, tok, 2).double()
    ex = [Example(r, prompt_ids(tok, r.prompt), prompt_ids(tok, "Rules first. " * i + r.prompt), None, "default")
          for i, r in enumerate(rows[:4])]
    responses = [response_ids(tok, r.reference) for r in rows[:4]]
    scores = teacher_logprobs({"default": teacher}, ex, responses, tok.pad_token_id, chunk=chunk, temperature=0.8,
                              dist_top_k=top_k)
    s_seq = Sequences.build([e.student_prompt for e in ex], responses, tok.pad_token_id)
    st = policy_stats(student, s_seq, chunk=chunk, temperature=0.8, teacher=scores.dist, beta=beta)
    want = torch.zeros_like(st.divergence, dtype=torch.float64)
    for i, e in enumerate(ex):
        t_seq = Sequences.build([e.teacher_prompt], [responses[i]], tok.pad_token_id)
        one = Sequences.build([e.student_prompt], [responses[i]], tok.pad_token_id)
        t_logits = teacher(input_ids=t_seq.input_ids).logits[0, :-1][t_seq.response_mask[0, 1:].bool()].double()
        s_logits = student(input_ids=one.input_ids).logits[0, :-1][one.response_mask[0, 1:].bool()].double()
        t_lp, s_lp = torch.log_softmax(t_logits / 0.8, -1), torch.log_softmax(s_logits / 0.8, -1)
        if top_k:
            t_lp, s_lp = topk_with_tail(t_lp, s_lp, top_k)
        want[i, s_seq.response_mask[i, 1:].bool()] = divergence_logprobs(s_lp, t_lp, "jsd", beta).detach()
    torch.testing.assert_close(st.divergence.double().detach(), want, rtol=1e-6, atol=1e-8)
    st.divergence.sum().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    sub = scores.dist.select(torch.tensor([2, 0]))  # a micro-batch's rows, in its own order
    st2 = policy_stats(student, s_seq.select(torch.tensor([2, 0])), chunk=chunk, temperature=0.8, teacher=sub, beta=beta)
    torch.testing.assert_close(st2.divergence.detach(), st.divergence.detach()[[2, 0], : st2.divergence.shape[1]])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt, LD_PRELOAD")
def test_freed_memory_is_reused_instead_of_faulted_back_in():
    """``runtime.allocator``: a step's large tensors come back from the allocator instead of being
    mapped and page-faulted in again. Under mimalloc, preloaded as ``python -m flows`` preloads it,
    allocating and filling the same 64 MiB again costs no page faults in every round; with glibc's
    mallopt in most rounds (13-18 of 19 over 20 fresh processes: PyTorch's 64-byte-aligned request
    does not always fit the block the previous round freed, see opd/allocator.py); with neither, glibc
    unmaps a freed block that large and every round faults every page again (~16k faults)."""
    from opd.allocator import preload_env

    probe = ("import resource, sys, torch\n"
             "from opd.allocator import use_allocator\n"
             "used = use_allocator(sys.argv[1])\n"
             "def faults():\n"
             "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "    torch.ones(16 * 2**20).sum()\n"
             "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
             "rounds = [faults() for _ in range(20)][1:]\n"
             "print(used, sum(f < 1_000 for f in rounds), min(rounds))\n")
    env = preload_env("mimalloc")
    assert env is not None, "cmeel-mimalloc is a dependency on Linux"
    runs = {mode: subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True,
                                 env=env if mode == "mimalloc" else None,
                                 cwd=Path(__file__).resolve().parent.parent).stdout.split()
            for mode in ("system", "glibc", "mimalloc")}
    assert [out[0] for out in runs.values()] == ["system", "glibc", "mimalloc"], runs
    reused = {mode: int(out[1]) for mode, out in runs.items()}
    assert reused["system"] == 0 and int(runs["system"][2]) > 10_000, runs
    assert reused["glibc"] >= 10, runs
    assert reused["mimalloc"] == 19, runs
