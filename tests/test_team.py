"""Beyond one machine (docs/deploy.md), each shared piece a real server on 127.0.0.1, started and stopped here.

One team for the module: an S3 API (moto's server mode) holding the DVC remote and MLflow's artifacts,
an ``mlflow server`` with a SQL backend (a SQLite file) proxying those artifacts, a Prefect server with a
``process`` work pool. Two users' clones run the tiny pipeline at the same time against them: Alice
runs ``dvc repro`` on her laptop, Bob's clone is deployed to the pool and run by ``prefect worker``.
Then Alice pushes to the DVC remote and a third, fresh clone pulls. Separately, two torchrun "nodes"
(one process each, c10d rendezvous on 127.0.0.1, each in its own checkout) train the same student as
``--standalone --nproc_per_node 2``.
"""

from __future__ import annotations

import asyncio
import filecmp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny
from tests.test_prepare import copy_repo
from tests.test_tracking import STAGES, free_port, stop_server, wait_http

pytestmark = pytest.mark.slow
BUCKET = "opd-team"
CREDS = {"AWS_ACCESS_KEY_ID": "team-key", "AWS_SECRET_ACCESS_KEY": "team-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def base_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_WORKER_QUERY_SECONDS": "2", **CREDS}
    for k in ("OPD_ROOT", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "OPD_PIPELINE_KEY", "DVC_ROOT", "PYTHONPATH"):
        env.pop(k, None)
    return env


def bucket(url: str):
    """A boto3 S3 client of the test's object store."""
    import boto3

    return boto3.client("s3", endpoint_url=url, aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"], region_name=CREDS["AWS_DEFAULT_REGION"])


def sh(cwd: Path, env: dict[str, str], *cmd: str, timeout: int = 600) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} in {cwd}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def server(cmd: list[str], env: dict[str, str], health: str, log: Path, seconds: float = 180) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(health, seconds)
    except TimeoutError:
        stop_server(proc)
        raise AssertionError(log.read_text()[-3000:]) from None
    return proc


def clone(dst: Path, env: dict[str, str], **overrides) -> Path:
    """A user's checkout: the project's sources, tiny settings, one commit."""
    dst.mkdir()
    copy_repo(dst)
    (dst / "params.yaml").write_text(yaml.safe_dump(tiny(**overrides)))
    sh(dst, env, "git", "init", "-q")
    commit(dst, env, "clone")
    return dst


