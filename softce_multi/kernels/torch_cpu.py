"""The torch CPU path: the core's routines as ``torch.library`` custom operators.

``softce_multi::torch_row_routine`` and ``softce_multi::torch_gradient_routine`` run the core's
two steps (:func:`softce_multi._core.row_statistics` and the gradients from the saved
statistics) for torch tensors on the CPU, and on any device where Triton does not run. The
elementwise work is done in place on block-sized buffers reused by every block, which roughly
halves the passes over memory of the generic core. Each operator has a fake implementation
(shapes and dtypes only) and a vmap rule that folds the batch into the rows, so
``torch.compile`` sees an opaque call and ``torch.func.vmap`` works.

:func:`row_routine` and :func:`gradient_routine` are the
:class:`~softce_multi._core.RowRoutine` and :class:`~softce_multi._core.GradientRoutine` that
call them.
"""

from __future__ import annotations

import array_api_compat
import torch
from torch import Tensor

from softce_multi import _core, kernels

__all__ = ["gradient_routine", "row_routine", "torch_gradient_routine", "torch_row_routine"]


def row_routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of the operator :func:`torch_row_routine`."""
    outputs = torch_row_routine(rows.z, rows.p, rows.weights, rows.row_scale, with_logits_grad)
    return kernels.row_results(outputs, with_logits_grad=with_logits_grad)


def gradient_routine(
    rows: _core.BackwardRows, /, *, logits_grad: bool, targets_grad: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The :class:`~softce_multi._core.GradientRoutine` of :func:`torch_gradient_routine`."""
    outputs = torch_gradient_routine(
        rows.z, rows.p, *rows.saved, rows.row_scale, logits_grad, targets_grad
    )
    return kernels.gradient_results(outputs, logits_grad=logits_grad, targets_grad=targets_grad)


