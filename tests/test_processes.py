"""Several processes (torchrun, gloo on CPU) train ONE student: ranks agree, equal one process on the
same global batch, FSDP2 equals DDP, a NaN on one rank stops all, kill + resume is exact.

Each launch runs ``tests/workers/ranks.py`` under ``torch.distributed.run``; the tiny project (prepared
data, teacher, initial student) is built once for the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opd.params import load
from opd.paths import resolve
from tests.conftest import REPO
from tests.test_stages import tiny_project

WORKER = REPO / "tests" / "workers" / "ranks.py"
ONE_STEP = ("opd", "fire", "gkd", "copsd", "lora_opd", "lora_copsd")


def launch(mode: str, root: Path, out: Path, procs: int = 2, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(WORKER), mode, str(root), str(out)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cmd[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    tiny_project(root)
    return root


@pytest.fixture(scope="module")
def methods(proj, tmp_path_factory):
    """Every method under 2 processes and under 1, with a sampler that depends only on the prompt."""
    out = tmp_path_factory.mktemp("methods")
    for procs in (2, 1):
        r = launch("methods", proj, out, procs)
        assert r.returncode == 0, r.stderr[-4000:]
    return out


def states(out: Path, name: str) -> tuple[dict, dict, dict]:
    return tuple(torch.load(out / f"{name}-{w}.pt") for w in ("w2-rank0", "w2-rank1", "w1-rank0"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("name", ONE_STEP)
def test_one_step_under_two_processes_equals_one_process(methods, name):
    """The same update as one process on the global batch: the loss to 1e-6 and every parameter to 1e-6,
    but for the few elements whose gradient is near Adam's eps (1e-8), where the last bits of the
    reduction order (two half batches summed vs one batch) move the element by up to lr: on an AMX /
    AVX512-BF16 Xeon, 4 of 12,208 elements of the OPD step differ by up to 2.4e-6 (lr 1e-3)."""
    r0, r1, single = states(methods, name)
    assert max_diff(r0["state"], r1["state"]) == 0.0  # DDP reduced the gradients: one model, not two
    diffs = torch.cat([(r0["state"][k].float() - single["state"][k].float()).abs().flatten() for k in r0["state"]])
    assert (diffs > 1e-6).sum() <= max(4, 1e-3 * diffs.numel()) and float(diffs.max()) < 1e-3, \
        (int((diffs > 1e-6).sum()), float(diffs.max()))
    assert r0["history"][0]["loss"] == pytest.approx(single["history"][0]["loss"], abs=1e-6)


@pytest.mark.parametrize("name", ["opd_ppo", "opd_2steps"])
def test_several_updates_keep_the_ranks_identical(methods, name):
    """Several optimiser steps: ranks still bit-identical; against one process the parameters agree to
    Adam's resolution (a ~1e-9 gradient difference on a near-zero gradient moves an element by up to lr)."""
    r0, r1, single = states(methods, name)
    assert max_diff(r0["state"], r1["state"]) == 0.0
    assert max_diff(r0["state"], single["state"]) < 2e-3  # lr 1e-3
    assert r0["history"][0]["loss"] == pytest.approx(single["history"][0]["loss"], rel=0.05)


def test_fsdp2_step_equals_the_ddp_step(proj, methods, tmp_path):
    r = launch("fsdp2", proj, tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    fsdp = torch.load(tmp_path / "fsdp2.pt")["state"]
    ddp = states(methods, "opd")[0]["state"]
    assert max_diff(fsdp, ddp) < 1e-6


def test_nan_on_one_rank_stops_every_rank(proj, tmp_path):
    r = launch("nan", proj, tmp_path, timeout=180)  # without the global decision rank 0 would hang here
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):
        msg = (tmp_path / f"nan-rank{rank}.txt").read_text()
        assert msg.startswith("non-finite loss at step 2") and "over 2 process(es)" in msg


def test_two_process_run_killed_after_a_checkpoint_resumes_to_the_same_weights(proj, tmp_path):
    killed = launch("resume", proj, tmp_path / "a", KILL_AT="3")
    assert killed.returncode != 0 and (tmp_path / "a" / "ckpt" / "step-000002").is_dir()
    resumed = launch("resume", proj, tmp_path / "a")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    full = launch("resume", proj, tmp_path / "b")
    assert full.returncode == 0, full.stderr[-4000:]
    assert (tmp_path / "a/student/model.safetensors").read_bytes() == (tmp_path / "b/student/model.safetensors").read_bytes()
    # nodes without a shared file system: rank 1 sees no checkpoint; every rank starts over (the same
    # weights as the full run) with the reason, instead of rank 0 resuming alone and the ranks diverging
    killed = launch("resume", proj, tmp_path / "c", KILL_AT="3", CKPT_PER_RANK="1")
    assert killed.returncode != 0 and (tmp_path / "c" / "ckpt-rank0" / "step-000002").is_dir()
    split = launch("resume", proj, tmp_path / "c", CKPT_PER_RANK="1")
    assert split.returncode == 0, split.stderr[-4000:]
    assert "is not on every rank" in split.stderr and "starting from step 0" in split.stderr
    assert (tmp_path / "c/student/model.safetensors").read_bytes() == (tmp_path / "b/student/model.safetensors").read_bytes()


