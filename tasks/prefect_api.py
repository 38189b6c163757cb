"""A local Prefect API server that lives exactly as long as the command that started it.

Why: with no ``PREFECT_API_URL``, Prefect starts a temporary API server as a child of every process
that runs a flow, and a ``kill -9`` of that process leaves the server running (one orphan per
killed stage, docs/stack.md). :func:`serving` starts the same server (Prefect's API app under
uvicorn, loopback only, no UI) as a child that watches its parent and exits as soon as the parent is
gone, however it died, and points ``PREFECT_API_URL`` at it.

A stage also watches the API it talks to (:func:`watching`): Prefect's client retries a vanished server
for as long as the run lasts (a distill stage whose API died was still draining 4,700 queued events
at one per 7 s, 5 minutes later), so when the API has not answered for ``API_GRACE_S`` the stage
says so in one line and ends itself and its children at once, as a kill would; its last checkpoint
resumes it.

One server can serve many stages: ``python -m flows with-api CMD...`` runs CMD (``make run`` runs
``dvc repro`` so) with the URL in its environment, and every stage it starts uses that server instead
of paying Prefect's start-up itself. A ``PREFECT_API_URL`` the user set always wins.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

URL_ENV = "PREFECT_API_URL"
API_GRACE_S = 15.0  # seconds without an answer from /health before a stage gives up on its API


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the local Prefect API server exited with code {proc.returncode}: "
                               f"{proc.stderr.read().decode(errors='replace')[-2000:] if proc.stderr else ''}")
        if _healthy(url, timeout=2):
            return
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the local Prefect API server did not answer {url}/health within {seconds:.0f} s "
                       "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); set PREFECT_API_URL to a running server")


@contextlib.contextmanager
def serving() -> Iterator[str]:
    """Inside the block, flows of this process and of the processes it starts talk to a local API
    server that dies with this process; yields its URL (the user's ``PREFECT_API_URL`` if set)."""
    if os.environ.get(URL_ENV):
        yield os.environ[URL_ENV]
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tasks.prefect_api", str(os.getpid()), str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(url, proc, float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
        os.environ[URL_ENV] = url
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        with contextlib.suppress(Exception):  # the run's last log lines reach the server before it stops
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
        os.environ.pop(URL_ENV, None)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _healthy(url: str, timeout: float) -> bool:
    """True when the API at ``url`` answers ``/health`` (with the user's ``PREFECT_API_KEY``, if any)."""
    req = urllib.request.Request(f"{url.rstrip('/')}/health")
    if os.environ.get("PREFECT_API_KEY"):
        req.add_header("Authorization", f"Bearer {os.environ['PREFECT_API_KEY']}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def watching(url: str, stage: str, grace: float = API_GRACE_S, every: float = 1.0) -> Iterator[None]:
    """Inside the block, watch the API from a daemon thread; when it has not answered for ``grace``
    seconds, print one line and end this process and every process it started (SIGKILL, as
    ``with-api``'s group kill). Leaving the block stops the watch (the local server stops next)."""
    from opd.config import redact

    stop = threading.Event()

    def run() -> None:
        last_ok = time.monotonic()
        while not stop.wait(every):
            if _healthy(url, timeout=min(5.0, grace / 3)):
                last_ok = time.monotonic()
            elif time.monotonic() - last_ok > grace and not stop.is_set():
                # the line must stay the last one printed (Prefect's threads and the progress bar write on
                # until the kill lands) and start a line of its own (a progress bar may be mid-line): every
                # later write goes to /dev/null, the line to the saved stderr
                sys.stdout.flush()
                sys.stderr.flush()
                saved, quiet = os.dup(2), os.open(os.devnull, os.O_WRONLY)
                os.dup2(quiet, 1)
                os.dup2(quiet, 2)
                os.write(saved, (f"\nerror: {stage}: the Prefect API at {redact(url)} has not answered for {grace:.0f} s; "
                                 "stopping (run the stage again to resume from its last checkpoint)\n").encode())
                _end_tree()

    thread = threading.Thread(target=run, name="prefect-api-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _end_tree() -> None:
    """SIGKILL this process's descendants, then exit without running Prefect's shutdown (which would
    wait on the dead API); outputs are written atomically, so this loses what a kill loses."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    os._exit(1)


def _exit_with(parent: int) -> None:
    """Poll the parent; when it is gone (the child is re-parented), exit at once."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(0)


if __name__ == "__main__":  # the server process: python -m tasks.prefect_api PARENT_PID PORT
    parent_pid, port = int(sys.argv[1]), int(sys.argv[2])
    threading.Thread(target=_exit_with, args=(parent_pid,), daemon=True).start()
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                log_level="error", lifespan="on")
