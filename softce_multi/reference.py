"""The reference formula, written plainly in PyTorch: the oracle of the parity tests.

It is the loss as EAGLE-3 trainers write it: ``log_softmax`` of the logits upcast to float32
(kept in float64 when an input is float64, so that float64 comparisons mean something), the sum
of ``p * log_softmax`` over the vocabulary, weighted by the mask and divided by the number of
valid positions clamped at 1. It materialises every intermediate and multiplies the mask in,
so padding must hold finite values here.
"""

from __future__ import annotations

from softce_multi import _compat

try:
    import torch
except ModuleNotFoundError as error:
    raise _compat.missing_framework("torch", "softce_multi.reference") from error

__all__ = ["masked_soft_cross_entropy"]


def masked_soft_cross_entropy(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    position_mask: torch.Tensor,
    *,
    reduction: str = "mean",
    num_valid: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Return the masked soft-target cross entropy by the plain formula.

    Parameters
    ----------
    logits : torch.Tensor, shape ``[..., V]``
    target_probs : torch.Tensor, shape ``[..., V]``
    position_mask : torch.Tensor, shape ``[...]`` or ``[..., 1]``
    reduction : {"mean", "sum", "none"}
    num_valid : number or 0-d tensor, optional
        Replaces the denominator of ``"mean"``; 0 gives 0. Only with ``"mean"``.

    Returns
    -------
    torch.Tensor
        float32, or float64 when an input is float64.

    Raises
    ------
    ValueError
        For an unknown ``reduction``, or ``num_valid`` with another reduction than ``"mean"``,
        as :func:`softce_multi.masked_soft_cross_entropy` refuses them.
    """
    if reduction not in ("mean", "sum", "none"):
        msg = f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}"
        raise ValueError(msg)
    if num_valid is not None and reduction != "mean":
        msg = f"num_valid replaces the denominator of reduction='mean'; got reduction={reduction!r}"
        raise ValueError(msg)
    dtype = torch.float64 if torch.float64 in (logits.dtype, target_probs.dtype) else torch.float32
    log_probs = torch.log_softmax(logits.to(dtype), dim=-1)
    per_position = -(target_probs.to(dtype) * log_probs).sum(dim=-1)
    mask = position_mask.reshape(per_position.shape).to(dtype)
    weighted = per_position * mask
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    if num_valid is None:
        return weighted.sum() / mask.sum().clamp_min(1.0)
    count = torch.as_tensor(num_valid, dtype=dtype, device=logits.device)
    safe_count = torch.where(count == 0, 1.0, count)
    return torch.where(count == 0, 0.0, weighted.sum() / safe_count)
