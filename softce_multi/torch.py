"""PyTorch adapter: an ``autograd.Function`` around the shared core, and an ``nn.Module``.

The forward pass computes the loss and, for the ``"mean"`` and ``"sum"`` reductions, the logits
gradient in the same pass over the inputs; the backward pass only scales that buffer by the
upstream gradient. For ``"none"`` (whose upstream gradient differs per position) and for the
gradient to ``target_probs``, the backward pass recomputes from small per-row statistics.

The forward pass is the core's two steps with the elementwise work done in place on one
block-sized buffer, which roughly halves the passes over memory of the generic version. On CUDA
tensors, with Triton installed, the forward and backward passes run the kernels of
:mod:`softce_multi.kernels.triton` instead (imported on first use).
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import torch

from softce_multi import _core, kernels
from softce_multi._types import Reduction
from softce_multi._validate import check_reduction, validate_inputs

__all__ = ["MaskedSoftCrossEntropy", "masked_soft_cross_entropy"]


def masked_soft_cross_entropy(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    position_mask: torch.Tensor,
    /,
    *,
    reduction: Reduction = "mean",
    num_valid: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Masked soft-target cross entropy for torch tensors, differentiable with autograd.

    Same function and arguments as :func:`softce_multi.masked_soft_cross_entropy`.
    """
    validate_inputs(logits, target_probs, position_mask, reduction, num_valid)
    return loss(logits, target_probs, position_mask, reduction=reduction, num_valid=num_valid)


def loss(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    position_mask: torch.Tensor,
    /,
    *,
    reduction: str,
    num_valid: torch.Tensor | float | None,
) -> torch.Tensor:
    """The loss of validated inputs, through autograd when a gradient is wanted."""
    if torch.is_grad_enabled() and (logits.requires_grad or target_probs.requires_grad):
        return _MaskedSoftCrossEntropyFunction.apply(
            logits, target_probs, position_mask, reduction, num_valid
        )
    return forward(
        logits,
        target_probs,
        position_mask,
        reduction=reduction,
        num_valid=num_valid,
        with_logits_grad=False,
    ).loss


def loss_with_grad(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    position_mask: torch.Tensor,
    /,
    *,
    reduction: str,
    num_valid: torch.Tensor | float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of validated inputs and its logits gradient, from one pass (no autograd)."""
    result = forward(
        logits,
        target_probs,
        position_mask,
        reduction=reduction,
        num_valid=num_valid,
        with_logits_grad=True,
    )
    return result.loss, result.logits_grad


@torch.no_grad()
def forward(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    position_mask: torch.Tensor,
    *,
    reduction: str,
    num_valid: torch.Tensor | float | None,
    with_logits_grad: bool,
) -> _core.ForwardResult:
    """:func:`softce_multi._core.forward` with the per-row work of the tensors' device.

    The Triton kernels where :func:`softce_multi.kernels.use_triton` says they apply (CUDA
    tensors, Triton installed), else :func:`cpu_row_routine`.
    """
    if kernels.use_triton(logits):
        from softce_multi.kernels import triton as triton_kernels

        row_routine: _core.RowRoutine = triton_kernels.row_routine
    else:
        row_routine = cpu_row_routine
    return _core.forward(
        logits,
        target_probs,
        position_mask,
        reduction=reduction,
        num_valid=num_valid,
        with_logits_grad=with_logits_grad,
        row_routine=row_routine,
        xp=array_api_compat.array_namespace(logits),
    )


def cpu_row_routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of eager torch outside the kernels.

    The core's two steps with the elementwise work done in place on one block-sized buffer,
    which roughly halves the passes over memory of the generic version.
    """
    xp = array_api_compat.array_namespace(rows.z)
    z, p, weights, dtype = rows.z, rows.p, rows.weights, rows.dtype
    valid = weights != 0
    row_scale = rows.row_scale

    n_rows, vocab_size = z.shape
    losses = torch.empty(n_rows, dtype=dtype, device=z.device)
    saved = _core.SavedRows(*(torch.empty_like(losses) for _ in _core.SavedRows._fields))
    grad = torch.empty(z.shape, dtype=z.dtype, device=z.device) if with_logits_grad else None
    # Block-sized buffers reused by every block: a fresh allocation per block costs page faults.
    block_rows = min(_core.default_block_rows(vocab_size), n_rows)

    def block_buffer() -> torch.Tensor:
        return torch.empty((block_rows, vocab_size), dtype=dtype, device=z.device)

    softmax_buf, work_buf = block_buffer(), block_buffer()
    z_buf = None if z.dtype == dtype else block_buffer()
    p_buf = None if p.dtype == dtype else block_buffer()
    for block in _core.row_blocks(n_rows, block_rows):
        size = block.stop - block.start
        softmax, work = softmax_buf[:size], work_buf[:size]
        z_block = z[block] if z_buf is None else z_buf[:size].copy_(z[block])
        p_block = p[block] if p_buf is None else p_buf[:size].copy_(p[block])
        stats = _row_statistics_and_softmax(z_block, p_block, softmax=softmax, work=work)
        block_loss = weights[block] * _core.row_losses(stats, xp=xp)
        # Rows of weight 0 (padding, which may hold anything) keep zeros, as in the kernels.
        block_valid = valid[block]
        losses[block] = torch.where(block_valid, block_loss, 0.0)
        saved.row_max[block] = torch.where(block_valid, stats.row_max, 0.0)
        saved.log_sum_exp[block] = torch.where(block_valid, torch.log(stats.sum_exp), 0.0)
        saved.target_sum[block] = torch.where(block_valid, stats.target_sum, 0.0)
        if grad is not None:
            scale = row_scale[block, None]
            out = grad[block] if grad.dtype == dtype else work
            torch.mul(softmax, scale * stats.target_sum[:, None], out=out)
            out.addcmul_(p_block, scale, value=-1)
            # Padding may hold NaN or inf, and a row with no target mass may have no softmax.
            _zero_rows(out, ~_core.rows_with_gradient(row_scale[block], stats.target_sum))
            if out is work:
                grad[block] = work
    return _core.RowResults(losses, saved, grad)


def _row_statistics_and_softmax(
    z: torch.Tensor, p: torch.Tensor, *, softmax: torch.Tensor, work: torch.Tensor
) -> _core.RowStatistics:
    """:func:`softce_multi._core.row_statistics` of a block; its softmax is written to ``softmax``.

    ``work`` is scratch space of the block's shape. PyTorch's fused softmax kernel is faster on
    the CPU than a separate ``exp``; the sum of exponentials follows from the softmax at the row
    maximum, ``exp(max - lse)``, which lies in ``[1/V, 1]`` and so loses no precision.
    """
    row_max = z.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max.isfinite(), row_max, 0.0)
    torch.ops.aten._softmax.out(z, -1, False, out=softmax)
    sum_exp = torch.reciprocal(softmax.amax(dim=-1))
    # The product is NaN only where p == 0 meets an infinite shifted logit, a term that is 0 by
    # definition; NaN inputs still reach the loss through sum_exp and target_sum.
    target_dot = torch.sub(z, row_max, out=work).mul_(p).nansum(dim=-1)
    return _core.RowStatistics(row_max[:, 0], sum_exp, p.sum(dim=-1), target_dot)


