"""A local Prefect API server that lives exactly as long as the command that started it.

Why: with no ``PREFECT_API_URL``, Prefect starts a temporary API server as a child of every process
that runs a flow, and a ``kill -9`` of that process leaves the server running (one orphan per
killed stage, ../shared/STACK.md). :func:`serving` starts the same server (Prefect's API app under
uvicorn, loopback only, no UI) as a child that watches its parent and exits as soon as the parent is
gone, however it died, and points ``PREFECT_API_URL`` at it.

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
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
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
