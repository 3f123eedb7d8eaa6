"""Input checks for the public functions, and their error messages."""

from __future__ import annotations

import math
import numbers
from typing import Any

import array_api_compat

from softce_multi._types import REDUCTIONS, Array, Namespace


def namespace_of(**arrays: Array) -> Namespace:
    """Return the one array namespace shared by ``arrays`` (given by argument name).

    Raises
    ------
    TypeError
        If an argument is not an array, or two arguments belong to different namespaces.
    """
    namespaces = {}
    for name, array in arrays.items():
        if not array_api_compat.is_array_api_obj(array):
            msg = f"{name} must be an array, got {type(array).__module__}.{type(array).__name__}"
            raise TypeError(msg)
        namespaces[name] = array_api_compat.array_namespace(array)
    (first_name, xp), *rest = namespaces.items()
    for name, other in rest:
        if other is not xp:
            msg = (
                f"{first_name} and {name} must come from the same array library, got "
                f"{first_name} from {xp.__name__} and {name} from {other.__name__}"
            )
            raise TypeError(msg)
    return xp


def check_same_device(**arrays: Array) -> None:
    """Raise ValueError if the arrays (given by argument name) live on different devices."""
    devices = {name: array_api_compat.device(array) for name, array in arrays.items()}
    # Traced JAX arrays have no concrete device; there is nothing to compare.
    known = {name: device for name, device in devices.items() if device is not None}
    if len({str(device) for device in known.values()}) > 1:
        shown = ", ".join(f"{name} on {device}" for name, device in known.items())
        msg = f"all arrays must be on the same device, got {shown}"
        raise ValueError(msg)


def validate_inputs(
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    reduction: str,
    num_valid: Any,
) -> Namespace:
    """Check the arguments of the loss and return their array namespace."""
    arrays = {"logits": logits, "target_probs": target_probs, "position_mask": position_mask}
    if is_array(num_valid):
        arrays["num_valid"] = num_valid
    xp = namespace_of(**arrays)
    check_same_device(**arrays)

    check_floating(xp, logits=logits, target_probs=target_probs)

    shape = tuple(logits.shape)
    if len(shape) == 0 or shape[-1] == 0:
        msg = f"logits must have a non-empty vocabulary axis (the last one), got shape {shape}"
        raise ValueError(msg)
    if tuple(target_probs.shape) != shape:
        msg = (
            f"target_probs must have the shape of logits, got target_probs "
            f"{tuple(target_probs.shape)} and logits {shape}"
        )
        raise ValueError(msg)
    check_mask(xp, position_mask=position_mask, logits=logits)

    check_reduction(reduction, with_grad=False)
    check_num_valid(num_valid, reduction, xp=xp)
    return xp


def is_array(value: Any) -> bool:
    """Whether ``value`` is an array; NumPy scalars such as ``np.int64(3)`` are host numbers."""
    return array_api_compat.is_array_api_obj(value) and not isinstance(value, numbers.Number)


def check_floating(xp: Namespace, **arrays: Array) -> None:
    """Raise TypeError unless every array (given by argument name) is real floating."""
    for name, array in arrays.items():
        if not xp.isdtype(array.dtype, "real floating"):
            msg = f"{name} must have a real floating dtype, got {array.dtype}"
            raise TypeError(msg)


def check_mask(xp: Namespace, **mask_and_logits: Array) -> None:
    """Check a mask against the logits it weighs, both given by argument name, in that order.

    The mask is bool, integer or real floating, of shape ``logits.shape[:-1]`` or that
    with a trailing 1.
    """
    (mask_name, mask), (logits_name, logits) = mask_and_logits.items()
    if not xp.isdtype(mask.dtype, ("bool", "integral", "real floating")):
        msg = f"{mask_name} must be bool, integer or real floating, got {mask.dtype}"
        raise TypeError(msg)
    shape = tuple(logits.shape)
    if tuple(mask.shape) not in (shape[:-1], (*shape[:-1], 1)):
        msg = (
            f"{mask_name} must have shape {shape[:-1]} or {(*shape[:-1], 1)} for {logits_name} "
            f"of shape {shape}, got {tuple(mask.shape)}"
        )
        raise ValueError(msg)


def check_reduction(reduction: Any, *, with_grad: bool) -> None:
    """Raise ValueError for an unknown reduction, or ``"none"`` where a gradient is returned."""
    if reduction not in REDUCTIONS:
        msg = f"reduction must be one of {REDUCTIONS}, got {reduction!r}"
        raise ValueError(msg)
    if with_grad and reduction == "none":
        msg = (
            "reduction='none' has no single gradient to return; use 'mean' or 'sum' with "
            "masked_soft_cross_entropy_with_grad, or the differentiable masked_soft_cross_entropy"
        )
        raise ValueError(msg)


def check_num_valid(num_valid: Any, reduction: str, *, xp: Namespace) -> None:
    """Check ``num_valid``: None, a non-negative finite number, or a 0-d real array."""
    if num_valid is None:
        return
    if reduction != "mean":
        msg = f"num_valid replaces the denominator of reduction='mean'; got reduction={reduction!r}"
        raise ValueError(msg)
    if is_array(num_valid):
        if tuple(num_valid.shape) != ():
            msg = f"num_valid must be a 0-d array, got shape {tuple(num_valid.shape)}"
            raise ValueError(msg)
        if not xp.isdtype(num_valid.dtype, ("integral", "real floating")):
            msg = f"num_valid must have an integer or real floating dtype, got {num_valid.dtype}"
            raise TypeError(msg)
        return
    if isinstance(num_valid, bool) or not isinstance(num_valid, numbers.Real):
        msg = f"num_valid must be a number or a 0-d array, got {type(num_valid).__name__}"
        raise TypeError(msg)
    if not math.isfinite(num_valid) or num_valid < 0:
        msg = f"num_valid must be finite and non-negative, got {num_valid}"
        raise ValueError(msg)
