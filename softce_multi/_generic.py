"""The generic adapter: the blocked core, for NumPy, CuPy, array-api-strict and any other library.

It has the interface of every adapter (:mod:`softce_multi.torch`, :mod:`softce_multi.jax`):
``loss`` and ``loss_with_grad`` of validated inputs. These libraries have no autodiff, so the
gradient is computed in the same pass as the loss when it is asked for.
"""

from __future__ import annotations

import array_api_compat
import numpy as np

from softce_multi import _core
from softce_multi._types import Array


def loss(
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    /,
    *,
    reduction: str,
    num_valid: Array | float | None,
) -> Array:
    """The loss of validated inputs."""
    return _forward(logits, target_probs, position_mask, reduction, num_valid, False).loss


def loss_with_grad(
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    /,
    *,
    reduction: str,
    num_valid: Array | float | None,
) -> tuple[Array, Array]:
    """The loss of validated inputs and its gradient to the logits, from one pass."""
    result = _forward(logits, target_probs, position_mask, reduction, num_valid, True)
    return result.loss, result.logits_grad


def _forward(
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    reduction: str,
    num_valid: Array | float | None,
    with_logits_grad: bool,
) -> _core.ForwardResult:
    xp = array_api_compat.array_namespace(logits)
    block_rows = _core.default_block_rows(logits.shape[-1])
    # Padding may hold NaN or inf: the core discards what they produce with where(), but NumPy
    # (under NumPy and array-api-strict) would still warn about computing it.
    with np.errstate(all="ignore"):
        return _core.forward(
            logits,
            target_probs,
            position_mask,
            reduction=reduction,
            num_valid=num_valid,
            with_logits_grad=with_logits_grad,
            row_routine=_core.blocked_row_routine(block_rows, xp=xp),
            xp=xp,
        )
