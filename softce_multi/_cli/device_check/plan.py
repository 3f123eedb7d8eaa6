"""What the device check runs, at which sizes, and how it times and measures on either device.

A :class:`Plan` holds every size the stages use: :data:`FULL` is the run on the GPU, :data:`DRY`
the same stages at tiny sizes on the CPU (``--dry-run``), where the Triton kernels run in
Triton's interpreter and the Pallas kernels with ``interpret=True``
(:func:`kernels_as_on_a_gpu`). Times come from device events on CUDA
(``triton.testing.do_bench``, median) and from the wall clock on the CPU; extra peak memory
from ``torch.cuda.max_memory_allocated`` (torch) and XLA's temporaries (JAX), and is not
measured in a dry run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

Shape = tuple[int, ...]

Record = Callable[[str, Any], None]
"""``record(key, value)``: add a stage's result (a list is appended to) and write it out."""

LOW_PRECISION = ("bfloat16", "float16", "float32")
"""The logits dtypes every parity case runs in."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one run of the device check.

    Attributes
    ----------
    parity_shapes
        Shapes of the parity cases in every dtype, case and reduction.
    parity_large
        ``(shape, logits dtype, case, reduction)`` of the large parity cases.
    jax_parity_shapes, cupy_parity_shapes
        Shapes of the JAX (XLA and Pallas) and CuPy parity cases.
    speed_shapes
        ``[1, S, V]`` shapes of the speed comparison (NeMo's benchmark shapes).
    linear_case
        ``(N, H, V)`` of the loss from hidden states against the materialised path and Liger.
    targets_case
        ``(N, H, V_target, V_draft)`` of ``prepare_targets_from_hidden``.
    copy_bytes
        Bytes of the buffer whose device-to-device copy gives the bandwidth ceiling.
    """

    parity_shapes: tuple[Shape, ...]
    parity_large: tuple[tuple[Shape, str, str, str], ...]
    jax_parity_shapes: tuple[Shape, ...]
    cupy_parity_shapes: tuple[Shape, ...]
    speed_shapes: tuple[Shape, ...]
    linear_case: tuple[int, int, int]
    targets_case: tuple[int, int, int, int]
    copy_bytes: int


FULL = Plan(
    parity_shapes=((2, 7, 33), (4, 129, 1000), (2, 256, 32000)),
    parity_large=(
        ((1, 32768, 32000), "bfloat16", "nan_inf_padding", "mean"),
        ((1, 32768, 32000), "bfloat16", "random", "none"),
        ((1, 8192, 128256), "bfloat16", "unnormalised", "mean"),
        ((1, 8192, 128256), "float32", "neg_inf_logits", "sum"),
    ),
    jax_parity_shapes=((2, 7, 33), (4, 129, 1000), (1, 4096, 128256)),
    cupy_parity_shapes=((2, 7, 33), (4, 129, 1000), (1, 4096, 32000)),
    speed_shapes=((1, 8192, 32000), (1, 32768, 32000), (1, 8192, 128256)),
    linear_case=(8192, 4096, 128256),
    targets_case=(8192, 4096, 128256, 32000),
    copy_bytes=4 << 30,
)
"""The run on the H200."""

DRY = Plan(
    parity_shapes=((2, 7, 33), (3, 5, 300)),
    parity_large=(((1, 6, 5000), "bfloat16", "nan_inf_padding", "mean"),),
    jax_parity_shapes=((2, 7, 33),),
    cupy_parity_shapes=((2, 7, 33),),
    speed_shapes=((1, 16, 256), (1, 32, 256)),
    linear_case=(16, 8, 300),
    targets_case=(16, 8, 300, 40),
    copy_bytes=1 << 20,
)
"""The same stages at sizes the CPU runs in seconds, the Triton and Pallas kernels interpreted."""


def plan_for(dry_run: bool) -> Plan:
    """:data:`DRY` for a dry run, else :data:`FULL`."""
    return DRY if dry_run else FULL


def torch_device(dry_run: bool) -> str:
    """The torch device of the stages: ``"cpu"`` in a dry run, else ``"cuda"``."""
    return "cpu" if dry_run else "cuda"


@contextlib.contextmanager
def kernels_as_on_a_gpu(dry_run: bool) -> Iterator[None]:
    """Within the block, the torch adapter runs the Triton kernels and the JAX adapter the Pallas
    kernels, as it does on a GPU.

    On the GPU this changes nothing. In a dry run, torch tensors on the CPU go to the Triton
    kernels (the caller set ``TRITON_INTERPRET=1`` before Triton was imported), whose
    interpreter rounds to bfloat16 as a GPU does, and JAX arrays on the CPU to the Pallas kernels
    with ``interpret=True``.
    """
    if not dry_run:
        yield
        return
    from softce_multi import kernels, testing

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(kernels, "use_triton", lambda *tensors: True))
        stack.enter_context(testing.triton_interpreter_rounds_to_nearest())
        if _jax_installed():
            from softce_multi._adapters import jax as jax_adapter
            from softce_multi.kernels import pallas

            stack.enter_context(mock.patch.object(kernels, "use_pallas", lambda *arrays: True))
            stack.enter_context(mock.patch.object(jax_adapter, "_KERNEL_PLATFORMS", ("cpu",)))
            for name in ("row_routine", "gradient_routine"):
                interpreted = functools.partial(getattr(pallas, name), interpret=True)
                stack.enter_context(mock.patch.object(pallas, name, interpreted))
        yield


@contextlib.contextmanager
def xla_only() -> Iterator[None]:
    """Within the block, the JAX adapter traces XLA's routines alone, also on a GPU."""
    from softce_multi import kernels

    with mock.patch.object(kernels, "use_pallas", lambda *arrays: False):
        yield


def _jax_installed() -> bool:
    from softce_multi.kernels import _installed

    return _installed("jax")


@contextlib.contextmanager
def failure_recorded(record: Record, implementation: str, **where: Any) -> Iterator[None]:
    """Within the block, an exception is recorded under ``"failed"`` (the implementation, where,
    the error) instead of raised: one implementation that fails on the device leaves the others
    measured. The check reports it and exits with status 1."""
    try:
        yield
    except Exception as error:
        failure = {"implementation": implementation, **where}
        record("failed", [{**failure, "error": f"{type(error).__name__}: {error}"}])


def median_seconds(step: Callable[[], Any], *, device: str, repeats: int = 5) -> float:
    """The median time of ``step()``.

    On CUDA, from device events (``triton.testing.do_bench``, 25 ms of warm-up, 100 ms of
    repeats, the median); elsewhere, :func:`wall_median` of ``repeats`` calls.
    """
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(step, warmup=25, rep=100, return_mode="median")) / 1e3
    return wall_median(step, repeats)


def wall_median(step: Callable[[], Any], repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``step()``, after a warm-up call; ``step``
    must wait for its work (JAX's ``block_until_ready``, say)."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def extra_peak_bytes(step: Callable[[], Any], *, device: str) -> int | None:
    """The rise of ``torch.cuda.max_memory_allocated`` above the memory allocated before one call
    of ``step()``, what it returns kept until the peak is read; None off CUDA."""
    if device != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return int(peak)


def free_device_memory(device: str) -> None:
    """Give the torch caching allocator's free blocks back, so the next case starts clean."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
