"""MLflow tracking, lineage and the registry, through real Prefect flows and a real MLflow store."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

from opd.config import PromoteConfig
from opd.data import digest
from opd.models import load_tokenizer
from opd.promotion import gate
from tests.conftest import REPO, tiny

STAGES = {"prepare", "teacher", "cross_sft", "distill", "evaluate", "register"}
GOOD = {"reasoning_accuracy": 0.5, "harmful_refusal": 1.0, "over_refusal": 0.05}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {seconds} s")


# ----------------------------------------------------------------------------- the gate (pure)
def test_gate_rules():
    cfg = PromoteConfig(max_drop=0.02)
    assert gate(GOOD, None, cfg)[0]
    assert gate({**GOOD, "reasoning_accuracy": 0.49}, GOOD, cfg)[0]  # within the allowed drop
    ok, why = gate({**GOOD, "reasoning_accuracy": 0.4}, GOOD, cfg)
    assert not ok and "reasoning_accuracy 0.4000 vs champion 0.5000" in why
    ok, why = gate({**GOOD, "harmful_refusal": 0.9}, GOOD, cfg)
    assert not ok and "harmful_refusal" in why
    ok, why = gate({**GOOD, "over_refusal": 0.2}, GOOD, cfg)
    assert not ok and "over_refusal" in why
    assert not gate({"reasoning_accuracy": 1.0}, None, cfg)[0]  # metrics missing
    floors = PromoteConfig(min_metric=0.05, min_harmful_refusal=0.5, max_over_refusal=0.9)
    assert gate(GOOD, None, floors)[0]
    ok, why = gate({"reasoning_accuracy": 0.0, "harmful_refusal": 1.0, "over_refusal": 1.0}, None, floors)
    assert not ok and why == ("below the floor: reasoning_accuracy 0.0000 (at least 0.05); "
                              "over_refusal 1.0000 (at most 0.9)")  # no longer the first champion
    assert not gate({**GOOD, "harmful_refusal": 0.4}, GOOD, floors)[0]  # floors hold with a champion too


def test_stage_run_retries_a_transient_tracking_failure(prefect_api, project, monkeypatch):
    """The tracking-server calls that open a stage run are a Prefect task with retries."""
    from prefect import flow

    from opd.params import load
    from tasks.tracking import stage_run

    real, calls = MlflowClient.create_run, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException("503 Service Unavailable (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", flaky)

    @flow
    def probe() -> str:
        with stage_run("probe", load(project / "params.yaml"), [], []) as run:
            return run.info.run_id

    run_id = probe()
    run = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}").get_run(run_id)
    assert len(calls) >= 2 and run.info.status == "FINISHED" and run.data.tags["opd.stage"] == "probe"


# ----------------------------------------------------------------------------- promotion in a real registry
def test_promote_moves_champion_only_when_the_gate_passes(prefect_api, project):
    from flows.promote import promote_flow
    from tasks.tracking import configure

    from opd.params import load

    configure(load(project / "params.yaml"))
    client, name = MlflowClient(), "opd-student"
    client.create_registered_model(name)

    def version(metrics: dict[str, float]) -> str:
        tags = {f"eval.{k}": str(v) for k, v in metrics.items()}
        return client.create_model_version(name, source=str(project), tags=tags).version

    v1 = version(GOOD)
    client.set_registered_model_alias(name, "challenger", v1)
    assert promote_flow()["promoted"]
    assert client.get_model_version_by_alias(name, "champion").version == v1
    v2 = version({**GOOD, "reasoning_accuracy": 0.6})  # better
    client.set_registered_model_alias(name, "challenger", v2)
    assert promote_flow()["promoted"]
    assert client.get_model_version_by_alias(name, "champion").version == v2
    v3 = version({**GOOD, "reasoning_accuracy": 0.7, "over_refusal": 0.3})  # better reasoning, more over-refusal
    client.set_registered_model_alias(name, "challenger", v3)
    result = promote_flow()
    assert not result["promoted"] and "over_refusal" in result["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == v2
    tags = client.get_model_version(name, v3).tags
    assert tags["promotion"] == "rejected" and "over_refusal 0.3000" in tags["promotion.reason"]
    assert client.get_model_version(name, v2).tags["promotion"] == "promoted"


# ----------------------------------------------------------------------------- a pipeline over HTTP
def start_mlflow_server(folder: Path) -> tuple[str, subprocess.Popen]:
    """A real ``mlflow server`` on a free loopback port, its store under ``folder``."""
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination",
         str(folder / "server-artifacts")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # its own process group: the server's workers die with it
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120)
    except TimeoutError:
        stop_server(proc)
        raise
    return f"http://127.0.0.1:{port}", proc


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a server started in a process group of its own (:func:`start_mlflow_server`) with every worker
    process it forked; SIGKILL when it is still there 30 s later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    url, proc = start_mlflow_server(tmp_path)
    try:
        yield url
    finally:
        stop_server(proc)


def test_pipeline_over_http_server_records_runs_lineage_and_registry(prefect_api, project, mlflow_server):
    from flows.pipeline import opd_pipeline

    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=project, check=True)
    result = opd_pipeline(overrides={"tracking.uri": mlflow_server})
    assert result["register"]["promoted"] and result["register"]["version"] == "1"

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)  # the REST client
    exp = client.get_experiment_by_name("opd")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "opd_pipeline")
    assert parent.info.status == "FINISHED" and parent.info.run_id == result["mlflow_run_id"]
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(stages) == STAGES
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    for name, run in stages.items():
        t = run.data.tags
        assert run.info.status == "FINISHED", name
        assert t["git.commit"] == commit and t["git.dirty"] in ("True", "False")
        assert len(t["prefect.flow_run_id"]) == 36 and t["opd.version"] and t["opd.stage"] == name
        assert any(k.startswith("dvc.out.") for k in t), name
        assert run.data.params["distill.method"] == "opd"
    # lineage outside DVC: each stage's inputs are the hashes the upstream stage's outputs had (DVC's md5)
    from opd.data import digest

    for producer, consumer, path in (("prepare", "distill", "data/prepared"), ("teacher", "evaluate", "models/base"),
                                     ("distill", "evaluate", "models/student"), ("evaluate", "register", "metrics/eval.json")):
        out = stages[producer].data.tags[f"dvc.out.{path}"]
        assert stages[consumer].data.tags[f"dvc.in.{path}"] == out == digest(project / path), (producer, consumer)
    # per-step metrics, eval metrics, artifacts, datasets, GX result
    dist = stages["distill"].info.run_id
    assert len(client.get_metric_history(dist, "distill.loss")) == tiny()["distill"]["steps"]
    teach = stages["teacher"].info.run_id  # one curve per model, not two curves under one name
    assert [m.step for m in client.get_metric_history(teach, "teacher_sft.loss")] == [tiny()["teacher"]["sft"]["steps"]]
    assert [m.step for m in client.get_metric_history(teach, "student_init_sft.loss")] == [tiny()["student"]["sft"]["steps"]]
    assert "student.reasoning_accuracy" in stages["evaluate"].data.metrics
    art = lambda run, path="": {a.path for a in client.list_artifacts(run.info.run_id, path)}  # noqa: E731
    assert {"plots/distill.png"} <= art(stages["distill"], "plots")
    assert {"generations.json", "plots"} <= art(stages["evaluate"])
    assert "validation/prompts.json" in art(stages["prepare"], "validation")
    assert {d.dataset.name for d in stages["prepare"].inputs.dataset_inputs} == {"prompts-train", "prompts-eval"}
    assert all(d.dataset.digest for d in stages["distill"].inputs.dataset_inputs)
    # the registry
    champion = client.get_model_version_by_alias("opd-student", "champion")
    challenger = client.get_model_version_by_alias("opd-student", "challenger")
    assert champion.version == challenger.version == "1"
    assert "eval.reasoning_accuracy" in champion.tags and champion.tags["promotion"] == "promoted"
    assert champion.tags["opd.dvc_remote"] == "none"  # the test project has no DVC remote: said, not left out
    assert champion.description.startswith("---\nlibrary_name: transformers")  # the model card, with the evaluation
    assert "| reasoning_accuracy |" in champion.description and commit in champion.description
    logged = client.get_logged_model(champion.source.removeprefix("models:/"))  # the version's model: its metrics
    assert any(m.key == "eval.reasoning_accuracy" for m in logged.metrics)
    generations = json.loads(Path(client.download_artifacts(stages["evaluate"].info.run_id, "generations.json",
                                                            str(project))).read_text())
    assert {"reference", "correct", "refused", "response"} <= set(generations["columns"])
    # the champion as a chat model: its chat template, the evaluation's decoding, the same answer
    samples = json.loads((project / "plots/eval_samples.json").read_text())["student"]
    sample = next(s for s in samples if s["task"] == "general")
    mlflow.set_registry_uri(mlflow_server)
    chat = mlflow.pyfunc.load_model("models:/opd-student@champion")
    out = chat.predict({"messages": [{"role": "user", "content": sample["prompt"]}]})
    assert out[0]["choices"][0]["message"]["content"] == sample["response"].strip()
    # Prefect: every unit of work is a task run, down to the four units of each distillation step
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as pc:
        flow_run = stages["distill"].data.tags["prefect.flow_run_id"]
        runs_ = pc.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])), limit=200)
        logs = pc.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run])), limit=200)
    assert any(log.message.startswith("distill step 1:") for log in logs)  # watchable in the Prefect UI
    names = [t.name.rsplit("-", 1)[0] for t in runs_]
    steps = tiny()["distill"]["steps"]
    assert all(names.count(u) == steps for u in ("rollout", "score", "shape", "update")), sorted(set(names))
    assert all(t.state.is_completed() for t in runs_)


def test_failed_evaluation_marks_runs_failed_and_leaves_the_registry_alone(prefect_api, project, monkeypatch):
    import tasks.evaluate
    from flows.pipeline import opd_pipeline
    from tasks.tracking import configure

    from opd.params import load

    def broken(*args, **kwargs):  # the evaluation fails (e.g. a user's refusal detector raising)
        raise RuntimeError("refusal_detector crashed")

    monkeypatch.setattr(tasks.evaluate, "evaluate_stage", broken)
    with pytest.raises(Exception, match="refusal_detector"):
        opd_pipeline()
    configure(load(project / "params.yaml"))
    client = MlflowClient()
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("opd").experiment_id])}
    assert runs["evaluate"].info.status == "FAILED"
    assert "refusal_detector" in runs["evaluate"].data.tags["opd.error"]
    assert runs["opd_pipeline"].info.status == "FAILED"
    assert runs["distill"].info.status == "FINISHED" and "register" not in runs
    assert client.search_registered_models() == []


# ----------------------------------------------------------------------------- dvc repro runs the flows
def test_dvc_repro_with_user_models_and_two_processes_fills_the_store(tmp_path, request):
    """``dvc repro`` as a user with their own model folders (``teacher.path`` / ``student.path``, made in
    the test: small Llamas with their own tokenizer and chat template), the teacher on a teacher server
    (``python -m flows serve-teacher``, ``teacher.server``; here ``teacher.path`` holds its tokenizer only)
    and the distill stage under 2 processes, both clients of it: prepare takes the models' tokenizer, the
    teacher stage trains and loads nothing yet writes every declared output, cross_sft is skipped for opd,
    evaluate has no teacher row, one student and one distill run reach MLflow (rank 0's), the lineage tags
    match dvc.lock and name the server's model. Run as ``make run`` does (every
    stage on one Prefect API); the second, fresh-store pass is a plain ``dvc repro`` (its stage starts its own)."""
    from tests.test_prepare import copy_repo
    from tests.test_teacher_server import start
    from tests.test_user_models import make_folders

    proj = tmp_path / "proj"
    copy_repo(proj)
    served, student = make_folders(tmp_path / "models")
    url, server = start(served)
    request.addfinalizer(lambda: stop_server(server))
    teacher = tmp_path / "models" / "teacher-tokenizer"  # what the student's machine keeps of a served teacher
    shutil.copytree(served, teacher, ignore=shutil.ignore_patterns("*.safetensors"))
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny(**{"runtime.num_processes": 2, "teacher.path": str(teacher),
                                                             "student.path": str(student), "teacher.server": {"url": url}})))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PREFECT_HOME": str(REPO / ".prefect"), "OPD_PIPELINE_KEY": "test-key"}
    for k in ("OPD_ROOT", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(k, None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"],
                [sys.executable, "-m", "flows", "with-api", "--", "dvc", "repro"]):  # as `make run`: one Prefect API
        r = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{cmd}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert json.loads((proj / "metrics/registry.json").read_text())["promoted"] is True
    # the user's models: their tokenizer, no training, every declared output, no Cross-SFT for opd
    assert json.loads((proj / "data/prepared/stats.json").read_text())["vocab_size"] == len(load_tokenizer(student))
    assert json.loads((proj / "models/base/manifest.json").read_text()) == {
        "teacher": str(teacher.resolve()), "student_init": str(student.resolve())}
    for name in ("teacher", "student_init"):
        assert (proj / f"plots/{name}_sft.csv").read_text().strip() == "step,loss"
    assert "skipped" in json.loads((proj / "metrics/cross_sft.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("opd").experiment_id])
    parents = [r for r in runs if r.data.tags.get("opd.pipeline_key") == "test-key"]
    assert len(parents) == 1  # five processes, one pipeline run
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(stages) == STAGES
    assert [r.info.run_name for r in runs].count("distill") == 1  # two ranks, one tracked run
    said = {k.removeprefix("opd.teacher_server.default."): v for k, v in stages["distill"].data.tags.items()
            if k.startswith("opd.teacher_server.default.")}  # what the server said it is: its folder's DVC md5
    assert said["url"] == url and said["model"] == served.name and said["revision"] == digest(served)
    assert set(json.loads((proj / "metrics/eval.json").read_text())) == {"student_init", "student"}
    assert json.loads((proj / "metrics/distill.json").read_text())["processes"] == 2
    for committed in [*proj.glob("metrics/*.json"), *proj.glob("plots/*.csv")]:  # the same on every machine
        text = committed.read_text()
        assert "seconds" not in text and "tokens_per_s" not in text and str(proj) not in text, committed
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    prepared_md5 = next(o["md5"] for o in lock["prepare"]["outs"] if o["path"] == "data/prepared")
    assert stages["distill"].data.tags["dvc.in.data/prepared"] == prepared_md5
    assert stages["distill"].data.tags["dvc.out.models/student"] == next(
        o["md5"] for o in lock["distill"]["outs"] if o["path"] == "models/student")
    assert stages["evaluate"].data.tags["dvc.in.models/student"] == next(
        o["md5"] for o in lock["distill"]["outs"] if o["path"] == "models/student")
    # the plots are PNGs: `dvc plots show` writes a page that needs no network (vega pages load a CDN)
    r = subprocess.run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], cwd=proj, env=env, capture_output=True,
                       text=True, timeout=120)
    page = (tmp_path / "plots/index.html").read_text()
    assert r.returncode == 0 and "http" not in page.replace('http-equiv', '') and page.count("<img") == 5, page[:2000]
    # a fresh store (a new machine, another tracking.uri): DVC reruns nothing, the store is filled from its outputs
    fresh = f"sqlite:///{proj / 'fresh.db'}"  # (a deleted mlruns.db would still be open in this process)
    r = subprocess.run(["dvc", "repro"], cwd=proj, env={**env, "MLFLOW_TRACKING_URI": fresh}, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0 and "Running stage 'evaluate'" not in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    client = MlflowClient(tracking_uri=fresh, registry_uri=fresh)
    runs = client.search_runs([client.get_experiment_by_name("opd").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["evaluate", "pipeline", "register"]
    restored = next(r for r in runs if r.info.run_name == "evaluate")
    assert "opd.restored" in restored.data.tags and "student.reasoning_accuracy" in restored.data.metrics
    champion = client.get_model_version_by_alias("opd-student", "champion")
    assert str(champion.version) == "1" and champion.tags["opd.student_md5"] == digest(proj / "models/student")
    # the user's weights are DVC dependencies: new weights in the same folder make the teacher stage stale
    # (the served teacher's are the server's: its revision is recorded, DVC cannot see them)
    status = subprocess.run(["dvc", "status", "teacher"], cwd=proj, env=env, capture_output=True, text=True)
    assert "changed" not in status.stdout, status.stdout
    from opd.models import load_model, save_model

    changed = load_model(student)
    torch.nn.init.normal_(changed.lm_head.weight)
    save_model(changed, load_tokenizer(student), student)
    for cmd in (["dvc", "repro", "user_inputs"], ["dvc", "status", "teacher"]):
        r = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    assert "data/user_inputs.json" in r.stdout and "modified" in r.stdout, r.stdout


def test_a_dead_tracking_server_fails_fast_naming_the_setting():
    from tasks.tracking import TrackingUnavailable, check_reachable

    with socket.socket() as s:  # a port nobody listens on (held, so no parallel test can take it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.perf_counter()
        with pytest.raises(TrackingUnavailable, match=rf"127.0.0.1:{port} \(tracking.uri, or MLFLOW_TRACKING_URI\)"):
            check_reachable(f"http://127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 20
    check_reachable("sqlite:///x.db")  # local stores need no server


def test_a_closed_tracking_port_fails_the_stage_in_seconds(project):
    """The health check runs before the stage starts Prefect, and is not retried by Prefect: a closed
    port is one line and rc 2, not two minutes of retries."""
    with socket.socket() as s:  # bound, never listening: refuses connections, and no parallel test can take it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # set in-process by earlier tests; it would win
        r = subprocess.run([sys.executable, "-m", "flows", "prepare", "--set", f"tracking.uri=http://127.0.0.1:{port}"],
                           cwd=REPO, env={**env, "OPD_ROOT": str(project)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.perf_counter() - t0 < 30, (r.returncode, time.perf_counter() - t0)
    assert r.stderr.startswith(f"error: the MLflow tracking server http://127.0.0.1:{port} (tracking.uri")
    assert r.stderr.count("did not answer") == 1 and not r.stdout


def test_tracking_credentials_reach_the_server_and_nothing_else(tmp_path):
    """A user and password in ``MLFLOW_TRACKING_URI`` go to the server (basic auth, through MLflow's own
    MLFLOW_TRACKING_USERNAME / _PASSWORD), and nowhere else: not the output, the Prefect database, the
    logs or any file of the project. In ``tracking.uri`` (stored by params.yaml and dvc.lock) a password
    is refused, and the refusal does not repeat it."""
    import base64
    import http.server
    import threading
    import uuid

    from tests.conftest import tiny

    secret = f"pw{uuid.uuid4().hex[:12]}"  # unique: Prefect's own schemas hold example passwords

    seen: list[tuple[str, str | None]] = []

    class Server(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            ok = self.path.startswith("/health")
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "text/plain" if ok else "application/json")
            self.end_headers()
            self.wfile.write(b"OK" if ok else b'{"error_code": "UNAUTHENTICATED", "message": "no"}')

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env |= {"OPD_ROOT": str(tmp_path), "PREFECT_HOME": str(tmp_path / ".prefect"),
            "MLFLOW_TRACKING_URI": f"http://opd:{secret}%40x@127.0.0.1:{server.server_port}"}
    try:
        r = subprocess.run([sys.executable, "-m", "flows", "prepare"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    finally:
        server.shutdown()
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, r.stderr[-2000:]  # the fake server is no MLflow
    basic = "Basic " + base64.b64encode(f"opd:{secret}@x".encode()).decode()
    assert ("/health", basic) in seen and any(p.startswith("/api/") and a == basic for p, a in seen), seen
    assert secret not in r.stdout + r.stderr
    leaks = [str(f) for f in tmp_path.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
    assert not leaks and (tmp_path / ".prefect").is_dir(), leaks
    bad = subprocess.run([sys.executable, "-m", "flows", "prepare", "--set", f"tracking.uri=http://opd:{secret}@127.0.0.1:9"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "tracking.uri (from --set): Value error, tracking.uri holds a password" in bad.stderr
    assert secret not in bad.stdout + bad.stderr


def test_training_goes_on_when_the_tracking_server_dies_mid_distill(prefect_api, project, monkeypatch):
    """The server is killed at distill step 2 of 6: the steps go on, the student and the stage's
    metrics are written, and then the stage fails naming tracking.uri (step metrics are sent by a
    background thread, never inside the training step)."""
    import tasks.distill
    from flows.distill import distill_flow
    from flows.prepare import prepare_flow
    from flows.teacher import teacher_flow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a dead server fails each call in seconds
    url, server = start_mlflow_server(project)
    try:
        over = {"tracking.uri": url, "distill.steps": 6}
        prepare_flow(overrides=over)
        teacher_flow(overrides=over)
        real, seen = tasks.distill.distill_stage, []

        def stage_with_a_dying_server(*args, log, **kwargs):
            def step(n: int, metrics: dict) -> None:
                seen.append(n)
                if n == 2:
                    stop_server(server, signal.SIGKILL)
                log(n, metrics)

            return real(*args, log=step, **kwargs)

        monkeypatch.setattr(tasks.distill, "distill_stage",
                            lambda p, *a, **kw: stage_with_a_dying_server(p, *a[:5], log=a[5], **kw))
        with pytest.raises(Exception, match=rf"{url} \(tracking.uri"):
            distill_flow(overrides=over)
    finally:
        stop_server(server, signal.SIGKILL)
    assert seen == [1, 2, 3, 4, 5, 6]
    assert (project / "models/student/model.safetensors").is_file()
    assert json.loads((project / "metrics/distill.json").read_text())["steps"] == 6


def test_a_killed_stage_leaves_no_process_and_its_run_is_closed_then_continued(prefect_api, project):
    """kill -9 of ``python -m flows distill`` after its first checkpoint: no process it started
    survives (its Prefect API server dies with it); the rerun resumes, closes the killed MLflow run as
    KILLED with a tag, links it (``opd.continues_run``) and carries its curve, so the resumed run's
    loss covers every step."""
    import psutil

    from flows.prepare import prepare_flow
    from flows.teacher import teacher_flow

    steps = 60
    (project / "params.yaml").write_text(yaml.safe_dump(tiny(**{"distill.steps": steps, "distill.checkpoint_every": 2})))
    prepare_flow()
    teacher_flow()
    env = {**os.environ, "OPD_ROOT": str(project), "PREFECT_HOME": str(REPO / ".prefect")}
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "flows", "distill"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts, deadline = project / "models/checkpoints/distill", time.time() + 300
    while not any(ckpts.glob("*/trainer_state.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "distill ended before it could be killed"
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children  # the Prefect API server at least
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [" ".join(p.cmdline()[:4]) for p in alive]

    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("opd").experiment_id], "tags.`opd.stage` = 'distill'")
    by_status = {run.info.status: run for run in runs}
    assert sorted(by_status) == ["FINISHED", "KILLED"] and len(runs) == 2
    killed, resumed = by_status["KILLED"], by_status["FINISHED"]
    assert f"process {proc.pid} " in killed.data.tags["opd.killed"]
    assert resumed.data.tags["opd.continues_run"] == killed.info.run_id
    assert resumed.data.tags["opd.allocator"] == "mimalloc"  # python -m flows restarted itself with it preloaded
    assert sorted({m.step for m in client.get_metric_history(resumed.info.run_id, "distill.loss")}) == list(range(1, steps + 1))


def test_committed_outputs_drop_wall_clock_fields_and_project_paths(tmp_path):
    from tasks.outputs import portable

    summary = {"seconds": 3.2, "teacher": str(tmp_path / "models/base/teacher"), "user": "/elsewhere/model",
               "final": {"loss": 0.5, "tokens_per_s": 900.0}, "curve": [{"step": 1, "tokens_per_s": 1.0}]}
    assert portable(summary, tmp_path) == {"teacher": "models/base/teacher", "user": "/elsewhere/model",
                                           "final": {"loss": 0.5}, "curve": [{"step": 1}]}


def test_one_pipeline_key_for_every_stage_of_a_plain_dvc_repro(project, monkeypatch):
    """Without OPD_PIPELINE_KEY the stages of one ``dvc repro`` share a parent run: the outputs the
    stages write (dvc.lock, metrics, plots) change neither the key nor ``git.dirty``; a source
    change does, and a DVC experiment is keyed by its name."""
    from opd.params import load
    from tasks.tracking import git_tags, pipeline_key

    monkeypatch.delenv("OPD_PIPELINE_KEY", raising=False)
    for k in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(k, raising=False)
    for name in ("dvc.lock", "metrics/eval.json", "plots/distill.csv", "src.py"):
        (project / name).parent.mkdir(exist_ok=True)
        (project / name).write_text("before\n")
    git = lambda *a: subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *a], cwd=project,  # noqa: E731
                                    check=True, capture_output=True)
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "x")
    params = load(project / "params.yaml")
    key = pipeline_key(params)
    for name in ("dvc.lock", "metrics/eval.json", "plots/distill.csv"):  # what a stage writes
        (project / name).write_text("after\n")
    assert pipeline_key(params) == key and git_tags()["git.dirty"] == "False"
    (project / "src.py").write_text("changed\n")
    assert pipeline_key(params) != key and git_tags()["git.dirty"] == "True"
    monkeypatch.setenv("DVC_EXP_NAME", "fuzzy-cat")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123456789abcdef")
    assert pipeline_key(params) == "exp-fuzzy-cat-01234567"


def test_the_default_dvc_remote_is_read_without_its_credentials(tmp_path):
    """A registered version records where ``dvc pull`` finds its student: the default remote that
    ``dvc remote add -d`` wrote (the local config too), with no user or password; none without one."""
    from tasks.tracking import dvc_remote

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
    assert dvc_remote(tmp_path) is None
    subprocess.run(["dvc", "remote", "add", "-d", "storage", "s3://bucket/opd"], cwd=tmp_path, check=True)
    assert dvc_remote(tmp_path) == "s3://bucket/opd"
    subprocess.run(["dvc", "remote", "add", "--local", "-d", "-f", "mine", "https://me:s3cret@dvc.example/opd"],
                   cwd=tmp_path, check=True)
    assert dvc_remote(tmp_path) == "https://***@dvc.example/opd"
