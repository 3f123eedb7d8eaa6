"""The float64 oracle: the loss and its gradients, from torch autograd or NumPy."""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import numpy as np

from softce_multi.testing._backends import is_installed, to_float64, to_numpy

__all__ = ["Expected", "dense_targets", "numpy_reference", "reference"]


class Expected(NamedTuple):
    """The float64 loss and its gradients for the logits and the targets."""

    loss: np.ndarray
    grad_logits: np.ndarray
    grad_targets: np.ndarray


def reference(
    logits: np.ndarray,
    target_probs: np.ndarray,
    position_mask: np.ndarray,
    /,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> Expected:
    """The float64 loss of :mod:`softce_multi.reference` and its gradients.

    Parameters
    ----------
    logits, target_probs
        ``[..., V]`` values (converted to float64).
    position_mask
        Weights of shape ``[...]`` or ``[..., 1]``.
    reduction
        ``"mean"``, ``"sum"`` or ``"none"``.
    num_valid
        Denominator of ``"mean"`` in place of ``max(sum(mask), 1)``; with another reduction,
        a ValueError, as the loss raises.
    upstream
        Cotangent of the loss: a number, or an array of the loss's shape for ``"none"``.

    Returns
    -------
    Expected
        ``loss``, ``grad_logits`` and ``grad_targets`` as float64 NumPy arrays. They come from
        :func:`softce_multi.reference.masked_soft_cross_entropy` with torch autograd when torch
        is installed (on the GPU when torch has one), else from :func:`numpy_reference`.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.testing import reference
    >>> expected = reference(np.zeros((1, 2)), np.array([[0.5, 0.5]]), np.ones(1))
    >>> round(float(expected.loss), 6)
    0.693147
    """
    z, p, w = (to_float64(value) for value in (logits, target_probs, position_mask))
    if not is_installed("torch"):
        return numpy_reference(z, p, w, reduction=reduction, num_valid=num_valid, upstream=upstream)
    import torch

    from softce_multi.reference import masked_soft_cross_entropy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    z_tensor = torch.tensor(z, requires_grad=True, device=device)
    p_tensor = torch.tensor(p, requires_grad=True, device=device)
    loss = masked_soft_cross_entropy(
        z_tensor, p_tensor, torch.tensor(w, device=device), reduction=reduction, num_valid=num_valid
    )
    cotangent = torch.as_tensor(np.asarray(upstream), dtype=torch.float64, device=device)
    loss.backward(cotangent.expand_as(loss))
    assert z_tensor.grad is not None and p_tensor.grad is not None
    return Expected(
        loss.detach().cpu().numpy(), z_tensor.grad.cpu().numpy(), p_tensor.grad.cpu().numpy()
    )


def numpy_reference(
    logits: np.ndarray,
    target_probs: np.ndarray,
    position_mask: np.ndarray,
    /,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> Expected:
    """The same as :func:`reference`, from the formula and its analytic gradients in NumPy.

    ``d/dz = w/den * (sum(p) * softmax(z) - p)`` and ``d/dp = -w/den * log_softmax(z)``, with
    ``den`` the mean's denominator (1 for ``"sum"`` and ``"none"``).
    """
    if num_valid is not None and reduction != "mean":
        msg = f"num_valid replaces the denominator of reduction='mean'; got reduction={reduction!r}"
        raise ValueError(msg)
    z, p = np.asarray(logits, np.float64), np.asarray(target_probs, np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    terms = np.where(p == 0, 0.0, p * np.where(p == 0, 0.0, log_probs))
    per_position = -terms.sum(axis=-1)
    weights = np.asarray(position_mask, dtype=np.float64).reshape(per_position.shape)
    weighted = weights * per_position
    if reduction == "none":
        loss = weighted
    elif reduction == "sum":
        loss = weighted.sum()
    else:
        loss = weighted.sum() * _inverse_denominator(weights, num_valid)
    scale = row_scale(
        weights, per_position.shape, reduction=reduction, num_valid=num_valid, upstream=upstream
    )
    grad_logits = scale * (p.sum(axis=-1, keepdims=True) * np.exp(log_probs) - p)
    grad_targets = -scale * log_probs
    return Expected(np.asarray(loss), grad_logits, grad_targets)


def _inverse_denominator(weights: np.ndarray, num_valid: float | None) -> float:
    """``1 / den`` of ``"mean"``: ``max(sum(w), 1)`` or ``num_valid``; 0 when that is 0."""
    den = max(float(weights.sum()), 1.0) if num_valid is None else float(num_valid)
    return 0.0 if den == 0 else 1.0 / den


def row_scale(
    position_mask: np.ndarray,
    batch_shape: tuple[int, ...],
    *,
    reduction: str,
    num_valid: float | None,
    upstream: np.ndarray | float,
) -> np.ndarray:
    """``d loss / d c`` per position times the upstream gradient, shape ``batch_shape + (1,)``."""
    weights = np.asarray(position_mask, dtype=np.float64).reshape(batch_shape)
    inverse_den = _inverse_denominator(weights, num_valid) if reduction == "mean" else 1.0
    return (np.broadcast_to(upstream, batch_shape) * weights * inverse_den)[..., None]


def dense_targets(
    target_ids: np.ndarray, target_probs: np.ndarray, vocab_size: int, /
) -> np.ndarray:
    """The dense float64 targets ``[..., vocab_size]`` that sparse targets stand for.

    Each ``target_probs[..., k]`` is added at ``target_ids[..., k]`` into zeros (duplicate ids
    add up); a slot of probability 0 is skipped whatever its id. The oracle of the sparse loss:
    its value is the dense loss of these targets.

    An id outside ``[0, vocab_size)`` whose probability is not 0 (NaN included) makes its
    position's targets NaN, the whole row: the oracle's loss there is NaN, as the sparse loss
    is. (The oracle's logits gradient is then NaN in the whole row, where the loss's is NaN
    in part of it; see the sparse targets' documentation.)

    Parameters
    ----------
    target_ids
        Ids of any integer dtype, ``[..., K]``, of any backend.
    target_probs
        Their probabilities, of the same shape, of any backend.
    vocab_size
        ``V``, a non-negative integer.

    Returns
    -------
    numpy.ndarray
        ``[..., V]`` float64 targets.

    Raises
    ------
    TypeError
        If ``target_ids`` has no integer dtype (bool included).
    ValueError
        If ``target_ids`` is 0-d or its shape differs from that of ``target_probs``, or
        ``vocab_size`` is negative.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.testing import dense_targets
    >>> dense_targets(np.array([[2, 0, 2, -1]]), np.array([[0.25, 0.5, 0.125, 0.0]]), 3)
    array([[0.5  , 0.   , 0.375]])
    >>> dense_targets(np.array([[0, -1]]), np.array([[0.5, 0.5]]), 3)
    array([[nan, nan, nan]])
    """
    ids, probs = to_numpy(target_ids), to_float64(target_probs)
    if not np.issubdtype(ids.dtype, np.integer):
        msg = f"target_ids must have an integer dtype, got {ids.dtype}"
        raise TypeError(msg)
    if ids.ndim == 0 or ids.shape != probs.shape:
        msg = (
            f"target_ids and target_probs must have the same shape [..., K]; got target_ids "
            f"{ids.shape} and target_probs {probs.shape}"
        )
        raise ValueError(msg)
    vocab = operator.index(vocab_size)
    if vocab < 0:
        msg = f"vocab_size must be a non-negative integer, got {vocab_size}"
        raise ValueError(msg)
    n_rows = math.prod(probs.shape[:-1])
    dense = np.zeros((*probs.shape[:-1], vocab))
    rows = dense.reshape(n_rows, vocab)
    slots = probs.shape[-1]
    flat_ids, flat_probs = ids.reshape(n_rows, slots), probs.reshape(n_rows, slots)
    used = flat_probs != 0
    inside = (flat_ids >= 0) & (flat_ids < vocab)
    row_index = np.broadcast_to(np.arange(n_rows)[:, None], flat_ids.shape)
    added = used & inside
    np.add.at(rows, (row_index[added], flat_ids[added]), flat_probs[added])
    rows[np.any(used & ~inside, axis=-1)] = np.nan
    return dense
