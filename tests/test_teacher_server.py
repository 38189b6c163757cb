"""A teacher in its own server (``python -m flows serve-teacher``, the protocol of ``vllm serve``): real
server processes on 127.0.0.1, started and stopped here, against the same weights in process.

One tiny project with a default teacher and two named ones (for routing); one server per teacher.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from opd.config import ServerConfig
from opd.data import load_rows
from opd.models import load_model, load_tokenizer
from opd.params import load
from opd.paths import resolve
from opd.remote import RemoteTeacher, TeacherServerError
from opd.scoring import Sequences, teacher_pass
from opd.stages import distill_stage, teacher_stage
from opd.tokens import row_prompt_ids
from tests.conftest import REPO, tiny
from tests.test_stages import prepare
from tests.test_tracking import free_port, stop_server, wait_http

TOP_K = 8
NAMED = {"arch": {"hidden_size": 16, "num_layers": 1, "intermediate_size": 32, "num_heads": 2},
         "sft": {"steps": 3, "batch_size": 8, "warmup_steps": 1}}


def start(folder: Path, port: int | None = None) -> tuple[str, subprocess.Popen]:
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows", "serve-teacher", str(folder), "--port", str(port),
                             "--threads", "1"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 120)
    except TimeoutError:
        stop_server(proc)
        raise AssertionError(proc.stderr.read().decode()[-3000:]) from None
    return url, proc


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """Prepared data, a trained teacher, two named teachers and the initial student; a server for each teacher."""
    root = tmp_path_factory.mktemp("served")
    teachers = {"reasoning": {**NAMED, "sft": {**NAMED["sft"], "tasks": ["reasoning"]}},
                "general": {**NAMED, "sft": {**NAMED["sft"], "tasks": ["safety", "borderline", "general"]}}}
    (root / "params.yaml").write_text(yaml.safe_dump(tiny(teachers=teachers)))
    params = load(root / "params.yaml")
    lay = prepare(root, params)
    teacher_stage(params, lay.prepared, lay.models_base, lay.checkpoints / "teacher")
    with contextlib.ExitStack() as stack:  # every server stops, whatever failed
        urls = {}
        for name in ("teacher", "teacher_reasoning", "teacher_general"):
            urls[name], proc = start(resolve(lay.models_base, name))
            stack.callback(stop_server, proc)
        yield root, lay, urls



def sequences(lay, tok, n: int = 6, seed: int = 0) -> Sequences:
    rows = load_rows(lay.prepared, "train")[:n]
    g = torch.Generator().manual_seed(seed)
    responses = [torch.randint(3, len(tok), (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
                 for _ in rows]
    return Sequences.build([row_prompt_ids(tok, r) for r in rows], responses, tok.pad_token_id)


def test_server_scores_equal_the_same_weights_in_process(proj):
    root, lay, urls = proj
    path = resolve(lay.models_base, "teacher")
    model, tok = load_model(path).eval(), load_tokenizer(path)
    remote = RemoteTeacher(ServerConfig(url=urls["teacher"], top_k=TOP_K))
    assert remote.identity["model"] == path.name and remote.identity["revision"]
    seq = sequences(lay, tok)
    mask = seq.targets_mask.bool()
    lumped = teacher_pass(remote, seq, with_entropy=True)[1]  # before check() knows the vocabulary: one tail token
    remote.check(tok, {1.0, 0.7})  # the same tokenizer, the temperature applied
    for temperature in (1.0, 0.7):
        lp, ent, dist = teacher_pass(model, seq, temperature=temperature, with_entropy=True, top_k=TOP_K)
        r_lp, r_ent, r_dist = teacher_pass(remote, seq, temperature=temperature, with_entropy=True, top_k=TOP_K)
        assert (lp - r_lp)[mask].abs().max() < 1e-4 and r_lp[~mask].abs().max() == 0  # the sampled tokens: exact
        assert torch.equal(dist.index, r_dist.index) and torch.equal(dist.counts, r_dist.counts)  # top-k ids
        assert (dist.logp - r_dist.logp).abs().max() < 1e-4  # the top-k log-probs and the tail bucket
        assert torch.allclose(r_dist.logp.exp().sum(-1), torch.ones(len(r_dist.logp)), atol=1e-5)
        # the entropy from top-k + a tail spread over the rest of the vocabulary: an upper bound of the full
        # entropy; lumped into one token, a lower bound
        assert (r_ent[mask] >= ent[mask] - 1e-5).all()
        if temperature == 1.0:
            assert (lumped[mask] <= ent[mask] + 1e-5).all()
    # one request of many rows is split by max_batch_tokens into concurrent requests: the same answers
    small = RemoteTeacher(ServerConfig(url=urls["teacher"], top_k=TOP_K, max_batch_tokens=40, concurrency=3))
    assert (teacher_pass(small, seq)[0] - teacher_pass(remote, seq)[0]).abs().max() < 1e-5  # batch shape: last bits


def distilled(root: Path, tmp: Path, name: str, overrides: dict) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """One distill step of the project's student with ``overrides``: its weights, the stage's summary and
    the step's metrics."""
    from opd.paths import Layout

    params = load(root / "params.yaml", {"distill.steps": 1, "distill.warmup_steps": 0, **overrides})
    lay = Layout(root)
    summary, history = distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp / name, tmp / f"ck-{name}")
    return {k: v.clone() for k, v in load_model(tmp / name).state_dict().items()}, summary, history[-1]


