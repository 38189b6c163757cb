"""`python -m flows serve` and `deploy` against a real local Prefect server: deployments, schedule, a triggered run."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import yaml

from tests.conftest import REPO, tiny
from tests.test_tracking import free_port, wait_http


def test_serve_registers_a_scheduled_deployment_and_runs_it(tmp_path):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny(**{"schedule.cron": "15 4 * * *"})))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": str(REPO), "OPD_ROOT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    serve = None
    try:
        wait_http(f"{api}/health", 180)
        log = open(tmp_path / "serve.log", "w")
        serve = subprocess.Popen([sys.executable, "-m", "flows", "serve"], cwd=tmp_path, env={**env, "PREFECT_API_URL": api},
                                 stdout=log, stderr=subprocess.STDOUT)

        async def check() -> str:
            async with get_client() as client:
                deadline = time.time() + 180
                while True:
                    try:
                        dep = await client.read_deployment_by_name("opd_pipeline/opd-nightly")
                        break
                    except Exception:
                        assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                        assert time.time() < deadline, "deployment never appeared"
                        await asyncio.sleep(1)
                assert [s.schedule.cron for s in dep.schedules] == ["15 4 * * *"]
                assert dep.global_concurrency_limit and dep.global_concurrency_limit.limit == 1  # one run at a time
                run = await client.create_flow_run_from_deployment(dep.id)
                deadline = time.time() + 400
                while True:
                    state = (await client.read_flow_run(run.id)).state
                    if state.is_final():
                        return state.type.value
                    assert time.time() < deadline, f"flow run still {state.type.value}"
                    await asyncio.sleep(2)

        with temporary_settings({PREFECT_API_URL: api}):
            final = asyncio.run(check())
        assert final == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert (tmp_path / "metrics" / "registry.json").is_file()  # the served run did the whole pipeline

        # the same pipeline placed on a work pool (created as a process pool), with the settings a worker
        # elsewhere needs: the params file and the --set overrides travel as the deployment's parameters
        r = subprocess.run([sys.executable, "-m", "flows", "deploy", "--set", "schedule.deployment=opd-pool",
                            "--set", "schedule.work_pool=opd-test", "--set", "distill.steps=3"], cwd=REPO,
                           env={**env, "PREFECT_API_URL": api}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "prefect worker start --pool opd-test" in r.stdout, r.stderr[-3000:]

        async def deployed() -> tuple[object, str]:
            async with get_client() as client:
                return (await client.read_deployment_by_name("opd_pipeline/opd-pool"),
                        (await client.read_work_pool("opd-test")).type)

        with temporary_settings({PREFECT_API_URL: api}):
            dep, pool_type = asyncio.run(deployed())
        assert pool_type == "process" and dep.work_pool_name == "opd-test"
        assert dep.entrypoint == "flows/pipeline.py:opd_pipeline" and [s.schedule.cron for s in dep.schedules] == ["15 4 * * *"]
        assert dep.parameters["overrides"]["distill.steps"] == 3
        assert dep.global_concurrency_limit and dep.global_concurrency_limit.limit == 1
    finally:
        for proc in (serve, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_serve_without_a_prefect_server_says_how_to_start_one(tmp_path):
    """Schedules never fire on a temporary API server, so serve refuses one and says what to run."""
    env = {**os.environ, "OPD_ROOT": str(tmp_path)}
    env.pop("PREFECT_API_URL", None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny()))
    r = subprocess.run([sys.executable, "-m", "flows", "serve"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "prefect server start --host 127.0.0.1" in r.stderr, r.stderr[-2000:]