def commit(repo: Path, env: dict[str, str], message: str) -> None:
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The servers, and the two users' pipelines run at once against them (Alice: dvc repro, Bob: a worker)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tmp = tmp_path_factory.mktemp("team")
    env = base_env(tmp / "prefect-home")
    procs: list[subprocess.Popen] = []
    try:
        s3_port, mlflow_port, prefect_port = free_port(), free_port(), free_port()
        s3 = f"http://127.0.0.1:{s3_port}"
        procs.append(server([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                            env, f"{s3}/moto-api/", tmp / "s3.log"))
        bucket(s3).create_bucket(Bucket=BUCKET)
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        procs.append(server([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                             "--workers", "2", "--backend-store-uri", f"sqlite:///{tmp / 'team.db'}",
                             "--artifacts-destination", f"s3://{BUCKET}/mlflow"],
                            {**env, "MLFLOW_S3_ENDPOINT_URL": s3}, f"{mlflow_url}/health", tmp / "mlflow.log"))
        api = f"http://127.0.0.1:{prefect_port}/api"
        procs.append(server([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(prefect_port)], env, f"{api}/health", tmp / "prefect.log"))
        # the users: no AWS credentials for MLflow (the server proxies the artifacts); Alice's DVC remote
        # is the bucket (its endpoint in .dvc/config, committed; the keys in the environment)
        user = {**env, "PREFECT_API_URL": api}
        alice = clone(tmp / "alice", user, **{"tracking.uri": mlflow_url})
        sh(alice, user, "dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc")
        sh(alice, user, "dvc", "remote", "modify", "storage", "endpointurl", s3)
        commit(alice, user, "a DVC remote")
        bob = clone(tmp / "bob", user, **{"tracking.uri": mlflow_url, "distill.method": "fire",
                                          "schedule.work_pool": "team", "schedule.deployment": "bob"})
        sh(bob, user, sys.executable, "-m", "flows", "deploy")
        worker_dir = tmp / "worker"
        worker_dir.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "team"],
                                      cwd=worker_dir, env=user, stdout=(tmp / "worker.log").open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))

        async def trigger() -> str:
            async with get_client() as client:
                dep = await client.read_deployment_by_name("opd_pipeline/bob")
                return str((await client.create_flow_run_from_deployment(dep.id)).id)

        with temporary_settings({PREFECT_API_URL: api}):
            bob_run = asyncio.run(trigger())
        started = time.monotonic()
        laptop = subprocess.run([sys.executable, "-m", "flows", "with-api", "--", "dvc", "repro"], cwd=alice,
                                env={**user, "OPD_PIPELINE_KEY": "alice-1"}, capture_output=True, text=True, timeout=1200)
        assert laptop.returncode == 0, laptop.stdout[-3000:] + laptop.stderr[-3000:]

        async def finished() -> str:
            async with get_client() as client:
                while True:
                    state = (await client.read_flow_run(bob_run)).state
                    if state.is_final():
                        return state.type.value
                    assert time.monotonic() - started < 1200, f"Bob's run still {state.type.value}"
                    await asyncio.sleep(2)

        with temporary_settings({PREFECT_API_URL: api}):
            bob_state = asyncio.run(finished())
        assert bob_state == "COMPLETED", (tmp / "worker.log").read_text()[-4000:]
        yield {"tmp": tmp, "env": env, "user": user, "s3": s3, "mlflow": mlflow_url, "api": api, "alice": alice,
               "bob": bob, "bob_run": bob_run}
    finally:
        for proc in reversed(procs):  # each one: stop_server escalates to SIGKILL, so none is left behind
            stop_server(proc)


def test_a_worker_runs_the_deployed_pipeline_and_its_runs_carry_the_flow_run(team):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    assert (team["bob"] / "metrics" / "registry.json").is_file()  # the worker ran in Bob's checkout
    client = MlflowClient(tracking_uri=team["mlflow"], registry_uri=team["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("opd").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("prefect.flow_run_id") == team["bob_run"])
    assert parent.info.run_name == "opd_pipeline" and parent.info.status == "FINISHED"
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in stages} == STAGES

    async def parents_of(ids: list[str]) -> set[str]:  # each stage's subflow hangs under the worker's flow run
        async with get_client() as pc:
            out = set()
            for i in ids:
                sub = await pc.read_flow_run(i)
                out.add(str((await pc.read_task_run(sub.parent_task_run_id)).flow_run_id))
            return out

    with temporary_settings({PREFECT_API_URL: team["api"]}):
        assert asyncio.run(parents_of([r.data.tags["prefect.flow_run_id"] for r in stages])) == {team["bob_run"]}


def test_two_clones_share_one_mlflow_server_with_artifacts_in_object_storage(team):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=team["mlflow"], registry_uri=team["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("opd").experiment_id])
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("opd.kind") == "pipeline"}
    assert len(parents) == 2  # one per user's pipeline, no run adopted by the other
    methods = set()
    for pid, parent in parents.items():
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
        assert sorted(r.info.run_name for r in stages) == sorted(STAGES) and all(r.info.status == "FINISHED" for r in stages)
        methods.add(parent.data.params["distill.method"])
        assert all(r.data.params["distill.method"] == parent.data.params["distill.method"] for r in stages)
    assert methods == {"opd", "fire"}
    # the registry: both students, one champion chosen by the gate
    versions = client.search_model_versions("name = 'opd-student'")
    assert sorted(v.version for v in versions) == ["1", "2"]
    champion = client.get_model_version_by_alias("opd-student", "champion")
    assert champion.tags["promotion"] == "promoted"
    assert [v.version for v in versions if v.tags.get("promotion") == "promoted"].count(champion.version) == 1
    remotes = {v.tags["opd.dvc_remote"] for v in versions}
    assert remotes == {f"s3://{BUCKET}/dvc", "none"}  # Alice's student can be pulled from her remote
    # every artifact goes through the server (proxied) and lies in the bucket, not on a client's disk
    s3 = bucket(team["s3"])
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="mlflow/")
            for o in page.get("Contents", [])}
    evaluations = [r for r in runs if r.info.run_name == "evaluate"]
    assert len(evaluations) == 2
    for run in evaluations:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        local = client.download_artifacts(run.info.run_id, "generations.json", str(team["tmp"] / run.info.run_id))
        assert Path(local).stat().st_size > 0
        assert any(k.endswith(f"{run.info.run_id}/artifacts/generations.json") for k in keys)
    for name in ("alice", "bob"):
        assert not (team[name] / "mlruns").exists() and not (team[name] / "mlruns.db").exists()