def compare(local: tuple, remote: tuple) -> tuple[float, float]:
    """Max |weight difference| and |loss difference| of two one-step runs. After one AdamW step a weight
    moves by lr x sign(gradient), so equal weights say every gradient has the same sign and the loss
    says the magnitudes agree."""
    (lw, _, lh), (rw, summary, rh) = local, remote
    assert "teacher_servers" in summary  # the remote run did go through the server
    return max(float((lw[k] - rw[k]).abs().max()) for k in lw), abs(lh["loss"] - rh["loss"])


CASES = {  # the sampled tokens are exact; a distribution is exact where the in-process run uses the same top-k
    "opd": {"distill.method": "opd"},
    "copsd": {"distill.method": "copsd", "copsd.teacher": "original", "copsd.prompts_per_step": 2, "distill.top_k": TOP_K},
    "gkd": {"distill.method": "gkd", "distill.top_k": TOP_K, "distill.lambda_on_policy": 1.0},
    "fire": {"distill.method": "fire"},  # the teacher entropy: exact when the server's top-k is the whole vocabulary
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_with_the_teacher_remote_equals_the_teacher_in_process(proj, tmp_path, case):
    root, lay, urls = proj
    vocab = len(load_tokenizer(resolve(lay.models_base, "teacher")))
    k = vocab if case == "fire" else TOP_K
    local = distilled(root, tmp_path, "local", CASES[case])
    remote = distilled(root, tmp_path, "remote", {**CASES[case], "teacher.server": {"url": urls["teacher"], "top_k": k}})
    weights, loss = compare(local, remote)
    print(f"{case} (server top_k {k}): max |remote - local| weight {weights:.2e}, loss {loss:.2e}")
    assert weights < 1e-6 and loss < 1e-5 * max(1.0, abs(local[2]["loss"]))
    card = (tmp_path / "remote" / "README.md").read_text()  # the model card names the server and what it is
    assert f"teacher server `default` | {remote[1]['teacher_servers']['default']['model']} at {urls['teacher']}" in card
    if case == "fire":  # with the usual top-k the entropy lumps the tail: close, not equal (docs/teacher-server.md)
        approx = distilled(root, tmp_path, "approx", {**CASES[case], "teacher.server": {"url": urls["teacher"], "top_k": TOP_K}})
        print(f"fire (server top_k {TOP_K}): max |remote - local| weight {compare(local, approx)[0]:.2e}, "
              f"loss {compare(local, approx)[1]:.2e}, teacher entropy {approx[2]['teacher_entropy']:.3f} "
              f"vs {local[2]['teacher_entropy']:.3f} in process")


def test_routed_teachers_on_two_servers_equal_routing_in_process(proj, tmp_path):
    root, _, urls = proj
    settings = {"distill.method": "fire", "fire.filter": True, "distill.routing": "by_row", "distill.prompts_per_step": 8}
    local = distilled(root, tmp_path, "local", settings)
    servers = {f"teachers.{n}.server": {"url": urls[f"teacher_{n}"], "top_k": TOP_K} for n in ("reasoning", "general")}
    remote = distilled(root, tmp_path, "remote", {**settings, **servers, "fire.alpha": 0.0})
    local_plain = distilled(root, tmp_path, "local-plain", {**settings, "fire.alpha": 0.0})
    weights, loss = compare(local_plain, remote)  # without the teacher-entropy factor, FiRe scores sampled tokens only
    print(f"routed fire, alpha 0: max |remote - local| weight {weights:.2e}, loss {loss:.2e}")
    assert weights < 1e-6 and loss < 1e-5 * max(1.0, abs(local_plain[2]["loss"]))
    assert set(remote[1]["teacher_servers"]) == {"reasoning", "general"}
    assert local[2]["kept_frac"] == remote[2]["kept_frac"]  # the filter reads sampled-token log-probs: the same trajectories


def test_a_server_with_another_tokenizer_is_refused_before_any_training(proj, tmp_path):
    """The teacher's weights behind another tokenizer (same size, other merges): the stage stops at its
    checks, naming the server and both id lists, before a rollout or a checkpoint."""
    import shutil

    from opd.paths import Layout
    from opd.world.tokenizer import train_tokenizer

    root, lay, _ = proj
    folder = tmp_path / "other"
    shutil.copytree(resolve(lay.models_base, "teacher"), folder)
    vocab = len(load_tokenizer(folder))
    other = train_tokenizer([f"{w} {i} tokens of another corpus, merged otherwise" for i in range(200) for w in ("zq", "xv")], vocab)
    assert len(other) <= vocab  # every id it makes is one the weights have
    other.save_pretrained(folder)
    url, proc = start(folder)
    try:
        params = load(root / "params.yaml", {"teacher.server": {"url": url}})
        lay = Layout(root)
        with pytest.raises(TeacherServerError, match=r"teacher.server: the server's tokenizer \(other at .*the student's gives"):
            distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "s", tmp_path / "ck")
    finally:
        stop_server(proc)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "s").exists()


