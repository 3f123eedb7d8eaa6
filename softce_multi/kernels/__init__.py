"""Optional accelerated kernels, behind the contract of :func:`softce_multi._core.forward`.

* :mod:`softce_multi.kernels.triton`: Triton kernels for torch tensors on CUDA.
* :mod:`softce_multi.kernels.pallas`: Pallas (Triton backend) kernels for JAX arrays on GPU.

Each module needs its library; importing this package needs neither. The adapters ask
:func:`use_triton` and :func:`use_pallas` whether a kernel applies to their arrays.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

__all__ = ["use_pallas", "use_triton"]

#: The largest chunk of a row that one kernel step loads.
MAX_BLOCK_SIZE = 4096


def use_triton(*tensors: Any) -> bool:
    """Return whether the Triton kernels can run on these torch tensors.

    True when every tensor is on a CUDA (or ROCm) device and Triton is installed.
    """
    return all(tensor.is_cuda for tensor in tensors) and _installed("triton")


def use_pallas(*arrays: Any) -> bool:
    """Return whether the Pallas kernels can run on these JAX arrays.

    True when the arrays live on GPUs (under a trace, where arrays carry no device: when JAX's
    default backend is the GPU) and this JAX has the Triton backend of Pallas.
    """
    import jax

    platforms = set()
    for array in arrays:
        if isinstance(array, jax.core.Tracer):
            platforms.add(jax.default_backend())
        else:
            platforms.update(device.platform for device in array.devices())
    return platforms == {"gpu"} and _installed("jax.experimental.pallas.triton")


@functools.cache
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def launch_config(n_cols: int, block_size: int | None) -> tuple[int, int]:
    """Return the chunk size and the number of warps for rows of ``n_cols`` entries.

    By default the chunk is the next power of two of ``n_cols``, at most :data:`MAX_BLOCK_SIZE`.
    """
    if block_size is None:
        block_size = min(1 << max(n_cols - 1, 0).bit_length(), MAX_BLOCK_SIZE)
    if block_size < 1 or block_size & (block_size - 1):
        msg = f"block_size must be a positive power of two, got {block_size}"
        raise ValueError(msg)
    return block_size, 8 if block_size >= 2048 else 4
