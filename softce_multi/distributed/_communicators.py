"""Which library, which communicator: the checks and collectives under the public functions.

:func:`library_of` tells torch tensors from JAX arrays, :func:`check_communicator` refuses a
communicator of the other library, :func:`torch_group` resolves torch's ``group=None``, and
:func:`torch_all_reduce` makes the all-reduce that :mod:`softce_multi.distributed._statistics`
takes as ``max_over_shards`` or ``sum_over_shards`` on torch. torch is imported only by the
functions that take torch tensors, so importing this module needs neither torch nor JAX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat

from softce_multi import _core
from softce_multi._types import Array, Namespace
from softce_multi._validate import namespace_of


def library_of(**arrays: Array) -> tuple[str, Namespace]:
    """``("torch" or "jax", namespace)`` of the arrays (by argument name), or TypeError."""
    xp = namespace_of(**arrays)
    if array_api_compat.is_torch_namespace(xp):
        return "torch", xp
    if array_api_compat.is_jax_namespace(xp):
        return "jax", xp
    names = ", ".join(arrays)
    msg = (
        f"{names} must be torch tensors (with torch.distributed) or JAX arrays (inside "
        f"jax.shard_map or jax.pmap), got arrays of {xp.__name__}"
    )
    raise TypeError(msg)


def check_communicator(library: str, *, group: Any, axis_name: Any) -> None:
    """Refuse a communicator of the other library, or JAX arrays without an axis name."""
    if library == "torch" and axis_name is not None:
        msg = (
            f"axis_name={axis_name!r} is for JAX arrays inside jax.shard_map or jax.pmap; torch "
            "tensors are reduced over a torch.distributed process group: pass group= (None is "
            "the default group)"
        )
        raise TypeError(msg)
    if library == "jax" and group is not None:
        msg = (
            f"group (a {type(group).__name__}) is a torch.distributed process group, for torch "
            "tensors; JAX arrays are reduced over a mesh axis: pass axis_name= inside "
            "jax.shard_map or jax.pmap"
        )
        raise TypeError(msg)
    if library == "jax" and axis_name is None:
        msg = (
            "axis_name is required for JAX arrays: the mesh axis (or tuple of axes) of "
            "jax.shard_map or jax.pmap to reduce over"
        )
        raise TypeError(msg)


def torch_group(group: Any) -> Any:
    """The process group to use: ``group``, or the default one, which must exist."""
    import torch.distributed as dist

    if group is not None:
        if not isinstance(group, dist.ProcessGroup):
            msg = f"group must be a torch.distributed.ProcessGroup or None, got {type(group)}"
            raise TypeError(msg)
        return group
    if not (dist.is_available() and dist.is_initialized()):
        msg = (
            "group=None means the default process group, which is not initialized: call "
            "torch.distributed.init_process_group first, or pass group="
        )
        raise ValueError(msg)
    return dist.group.WORLD


def torch_all_reduce(op_name: str, group: Any) -> Callable[[Any], Any]:
    """A function that all-reduces a tensor over ``group`` with the ``ReduceOp`` named.

    It reduces a contiguous copy where the tensor is not contiguous, and the tensor itself
    (in place) otherwise; it returns the reduced tensor.
    """
    import torch.distributed as dist

    def reduce(tensor: Any) -> Any:
        tensor = tensor.contiguous()
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op_name), group=group)
        return tensor

    return reduce


def mask_total(position_mask: Array, *, xp: Namespace) -> Array:
    """The sum of a mask, exactly for bool and integer masks, in float32 or wider otherwise."""
    if not xp.isdtype(position_mask.dtype, "real floating"):
        return xp.sum(position_mask)
    return xp.sum(position_mask, dtype=_core.compute_dtype(position_mask, xp=xp))
