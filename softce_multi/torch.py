"""PyTorch adapter: custom operators for the per-row work, an autograd function, an ``nn.Module``.

The core's driver (:func:`softce_multi._core.forward` and :func:`softce_multi._core.backward`)
lays out the rows and reduces the losses; the per-row work in between runs in custom operators
(``torch.library``), each with a fake implementation (shapes and dtypes only) and a vmap rule
(the batch is folded into the rows):

``softce_multi::torch_row_routine``, ``softce_multi::torch_gradient_routine``
    :func:`torch.library.custom_op` operators for the CPU (and any device where Triton does not
    run): the core's two steps with the elementwise work done in place on block-sized buffers,
    which roughly halves the passes over memory of the generic core. ``torch.compile`` sees
    them as opaque calls.
``softce_multi::triton_row_routine``, ``softce_multi::triton_gradient_routine``
    :func:`torch.library.triton_op` operators of :mod:`softce_multi.kernels.triton`, for CUDA
    tensors with Triton installed (imported on first use). ``torch.compile`` sees the kernels.

:func:`row_routine` and :func:`gradient_routine` choose between them by device; other modules
call them as the :class:`~softce_multi._core.RowRoutine` and
:class:`~softce_multi._core.GradientRoutine` of torch tensors.

:class:`_MaskedSoftCrossEntropyFunction` is an ``autograd.Function`` in the style that
``torch.func`` and ``torch.compile`` support (``forward`` without ``ctx``, a separate
``setup_context``, a vmap rule generated from the operators'). Its forward pass computes the
loss and, for ``"mean"`` and ``"sum"`` with logits that require grad, the logits gradient in the
same pass over the inputs. Its backward pass has two modes:

* Grad mode off (a plain ``backward()``): the logits gradient is the buffer made in forward,
  saved with ``save_for_backward`` and never written, times the upstream gradient (on the CPU
  in eager mode an upstream of exactly 1 hands the buffer over as it is). The rest (the logits
  gradient of ``"none"``, the gradient to ``target_probs``) comes from the saved per-row
  statistics through :func:`gradient_routine`.
* Grad mode on (``create_graph=True``, ``torch.func.grad``, hessians): the gradients are
  recomputed from the saved inputs with differentiable torch operations, so that derivatives of
  the gradient (gradient penalties, hessians, upstream gradients that require grad) are right.

The function has no ``jvp`` (Dynamo cannot trace one), so forward-mode differentiation is
refused by PyTorch with an error naming it.

:class:`_LinearMaskedSoftCrossEntropyFunction` and :class:`LinearMaskedSoftCrossEntropy` serve
:func:`softce_multi.linear_masked_soft_cross_entropy`: the chunked driver of
:mod:`softce_multi._linear` with :func:`row_routine`, the gradients to ``hidden``, ``weight`` and
``bias`` made in the forward pass, and the weight gradient accumulated in place (``addmm_``).
That function is differentiable once (its backward pass is ``once_differentiable``).
"""

from __future__ import annotations

from typing import Any, cast

import array_api_compat
import torch
from torch import Tensor

from softce_multi import _core, _linear, kernels
from softce_multi._types import Reduction
from softce_multi._validate import (
    check_chunk_rows,
    check_reduction,
    validate_inputs,
    validate_linear_inputs,
)

__all__ = [
    "LinearMaskedSoftCrossEntropy",
    "MaskedSoftCrossEntropy",
    "gradient_routine",
    "masked_soft_cross_entropy",
    "row_routine",
]


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
    """The loss of validated inputs, always through the autograd function.

    Without a gradient to record it records nothing; going through it even then makes PyTorch
    refuse forward-mode differentiation by name (the function has no ``jvp``) rather than lose
    the tangents.
    """
    with_logits_grad = torch.is_grad_enabled() and logits.requires_grad and reduction != "none"
    outputs = _MaskedSoftCrossEntropyFunction.apply(
        logits, target_probs, position_mask, reduction, num_valid, with_logits_grad
    )
    return outputs[0]


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
    return result.loss, cast(torch.Tensor, result.logits_grad)


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
    """:func:`softce_multi._core.forward` with the per-row work of :func:`row_routine`."""
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


