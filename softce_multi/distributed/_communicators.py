"""Which library, which communicator: the checks and collectives under the public functions.

:func:`library_of` tells torch tensors from JAX arrays (:func:`engine_of` from the first such
argument), :func:`check_communicator` refuses a communicator of the other library or a JAX
``axis_name`` that names no bound axis (:func:`check_axis_name`), :func:`torch_group` resolves
torch's ``group=None``, and :func:`torch_all_reduce` makes the all-reduce that
:mod:`softce_multi.distributed._statistics` takes as ``max_over_shards`` or
``sum_over_shards`` on torch. torch and JAX are imported only by the functions that take their
arrays, so importing this module needs neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from softce_multi import _compat, _core
from softce_multi._types import Array, Namespace
from softce_multi._validate import namespace_of


def library_of(**arrays: Array) -> tuple[str, Namespace]:
    """``("torch" or "jax", namespace)`` of the arrays (by argument name), or TypeError."""
    xp = namespace_of(**arrays)
    if _compat.is_torch_namespace(xp):
        return "torch", xp
    if _compat.is_jax_namespace(xp):
        return "jax", xp
    names = ", ".join(arrays)
    msg = (
        f"{names} must be torch tensors (with torch.distributed) or JAX arrays (inside "
        f"jax.shard_map or jax.pmap), got arrays of {xp.__name__}"
    )
    raise TypeError(msg)


def engine_of(**arrays: Array) -> str:
    """``"torch"`` or ``"jax"``: the library of the first argument that is a torch tensor or a
    JAX array, even if others are not; if none is, :func:`library_of`'s TypeError.

    The torch losses take the engine from it before they validate the arguments, so that a rank
    with one wrong argument still takes part in the agreement of the ranks and refuses there.
    """
    for array in arrays.values():
        if _compat.is_torch_array(array):
            return "torch"
        if _compat.is_jax_array(array):
            return "jax"
    return library_of(**arrays)[0]


def check_communicator(library: str, *, group: Any, axis_name: Any) -> None:
    """Refuse a communicator of the other library, or JAX arrays without an axis name or with
    one that :func:`check_axis_name` refuses."""
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
    if library == "jax":
        check_axis_name(axis_name)


def check_axis_name(axis_name: Any) -> None:
    """Check that ``axis_name`` names axes bound where the call is traced.

    It must be a name (hashable, and not an int, which JAX's collectives read as an axis of
    the array) or a non-empty tuple of names, each bound by an enclosing ``jax.shard_map``,
    ``jax.pmap`` or ``jax.vmap``: TypeError for the first, ValueError for the others.
    """
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names:
        msg = (
            "axis_name=() names no axis: pass the mesh axis (or a tuple of mesh axes) of "
            "jax.shard_map or jax.pmap to reduce over"
        )
        raise ValueError(msg)
    for name in names:
        if isinstance(name, (int, tuple)) or not _hashable(name):
            msg = (
                "axis_name must be a mesh axis name (a hashable that is not an int: JAX reads "
                f"ints as axes of the array) or a non-empty tuple of names, got {axis_name!r}"
            )
            raise TypeError(msg)
    import jax

    for name in names:
        try:
            jax.lax.axis_size(name)
        except (NameError, ValueError, TypeError, AssertionError):
            msg = (
                f"axis_name={axis_name!r} names an axis that is not bound here: {name!r}; the "
                "call must run inside jax.shard_map or jax.pmap (or jax.vmap) over that axis"
            )
            raise ValueError(msg) from None


def _hashable(value: Any) -> bool:
    """Whether ``value`` can be hashed (a tuple holding a list cannot)."""
    try:
        hash(value)
    except TypeError:
        return False
    return True


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


def agreement_device(tensors: list[Any], group: Any) -> Any:
    """Where the ranks' agreement runs: the device of the first tensor that is not a meta
    tensor, else the group's (CUDA for NCCL, the CPU otherwise), where a collective moves
    values: on the meta device it would move nothing, and the ranks would get out of step."""
    import torch
    import torch.distributed as dist

    for tensor in tensors:
        if tensor.device.type != "meta":
            return tensor.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_not_meta(**arrays: Any) -> None:
    """Raise ValueError for a torch meta tensor among ``arrays``: the vocabulary-parallel
    losses reduce values across the ranks, which a meta tensor does not hold."""
    for name, array in arrays.items():
        if getattr(getattr(array, "device", None), "type", None) == "meta":
            msg = (
                f"{name} is a meta tensor: the vocabulary-parallel losses reduce values across "
                "the ranks, which a meta tensor does not hold"
            )
            raise ValueError(msg)


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
    """The sum of a mask: exact, of the default integer dtype, for bool and integer masks; in
    float32 or wider for floating ones."""
    if not xp.isdtype(position_mask.dtype, "real floating"):
        integers = xp.__array_namespace_info__().default_dtypes()["integral"]
        return xp.sum(position_mask, dtype=integers)
    return xp.sum(position_mask, dtype=_core.compute_dtype(position_mask, xp=xp))
