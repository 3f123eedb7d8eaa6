"""Input checks for the public functions, and their error messages.

Each check raises TypeError (a wrong type or dtype) or ValueError (a wrong shape, device or
value) with a message that names the argument and shows what it got. Checks read shapes, dtypes
and host numbers only, never the values inside an array (that would read a device back to the
host), except :func:`check_always_include` for an array given as ``always_include``.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable
from typing import Any

from softce_multi import _compat
from softce_multi._core import compute_dtype
from softce_multi._types import REDUCTIONS, Array, LinearLossInputs, LossInputs, Namespace

#: The narrowest and widest floating dtypes the losses read (float8 and longdouble are out).
_NARROWEST_FLOAT_BITS, _WIDEST_FLOAT_BITS = 16, 64

#: Host numbers longer than this are shown cut in error messages (10**400 has 401 digits).
_SHOWN_CHARACTERS = 40


# --- arrays: namespaces, devices, dtypes, shapes ------------------------------------------


def namespace_of(**arrays: Array) -> Namespace:
    """Return the one array namespace shared by ``arrays`` (given by argument name).

    Raises
    ------
    TypeError
        If an argument is not an array, or two arguments belong to different namespaces.
    """
    namespaces = {}
    for name, array in arrays.items():
        if not _compat.is_array_api_obj(array):
            msg = f"{name} must be an array, got {type(array).__module__}.{type(array).__name__}"
            raise TypeError(msg)
        if _compat.is_torch_array(array) and (
            array.is_nested or str(array.layout) != "torch.strided"
        ):
            kind = "a nested tensor" if array.is_nested else f"layout {array.layout}"
            msg = f"{name} must be a dense (strided) tensor, got {kind}; make it dense first"
            raise TypeError(msg)
        namespaces[name] = _compat.array_namespace(array)
    (first_name, xp), *rest = namespaces.items()
    for name, other in rest:
        if other is not xp:
            msg = (
                f"{first_name} and {name} must come from the same array library, got "
                f"{first_name} from {xp.__name__} and {name} from {other.__name__}"
            )
            raise TypeError(msg)
    return xp


def check_library(xp: Namespace, libraries: tuple[str, ...], *, function: str) -> None:
    """Raise TypeError unless ``xp`` is the namespace of one of ``libraries`` ("torch", "jax")."""
    if not any(getattr(_compat, f"is_{name}_namespace")(xp) for name in libraries):
        msg = (
            f"{function} takes arrays of {' or '.join(libraries)}, got arrays of {xp.__name__}; "
            "the functions of softce_multi itself take arrays of any library"
        )
        raise TypeError(msg)


def _placement(array: Array) -> object:
    """Where ``array`` lives, for comparing arguments: its device, or for a JAX array the ids
    of the devices it is committed to, a sharded array's several (``None`` where JAX may
    place it: a tracer, or an array not committed to a device)."""
    device = _compat.device(array)
    if device is None or not _compat.is_jax_array(array):
        return device
    if not array.committed:
        return None
    return sorted(device.id for device in array.sharding.device_set)


def check_same_device(**arrays: Array) -> None:
    """Raise ValueError if the arrays (given by argument name) live on different devices; JAX
    arrays committed to devices must be on one set of devices, whatever their shardings."""
    placements = {name: _placement(array) for name, array in arrays.items()}
    known = {name: placement for name, placement in placements.items() if placement is not None}
    if len({str(placement) for placement in known.values()}) > 1:
        shown = ", ".join(f"{name} on {_compat.device(arrays[name])}" for name in known)
        msg = f"all arrays must be on the same device, got {shown}"
        raise ValueError(msg)


def is_array(value: Any) -> bool:
    """Whether ``value`` is an array; NumPy scalars such as ``np.int64(3)`` are host numbers.

    Numbers are told apart first: under ``torch.compile``, a number that changes between calls
    is a symbolic ``torch.SymInt`` or ``SymFloat``, which array-api-compat's test cannot trace.
    """
    return not isinstance(value, numbers.Number) and _compat.is_array_api_obj(value)


def is_dtype(xp: Namespace, dtype: Any, kind: str | tuple[str, ...], *, name: str) -> bool:
    """``xp.isdtype(dtype, kind)``, for the argument called ``name``.

    A dtype the namespace does not know, such as ml_dtypes' bfloat16 or float8 in a NumPy array
    (NumPy's ``isdtype`` raises on them), is a TypeError naming the argument and the dtype.
    """
    try:
        return bool(xp.isdtype(dtype, kind))
    except TypeError as error:
        library = xp.__name__.rsplit(".", maxsplit=1)[-1]
        msg = (
            f"{name} has dtype {dtype}, which {library} does not support as an array API dtype; "
            "convert it to one it supports (bfloat16 converts exactly to float32)"
        )
        raise TypeError(msg) from error


def check_floating(xp: Namespace, **arrays: Array) -> None:
    """Raise TypeError unless every array (given by argument name) is float16 to float64."""
    for name, array in arrays.items():
        if not is_dtype(xp, array.dtype, "real floating", name=name):
            msg = f"{name} must have a real floating dtype, got {array.dtype}"
            raise TypeError(msg)
        check_float_width(xp, array.dtype, name=name)


def check_float_width(xp: Namespace, dtype: Any, /, *, name: str) -> None:
    """Raise TypeError unless the real floating ``dtype`` has 16 to 64 bits.

    Wider ones (NumPy's longdouble on x86-64 Linux) no backend computes in, and converting them
    would quietly drop their precision; float8 and float4 dtypes not every library converts.
    """
    bits = xp.finfo(dtype).bits
    if not _NARROWEST_FLOAT_BITS <= bits <= _WIDEST_FLOAT_BITS:
        target = "float64" if bits > _WIDEST_FLOAT_BITS else "bfloat16 or float32"
        msg = f"{name} must be float16, bfloat16, float32 or float64, got {dtype} ({bits} bits); "
        msg += f"convert it to {target}"
        raise TypeError(msg)


def check_integer(xp: Namespace, **arrays: Array) -> None:
    """Raise TypeError unless every array (given by argument name) has an integer dtype."""
    for name, array in arrays.items():
        if not is_dtype(xp, array.dtype, "integral", name=name):
            msg = f"{name} must have an integer dtype, got {array.dtype}"
            raise TypeError(msg)


def check_signed(xp: Namespace, dtype: Any, *, name: str) -> None:
    """Raise TypeError unless ``dtype`` (described by ``name``) can hold the id -1."""
    if not is_dtype(xp, dtype, "signed integer", name=name):
        msg = f"{name} must be a signed integer dtype to hold the id -1, got {dtype}"
        raise TypeError(msg)


def check_1d(array: Array, *, name: str, meaning: str) -> None:
    """Raise ValueError unless ``array`` is 1-D; ``meaning`` says what its entries are."""
    if array.ndim != 1:
        msg = f"{name} must be 1-D ({meaning}), got shape {tuple(array.shape)}"
        raise ValueError(msg)


def check_mask_dtype(xp: Namespace, mask: Array, /, *, name: str) -> None:
    """Check that the mask called ``name`` is bool, integer or real floating."""
    if not is_dtype(xp, mask.dtype, ("bool", "integral", "real floating"), name=name):
        msg = f"{name} must be bool, integer or real floating, got {mask.dtype}"
        raise TypeError(msg)
    if is_dtype(xp, mask.dtype, "real floating", name=name):
        check_float_width(xp, mask.dtype, name=name)


def check_mask(
    xp: Namespace, mask: Array, logits: Array, /, *, mask_name: str, logits_name: str
) -> None:
    """Check a mask against the logits it weighs.

    The mask is bool, integer or real floating, of shape ``logits.shape[:-1]`` or that with a
    trailing 1. ``mask_name`` and ``logits_name`` are the argument names the messages show.
    """
    check_mask_dtype(xp, mask, name=mask_name)
    shape = tuple(logits.shape)
    if tuple(mask.shape) not in (shape[:-1], (*shape[:-1], 1)):
        msg = (
            f"{mask_name} must have shape {shape[:-1]} or {(*shape[:-1], 1)} for {logits_name} "
            f"of shape {shape}, got {tuple(mask.shape)}"
        )
        raise ValueError(msg)


def check_output_layer(hidden: Array, weight: Array, *, names: tuple[str, str], rows: str) -> None:
    """Check ``[..., H]`` hidden states and the ``[rows, H]`` weight of an output layer, named
    ``names`` in the messages."""
    hidden_name, weight_name = names
    hidden_shape, weight_shape = tuple(hidden.shape), tuple(weight.shape)
    if len(hidden_shape) == 0:
        msg = f"{hidden_name} must have the hidden size as its last axis, got a 0-d array"
        raise ValueError(msg)
    if len(weight_shape) != 2 or weight_shape[1] != hidden_shape[-1]:
        msg = (
            f"{weight_name} must have shape [{rows}, H] with H = {hidden_shape[-1]}, the last axis "
            f"of {hidden_name}; got {weight_name} {weight_shape} and {hidden_name} {hidden_shape}"
        )
        raise ValueError(msg)


# --- the loss ------------------------------------------------------------------------------


def validate_inputs(inputs: LossInputs, /) -> Namespace:
    """Check the arguments of the loss and return their array namespace."""
    logits, target_probs, position_mask, reduction, num_valid, target_ids = inputs
    arrays = {"logits": logits, "target_probs": target_probs, "position_mask": position_mask}
    if target_ids is not None:
        arrays["target_ids"] = target_ids
    if is_array(num_valid):
        arrays["num_valid"] = num_valid
    xp = namespace_of(**arrays)
    check_same_device(**arrays)

    check_floating(xp, logits=logits, target_probs=target_probs)

    shape = tuple(logits.shape)
    if len(shape) == 0 or shape[-1] == 0:
        msg = f"logits must have a non-empty vocabulary axis (the last one), got shape {shape}"
        raise ValueError(msg)
    if target_ids is not None:
        check_sparse_targets(xp, target_ids, target_probs, shape[:-1], positions="logits")
    elif tuple(target_probs.shape) != shape:
        msg = (
            f"target_probs must have the shape of logits, got target_probs "
            f"{tuple(target_probs.shape)} and logits {shape}"
        )
        raise ValueError(msg)
    check_mask(xp, position_mask, logits, mask_name="position_mask", logits_name="logits")

    check_reduction(reduction, with_grad=False)
    dtype = compute_dtype(logits, target_probs, xp=xp)
    check_num_valid(num_valid, reduction, xp=xp, dtype=dtype)
    return xp


def validate_linear_inputs(inputs: LinearLossInputs, /) -> Namespace:
    """Check the arguments of the linear loss and return their array namespace.

    ``hidden`` is ``[..., H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or None and
    ``target_probs`` ``[..., V]`` over the positions of ``hidden``; the messages name the two
    arguments that disagree. ``chunk_rows`` is checked by :func:`check_chunk_rows`.
    """
    hidden, weight, bias = inputs.hidden, inputs.weight, inputs.bias
    target_probs, position_mask = inputs.target_probs, inputs.position_mask
    reduction, num_valid, chunk_rows = inputs.reduction, inputs.num_valid, inputs.chunk_rows
    target_ids = inputs.target_ids
    arrays = {
        "hidden": hidden,
        "weight": weight,
        "target_probs": target_probs,
        "position_mask": position_mask,
    }
    if bias is not None:
        arrays["bias"] = bias
    if target_ids is not None:
        arrays["target_ids"] = target_ids
    if is_array(num_valid):
        arrays["num_valid"] = num_valid
    xp = namespace_of(**arrays)
    check_same_device(**arrays)
    floating = {"hidden": hidden, "weight": weight, "target_probs": target_probs, "bias": bias}
    check_floating(xp, **{name: array for name, array in floating.items() if array is not None})

    check_output_layer(hidden, weight, names=("hidden", "weight"), rows="V")
    hidden_shape, weight_shape = tuple(hidden.shape), tuple(weight.shape)
    if weight_shape[0] == 0:
        msg = f"weight must have a non-empty vocabulary axis (the first one), got {weight_shape}"
        raise ValueError(msg)
    logits_shape = (*hidden_shape[:-1], weight_shape[0])
    if target_ids is not None:
        check_sparse_targets(xp, target_ids, target_probs, logits_shape[:-1], positions="hidden")
    elif tuple(target_probs.shape) != logits_shape:
        msg = (
            f"target_probs must have shape {logits_shape}, the positions of hidden "
            f"{hidden_shape} by the vocabulary of weight {weight_shape}; got "
            f"{tuple(target_probs.shape)}"
        )
        raise ValueError(msg)
    if bias is not None and tuple(bias.shape) != weight_shape[:1]:
        msg = (
            f"bias must have shape {weight_shape[:1]}, one entry per row of weight "
            f"{weight_shape}; got {tuple(bias.shape)}"
        )
        raise ValueError(msg)
    # The mask is checked against an array with the positions as leading axes.
    positions, name = (target_probs, "target_probs") if target_ids is None else (hidden, "hidden")
    check_mask(xp, position_mask, positions, mask_name="position_mask", logits_name=name)

    check_reduction(reduction, with_grad=False)
    dtype = compute_dtype(hidden, weight, bias, target_probs, xp=xp)
    check_num_valid(num_valid, reduction, xp=xp, dtype=dtype)
    check_chunk_rows(chunk_rows)
    return xp


def check_sparse_targets(
    xp: Namespace,
    target_ids: Array,
    target_probs: Array,
    batch_shape: tuple[int, ...],
    /,
    *,
    positions: str,
) -> None:
    """Check sparse targets: integer ``target_ids`` and ``target_probs`` of one shape
    ``[..., K]``, whose leading axes are ``batch_shape``, the positions of the argument named
    ``positions``."""
    check_integer(xp, target_ids=target_ids)
    ids_shape, probs_shape = tuple(target_ids.shape), tuple(target_probs.shape)
    if ids_shape != probs_shape:
        msg = (
            f"target_ids must have the shape of target_probs ([..., K], one id per "
            f"probability), got target_ids {ids_shape} and target_probs {probs_shape}"
        )
        raise ValueError(msg)
    if probs_shape[:-1] != batch_shape or len(probs_shape) != len(batch_shape) + 1:
        msg = (
            f"target_ids and target_probs must have shape [..., K] with the positions "
            f"{batch_shape} of {positions}, got {probs_shape}"
        )
        raise ValueError(msg)


def check_chunk_rows(chunk_rows: Any, *, name: str = "chunk_rows") -> int | None:
    """Return a chunk size as an int (or None) after checking it is a positive int or None.

    ``name`` is the argument name the messages show.
    """
    if chunk_rows is None:
        return None
    value = _as_int(chunk_rows, name=name, expected="a positive int or None")
    if value < 1:
        msg = f"{name} must be a positive int or None, got {value}"
        raise ValueError(msg)
    return value


def check_reduction(
    reduction: Any, *, with_grad: bool, loss: str = "masked_soft_cross_entropy"
) -> None:
    """Raise ValueError for an unknown reduction, or ``"none"`` where a gradient is returned
    (by ``loss + "_with_grad"``, whose differentiable sibling is ``loss``)."""
    if reduction not in REDUCTIONS:
        msg = f"reduction must be one of {REDUCTIONS}, got {reduction!r}"
        raise ValueError(msg)
    if with_grad and reduction == "none":
        msg = (
            f"reduction='none' has no single gradient to return; use 'mean' or 'sum' with "
            f"{loss}_with_grad, or the differentiable {loss}"
        )
        raise ValueError(msg)


def check_num_valid(num_valid: Any, reduction: str, *, xp: Namespace, dtype: Any) -> None:
    """Check ``num_valid``: None, a host number, or a 0-d real array.

    A host number must be 0, or lie where it and its inverse are normal numbers of ``dtype``,
    the computation dtype (``2**-126`` to ``2**126`` in float32): outside, the denominator
    would round to 0 or infinity, or its inverse be flushed to 0 on some backends. A host
    number wider than 64 bits (``np.longdouble``) is refused, since not every backend converts
    it. A 0-d array is used as it is, unchecked (its value stays on the device).
    """
    if num_valid is None:
        return
    if reduction != "mean":
        msg = f"num_valid replaces the denominator of reduction='mean'; got reduction={reduction!r}"
        raise ValueError(msg)
    if is_array(num_valid):
        if tuple(num_valid.shape) != ():
            msg = f"num_valid must be a 0-d array, got shape {tuple(num_valid.shape)}"
            raise ValueError(msg)
        if not is_dtype(xp, num_valid.dtype, ("integral", "real floating"), name="num_valid"):
            msg = f"num_valid must have an integer or real floating dtype, got {num_valid.dtype}"
            raise TypeError(msg)
        if is_dtype(xp, num_valid.dtype, "real floating", name="num_valid"):
            check_float_width(xp, num_valid.dtype, name="num_valid")
        return
    if not is_real_number(num_valid):
        msg = f"num_valid must be a number or a 0-d array, got {type(num_valid).__name__}"
        raise TypeError(msg)
    # NumPy scalars have a dtype; Python's numbers (symbolic ones under torch.compile) none.
    host_dtype = None if isinstance(num_valid, (int, float)) else getattr(num_valid, "dtype", None)
    if host_dtype is not None and host_dtype.itemsize * 8 > _WIDEST_FLOAT_BITS:
        msg = (
            f"num_valid must be a Python number or a NumPy scalar of at most 64 bits, got "
            f"{type(num_valid).__name__} ({host_dtype.itemsize * 8} bits); convert it to float"
        )
        raise TypeError(msg)
    # Comparisons, not float(): a huge int or Fraction would overflow the conversion.
    if num_valid != num_valid or num_valid < 0 or num_valid == math.inf:
        msg = f"num_valid must be finite and non-negative, got {shown(num_valid)}"
        raise ValueError(msg)
    if host_dtype is not None:  # a NumPy scalar: compared in float64, not in its own dtype
        num_valid = float(num_valid)
    smallest = float(xp.finfo(dtype).smallest_normal)
    if num_valid != 0 and not smallest <= num_valid <= 1 / smallest:
        msg = (
            f"num_valid must be 0 or between {smallest:.7g} and {1 / smallest:.7g}, where it "
            f"and its inverse are normal numbers of the computation dtype {dtype}; got "
            f"{shown(num_valid)}"
        )
        raise ValueError(msg)


# --- EAGLE-3 -------------------------------------------------------------------------------


def check_token_counts(xp: Namespace, token_counts: Array) -> None:
    """Check the counts of :func:`softce_multi.eagle3.build_vocab_mapping`."""
    if not is_dtype(xp, token_counts.dtype, ("integral", "real floating"), name="token_counts"):
        msg = f"token_counts must have an integer or real floating dtype, got {token_counts.dtype}"
        raise TypeError(msg)
    check_1d(token_counts, name="token_counts", meaning="one count per target token")


def check_size(size: Any, limit: int, *, name: str) -> int:
    """Check that ``size`` is an int in ``[1, limit]`` and return it."""
    value = _as_int(size, name=name, expected="an int")
    if not 1 <= value <= limit:
        msg = f"{name} must be between 1 and the target vocabulary size {limit}, got {value}"
        raise ValueError(msg)
    return value


def check_always_include(
    always_include: Any, target_vocab_size: int, draft_vocab_size: int
) -> list[int]:
    """Return the distinct ids of ``always_include``, sorted, after checking them.

    ``always_include`` is None, an iterable of ints (not a string), or a 1-D integer array,
    which is read on the host.
    """
    if always_include is None:
        return []
    if _compat.is_array_api_obj(always_include):
        xp = _compat.array_namespace(always_include)
        is_integral = is_dtype(xp, always_include.dtype, "integral", name="always_include")
        if not is_integral or always_include.ndim != 1:
            msg = (
                "always_include must be a 1-D integer array or a sequence of ints, got an "
                f"array of dtype {always_include.dtype} and shape {tuple(always_include.shape)}"
            )
            raise TypeError(msg)
        values = [int(i) for i in always_include]
    else:
        if isinstance(always_include, (str, bytes, bytearray)) or not isinstance(
            always_include, Iterable
        ):
            msg = (
                "always_include must be a sequence of ints or a 1-D integer array, got "
                f"{type(always_include).__name__}"
            )
            raise TypeError(msg)
        values = list(always_include)
        bad = [i for i in values if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
        if bad:
            msg = f"always_include must hold ints, got {bad[:5]}"
            raise TypeError(msg)
    ids = sorted({operator.index(i) for i in values})
    outside = [i for i in ids if not 0 <= i < target_vocab_size]
    if outside:
        msg = (
            f"always_include ids must lie in [0, {target_vocab_size}) for token_counts of "
            f"length {target_vocab_size}, got {outside[:5]}"
        )
        raise ValueError(msg)
    if len(ids) > draft_vocab_size:
        msg = (
            f"always_include holds {len(ids)} distinct ids, more than "
            f"draft_vocab_size={draft_vocab_size}"
        )
        raise ValueError(msg)
    return ids


def check_mapping(xp: Namespace, t2d: Array) -> None:
    """Check that ``t2d`` is a 1-D bool array."""
    if t2d.dtype != xp.bool:
        msg = f"t2d must be a bool array (True for draft tokens), got dtype {t2d.dtype}"
        raise TypeError(msg)
    check_1d(t2d, name="t2d", meaning="one entry per target token")


def check_prepare_inputs(
    xp: Namespace, target_logits: Array, loss_mask: Array, t2d: Array, /
) -> None:
    """Check the dtypes and shapes of the arguments of ``prepare_targets``."""
    check_floating(xp, target_logits=target_logits)
    check_mapping(xp, t2d)
    shape = tuple(target_logits.shape)
    if len(shape) == 0 or shape[-1] != t2d.shape[0]:
        msg = (
            "target_logits must have the target vocabulary as its last axis, of the length of "
            f"t2d; got target_logits {shape} and t2d {tuple(t2d.shape)}"
        )
        raise ValueError(msg)
    check_mask(xp, loss_mask, target_logits, mask_name="loss_mask", logits_name="target_logits")


def check_prepare_from_hidden_inputs(
    xp: Namespace, target_hidden: Array, target_head_weight: Array, loss_mask: Array, t2d: Array, /
) -> None:
    """Check the dtypes and shapes of the arguments of ``prepare_targets_from_hidden``."""
    check_floating(xp, target_hidden=target_hidden, target_head_weight=target_head_weight)
    check_mapping(xp, t2d)
    names = ("target_hidden", "target_head_weight")
    check_output_layer(target_hidden, target_head_weight, names=names, rows="V_target")
    weight_shape = tuple(target_head_weight.shape)
    if weight_shape[0] != t2d.shape[0]:
        msg = (
            "target_head_weight must have one row per target token, as many as t2d has "
            f"entries; got target_head_weight {weight_shape} and t2d {tuple(t2d.shape)}"
        )
        raise ValueError(msg)
    check_mask(xp, loss_mask, target_hidden, mask_name="loss_mask", logits_name="target_hidden")


def check_axis(axis: Any, shape: tuple[int, ...]) -> int:
    """Check ``axis`` against an array of ``shape`` and return it as a non-negative int."""
    index, ndim = _as_int(axis, name="axis", expected="an int"), len(shape)
    if not -ndim <= index < ndim:
        msg = f"axis {index} is out of range for x of shape {shape}"
        raise ValueError(msg)
    return index % ndim


def check_fill(xp: Namespace, fill: Any, dtype: Any) -> bool | int | float:
    """Return ``fill`` as a Python scalar that an array of ``dtype`` holds exactly.

    Bool arrays take 0, 1, False and True. Integer arrays take whole numbers (True and False
    count as 1 and 0) within the dtype's range. Floating arrays take any real number up to
    the dtype's largest magnitude, and the infinities and NaN.

    Raises
    ------
    TypeError
        If ``fill`` is not a real number, or does not fit ``dtype``.
    """
    if not (isinstance(fill, bool) or is_real_number(fill)):
        msg = f"fill must be a bool or a real number, got {type(fill).__name__}"
        raise TypeError(msg)
    if is_dtype(xp, dtype, "bool", name="x"):
        if fill not in (0, 1):
            msg = f"fill must be 0, 1, False or True for x of dtype {dtype}, got {shown(fill)}"
            raise TypeError(msg)
        return bool(fill)
    if is_dtype(xp, dtype, "integral", name="x"):
        # Comparisons first: NaN, the infinities and huge numbers do not convert to int safely.
        whole = fill == fill and abs(fill) != math.inf and int(fill) == fill
        if not whole:
            msg = f"fill must be a whole number for x of dtype {dtype}, got {shown(fill)}"
            raise TypeError(msg)
        value = int(fill)
        info = xp.iinfo(dtype)
        if not info.min <= value <= info.max:
            msg = (
                f"fill {shown(value)} does not fit x of dtype {dtype}, which holds "
                f"{info.min} to {info.max}"
            )
            raise TypeError(msg)
        return value
    largest = float(xp.finfo(dtype).max)
    if abs(fill) != math.inf and abs(fill) > largest:
        msg = (
            f"fill {shown(fill)} does not fit x of dtype {dtype}, whose largest finite "
            f"magnitude is {largest:.7g}"
        )
        raise TypeError(msg)
    return float(fill)


def _as_int(value: Any, *, name: str, expected: str) -> int:
    """``value`` as an int, or TypeError unless it is a host integer other than a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{name} must be {expected}, got {type(value).__name__}"
        raise TypeError(msg)
    return operator.index(value)


def is_real_number(value: Any) -> bool:
    """Whether ``value`` is a real host number other than a bool (``True`` is no count)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def shown(value: Any) -> str:
    """``str(value)``, cut when it is long (a huge int) so that a message stays readable."""
    text = str(value)
    if len(text) <= _SHOWN_CHARACTERS:
        return text
    return f"{text[:12]}...{text[-4:]} ({len(text)} characters)"