# --------------------------------------------------------------------------------------------
# The routines: which operator runs the rows
# --------------------------------------------------------------------------------------------


def row_routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of torch tensors.

    :func:`softce_multi.kernels.triton.row_routine` (the ``softce_multi::triton_row_routine``
    operator) where :func:`softce_multi.kernels.use_triton` says it applies (CUDA tensors,
    Triton installed), else the ``softce_multi::torch_row_routine`` operator.
    """
    if kernels.use_triton(rows.z):
        from softce_multi.kernels import triton as triton_kernels

        return triton_kernels.row_routine(rows, with_logits_grad=with_logits_grad)
    weighted, row_max, log_sum_exp, target_sum, grad = torch_row_routine(
        rows.z, rows.p, rows.weights, rows.row_scale, with_logits_grad
    )
    saved = _core.SavedRows(row_max, log_sum_exp, target_sum)
    return _core.RowResults(weighted, saved, grad if with_logits_grad else None)


def gradient_routine(
    z: torch.Tensor,
    p: torch.Tensor,
    saved: _core.SavedRows,
    row_scale: torch.Tensor,
    /,
    *,
    logits_grad: bool,
    targets_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The :class:`~softce_multi._core.GradientRoutine` of torch tensors.

    :func:`softce_multi.kernels.triton.gradient_routine` (the
    ``softce_multi::triton_gradient_routine`` operator) where Triton applies, else the
    ``softce_multi::torch_gradient_routine`` operator.
    """
    if kernels.use_triton(z):
        from softce_multi.kernels import triton as triton_kernels

        return triton_kernels.gradient_routine(
            z, p, saved, row_scale, logits_grad=logits_grad, targets_grad=targets_grad
        )
    grad_z, grad_p = torch_gradient_routine(z, p, *saved, row_scale, logits_grad, targets_grad)
    return (grad_z if logits_grad else None, grad_p if targets_grad else None)


# --------------------------------------------------------------------------------------------
# The operators of the torch path
# --------------------------------------------------------------------------------------------


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


