"""Keep freed CPU memory in the process for reuse, instead of page-faulting it back in every step.

PyTorch's CPU tensors come straight from the C allocator, which it does not cache (its CUDA
allocator does). glibc serves every block above its mmap threshold (128 KiB, raised dynamically
to at most 32 MiB) with a fresh ``mmap`` and returns it on free, and trims the heap's top above
128 KiB. A training step at a real vocabulary allocates and frees the same large blocks every step
(logit chunks of ``chunk x vocab``, the embedding's gradient, autocast's weight copies), so each
step pays the kernel to zero and map them again: on the SmolLM2 pair a third of the process's time
was system time, and the update took twice as long as with the blocks kept (``benchmarks/opd_step.py``).

Raising both thresholds keeps freed blocks in the heap, where the next step's allocations of the
same sizes find them; PyTorch's CPU tuning guide gets the same effect by preloading jemalloc or
tcmalloc. The cost: the process's resident memory stays at its peak instead of shrinking between
steps. Only glibc has ``mallopt``; elsewhere (macOS, musl) this does nothing.

Reuse is frequent, not certain: PyTorch allocates with ``posix_memalign(64)``, and glibc serves an
aligned request from a chunk that must hold the size plus the alignment slack; whether the block a
previous step freed is large enough depends on where the heap placed it. Measured over 20 fresh
processes: a plain ``malloc`` of 64 MiB with a small allocation after it was reused in 19 of 19
rounds, the same ``posix_memalign`` in 14-15, PyTorch's 64 MiB tensors in 13-18; without the setting
in 0. An allocator with size classes (jemalloc, tcmalloc, mimalloc) would make reuse certain.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 30  # blocks above 1 GiB still get their own mapping (returned to the OS when freed)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim the heap's top below ~2 GiB of free space


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed blocks up to 1 GiB for reuse; True when it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the process's own symbols: the C library PyTorch allocates from
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):  # musl has no mallopt tunables
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