def _zero_rows(block: torch.Tensor, rows: torch.Tensor) -> None:
    """Set the rows of ``block`` where the bool vector ``rows`` is true to 0, in place."""
    if block.device.type == "cpu":
        # Cheaper than a broadcast masked_fill_; finding the indices would sync a GPU.
        block.index_fill_(0, torch.nonzero(rows).squeeze(1), 0.0)
    else:
        block.masked_fill_(rows[:, None], 0.0)


class _MaskedSoftCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        target_probs: torch.Tensor,
        position_mask: torch.Tensor,
        reduction: str,
        num_valid: torch.Tensor | float | None,
    ) -> torch.Tensor:
        result = forward(
            logits,
            target_probs,
            position_mask,
            reduction=reduction,
            num_valid=num_valid,
            with_logits_grad=ctx.needs_input_grad[0] and reduction != "none",
        )
        ctx.reduction = reduction
        ctx.logits_grad = result.logits_grad
        ctx.save_for_backward(logits, target_probs, result.row_scale, *result.saved)
        return result.loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, target_probs, row_scale, *saved_rows = ctx.saved_tensors
        saved = _core.SavedRows(*saved_rows)
        upstream = grad_output.reshape(-1) if ctx.reduction == "none" else grad_output
        row_scale = row_scale * upstream

        grad_logits = None
        if ctx.needs_input_grad[0] and ctx.logits_grad is not None:
            # Hand over the buffer computed in forward and scale it in place; it is released
            # from ctx first, so a second backward (retain_graph=True) recomputes instead.
            grad_logits, ctx.logits_grad = ctx.logits_grad, None
            if not _is_one_on_cpu(grad_output):
                grad_logits.mul_(grad_output)
        recomputed, grad_targets = _gradients_from_saved(
            logits,
            target_probs,
            saved,
            row_scale,
            logits_grad=ctx.needs_input_grad[0] and grad_logits is None,
            targets_grad=ctx.needs_input_grad[1],
        )
        if grad_logits is None:
            grad_logits = recomputed
        return grad_logits, grad_targets, None, None, None


def _gradients_from_saved(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    saved: _core.SavedRows,
    row_scale: torch.Tensor,
    *,
    logits_grad: bool,
    targets_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Recompute the gradients asked for from the row statistics; None for the others."""
    if not (logits_grad or targets_grad):
        return None, None
    if kernels.use_triton(logits):
        from softce_multi.kernels import triton as triton_kernels

        gradient_routine: _core.GradientRoutine = triton_kernels.gradient_routine
    else:
        xp = array_api_compat.array_namespace(logits)
        block_rows = _core.default_block_rows(logits.shape[-1])
        gradient_routine = _core.blocked_gradient_routine(block_rows, xp=xp)
    return _core.backward(
        logits,
        target_probs,
        saved,
        row_scale,
        logits_grad=logits_grad,
        targets_grad=targets_grad,
        gradient_routine=gradient_routine,
        xp=array_api_compat.array_namespace(logits),
    )


def _is_one_on_cpu(value: torch.Tensor) -> bool:
    """Whether ``value`` is exactly 1, asked only where the answer costs no device sync."""
    return value.device.type == "cpu" and bool(value == 1)


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