@torch_row_routine.register_fake
def _torch_row_routine_fake(
    z: Tensor, p: Tensor, weights: Tensor, row_scale: Tensor, with_logits_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernels.empty_row_outputs(z, weights, with_logits_grad=with_logits_grad)


@torch_gradient_routine.register_fake
def _torch_gradient_routine_fake(
    z: Tensor,
    p: Tensor,
    row_max: Tensor,
    log_sum_exp: Tensor,
    target_sum: Tensor,
    row_scale: Tensor,
    logits_grad: bool,
    targets_grad: bool,
) -> tuple[Tensor, Tensor]:
    return kernels.empty_gradient_outputs(z, p, logits_grad=logits_grad, targets_grad=targets_grad)


torch_row_routine.register_vmap(kernels.row_routine_vmap(torch_row_routine))
torch_gradient_routine.register_vmap(kernels.gradient_routine_vmap(torch_gradient_routine))


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


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class _MaskedSoftCrossEntropyFunction(torch.autograd.Function):
    """The loss as an autograd function; see the module docstring for its two backward modes.

    ``forward`` returns the loss, then what the backward pass needs and autograd must not
    differentiate: the logits gradient made in forward (``[0]`` when it was not asked for), the
    per-row scale ``d loss / d c_row`` and the :class:`~softce_multi._core.SavedRows`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        logits: Tensor,
        target_probs: Tensor,
        position_mask: Tensor,
        reduction: str,
        num_valid: Tensor | float | None,
        with_logits_grad: bool,
    ) -> tuple[Tensor, ...]:
        result = forward(
            logits,
            target_probs,
            position_mask,
            reduction=reduction,
            num_valid=num_valid,
            with_logits_grad=with_logits_grad,
        )
        logits_grad = logits.new_empty(0) if result.logits_grad is None else result.logits_grad
        return (result.loss, logits_grad, result.row_scale, *result.saved)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        logits, target_probs, _, reduction, _, with_logits_grad = inputs
        _, logits_grad, row_scale, *saved = output
        ctx.mark_non_differentiable(logits_grad, row_scale, *saved)
        ctx.set_materialize_grads(False)
        ctx.reduction = reduction
        ctx.has_logits_grad = with_logits_grad
        ctx.save_for_backward(logits, target_probs, row_scale, logits_grad, *saved)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        nothing = (None,) * 6
        if grad_loss is None:
            return nothing
        logits, target_probs, row_scale, logits_grad, *saved_rows = ctx.saved_tensors
        upstream = grad_loss.reshape(-1) if ctx.reduction == "none" else grad_loss
        wants_logits, wants_targets = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            grad_z, grad_p = _differentiable_gradients(
                logits,
                target_probs,
                row_scale,
                upstream,
                logits_grad=wants_logits,
                targets_grad=wants_targets,
            )
            return grad_z, grad_p, *nothing[2:]
        grad_z = None
        if wants_logits and ctx.has_logits_grad:
            # Never written in place: a second backward (retain_graph) finds it unchanged.
            grad_z = logits_grad if _is_one_on_the_cpu(grad_loss) else logits_grad * grad_loss
        recomputed, grad_p = _core.backward(
            logits,
            target_probs,
            _core.SavedRows(*saved_rows),
            row_scale * upstream,
            logits_grad=wants_logits and grad_z is None,
            targets_grad=wants_targets,
            gradient_routine=gradient_routine,
            xp=array_api_compat.array_namespace(logits),
        )
        return (recomputed if grad_z is None else grad_z), grad_p, *nothing[2:]


def _differentiable_gradients(
    logits: Tensor,
    target_probs: Tensor,
    row_scale: Tensor,
    upstream: Tensor,
    *,
    logits_grad: bool,
    targets_grad: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of the loss as differentiable torch operations of the inputs.

    The backward pass of a backward pass that is itself differentiated (``create_graph=True``,
    ``torch.func.grad``, hessians): ``r * (sum(p) * softmax(z) - p)`` and ``-r * log_softmax(z)``
    with ``r = row_scale * upstream``, differentiable in ``logits``, ``target_probs`` and
    ``upstream``. The values equal those of the saved statistics. Rows whose ``row_scale`` is 0
    are replaced by zeros before any arithmetic, so that whatever they hold, their gradients
    and every derivative of them are exactly 0. A row whose softmax is undefined (logits all
    -inf, or holding +inf or NaN) gets NaN, as in the core, except for a zero logits gradient
    where it has no target mass.

    Parameters
    ----------
    logits, target_probs : Tensor, shape ``[..., V]``
    row_scale : Tensor, shape ``[N]``
        ``d loss / d c_row`` for a unit upstream, ``N`` the number of positions.
    upstream : Tensor
        The upstream gradient: 0-d, or ``[N]`` for ``"none"``.
    logits_grad, targets_grad : bool
        Which gradients to compute (None for the other).
    """
    vocab_size = logits.shape[-1]
    dtype = row_scale.dtype
    live = (row_scale != 0)[:, None]
    z = torch.where(live, logits.reshape(-1, vocab_size).to(dtype), 0.0)
    p = torch.where(live, target_probs.reshape(-1, vocab_size).to(dtype), 0.0)
    defined = z.amax(dim=-1, keepdim=True).isfinite()
    log_probs = torch.log_softmax(torch.where(defined, z, 0.0), dim=-1)
    scale = (row_scale * upstream)[:, None]
    grad_z = grad_p = None
    if logits_grad:
        target_sum = p.sum(dim=-1, keepdim=True)
        rows = scale * (target_sum * torch.exp(log_probs) - p)
        rows = torch.where(defined | (target_sum == 0), rows, torch.nan)
        grad_z = rows.to(logits.dtype).reshape(logits.shape)
    if targets_grad:
        rows = torch.where(defined, -scale * log_probs, torch.nan)
        grad_p = rows.to(target_probs.dtype).reshape(target_probs.shape)
    return grad_z, grad_p


def _is_one_on_the_cpu(upstream: Tensor) -> bool:
    """Whether ``upstream`` is exactly 1, asked only where the answer is free and traceable.

    That is for a plain tensor on the CPU (no device to wait for), in eager mode
    (``torch.compile`` would break its graph on reading a value), and not batched by
    ``torch.func.vmap`` or ``is_grads_batched`` (a batch of values has no single value).
    """
    return (
        type(upstream) is torch.Tensor
        and upstream.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(upstream)
        and not torch._C._functorch.is_legacy_batchedtensor(upstream)
        and bool(upstream == 1)
    )


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


# --------------------------------------------------------------------------------------------
# The loss straight from hidden states
# --------------------------------------------------------------------------------------------


def linear_loss(
    hidden: Tensor,
    weight: Tensor,
    target_probs: Tensor,
    position_mask: Tensor,
    /,
    *,
    bias: Tensor | None,
    reduction: str,
    num_valid: Tensor | float | None,
    chunk_rows: int | None,
) -> Tensor:
    """The linear loss of validated inputs, through :class:`_LinearMaskedSoftCrossEntropyFunction`.

    For ``"mean"`` and ``"sum"``, the gradients of the inputs that require grad are computed in
    the forward pass.
    """
    wanted = (False, False, False)
    if torch.is_grad_enabled() and reduction != "none":
        wanted = (
            hidden.requires_grad,
            weight.requires_grad,
            bias is not None and bias.requires_grad,
        )
    outputs = _LinearMaskedSoftCrossEntropyFunction.apply(
        hidden,
        weight,
        bias,
        target_probs,
        position_mask,
        reduction,
        num_valid,
        chunk_rows,
        wanted,
    )
    return outputs[0]


def linear_loss_with_grad(
    hidden: Tensor,
    weight: Tensor,
    target_probs: Tensor,
    position_mask: Tensor,
    /,
    *,
    bias: Tensor | None,
    reduction: str,
    num_valid: Tensor | float | None,
    chunk_rows: int | None,
) -> tuple[Tensor, _linear.LinearGradients]:
    """The linear loss of validated inputs and its three gradients, from one chunked pass."""
    result = linear_forward(
        hidden,
        weight,
        bias,
        target_probs,
        position_mask,
        reduction=reduction,
        num_valid=num_valid,
        chunk_rows=chunk_rows,
        wanted=(True, True, bias is not None),
    )
    assert result.grads is not None  # asked for
    return result.loss, result.grads


@torch.no_grad()
def linear_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target_probs: Tensor,
    position_mask: Tensor,
    *,
    reduction: str,
    num_valid: Tensor | float | None,
    chunk_rows: int | None,
    wanted: tuple[bool, bool, bool],
) -> _linear.LinearForwardResult:
    """:func:`softce_multi._linear.forward` with :func:`row_routine` and in-place accumulation.

    ``wanted`` says which of the gradients to ``hidden``, ``weight`` and ``bias`` to compute.
    """
    return _linear.forward(
        hidden,
        weight,
        bias,
        target_probs,
        position_mask,
        reduction=reduction,
        num_valid=num_valid,
        hidden_grad=wanted[0],
        weight_grad=wanted[1],
        bias_grad=wanted[2],
        chunk_rows=chunk_rows,
        row_routine=row_routine,
        xp=array_api_compat.array_namespace(hidden),
        add=_add_product,
    )


