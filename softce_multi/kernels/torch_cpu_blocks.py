"""How the torch CPU operators use the CPU: blocks of rows on single-threaded workers, and
fresh outputs in huge pages.

:func:`run_blocks` runs an operator's block loop on ``torch.get_num_threads()`` workers, threads
of a pool kept per process that each run PyTorch on one thread and take the next block of rows
whenever they finish one, so that a core kept busy by another process slows only the worker on
it. :func:`advise_huge_pages` asks Linux to back a fresh ``[N, V]`` output with transparent
huge pages, so that its first write faults in 2 MiB at a time, not 4 KiB.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from queue import Empty, SimpleQueue
from typing import cast

import torch
from torch import Tensor

from softce_multi import _core

__all__ = ["HUGE_PAGE_BYTES", "advise_huge_pages", "run_blocks"]

#: The size of a transparent huge page on x86-64 and most arm64 Linux kernels.
HUGE_PAGE_BYTES = 1 << 21


def run_blocks(work: Callable[[Iterator[slice]], None], z: Tensor, block_rows: int) -> None:
    """Run ``work(blocks)`` over the blocks of ``block_rows`` rows of the ``[N, V]`` logits
    ``z``: on the CPU, on
    ``torch.get_num_threads()`` single-threaded workers that each take the next block when done
    with one; elsewhere in order, on the caller's thread.

    Every PyTorch operator on a large tensor is a parallel region that waits for its slowest
    thread, so when another process holds a core, each of the many operators of a block waits
    for a time slice. Here a busy core only slows the worker on it; the other workers take its
    share of the blocks. ``work`` makes its own buffers, so its memory grows with the number of
    workers, not of blocks; it runs without autograd, in the caller's process.
    """
    blocks = list(_core.row_blocks(z.shape[0], block_rows))
    workers = min(torch.get_num_threads(), len(blocks))
    if workers < 2 or z.device.type != "cpu":
        with torch.no_grad():
            work(iter(blocks))
        return
    queue: SimpleQueue[slice] = SimpleQueue()
    for block in blocks:
        queue.put(block)

    def take() -> Iterator[slice]:
        while True:
            try:
                yield queue.get_nowait()
            except Empty:
                return

    def task() -> None:
        with torch.no_grad():
            work(take())

    pool = _single_threaded_pool(workers, os.getpid())
    for future in [pool.submit(task) for _ in range(workers)]:
        future.result()


@functools.cache
def _single_threaded_pool(workers: int, process_id: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads whose PyTorch operators run on one thread each.

    One pool per process (``process_id``): a forked child does not inherit the threads.
    PyTorch gives a thread its OpenMP thread count on the thread's first call into it, from a
    process-wide default that ``torch.set_num_threads`` also sets. So each worker makes that
    first call (``torch.get_num_threads``) before it sets its own count to 1, all before the
    caller restores the default: a worker that made it later would take the caller's count
    and run every operator of its blocks as a parallel region of its own.
    """
    started = threading.Barrier(workers + 1)
    caller_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(
        workers, thread_name_prefix="softce_multi", initializer=_run_on_one_thread
    )
    for _ in range(workers):
        pool.submit(started.wait)
    started.wait()
    torch.set_num_threads(caller_threads)
    return pool


def _run_on_one_thread() -> None:
    """Make this thread's PyTorch operators run on this thread alone."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def advise_huge_pages(tensor: Tensor) -> None:
    """Ask Linux to back a fresh, untouched CPU ``tensor`` with transparent huge pages.

    A new ``[N, V]`` output is memory the kernel maps page by page on first write: 64,000
    faults for 250 MiB of 4 KiB pages, each zeroing its page, which cost the gradient as much
    time as computing it. ``madvise(MADV_HUGEPAGE)`` on the 2 MiB-aligned interior of the
    tensor's memory lets each fault map 2 MiB instead. It is a hint: where the kernel does not
    take it (transparent huge pages set to ``never``, other systems, small tensors) nothing
    changes, and no data is touched either way. PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` does the
    same for every large CPU allocation of a process; this does it for this library's outputs
    only.
    """
    if tensor.device.type != "cpu":
        return
    madvise = _libc_madvise()
    if madvise is None:
        return
    address = tensor.data_ptr()
    start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    stop = (address + tensor.untyped_storage().nbytes()) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if stop > start:
        madvise(start, stop - start, mmap.MADV_HUGEPAGE)


@functools.cache
def _libc_madvise() -> Callable[[int, int, int], int] | None:
    """The C library's ``madvise`` on Linux, or None where it or ``MADV_HUGEPAGE`` is missing."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return cast(Callable[[int, int, int], int], madvise)
