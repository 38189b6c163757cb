"""Keep freed CPU memory in the process for reuse, instead of page-faulting it back in every step.

PyTorch's CPU tensors come straight from the C allocator, which it does not cache (its CUDA
allocator does). glibc serves every block above its mmap threshold (128 KiB, raised dynamically
to at most 32 MiB) with a fresh ``mmap`` and returns it on free, and trims the heap's top above
128 KiB. A training step at a real vocabulary allocates and frees the same large blocks every step
(logit chunks of ``chunk x vocab``, the embedding's gradient, autocast's weight copies), so each
step pays the kernel to zero and map them again: on the SmolLM2 pair a third of the process's time
was system time, and the update took twice as long as with the blocks kept (``benchmarks/opd_step.py``).

``runtime.allocator`` picks what keeps them:

- ``mimalloc`` (the default): Microsoft's mimalloc (the ``cmeel-mimalloc`` wheel) replaces the C
  allocator for the whole process, as PyTorch's CPU tuning guide does with jemalloc or tcmalloc.
  Its size classes and segments give a freed block back to the next request of its size every
  time, and ``MIMALLOC_PURGE_DELAY=-1`` keeps freed pages mapped. An allocator can only be replaced
  before the process starts (``LD_PRELOAD``): ``python -m flows`` re-executes itself with
  :func:`preload_env` (the engine never execs); torchrun's ranks inherit it.
- ``glibc``: raise glibc's thresholds with ``mallopt`` (no restart needed). Reuse is frequent, not
  certain: PyTorch allocates with ``posix_memalign(64)``, and glibc serves an aligned request from a
  chunk that must hold the size plus the alignment slack; whether the block a previous step freed is
  large enough depends on where the heap placed it. Measured over 20 fresh processes: a plain
  ``malloc`` of 64 MiB reused in 19 of 19 rounds, the same ``posix_memalign`` in 14-15, PyTorch's
  64 MiB tensors in 13-18 (mimalloc: 19 of 19 in every process); without either, 0.
- ``system``: whatever the process was started with.

With either setting the process's resident memory stays at its peak instead of shrinking between
steps. A ``mimalloc`` process that was not started with it (the engine called from a user's own
script, or macOS, where the wheel cannot be preloaded) falls back to ``glibc`` where it can.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 30  # blocks above 1 GiB still get their own mapping (returned to the OS when freed)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim the heap's top below ~2 GiB of free space
MIMALLOC_ENV = {"MIMALLOC_PURGE_DELAY": "-1"}  # never hand freed pages back to the OS (mimalloc's default: 10 ms)


def _mallopt():
    """glibc's ``mallopt``, or None (not Linux, or a C library without its tunables, like musl)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)  # the process's own symbols: the C library PyTorch allocates from
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed blocks up to 1 GiB for reuse; True when it took effect."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def mimalloc_active() -> bool:
    """True when mimalloc serves this process's ``malloc`` (it was preloaded)."""
    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mi_version")


def mimalloc_library() -> Path | None:
    """The installed ``cmeel-mimalloc`` shared library, or None (not installed, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        dist = distribution("cmeel-mimalloc")
    except PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name.startswith("libmimalloc.so.") and f.name.count(".") == 2:  # libmimalloc.so.3, not .so.3.4
            path = Path(dist.locate_file(f)).resolve()
            return path if path.is_file() else None
    return None


def preload_env(allocator: str, env: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-execute this process with so that ``allocator`` serves it from the start,
    or None when no restart is needed (already active, another setting, or mimalloc unavailable)."""
    env = dict(os.environ if env is None else env)
    if allocator != "mimalloc" or mimalloc_active() or env.get("OPD_ALLOCATOR_PRELOADED"):
        return None  # the marker stops a loop if the preload did not take (a loader that ignores it)
    lib = mimalloc_library()
    if lib is None:
        return None
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{lib} {preload}".strip()
    env["OPD_ALLOCATOR_PRELOADED"] = "1"
    return {**MIMALLOC_ENV, **env}  # a user's own MIMALLOC_* settings win


def in_effect(allocator: str) -> str:
    """What serves this process's memory under ``runtime.allocator``: ``mimalloc`` (preloaded), ``glibc``
    (mallopt) or ``system``."""
    if mimalloc_active():
        return "mimalloc"
    return "system" if allocator == "system" or _mallopt() is None else "glibc"


def use_allocator(allocator: str) -> str:
    """Apply ``runtime.allocator`` in a running process; returns :func:`in_effect`."""
    used = in_effect(allocator)
    if allocator == "mimalloc" and used != "mimalloc":
        warnings.warn("runtime.allocator is mimalloc but this process was not started with it "
                      "(python -m flows preloads it; elsewhere set LD_PRELOAD to cmeel-mimalloc's "
                      f"libmimalloc.so.3): using {used} instead", stacklevel=2)
    if used == "glibc":
        keep_freed_memory()
    return used