def test_bf16_loads_frozen_models_in_bf16_and_runs_the_step_under_autocast(proj, tmp_path, monkeypatch):
    from opd import stages
    from opd.paths import Layout
    from opd.train import LoopSettings, make_accelerator, train

    lay = Layout(proj)
    dtypes = []
    real = stages.load_model

    def spy(path, trust_remote_code=False, dtype=torch.float32):
        dtypes.append(dtype)
        return real(path, trust_remote_code, dtype)

    monkeypatch.setattr(stages, "load_model", spy)
    params = load(proj / "params.yaml", {"runtime.mixed_precision": "bf16", "distill.steps": 2})
    _, history = stages.distill_stage(params, lay.prepared, lay.models_base, lay.cross_sft, tmp_path / "s",
                                      tmp_path / "ck")
    assert dtypes == [torch.float32, torch.bfloat16]  # the student keeps fp32 master weights; the teacher is bf16
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)

    acc = make_accelerator(params.runtime)
    seen = []

    def factory(m, _):
        def step(i):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            loss = m(input_ids=torch.tensor([[1, 2, 3]])).logits.float().mean()
            acc.backward(loss)
            return {"loss": float(loss)}
        return step

    train(acc, real(resolve(lay.models_base, "student_init")), factory, LoopSettings(steps=1, lr=1e-3))
    assert seen == [(True, torch.bfloat16)]


def test_gpu_check_runs_on_cpu_and_reports_rank_agreement(proj, tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--project", str(proj), "--steps", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["processes"], row["backend"]) for row in rows] == [(1, "transformers"), (2, "transformers")]
    assert all(row["rank_max_param_diff"] == 0.0 and row["tokens_per_s"] > 0 for row in rows)
    assert "| transformers | fp32 | 2 | cpu |" in r.stdout and "skipped: vllm" in r.stdout


def _tree_with(marker: str) -> list[int]:
    """PIDs of the processes whose command line holds ``marker``."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(d.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_killing_with_api_ends_its_whole_process_tree(tmp_path):
    """``make run`` is ``python -m flows with-api -- dvc repro``, whose stages start processes of their
    own. SIGKILL of the top process: within 10 s nothing of its tree survives (the command, its
    children and grandchildren, the local Prefect API server)."""
    import signal
    import time
    import uuid

    marker = f"opd-tree-{uuid.uuid4().hex[:8]}"
    # a child that starts a grandchild, both sleeping, as dvc repro starts a stage that starts ranks
    script = ("import subprocess, sys, time; "
              f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', '{marker}-grandchild']); "
              "time.sleep(300)")
    top = subprocess.Popen([sys.executable, "-m", "flows", "with-api", "--", sys.executable, "-c", script, f"{marker}-child"],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(_tree_with(marker)) < 2 and time.monotonic() < deadline:  # the API is up, the tree started
        time.sleep(0.2)
    assert len(_tree_with(marker)) >= 2, "the command did not start"
    api = [p for p in _tree_with("tasks.prefect_api") if Path(f"/proc/{p}/stat").read_text().split()[3] == str(top.pid)]
    top.send_signal(signal.SIGKILL)
    top.wait()
    time.sleep(10)
    left = _tree_with(marker) + [p for p in api if Path(f"/proc/{p}").exists()]
    assert not left, f"survived the kill: {[Path(f'/proc/{p}/cmdline').read_bytes() for p in left]}"


def _gone(marker: str, within: float) -> bool:
    """Whether no process with ``marker`` is seen on 3 polls in a row within ``within`` seconds (one poll
    can miss a live process: its command line reads empty while it execs)."""
    import time

    deadline, empty = time.monotonic() + within, 0
    while time.monotonic() < deadline and empty < 3:
        empty = 0 if _tree_with(marker) else empty + 1
        time.sleep(0.2)
    return empty >= 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_kill_at_any_moment_of_starting_the_group_leaves_nothing(tmp_path):
    """The window CI caught: SIGKILL after the command started and before its watcher did left the command
    running unwatched (here the old code left the tree running at 1 of 40 such moments). Killed at 24 moments
    from 0 to 0.115 s after start (the command starts within them on an idle machine), nothing of the tree
    survives; deterministically: a command whose go never comes exits without running."""
    import signal
    import time
    import uuid

    from tasks.process_group import EXEC_WHEN_WATCHED

    ready, go = os.pipe()
    never = subprocess.Popen([sys.executable, "-c", EXEC_WHEN_WATCHED, str(ready), sys.executable, "-c",
                              f"open({str(tmp_path / 'ran')!r}, 'w')"], pass_fds=(ready,))
    os.close(ready)
    os.close(go)  # the parent died before saying go
    assert never.wait(timeout=60) == 1 and not (tmp_path / "ran").exists()
    for i in range(24):
        marker = f"opd-group-{uuid.uuid4().hex[:8]}"
        script = ("import subprocess, sys, time; "
                  f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', '{marker}-grandchild']); "
                  "time.sleep(300)")
        top = subprocess.Popen([sys.executable, "-c", "import sys; from tasks.process_group import run_in_group; "
                                "run_in_group(sys.argv[1:])", sys.executable, "-c", script, f"{marker}-child"], cwd=REPO)
        time.sleep(0.005 * i)
        top.send_signal(signal.SIGKILL)
        top.wait()
        assert _gone(marker, within=15), f"killed after {0.005 * i:.3f} s, survived: {_tree_with(marker)}"


def test_a_second_stage_run_on_the_same_project_is_refused_naming_the_first(tmp_path):
    """Two runs of stages on one project would share models/checkpoints: the second is refused with the
    holder's stage, pid and host; a lock whose holder died (SIGKILL) is taken over."""
    import socket
    import time

    import yaml

    from tasks.stage_lock import HELD_ENV, StageLocked, stage_lock
    from tests.conftest import tiny

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny()))
    env = {k: v for k, v in os.environ.items() if k != HELD_ENV}
    with stage_lock(tmp_path, "distill"):
        with stage_lock(tmp_path, "distill"):  # the holder's own launch (its ranks) shares the hold
            pass
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "flows", "evaluate"], cwd=REPO, capture_output=True, text=True,
                           env={**env, "OPD_ROOT": str(tmp_path)}, timeout=120)
        assert r.returncode == 2 and time.monotonic() - t0 < 60
        assert (f"error: evaluate: another stage of this project is running (distill as pid {os.getpid()} on "
                f"{socket.gethostname()} since") in r.stderr, r.stderr
    # a holder killed with SIGKILL leaves its file, not its lock
    dead = subprocess.run([sys.executable, "-c", "import os, signal, sys; from pathlib import Path; "
                           "from tasks.stage_lock import stage_lock\n"
                           "with stage_lock(Path(sys.argv[1]), 'distill'): os.kill(os.getpid(), signal.SIGKILL)",
                           str(tmp_path)], cwd=REPO, env=env)
    assert dead.returncode == -9 and "distill" in (tmp_path / ".cache/locks/stage.lock").read_text()
    with stage_lock(tmp_path, "teacher"):  # taken over; and now held by this process again
        other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                                "from tasks.stage_lock import stage_lock\n"
                                "with stage_lock(Path(sys.argv[1]), 'distill'): pass", str(tmp_path)],
                               cwd=REPO, env=env, capture_output=True, text=True)
        assert other.returncode == 1 and f"StageLocked: distill: another stage of this project is running (teacher as pid {os.getpid()}" in other.stderr
    with stage_lock(tmp_path, "distill"):  # released on leaving the block
        pass
    with pytest.raises(StageLocked, match="holder unknown"):  # a holder that has not written its name yet
        fd = os.open(tmp_path / ".cache/locks/stage.lock", os.O_RDWR)
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        try:
            with stage_lock(tmp_path, "distill"):
                pass
        finally:
            os.close(fd)