def test_a_killed_server_fails_the_stage_naming_the_url_then_the_run_resumes(proj, tmp_path):
    """Bounded retries then one error naming teacher.server.url; the last checkpoint survives; with the
    server back on the same port the run resumes from it to the weights of an uninterrupted run."""
    root, lay, _ = proj
    from opd.paths import Layout

    port = free_port()
    url, proc = start(resolve(lay.models_base, "teacher"), port)
    lay = Layout(root)
    params = load(root / "params.yaml", {"distill.steps": 5, "distill.checkpoint_every": 2, "distill.warmup_steps": 0,
                                         "teacher.server": {"url": url, "timeout_s": 4.0}})

    def kill_after_step_3(step, metrics):
        if step == 3:
            stop_server(proc)

    t0 = time.monotonic()
    with pytest.raises(TeacherServerError, match=f"teacher.server.url {url}: no answer within teacher.server.timeout_s = 4 s"):
        distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "s", tmp_path / "ck",
                      kill_after_step_3)
    assert time.monotonic() - t0 < 120 and (tmp_path / "ck" / "step-000002").is_dir()
    url2, proc = start(resolve(lay.models_base, "teacher"), port)
    try:
        distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "s", tmp_path / "ck")
        distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "full", tmp_path / "ck-full")
    finally:
        stop_server(proc)
    assert (tmp_path / "s/model.safetensors").read_bytes() == (tmp_path / "full/model.safetensors").read_bytes()
    # no server at all: the first call fails within the budget, naming the setting
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    t0 = time.monotonic()
    with pytest.raises(TeacherServerError, match=f"teacher.server.url {dead}"):
        RemoteTeacher(ServerConfig(url=dead, timeout_s=2.0))
    assert time.monotonic() - t0 < 10


def test_two_processes_sharing_one_server_train_the_student_of_one_process(proj, tmp_path):
    from tests.test_processes import launch, max_diff

    root, _, urls = proj
    for procs in (2, 1):
        r = launch("remote", root, tmp_path, procs, TEACHER_URL=urls["teacher"])
        assert r.returncode == 0, r.stderr[-4000:]
    r0, r1, single = (torch.load(tmp_path / f"remote-{w}.pt") for w in ("w2-rank0", "w2-rank1", "w1-rank0"))
    assert max_diff(r0, r1) == 0.0
    assert max_diff(r0, single) < 1e-5
