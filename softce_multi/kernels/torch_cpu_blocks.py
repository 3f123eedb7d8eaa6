"""How the torch CPU operators use the CPU: blocks of rows on single-threaded workers, and
the pages of fresh outputs mapped a block at a time.

:func:`run_blocks` runs an operator's block loop on ``torch.get_num_threads()`` workers, threads
of one pool kept per process that each run PyTorch on one thread and take the next block of rows
whenever they finish one, so that a core kept busy by another process slows only the worker on
it. :func:`populate` maps the pages of a block of a fresh ``[N, V]`` output in one system call,
where its first write would fault them in one 4 KiB page at a time.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from queue import Empty, SimpleQueue
from typing import NamedTuple, cast

import torch
from torch import Tensor

from softce_multi import _core

__all__ = ["MADV_POPULATE_WRITE", "populate", "run_blocks"]

#: ``MADV_POPULATE_WRITE``, Linux's ``madvise`` advice (5.14 and later) that maps the pages of
#: a range writable, as their first writes would; Python's ``mmap`` module does not name it.
MADV_POPULATE_WRITE = 23


def run_blocks(work: Callable[[Iterator[slice]], None], z: Tensor, block_rows: int) -> None:
    """Run ``work(blocks)`` over the blocks of ``block_rows`` rows of the ``[N, V]`` logits
    ``z``: on the CPU, on ``torch.get_num_threads()`` single-threaded workers that each take
    the next block when done with one; elsewhere in order, on the caller's thread.

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

    # Grad and inference modes are per thread: the workers take the caller's, so that they may
    # write into the caller's outputs (inference tensors under torch.inference_mode).
    inference = torch.is_inference_mode_enabled()

    def task() -> None:
        with torch.inference_mode(inference), torch.no_grad():
            work(take())

    for future in _submitted(task, workers):
        future.result()


class _Pool(NamedTuple):
    """The process's pool of single-threaded workers (:func:`_submitted`)."""

    process_id: int
    workers: int
    executor: ThreadPoolExecutor


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _submitted(task: Callable[[], None], workers: int) -> list[Future[None]]:
    """``task`` submitted ``workers`` times to the process's pool of single-threaded workers.

    One pool per process: a forked child does not inherit the threads, and gets its own. It has
    ``torch.get_num_threads()`` threads when made; a larger worker count (after
    ``torch.set_num_threads``) replaces it by a larger pool, and the old one's threads end once
    idle, so that a process keeps one pool, not one per count. The lock makes one pool when
    threads call at once, and keeps a task from being submitted to a pool being replaced.
    """
    global _pool
    with _pool_lock:
        if _pool is None or _pool.process_id != os.getpid() or _pool.workers < workers:
            if _pool is not None and _pool.process_id == os.getpid():
                _pool.executor.shutdown(wait=False)
            size = max(workers, torch.get_num_threads())
            _pool = _Pool(os.getpid(), size, _started_pool(size))
        return [_pool.executor.submit(task) for _ in range(workers)]


def _started_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, each started and running PyTorch on one thread.

    PyTorch gives a thread its OpenMP thread count on the thread's first call into it, from a
    process-wide default that ``torch.set_num_threads`` also sets. So each worker makes that
    first call (``torch.get_num_threads``) before it sets its own count to 1, all before the
    caller restores the default: a worker that made it later would take the caller's count
    and run every operator of its blocks as a parallel region of its own. If the caller is
    interrupted while it waits (Ctrl-C), the workers are released and the pool shut down, so
    that no thread waits forever and keeps the interpreter from exiting.
    """
    started = threading.Barrier(workers + 1)
    caller_threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(
        workers, thread_name_prefix="softce_multi", initializer=_run_on_one_thread
    )
    try:
        for _ in range(workers):
            pool.submit(started.wait)
        started.wait()
    except BaseException:
        started.abort()
        pool.shutdown(wait=False)
        raise
    finally:
        torch.set_num_threads(caller_threads)
    return pool


def _run_on_one_thread() -> None:
    """Make this thread's PyTorch operators run on this thread alone."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def populate(block: Tensor) -> None:
    """Map the pages of a fresh, contiguous CPU ``block`` in one system call, before it is
    first written.

    A new ``[N, V]`` output is memory that Linux maps page by page on first write: 64,000 page
    faults for the 250 MiB of a float32 ``[2048, 32000]`` gradient, each a trap into the kernel
    that zeroes one 4 KiB page. ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14 and later) maps
    and zeroes the pages of the block's page-aligned interior in one call, without the traps.
    Called by each worker on the block it is about to write, it leaves the block in the cache.
    Nothing is written to the block's values that its first write would not overwrite; where
    the call is not known (other systems, older kernels) nothing changes.
    """
    if block.device.type != "cpu" or not block.is_contiguous():
        return
    madvise = _libc_madvise()
    if madvise is None:
        return
    address = block.data_ptr()
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = (address + block.numel() * block.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start:
        madvise(start, stop - start, MADV_POPULATE_WRITE)


@functools.cache
def _libc_madvise() -> Callable[[int, int, int], int] | None:
    """The C library's ``madvise`` on Linux, or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return cast(Callable[[int, int, int], int], madvise)
