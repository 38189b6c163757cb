"""Run a command whose whole process tree dies with the process that started it.

Why: ``make run`` is ``python -m flows with-api -- dvc repro``; ``dvc repro`` starts each stage as
``python -m flows <stage>``, which may start torchrun ranks. A ``kill -9`` of the top process used to
leave that tree running under PID 1, retrying a Prefect API that had died with its parent. Here the
command runs in a process group of its own, and a small watcher process (``python -m
tasks.process_group PARENT PGID``) ends the group as soon as the parent is gone, however it died:
SIGTERM to every member, SIGKILL to what is left after a grace period. While the parent lives,
SIGINT / SIGTERM / SIGHUP it receives are passed on to the group (a new group no longer receives a
terminal's Ctrl-C by itself).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
# The group's first process (python -c, so that nothing is imported and the command's environment is
# exactly the one given): wait for the go on the pipe FD, then become the command; exit if it never comes.
EXEC_WHEN_WATCHED = ("import os, sys; fd = int(sys.argv[1]); said = os.read(fd, 2); os.close(fd); "
                     "sys.exit(1) if said != b'go' else os.execvp(sys.argv[2], sys.argv[2:])")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # members exist that we may not signal
        return True
    return True


def end_group(pgid: int, grace: float = GRACE_S) -> None:
    """SIGTERM to every process of the group, SIGKILL to what is left after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def run_in_group(cmd: list[str]) -> int:
    """Run ``cmd`` in its own process group; return its exit code. The group is ended when this
    process exits (normally, by a signal, or killed: then by the watcher).

    The group's first process waits on a pipe and becomes ``cmd`` only once the watcher runs: a kill
    between starting the command and starting its watcher (CI caught one) would otherwise leave the
    command unwatched. Killed before the go, the pipe closes and the waiting process exits instead."""
    ready, go = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", EXEC_WHEN_WATCHED, str(ready), *cmd], start_new_session=True,
                            pass_fds=(ready,))
    os.close(ready)
    watcher = subprocess.Popen([sys.executable, "-m", "tasks.process_group", str(os.getpid()), str(proc.pid)],
                               stdin=subprocess.DEVNULL, start_new_session=True)
    os.write(go, b"go")
    os.close(go)
    previous = {sig: signal.signal(sig, lambda sig, _: os.killpg(proc.pid, sig)) for sig in FORWARDED}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if _alive(proc.pid):  # the command is done; whatever it left behind goes with it
            end_group(proc.pid)
        watcher.kill()
        watcher.wait()


def _watch(parent: int, pgid: int) -> None:
    """The watcher: poll the parent; once it is gone (this process is re-parented), end the group."""
    while os.getppid() == parent and _alive(pgid):
        time.sleep(0.2)
    if _alive(pgid):
        end_group(pgid)


if __name__ == "__main__":  # python -m tasks.process_group PARENT_PID PGID
    _watch(int(sys.argv[1]), int(sys.argv[2]))
