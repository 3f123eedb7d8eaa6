"""The modes of softce_multi's kernels that ``bench`` times on their own on CUDA, each against
the bytes it must read and write (its byte floor)."""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from softce_multi._cli.bench.cases import make_inputs
from softce_multi._cli.bench.measure import ITEMSIZE, interleaved_times, synchronize


class KernelMode(NamedTuple):
    """A mode of the kernels: the ``[N, V]`` arrays it must read (``z``, ``p``) or write
    (``grad_z``, ``grad_p``), and whether it is a backward pass.

    The gradients it writes are those of its leaves: the logits with ``grad_z``, the targets
    with ``grad_p``. A forward mode times the loss, and with ``grad_z``
    :func:`softce_multi.masked_soft_cross_entropy_with_grad`, whose one pass writes the logits
    gradient in every dtype (autograd's forward pass writes it only where scaling it later
    rounds nothing, not for 16-bit logits); a backward mode times ``torch.autograd.grad`` of
    the per-position loss of ``reduction="none"``, whose forward pass makes no gradient, to
    them.
    """

    arrays: tuple[str, ...]
    backward: bool


KERNEL_MODES = {
    "forward only": KernelMode(("z", "p"), backward=False),
    "forward+gradient": KernelMode(("z", "p", "grad_z"), backward=False),
    "backward logits": KernelMode(("z", "p", "grad_z"), backward=True),
    "backward targets": KernelMode(("z", "grad_p"), backward=True),
    "backward both": KernelMode(("z", "p", "grad_z", "grad_p"), backward=True),
}
"""The modes ``bench --device cuda`` times, in order."""


def mode_floor_bytes(mode: str, shape: Sequence[int], dtype: str) -> int:
    """Bytes kernel mode ``mode`` must move for ``shape`` logits of ``dtype`` (float32 targets)."""
    itemsize = {"z": ITEMSIZE[dtype], "grad_z": ITEMSIZE[dtype], "p": 4, "grad_p": 4}
    return int(np.prod(shape)) * sum(itemsize[array] for array in KERNEL_MODES[mode].arrays)


def _mode_step(mode: KernelMode, logits: Any, target: Any, mask: Any) -> Callable[[], Any]:
    """What mode ``mode`` runs, on these inputs, as a call to time."""
    import torch

    import softce_multi

    def leaves() -> tuple[Any, Any]:
        """The logits and the targets, each a new leaf if the mode writes its gradient."""
        return (
            logits.detach().requires_grad_(True) if "grad_z" in mode.arrays else logits,
            target.detach().requires_grad_(True) if "grad_p" in mode.arrays else target,
        )

    if not mode.backward:
        if "grad_z" in mode.arrays:
            return lambda: softce_multi.masked_soft_cross_entropy_with_grad(logits, target, mask)
        return lambda: softce_multi.masked_soft_cross_entropy(logits, target, mask)
    z, p = leaves()
    loss = softce_multi.masked_soft_cross_entropy(z, p, mask, reduction="none")
    differentiated = [leaf for leaf in (z, p) if leaf.requires_grad]
    upstream = torch.ones_like(loss)
    return lambda: torch.autograd.grad(loss, differentiated, upstream, retain_graph=True)


def kernel_mode_rows(
    shape: Sequence[int], dtype: str, seed: int, repeats: int, device: str
) -> list[dict[str, Any]]:
    """Median time and achieved bandwidth against its byte floor of each :data:`KERNEL_MODES`."""
    inputs = make_inputs("torch", shape, dtype, seed, device)
    steps = {name: _mode_step(mode, *inputs) for name, mode in KERNEL_MODES.items()}
    times = interleaved_times(steps, (), repeats, functools.partial(synchronize, device))
    rows = []
    for name, mode_times in times.items():
        median = statistics.median(mode_times)
        floor = mode_floor_bytes(name, shape, dtype)
        rows.append(
            {
                "mode": name,
                "dtype": dtype,
                "length": shape[-2],
                "median_s": median,
                "floor_bytes": floor,
                "gb_per_s": floor / median / 1e9,
            }
        )
    return rows