@torch.library.custom_op("softce_multi::torch_row_routine", mutates_args=())
def torch_row_routine(
    z: Tensor, p: Tensor, weights: Tensor, row_scale: Tensor, with_logits_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The per-row work of the forward pass, as the operator ``softce_multi::torch_row_routine``.

    The core's two steps with the elementwise work done in place on block-sized buffers, which
    roughly halves the passes over memory of the generic version.

    Parameters
    ----------
    z, p : Tensor, shape ``[N, V]``
        Logits and targets, ``N > 0``, any floating dtypes and strides.
    weights : Tensor, shape ``[N]``
        Row weights in the computation dtype (float32 or float64).
    row_scale : Tensor, shape ``[N]``
        ``d loss / d c_row`` for a unit upstream gradient, in the computation dtype.
    with_logits_grad : bool
        Whether to compute the logits gradient.

    Returns
    -------
    tuple of Tensor
        ``w * c``, the row maximum, the log of the sum of exponentials and the target mass
        (:class:`softce_multi._core.SavedRows`), each ``[N]`` in the computation dtype and 0 in
        rows of weight 0; and ``row_scale * (sum(p) * softmax(z) - p)`` as ``[N, V]`` in the
        logits' dtype (exactly 0 in rows of weight 0), or ``[0, V]`` without
        ``with_logits_grad``.
    """
    xp = array_api_compat.array_namespace(z)
    dtype = weights.dtype
    valid = weights != 0
    losses, row_max, log_sum_exp, target_sum, grad = kernels.empty_row_outputs(
        z, weights, with_logits_grad=with_logits_grad
    )
    n_rows, vocab_size = z.shape
    # Block-sized buffers reused by every block: a fresh allocation per block costs page faults.
    block_rows = min(_core.default_block_rows(vocab_size), n_rows)

    def block_buffer() -> Tensor:
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
        row_max[block] = torch.where(block_valid, stats.row_max, 0.0)
        log_sum_exp[block] = torch.where(block_valid, torch.log(stats.sum_exp), 0.0)
        target_sum[block] = torch.where(block_valid, stats.target_sum, 0.0)
        if with_logits_grad:
            scale = row_scale[block, None]
            out = grad[block] if grad.dtype == dtype else work
            torch.mul(softmax, scale * stats.target_sum[:, None], out=out)
            out.addcmul_(p_block, scale, value=-1)
            # Padding may hold NaN or inf, and a row with no target mass may have no softmax.
            _zero_rows(out, ~_core.rows_with_gradient(row_scale[block], stats.target_sum))
            if out is work:
                grad[block] = work
    return losses, row_max, log_sum_exp, target_sum, grad


@torch.library.custom_op("softce_multi::torch_gradient_routine", mutates_args=())
def torch_gradient_routine(
    z: Tensor,
    p: Tensor,
    row_max: Tensor,
    log_sum_exp: Tensor,
    target_sum: Tensor,
    row_scale: Tensor,
    logits_grad: bool,
    targets_grad: bool,
) -> tuple[Tensor, Tensor]:
    """The per-row work of the backward pass, as ``softce_multi::torch_gradient_routine``.

    The log-softmax is taken from the saved statistics as ``(z - row_max) - log_sum_exp``, never
    through a rounded log-normalizer, and every elementwise step runs in place on one
    block-sized buffer.

    Parameters
    ----------
    z, p : Tensor, shape ``[N, V]``
        Logits and targets, ``N > 0``, any floating dtypes and strides.
    row_max, log_sum_exp, target_sum : Tensor, shape ``[N]``
        The :class:`softce_multi._core.SavedRows` of the forward pass, in the computation dtype.
    row_scale : Tensor, shape ``[N]``
        ``d loss / d c_row`` times the upstream gradient, in the computation dtype.
    logits_grad, targets_grad : bool
        Which gradients to compute.

    Returns
    -------
    tuple of Tensor
        ``row_scale * (sum(p) * softmax(z) - p)`` in the logits' dtype and
        ``-row_scale * log_softmax(z)`` in the targets' dtype, both ``[N, V]`` and exactly 0 in
        rows whose scale is 0 (the logits gradient also in rows without target mass); a
        gradient not asked for is ``[0, V]``.
    """
    dtype = row_max.dtype
    grad_z, grad_p = kernels.empty_gradient_outputs(
        z, p, logits_grad=logits_grad, targets_grad=targets_grad
    )
    n_rows, vocab_size = z.shape
    block_rows = min(_core.default_block_rows(vocab_size), n_rows)

    def block_buffer() -> Tensor:
        return torch.empty((block_rows, vocab_size), dtype=dtype, device=z.device)

    log_probs_buf = block_buffer()
    z_buf = None if z.dtype == dtype else block_buffer()
    p_buf = block_buffer() if logits_grad and p.dtype != dtype else None
    # Gradients of another dtype are computed here, then rounded into place.
    casts = (logits_grad and grad_z.dtype != dtype) or (targets_grad and grad_p.dtype != dtype)
    cast_buf = block_buffer() if casts else None
    for block in _core.row_blocks(n_rows, block_rows):
        size = block.stop - block.start
        log_probs = log_probs_buf[:size]
        z_block = z[block] if z_buf is None else z_buf[:size].copy_(z[block])
        scale = row_scale[block]
        torch.sub(z_block, row_max[block, None], out=log_probs).sub_(log_sum_exp[block, None])
        if targets_grad:
            out = grad_p[block] if cast_buf is None or grad_p.dtype == dtype else cast_buf[:size]
            torch.mul(log_probs, -scale[:, None], out=out)
            # Padding may hold NaN or inf.
            _zero_rows(out, scale == 0)
            if out.dtype != grad_p.dtype:
                grad_p[block] = out
        if logits_grad:
            p_block = p[block] if p_buf is None else p_buf[:size].copy_(p[block])
            softmax = log_probs.exp_()
            out = grad_z[block] if cast_buf is None or grad_z.dtype == dtype else cast_buf[:size]
            torch.mul(softmax, (scale * target_sum[block])[:, None], out=out)
            out.addcmul_(p_block, scale[:, None], value=-1)
            # A row with no target mass may have no softmax.
            _zero_rows(out, ~_core.rows_with_gradient(scale, target_sum[block]))
            if out.dtype != grad_z.dtype:
                grad_z[block] = out
    return grad_z, grad_p


kernels.register_operator_rules(torch_row_routine, torch_gradient_routine)


def _row_statistics_and_softmax(
    z: Tensor, p: Tensor, *, softmax: Tensor, work: Tensor
) -> _core.RowStatistics:
    """:func:`softce_multi._core.row_statistics` of a block; its softmax is written to ``softmax``.

    ``work`` is scratch space of the block's shape. PyTorch's fused softmax kernel is faster on
    the CPU than a separate ``exp``; the sum of exponentials follows from the softmax at the row
    maximum, ``exp(max - lse)``, which lies in ``[1/V, 1]`` and so loses no precision.
    """
    row_max = z.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max.isfinite(), row_max, 0.0)
    torch.softmax(z, dim=-1, out=softmax)
    sum_exp = torch.reciprocal(softmax.amax(dim=-1))
    # The product is NaN only where p == 0 meets an infinite shifted logit, a term that is 0 by
    # definition; NaN inputs still reach the loss through sum_exp and target_sum.
    target_dot = torch.sub(z, row_max, out=work).mul_(p).nansum(dim=-1)
    return _core.RowStatistics(row_max[:, 0], sum_exp, p.sum(dim=-1), target_dot)


def _zero_rows(block: Tensor, rows: Tensor) -> None:
    """Set the rows of ``block`` where the bool vector ``rows`` is true to 0, in place.

    On the CPU only those rows are written: a broadcast ``masked_fill_`` or ``where`` costs as
    much as the softmax of the block. The row indices are read on the host, which is free there
    and invisible to tracing (this runs inside an opaque operator); on other devices it would
    wait for the device, so they take the broadcast fill.
    """
    if block.device.type == "cpu":
        block.index_fill_(0, torch.nonzero(rows).squeeze(1), 0.0)
    else:
        block.masked_fill_(rows[:, None], 0.0)