def _add_product(total: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``total += a @ b`` in place: one pass over ``total`` where the dtypes allow it."""
    if a.dtype == total.dtype:
        return total.addmm_(a, b)
    return total.add_(a @ b)


class _LinearMaskedSoftCrossEntropyFunction(torch.autograd.Function):
    """The linear loss as an autograd function, differentiable once.

    ``forward`` returns the loss, then what the backward pass needs and autograd must not
    differentiate: the gradients to ``hidden``, ``weight`` and ``bias`` made in the forward pass
    (``[0]`` for one not made), the per-row scale and the
    :class:`~softce_multi._core.SavedRows`. The backward pass scales the gradients made in
    forward by the upstream gradient; what the forward pass could not make (every gradient of
    ``"none"``, the gradient to ``target_probs``) it computes by one more chunked pass, which
    recomputes the logits from the saved statistics.
    """

    @staticmethod
    def forward(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target_probs: Tensor,
        position_mask: Tensor,
        reduction: str,
        num_valid: Tensor | float | None,
        chunk_rows: int | None,
        wanted: tuple[bool, bool, bool],
    ) -> tuple[Tensor, ...]:
        result = linear_forward(
            hidden,
            weight,
            bias,
            target_probs,
            position_mask,
            reduction=reduction,
            num_valid=num_valid,
            chunk_rows=chunk_rows,
            wanted=wanted,
        )
        grads = result.grads or _linear.LinearGradients(None, None, None)
        made = tuple(hidden.new_empty(0) if grad is None else grad for grad in grads)
        return (result.loss, *made, result.row_scale, *result.saved)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        hidden, weight, bias, target_probs, _, reduction, _, chunk_rows, wanted = inputs
        _, *made, row_scale = output[:5]
        saved = output[5:]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.reduction = reduction
        ctx.chunk_rows = chunk_rows
        ctx.made = wanted
        ctx.save_for_backward(hidden, weight, bias, target_probs, row_scale, *made, *saved)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        nothing: tuple[None, ...] = (None,) * 9
        if grad_loss is None:
            return nothing
        hidden, weight, bias, target_probs, row_scale, *rest = ctx.saved_tensors
        made, saved = rest[:3], _core.SavedRows(*rest[3:])
        wants = ctx.needs_input_grad[:4]
        upstream = grad_loss.reshape(-1) if ctx.reduction == "none" else grad_loss
        # The gradients made in forward are those of a unit upstream (never of "none").
        scaled = any(ctx.made) and _is_one_on_the_cpu(grad_loss)
        grads: list[Tensor | None] = [
            (grad if scaled else grad * grad_loss) if want and was_made else None
            for grad, want, was_made in zip(made, wants[:3], ctx.made, strict=True)
        ]
        missing = [want and grad is None for want, grad in zip(wants[:3], grads, strict=True)]
        if any(missing) or wants[3]:
            recomputed, grad_targets = _linear.backward(
                hidden,
                weight,
                bias,
                target_probs,
                saved,
                row_scale * upstream,
                hidden_grad=missing[0],
                weight_grad=missing[1],
                bias_grad=missing[2],
                targets_grad=wants[3],
                chunk_rows=ctx.chunk_rows,
                gradient_routine=gradient_routine,
                xp=array_api_compat.array_namespace(hidden),
                add=_add_product,
            )
            if recomputed is not None:
                grads = [
                    fresh if need else grad
                    for grad, fresh, need in zip(grads, recomputed, missing, strict=True)
                ]
            return (*grads, grad_targets, *nothing[4:])
        return (*grads, *nothing[3:])


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
        bias: torch.Tensor | None = None,
        num_valid: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Return the loss; ``num_valid`` replaces the denominator of ``"mean"``."""
        validate_linear_inputs(
            hidden,
            weight,
            target_probs,
            position_mask,
            bias,
            self.reduction,
            num_valid,
            self.chunk_rows,
        )
        return linear_loss(
            hidden,
            weight,
            target_probs,
            position_mask,
            bias=bias,
            reduction=self.reduction,
            num_valid=num_valid,
            chunk_rows=self.chunk_rows,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, chunk_rows={self.chunk_rows!r}"
