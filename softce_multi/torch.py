"""The loss for PyTorch: the function of tensors and its two ``nn.Module`` forms.

The public functions of :mod:`softce_multi` take torch tensors as they are; this module is the
same loss under a torch-only signature, :class:`MaskedSoftCrossEntropy` for the loss of logits
and :class:`LinearMaskedSoftCrossEntropy` for the loss straight from hidden states and an output
projection (:func:`softce_multi.linear_masked_soft_cross_entropy`). All three are
differentiable with autograd (the linear loss once: its gradient is not differentiable). The
work behind them is the torch adapter, :mod:`softce_multi._adapters.torch`.
"""

from __future__ import annotations

from softce_multi import _compat

try:
    import torch
except ModuleNotFoundError as error:
    raise _compat.missing_framework("torch", "softce_multi.torch") from error

from softce_multi._adapters import torch as _adapter
from softce_multi._types import LinearLossInputs, LossInputs, Reduction
from softce_multi._validate import (
    check_chunk_rows,
    check_library,
    check_reduction,
    validate_inputs,
    validate_linear_inputs,
)

__all__ = [
    "LinearMaskedSoftCrossEntropy",
    "MaskedSoftCrossEntropy",
    "masked_soft_cross_entropy",
]


def masked_soft_cross_entropy(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    position_mask: torch.Tensor,
    *,
    reduction: Reduction = "mean",
    num_valid: torch.Tensor | float | None = None,
    target_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked soft-target cross entropy for torch tensors, differentiable with autograd.

    Same function and arguments as :func:`softce_multi.masked_soft_cross_entropy`. It works
    under ``torch.compile`` (without graph breaks), ``torch.func.grad``, ``torch.func.vmap``,
    ``torch.utils.checkpoint`` and higher-order ``torch.autograd`` derivatives.

    Examples
    --------
    >>> import torch
    >>> from softce_multi.torch import masked_soft_cross_entropy
    >>> logits = torch.randn(2, 5, 11, requires_grad=True)
    >>> target = torch.softmax(torch.randn(2, 5, 11), dim=-1)
    >>> mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    >>> loss = masked_soft_cross_entropy(logits, target, mask, num_valid=mask.sum())
    >>> loss.backward()
    >>> bool(logits.grad[0, 3:].eq(0).all())
    True
    """
    inputs = LossInputs(logits, target_probs, position_mask, reduction, num_valid, target_ids)
    xp = validate_inputs(inputs)
    check_library(xp, ("torch",), function="softce_multi.torch.masked_soft_cross_entropy")
    return _adapter.loss(inputs)


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
        *,
        num_valid: torch.Tensor | float | None = None,
        target_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the loss; ``num_valid`` replaces the denominator of ``"mean"``, and with
        ``target_ids`` the targets are sparse (see
        :func:`softce_multi.masked_soft_cross_entropy`)."""
        return masked_soft_cross_entropy(
            logits,
            target_probs,
            position_mask,
            reduction=self.reduction,
            num_valid=num_valid,
            target_ids=target_ids,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class LinearMaskedSoftCrossEntropy(torch.nn.Module):
    """The loss straight from hidden states and an output projection, as an ``nn.Module``.

    The module form of :func:`softce_multi.linear_masked_soft_cross_entropy`: the loss of the
    logits ``hidden @ weight.T + bias``, computed one chunk of rows at a time so that the
    ``[N, V]`` logits never exist.

    Parameters
    ----------
    reduction : {"mean", "sum", "none"}, default "mean"
        As in :func:`softce_multi.masked_soft_cross_entropy`.
    chunk_rows : int, optional
        Rows per chunk (by default chosen from a memory budget).

    Examples
    --------
    >>> import torch
    >>> from softce_multi.torch import LinearMaskedSoftCrossEntropy
    >>> lm_head = torch.nn.Linear(16, 50)
    >>> criterion = LinearMaskedSoftCrossEntropy()
    >>> hidden = torch.randn(2, 5, 16, requires_grad=True)
    >>> target = torch.softmax(torch.randn(2, 5, 50), dim=-1)
    >>> mask = torch.ones(2, 5, dtype=torch.bool)
    >>> criterion(hidden, lm_head.weight, target, mask, bias=lm_head.bias).backward()
    >>> lm_head.weight.grad.shape, hidden.grad.shape
    (torch.Size([50, 16]), torch.Size([2, 5, 16]))
    """

    def __init__(self, reduction: Reduction = "mean", chunk_rows: int | None = None) -> None:
        super().__init__()
        check_reduction(reduction, with_grad=False)
        self.reduction = reduction
        self.chunk_rows = check_chunk_rows(chunk_rows)

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target_probs: torch.Tensor,
        position_mask: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        num_valid: torch.Tensor | float | None = None,
        target_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the loss; ``num_valid`` replaces the denominator of ``"mean"``, and with
        ``target_ids`` the targets are sparse (see
        :func:`softce_multi.masked_soft_cross_entropy`)."""
        inputs = LinearLossInputs(
            hidden,
            weight,
            bias,
            target_probs,
            position_mask,
            self.reduction,
            num_valid,
            self.chunk_rows,
            target_ids,
        )
        xp = validate_linear_inputs(inputs)
        check_library(xp, ("torch",), function="softce_multi.torch.LinearMaskedSoftCrossEntropy")
        return _adapter.linear_loss(inputs)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, chunk_rows={self.chunk_rows!r}"