def test_a_stage_whose_prefect_api_dies_stops_within_seconds(tmp_path):
    """A stage whose Prefect API vanishes (a user's server, or ``with-api``'s, going down) used to keep
    retrying it for as long as its queued events lasted (hours). It now stops in about
    ``API_GRACE_S`` with one line naming the API, and takes every process it started with it."""
    import signal
    import socket
    import time
    import urllib.request

    import psutil
    import yaml

    from tasks.prefect_api import API_GRACE_S
    from tests.conftest import tiny

    tiny_project(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny(**{"distill.steps": 5000, "distill.checkpoint_every": 2})))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "OPD_STAGE_LOCK")}
    api = subprocess.Popen([sys.executable, "-m", "tasks.prefect_api", str(os.getpid()), str(port)], cwd=REPO,
                           env={**env, "PREFECT_UI_ENABLED": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        stage = subprocess.Popen([sys.executable, "-m", "flows", "distill"], cwd=REPO, text=True,
                                 env={**env, "OPD_ROOT": str(tmp_path), "PREFECT_API_URL": url},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ckpts, deadline = tmp_path / "models/checkpoints/distill", time.monotonic() + 300
        while not any(ckpts.glob("*/trainer_state.json")) and time.monotonic() < deadline and stage.poll() is None:
            time.sleep(0.1)
        assert stage.poll() is None, stage.stderr.read()[-2000:]
        children = psutil.Process(stage.pid).children(recursive=True)
        api.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _, err = stage.communicate(timeout=API_GRACE_S + 60)
        took = time.monotonic() - t0
    finally:
        api.kill()
        if "stage" in locals() and stage.poll() is None:
            stage.kill()
    assert stage.returncode == 1 and took < API_GRACE_S + 30, (stage.returncode, took, err[-2000:])
    assert err.strip().splitlines()[-1] == (f"error: distill: the Prefect API at {url} has not answered for "
                                            f"{API_GRACE_S:.0f} s; stopping (run the stage again to resume from "
                                            "its last checkpoint)"), err[-2000:]
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [" ".join(p.cmdline()[:4]) for p in alive]