def test_dvc_push_then_pull_in_a_fresh_clone_rebuilds_nothing(team):
    alice, user = team["alice"], team["user"]
    commit(alice, user, "run")  # dvc.lock and the committed metrics
    sh(alice, user, "dvc", "push")
    s3 = bucket(team["s3"])
    pushed = s3.list_objects_v2(Bucket=BUCKET, Prefix="dvc/")
    assert pushed.get("KeyCount", 0) > 0  # the outputs are in the object store, which the fresh clone pulls from
    fresh = team["tmp"] / "carol"
    sh(team["tmp"], user, "git", "clone", "-q", str(alice), str(fresh))
    assert not (fresh / "models" / "student").exists()
    sh(fresh, user, "dvc", "pull")
    status = sh(fresh, user, "dvc", "status")
    assert set(line.rstrip(":") for line in status.splitlines() if line and not line[0].isspace()) <= {
        "user_inputs", "sync_store"}, status  # only the two always-run stages
    out = sh(fresh, user, sys.executable, "-m", "flows", "with-api", "--", "dvc", "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
    assert ran <= {"user_inputs", "sync_store"}, out[-3000:]
    for folder in ("models/student", "models/base", "data/prepared"):
        cmp = filecmp.dircmp(alice / folder, fresh / folder)
        files = [p.relative_to(alice / folder) for p in (alice / folder).rglob("*") if p.is_file()]
        assert files and not cmp.left_only and not cmp.right_only
        assert all(filecmp.cmp(alice / folder / f, fresh / folder / f, shallow=False) for f in files), folder
    assert not sh(fresh, user, "git", "status", "--porcelain").strip()


def test_two_nodes_train_the_same_student_as_two_local_processes(tmp_path):
    """``torchrun --nnodes 2`` (one process per node, c10d on 127.0.0.1), each node in its own checkout
    with the same data and models: node 0's global rank 0 writes the student, node 1 writes nothing, and
    the student is bit-identical to ``--standalone --nproc_per_node 2``."""
    from tests.test_stages import tiny_project

    base = tmp_path / "base"
    base.mkdir()
    tiny_project(base)
    env = base_env(tmp_path / "prefect-home")
    env["OMP_NUM_THREADS"] = "1"
    node0, node1, standalone = (tmp_path / n for n in ("node0", "node1", "standalone"))
    for d in (node0, node1, standalone):
        shutil.copytree(base, d)
    sh(standalone, env, sys.executable, "-m", "flows", "distill", "--set", "runtime.num_processes=2")
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                               "-m", "flows", "distill"], cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r, d in enumerate((node0, node1))]
    outs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    student = [p.relative_to(standalone / "models/student") for p in (standalone / "models/student").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in student)
    for f in student:
        assert filecmp.cmp(standalone / "models/student" / f, node0 / "models/student" / f, shallow=False), f
    assert not (node1 / "models" / "student").exists() and not (node1 / "metrics").exists()
    assert (node0 / "metrics" / "distill.json").read_text() == (standalone / "metrics" / "distill.json").read_text()
