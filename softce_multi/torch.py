"""PyTorch adapter: an ``autograd.Function`` around the shared core, and an ``nn.Module``.

The forward pass computes the loss and, for the ``"mean"`` and ``"sum"`` reductions, the logits
gradient in the same pass over the inputs; the backward pass only scales that buffer by the
upstream gradient. For ``"none"`` (whose upstream gradient differs per position) and for the
gradient to ``target_probs``, the backward pass recomputes from small per-row statistics.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import torch

from softce_multi import _core
from softce_multi._api import Reduction
from softce_multi._api import masked_soft_cross_entropy as _masked_soft_cross_entropy
from softce_multi._validate import check_reduction

__all__ = ["MaskedSoftCrossEntropy", "masked_soft_cross_entropy"]

masked_soft_cross_entropy = _masked_soft_cross_entropy


class _MaskedSoftCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        target_probs: torch.Tensor,
        position_mask: torch.Tensor,
        reduction: str,
        num_valid: torch.Tensor | float | None,
    ) -> torch.Tensor:
        result = _core.forward(
            logits,
            target_probs,
            position_mask,
            reduction=reduction,
            num_valid=num_valid,
            with_logits_grad=ctx.needs_input_grad[0] and reduction != "none",
            block_rows=_core.default_block_rows(logits.shape[-1]),
            xp=array_api_compat.array_namespace(logits),
        )
        ctx.reduction = reduction
        ctx.logits_grad = result.logits_grad
        ctx.save_for_backward(
            logits, target_probs, result.log_normalizer, result.target_sum, result.row_scale
        )
        return result.loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, target_probs, lse, target_sum, row_scale = ctx.saved_tensors
        upstream = grad_output.reshape(-1) if ctx.reduction == "none" else grad_output
        row_scale = row_scale * upstream
        xp = array_api_compat.array_namespace(logits)
        block_rows = _core.default_block_rows(logits.shape[-1])

        grad_logits = grad_targets = None
        if ctx.needs_input_grad[0]:
            if ctx.logits_grad is not None:
                # Hand over the buffer computed in forward and scale it in place; it is released
                # from ctx first, so a second backward (retain_graph=True) recomputes instead.
                grad_logits, ctx.logits_grad = ctx.logits_grad, None
                grad_logits.mul_(grad_output)
            else:
                grad_logits = _core.logits_gradient(
                    logits, target_probs, lse, target_sum, row_scale, block_rows=block_rows, xp=xp
                )
        if ctx.needs_input_grad[1]:
            grad_targets = _core.targets_gradient(
                logits, lse, row_scale, out_dtype=target_probs.dtype, block_rows=block_rows, xp=xp
            )
        return grad_logits, grad_targets, None, None, None


def _differentiable_loss(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    position_mask: torch.Tensor,
    reduction: str,
    num_valid: torch.Tensor | float | None,
) -> torch.Tensor:
    """Run the validated inputs through autograd when a gradient is wanted, else the core."""
    if torch.is_grad_enabled() and (logits.requires_grad or target_probs.requires_grad):
        return _MaskedSoftCrossEntropyFunction.apply(
            logits, target_probs, position_mask, reduction, num_valid
        )
    return _core.forward(
        logits,
        target_probs,
        position_mask,
        reduction=reduction,
        num_valid=num_valid,
        with_logits_grad=False,
        block_rows=_core.default_block_rows(logits.shape[-1]),
        xp=array_api_compat.array_namespace(logits),
    ).loss


class MaskedSoftCrossEntropy(torch.nn.Module):
    """Masked soft-target cross entropy as an ``nn.Module``.

    Parameters
    ----------
    reduction : {"mean", "sum", "none"}, default "mean"
        As in :func:`softce_multi.masked_soft_cross_entropy`.

    Examples
    --------
    >>> import torch
    >>> from softce_multi.torch import MaskedSoftCrossEntropy
    >>> criterion = MaskedSoftCrossEntropy()
    >>> logits = torch.randn(2, 5, 11, requires_grad=True)
    >>> target = torch.softmax(torch.randn(2, 5, 11), dim=-1)
    >>> mask = torch.ones(2, 5, 1, dtype=torch.bool)
    >>> criterion(logits, target, mask).backward()
    >>> logits.grad.shape
    torch.Size([2, 5, 11])
    """

    def __init__(self, reduction: Reduction = "mean") -> None:
        super().__init__()
        check_reduction(reduction, with_grad=False)
        self.reduction = reduction

    def forward(
        self,
        logits: torch.Tensor,
        target_probs: torch.Tensor,
        position_mask: torch.Tensor,
        num_valid: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Return the loss; ``num_valid`` replaces the denominator of ``"mean"``."""
        return masked_soft_cross_entropy(
            logits, target_probs, position_mask, reduction=self.reduction, num_valid=num_valid
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
