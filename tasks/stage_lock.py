"""One stage at a time per project: ``python -m flows <stage>`` holds ``.cache/locks/stage.lock``.

Why: two ``python -m flows distill`` with different settings once both exited 0, writing into the
same ``models/checkpoints``, and the last to finish won the outputs. The lock is an ``flock`` on a
file that names its holder (stage, pid, host, start time): a second run is refused with that name;
the kernel releases the lock when its holder dies, however it died, so a lock left by a dead process
is simply taken over. Processes the holder starts (torchrun ranks of the same stage) inherit the
hold through ``OPD_STAGE_LOCK`` and do not lock again. ``dvc repro`` has its own lock; this one
covers direct runs of stages, flows and ``dvc repro`` side by side.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

HELD_ENV = "OPD_STAGE_LOCK"


class StageLocked(RuntimeError):
    """Another process runs a stage of this project."""


@contextlib.contextmanager
def stage_lock(root: Path, stage: str) -> Iterator[None]:
    """Hold the project's stage lock for the block, or raise :class:`StageLocked` naming the holder."""
    path = (root / ".cache" / "locks" / "stage.lock").resolve()
    if os.environ.get(HELD_ENV) == str(path):  # a process of the holder's own launch
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageLocked(f"{stage}: another stage of this project is running ({_holder(path)}); wait for it "
                              f"to finish or stop it (lock: {path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"stage": stage, "pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.environ[HELD_ENV] = str(path)
        try:
            yield
        finally:
            os.environ.pop(HELD_ENV, None)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h:
        return "holder unknown"
    return f"{h.get('stage')} as pid {h.get('pid')} on {h.get('host')} since {h.get('since')}"
