"""The test-time steps: their agreement with the target, and their losses combined.

:func:`draft_accuracy` gives a step's top-1 agreement with the target model; after the loss of
each step, :func:`multi_step_loss` weighs the steps' losses into one.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import array_api_extra as xpx

from softce_multi import _compat
from softce_multi._core import compute_dtype
from softce_multi._types import Array, LossInputs, Namespace
from softce_multi._validate import (
    check_floating,
    check_same_device,
    is_dtype,
    is_real_number,
    namespace_of,
    shown,
    validate_inputs,
)
from softce_multi.eagle3._arrays import constant, top_index, zero_d

__all__ = ["draft_accuracy", "multi_step_loss"]


def draft_accuracy(logits: Array, target_probs: Array, position_mask: Array) -> Array:
    """Fraction of the valid positions where the draft's top token is the target's.

    ``sum(valid & (argmax(logits) == argmax(target_probs))) / sum(valid)`` with
    ``valid = position_mask != 0``: every valid position counts once, whatever its weight; 0
    when no position is valid. Nothing is read on the host.

    Parameters
    ----------
    logits : array, shape ``[..., V_draft]``
        Draft logits: float16, bfloat16, float32 or float64.
    target_probs : array, shape ``[..., V_draft]``
        Target probabilities, as :func:`prepare_targets` returns them; the same dtypes.
    position_mask : array, shape ``[...]`` or ``[..., 1]``
        The positions to count: bool, integer or floating.

    Returns
    -------
    array, shape ``()``
        In float32 (float64 when an input is float64); no gradient flows through it.

    Raises
    ------
    TypeError, ValueError
        As :func:`softce_multi.masked_soft_cross_entropy` raises for the same arguments.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import draft_accuracy
    >>> logits = np.array([[[2.0, 1.0], [0.0, 1.0], [5.0, 0.0]]])
    >>> target = np.array([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]])
    >>> mask = np.array([[[True], [True], [False]]])
    >>> draft_accuracy(logits, target, mask)
    array(0.5)
    """
    xp = validate_inputs(LossInputs(logits, target_probs, position_mask, "mean", None))
    hit = top_index(logits, xp=xp) == top_index(target_probs, xp=xp)
    valid = xp.reshape(position_mask, hit.shape)
    if valid.dtype != xp.bool:
        valid = valid != 0
    dtype = compute_dtype(logits, target_probs, xp=xp)
    count_dtype = xpx.default_dtype(xp, "integral", device=_compat.device(logits))
    hits = xp.astype(xp.sum(xp.astype(hit & valid, count_dtype)), dtype)
    count = xp.astype(xp.sum(xp.astype(valid, count_dtype)), dtype)
    return constant(zero_d(hits / xp.maximum(count, xp.ones_like(count)), xp=xp), xp=xp)


def multi_step_loss(
    step_losses: Sequence[Array] | Array,
    *,
    decay: float = 0.8,
    normalize: bool = True,
) -> Array:
    """Combine the losses of the test-time steps: ``sum_i decay**i * loss_i``.

    With ``normalize=True`` (NeMo AutoModel's choice) the sum is divided by ``sum_i decay**i``,
    a weighted mean on the scale of one step's loss; with ``normalize=False`` (SpecForge's and
    the original EAGLE-3 code's) it is the plain weighted sum. See :ref:`eagle3-steps`.

    Parameters
    ----------
    step_losses : sequence of 0-d arrays, or a 1-D array
        ``loss_i`` for ``i = 0, 1, ...``, real floating, at least one. Gradients flow to each.
    decay : float, default 0.8
        The weight ratio between consecutive steps, finite and non-negative.
    normalize : bool, default True
        Whether to divide by the sum of the weights.

    Returns
    -------
    array, shape ``()``
        In the dtype of the stacked losses, of their namespace and device. The normalized
        weights are computed relative to the largest one, so that any finite decay and any
        number of steps give a finite result.

    Raises
    ------
    TypeError
        If ``step_losses`` holds something other than real floating arrays of one library, or
        ``decay`` or ``normalize`` has the wrong type.
    ValueError
        If ``step_losses`` is empty, its arrays are not 0-d (or it is not 1-D), they are on
        different devices, ``decay`` is negative or not finite, or (``normalize=False``) the
        weights sum beyond the largest number of the losses' dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import multi_step_loss
    >>> losses = [np.asarray(2.0), np.asarray(3.0)]
    >>> float(multi_step_loss(losses, decay=1.0))  # (2 + 3) / 2
    2.5
    >>> float(multi_step_loss(losses, decay=0.5, normalize=False))  # 2 + 0.5 * 3
    3.5
    """
    xp = check_step_losses(step_losses)
    ratio = check_decay(decay)
    check_normalize(normalize)
    is_stacked = _compat.is_array_api_obj(step_losses)
    losses: Array = step_losses if is_stacked else xp.stack(list(step_losses))
    steps = losses.shape[0]
    if normalize:
        weights = _normalized_weights(ratio, steps)
    else:
        check_step_weights_fit(ratio, steps, xp=xp, dtype=losses.dtype)
        weights = [ratio**i for i in range(steps)]
    # Python weights times each step's loss: the weights are never copied from the host.
    total = xp.sum(xp.stack([weight * losses[step] for step, weight in enumerate(weights)]))
    return zero_d(total, xp=xp)


def _normalized_weights(decay: float, steps: int) -> list[float]:
    """Return the normalized weights of the steps, without overflow for any finite decay.

    Parameters
    ----------
    decay : float
        The weight ratio between consecutive steps, finite and non-negative.
    steps : int
        The number of steps, at least 1.

    Returns
    -------
    list of float
        ``decay**i / sum_j decay**j`` for ``i < steps``.
    """
    # Powers relative to the largest weight (the first, or the last when decay > 1) are at
    # most 1; the smallest may underflow to 0, which is their value to float precision.
    largest = steps - 1 if decay > 1 else 0
    relative = [decay ** (i - largest) for i in range(steps)]
    total = math.fsum(relative)
    return [weight / total for weight in relative]


# --- the checks of multi_step_loss ------------------------------------------------------


def check_step_losses(step_losses: Any) -> Namespace:
    """Check the argument of ``multi_step_loss`` and return its namespace.

    It is a non-empty 1-D real floating array, or a non-empty sequence of 0-d real floating
    arrays of one namespace and device.
    """
    if _compat.is_array_api_obj(step_losses):
        xp = namespace_of(step_losses=step_losses)
        if step_losses.ndim != 1 or step_losses.shape[0] == 0:
            msg = (
                "step_losses must be a non-empty 1-D array or a sequence of 0-d arrays, got "
                f"an array of shape {tuple(step_losses.shape)}"
            )
            raise ValueError(msg)
        arrays = {"step_losses": step_losses}
    else:
        if isinstance(step_losses, (str, bytes)) or not isinstance(step_losses, Sequence):
            msg = (
                "step_losses must be a sequence of 0-d arrays or a 1-D array, got "
                f"{type(step_losses).__name__}"
            )
            raise TypeError(msg)
        if len(step_losses) == 0:
            msg = "step_losses must hold at least one loss, got an empty sequence"
            raise ValueError(msg)
        named = {f"step_losses[{i}]": loss for i, loss in enumerate(step_losses)}
        xp = namespace_of(**named)
        check_same_device(**named)
        shapes = {name: tuple(loss.shape) for name, loss in named.items() if loss.ndim != 0}
        if shapes:
            msg = f"step_losses must hold 0-d arrays, got shapes {shapes}"
            raise ValueError(msg)
        arrays = named
    for name, array in arrays.items():
        if not is_dtype(xp, array.dtype, "real floating", name=name):
            shown = "" if name == "step_losses" else f" ({name})"
            msg = f"step_losses must have a real floating dtype, got {array.dtype}{shown}"
            raise TypeError(msg)
    check_floating(xp, **arrays)  # no dtype wider than 64 bits, which no weight is computed in
    return xp


def check_decay(decay: Any) -> float:
    """Check the ``decay`` of ``multi_step_loss`` (a finite non-negative number); as a float."""
    if not is_real_number(decay):
        msg = f"decay must be a real number, got {type(decay).__name__}"
        raise TypeError(msg)
    # Comparisons, not math.isfinite: a huge int or Fraction would overflow the conversion.
    if decay != decay or decay < 0 or decay > sys.float_info.max:
        msg = f"decay must be finite and non-negative, got {shown(decay)}"
        raise ValueError(msg)
    return float(decay)


def check_normalize(normalize: Any) -> None:
    """Raise TypeError unless ``normalize`` is a bool."""
    if not isinstance(normalize, bool):
        msg = f"normalize must be a bool, got {type(normalize).__name__}"
        raise TypeError(msg)


def check_step_weights_fit(decay: float, steps: int, *, xp: Namespace, dtype: Any) -> None:
    """Refuse a ``decay`` whose weights ``decay**i`` (``i < steps``) sum beyond ``dtype``.

    Only the plain weighted sum (``normalize=False``) needs this: normalized weights are at
    most 1 whatever the decay.
    """
    if decay <= 1:
        return  # the weights sum to at most `steps`
    # log(sum_i decay**i) = (steps - 1) * log(decay) + log(sum_k decay**-k), without overflow.
    relative = math.fsum(decay**-k for k in range(steps))
    log_total = (steps - 1) * math.log(decay) + math.log(relative)
    largest = float(xp.finfo(dtype).max)
    # The margin covers the rounding of the logarithms (the weights are then computed exactly).
    if log_total > math.log(largest) - 1e-12:
        msg = (
            f"decay={decay} over {steps} steps gives step weights summing to about "
            f"10**{log_total / math.log(10):.0f}, beyond the largest {dtype} number "
            f"{largest:.7g}; use normalize=True or a smaller decay"
        )
        raise ValueError(msg)
