"""The torch adapter of the linear loss: two operators and an autograd function around them.

The chunked driver of :mod:`softce_multi._linear` runs inside two :func:`torch.library.custom_op`
operators, so that ``torch.compile`` traces the loss as one call whatever the number of
chunks, each with a fake implementation (shapes and dtypes only):

``softce_multi::linear_forward``
    :func:`linear_forward`: the loss and, where asked for, the gradients to ``hidden``,
    ``weight`` and ``bias`` for a unit upstream gradient, from one chunked pass. Every chunk's
    logits go into one buffer (:class:`~softce_multi._adapters.torch_shared.LogitsBuffer`), the
    in-place row routine of
    :func:`~softce_multi._adapters.torch_shared.kernels_for` them writes their gradient over
    them, and the weight gradient is accumulated in place (``addmm_``).
``softce_multi::linear_backward``
    :func:`linear_backward`: the gradients the forward pass did not make (those of ``"none"``,
    of 16-bit inputs, the gradient to ``target_probs``), the logits recomputed chunk by chunk.

:class:`_LinearMaskedSoftCrossEntropyFunction` calls them; it is differentiable once (its
backward pass is :func:`~softce_multi._adapters.torch_shared.differentiable_once`). Its
``setup_context`` and ``backward`` are also the autograd formula registered for
``softce_multi::linear_forward``, which ``torch.export`` calls directly: an exported program
keeps operators, not autograd functions.
:func:`linear_loss` and :func:`linear_loss_with_grad` are the two linear functions of the torch
adapter (:mod:`softce_multi._adapters.torch`).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, cast

import array_api_compat.torch as torch_namespace
import torch
from torch import Tensor

from softce_multi import _core, _linear
from softce_multi._adapters.torch_shared import (
    LogitsBuffer,
    add_product,
    autocast_dtype,
    differentiable_once,
    exporting,
    indexable_ids,
    kernels_for,
    refuse_forward_mode,
    refused_vmap,
    scaled_by_upstream,
    scaled_exactly,
    traced_input,
    traced_num_valid,
)
from softce_multi._types import LinearGradients, LinearLossInputs
from softce_multi.kernels import torch_sparse


def linear_loss(inputs: LinearLossInputs, /) -> Tensor:
    """The linear loss of validated inputs, through :class:`_LinearMaskedSoftCrossEntropyFunction`.

    For ``"mean"`` and ``"sum"``, the gradients of the inputs that require grad are computed in
    the forward pass, when scaling them by the upstream gradient later rounds nothing twice
    (:func:`scaled_exactly`: no 16-bit input, no 16-bit logits); otherwise the backward pass
    computes them with the upstream gradient inside. Under ``torch.autocast`` the chunks'
    matmuls run in the autocast dtype (:func:`autocast_dtype`). Under ``torch.export`` it calls
    :func:`linear_forward` directly, whose registered autograd formula is that of the function.
    """
    arguments = _operator_arguments(inputs)
    hidden, weight, bias = arguments[:3]
    refuse_forward_mode("linear_masked_soft_cross_entropy", hidden, weight, bias, arguments[3])
    matmul_dtype = arguments[-1]
    wanted = (False, False, False)
    if (
        torch.is_grad_enabled()
        and inputs.reduction != "none"
        and scaled_exactly(*(x for x in (hidden, weight, bias) if x is not None))
        and (matmul_dtype is None or matmul_dtype.itemsize >= 4)
    ):
        with_bias_grad = bias is not None and bias.requires_grad
        wanted = (hidden.requires_grad, weight.requires_grad, with_bias_grad)
    if exporting():
        # The operator itself, whose autograd formula is the function's: an exported program
        # then asks at run time which inputs require grad, not at export time.
        return linear_forward(*arguments, *wanted)[0]
    return _LinearMaskedSoftCrossEntropyFunction.apply(*arguments, wanted)[0]


def linear_loss_with_grad(inputs: LinearLossInputs, /) -> tuple[Tensor, LinearGradients]:
    """The linear loss of validated inputs and its three gradients, from one chunked pass."""
    with_bias = inputs.bias is not None
    loss, *grads = linear_forward(*_operator_arguments(inputs), True, True, with_bias)[:4]
    return loss, LinearGradients(grads[0], grads[1], grads[2] if with_bias else None)


def _operator_arguments(inputs: LinearLossInputs) -> tuple[Any, ...]:
    """The arguments of :func:`linear_forward` before its three flags, from validated inputs.

    ``num_valid`` goes in as a tensor or as a number, two arguments: an operator's schema
    takes no union of the two. Under ``torch.compile`` a Python number goes in as a tensor
    (:func:`traced_num_valid`): as an operator's number it would be compiled into the graph;
    and the four tensors that may require grad go in as :func:`traced_input` makes them. The
    last argument is the :func:`autocast_dtype` of the matmuls.
    """
    hidden, weight = (
        cast(Tensor, traced_input(inputs.hidden)),
        cast(Tensor, traced_input(inputs.weight)),
    )
    bias, target_probs = traced_input(inputs.bias), cast(Tensor, traced_input(inputs.target_probs))
    position_mask, reduction, chunk_rows = inputs.position_mask, inputs.reduction, inputs.chunk_rows
    dtype = _core.compute_dtype(hidden, weight, bias, target_probs, xp=torch)
    num_valid = traced_num_valid(inputs.num_valid, hidden, dtype)
    is_tensor = isinstance(num_valid, Tensor)
    if chunk_rows is not None:  # an operator's int has 64 bits; more rows than N are N
        chunk_rows = min(chunk_rows, max(math.prod(hidden.shape[:-1]), 1))
    return (
        hidden,
        weight,
        bias,
        target_probs,
        indexable_ids(inputs.target_ids),
        position_mask,
        num_valid if is_tensor else None,
        None if is_tensor or num_valid is None else float(num_valid),
        reduction,
        chunk_rows,
        autocast_dtype(*(x for x in (hidden, weight, bias) if x is not None)),
    )


@torch.library.custom_op("softce_multi::linear_forward", mutates_args=())
def linear_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target_probs: Tensor,
    target_ids: Tensor | None,
    position_mask: Tensor,
    num_valid: Tensor | None,
    num_valid_number: float | None,
    reduction: str,
    chunk_rows: int | None,
    matmul_dtype: torch.dtype | None,
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunked pass of the linear loss, as the operator ``softce_multi::linear_forward``.

    :func:`softce_multi._linear.chunked_loss_pass` in place where torch allows it: every chunk's
    logits go into one buffer (:class:`LogitsBuffer`), the row routine of :func:`kernels_for` them
    writes their gradient over them (``row_routine_over_logits``), so a chunk holds one
    ``[chunk, V]`` tensor, and the weight gradient is accumulated in place. One opaque operator,
    so that ``torch.compile`` traces the loss as one call, whatever the number of chunks.

    Parameters
    ----------
    hidden, weight, bias, target_probs, target_ids, position_mask, reduction, chunk_rows
        Validated inputs, as in :func:`softce_multi.linear_masked_soft_cross_entropy`
        (``target_ids`` None for dense targets).
    num_valid, num_valid_number
        ``num_valid`` as a tensor or as a number; None for both without it.
    matmul_dtype
        The dtype of the chunks' matmuls (the :func:`autocast_dtype`), or None for the dtype
        of ``hidden @ weight.T + bias``. The row math is float32 (float64) either way, and
        the gradients come back in the dtypes of their inputs.
    hidden_grad, weight_grad, bias_grad
        Which gradients to compute, for a unit upstream gradient (not with ``"none"``).

    Returns
    -------
    tuple of Tensor
        The loss; the gradients to ``hidden``, ``weight`` and ``bias`` (``[0]`` for one not
        asked for); the ``[N]`` row scale and the three ``[N]``
        :class:`~softce_multi._core.SavedRows`.
    """
    inputs = LinearLossInputs(
        hidden,
        weight,
        bias,
        target_probs,
        position_mask,
        reduction,
        num_valid if num_valid is not None else num_valid_number,
        chunk_rows,
        target_ids,
    )
    buffer = LogitsBuffer()
    with torch.no_grad(), _explicit_dtypes(hidden):
        result = _linear.chunked_loss_pass(
            inputs,
            hidden_grad=hidden_grad,
            weight_grad=weight_grad,
            bias_grad=bias_grad,
            row_routine=_routines(hidden, target_ids).row_routine_over_logits,
            xp=torch_namespace,
            add=add_product,
            logits=buffer,
            logits_copies=1,
            matmul_dtype=matmul_dtype,
            finish=False,
        )
    grads = _finished(hidden, weight, bias, result.grads, buffer)
    made = tuple(hidden.new_empty(0) if grad is None else grad for grad in grads)
    return (result.loss, *made, result.row_scale, *result.saved)


@linear_forward.register_fake
def _(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target_probs: Tensor,
    target_ids: Tensor | None,
    position_mask: Tensor,
    num_valid: Tensor | None,
    num_valid_number: float | None,
    reduction: str,
    chunk_rows: int | None,
    matmul_dtype: torch.dtype | None,
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, ...]:
    dtype = _core.compute_dtype(hidden, weight, bias, target_probs, xp=torch)
    batch_shape = hidden.shape[:-1]
    loss = hidden.new_empty(batch_shape if reduction == "none" else (), dtype=dtype)
    grads = _empty_linear_gradients(hidden, weight, bias, (hidden_grad, weight_grad, bias_grad))
    rows = [hidden.new_empty(math.prod(batch_shape), dtype=dtype) for _ in range(4)]
    return (loss, *grads, *rows)


@torch.library.custom_op("softce_multi::linear_backward", mutates_args=())
def linear_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target_probs: Tensor,
    target_ids: Tensor | None,
    row_max: Tensor,
    log_sum_exp: Tensor,
    target_sum: Tensor,
    row_scale: Tensor,
    chunk_rows: int | None,
    matmul_dtype: torch.dtype | None,
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    targets_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The chunked backward pass of the linear loss, as ``softce_multi::linear_backward``.

    :func:`softce_multi._linear.chunked_gradient_pass` with the chunks and logits of
    :func:`linear_forward`, to the last bit (its saved statistics are theirs), and the logits
    gradient of each chunk written over its logits (``gradient_routine_over_logits``). ``row_scale``
    is ``d loss / d c_row`` times the upstream gradient, which so enters every gradient before its
    one rounding. Returns the gradients to ``hidden``, ``weight``, ``bias`` and ``target_probs``,
    ``[0]`` for one not asked for.
    """
    buffer = LogitsBuffer()
    with torch.no_grad(), _explicit_dtypes(hidden):
        sums, grad_targets = _linear.chunked_gradient_pass(
            hidden,
            weight,
            bias,
            target_probs,
            _core.SavedRows(row_max, log_sum_exp, target_sum),
            row_scale,
            hidden_grad=hidden_grad,
            weight_grad=weight_grad,
            bias_grad=bias_grad and bias is not None,
            targets_grad=targets_grad,
            chunk_rows=chunk_rows,
            gradient_routine=_routines(hidden, target_ids).gradient_routine_over_logits,
            xp=torch_namespace,
            add=add_product,
            logits=buffer,
            logits_copies=1,
            matmul_dtype=matmul_dtype,
            target_ids=target_ids,
            finish=False,
        )
    made = _finished(hidden, weight, bias, sums, buffer)
    return tuple(  # type: ignore[return-value]
        hidden.new_empty(0) if grad is None else grad for grad in (*made, grad_targets)
    )


@linear_backward.register_fake
def _(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target_probs: Tensor,
    target_ids: Tensor | None,
    row_max: Tensor,
    log_sum_exp: Tensor,
    target_sum: Tensor,
    row_scale: Tensor,
    chunk_rows: int | None,
    matmul_dtype: torch.dtype | None,
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    targets_grad: bool,
) -> tuple[Tensor, ...]:
    grads = _empty_linear_gradients(hidden, weight, bias, (hidden_grad, weight_grad, bias_grad))
    grad_targets = target_probs.new_empty(target_probs.shape if targets_grad else (0,))
    return (*grads, grad_targets)


def _finished(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    sums: LinearGradients | None,
    buffer: LogitsBuffer,
) -> LinearGradients:
    """The summed gradients of a chunked pass in their inputs' dtypes, made after the chunks'
    logits ``buffer`` is freed: the 16-bit copy of a float32 weight gradient then takes its
    place rather than adding to it."""
    buffer.release()
    if sums is None:
        return LinearGradients(None, None, None)
    return _linear.finish_gradients(hidden, weight, bias, sums, xp=torch_namespace)


def _routines(hidden: Tensor, target_ids: Tensor | None) -> ModuleType:
    """The kernel module whose in-place routines run the chunks: that of sparse targets
    (:mod:`softce_multi.kernels.torch_sparse`) with ``target_ids``, else :func:`kernels_for`."""
    return kernels_for(hidden) if target_ids is None else torch_sparse


def _explicit_dtypes(tensor: Tensor) -> Any:
    """Autocast off on the tensor's device type: inside the operators every matmul runs in the
    dtype chosen for it (``matmul_dtype``), whatever the caller's autocast."""
    return torch.autocast(tensor.device.type, enabled=False)


def _empty_linear_gradients(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, wanted: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised gradients to ``hidden``, ``weight`` and ``bias`` as the linear operators
    return them: each in its input's shape and dtype where ``wanted``, else ``[0]`` of the
    dtype of ``hidden``."""
    return tuple(  # type: ignore[return-value]
        x.new_empty(x.shape) if want and x is not None else hidden.new_empty(0)
        for x, want in zip((hidden, weight, bias), wanted, strict=True)
    )


class _LinearMaskedSoftCrossEntropyFunction(torch.autograd.Function):
    """The linear loss as an autograd function, differentiable once.

    ``forward`` runs the operator :func:`linear_forward` and returns its outputs: the loss,
    then what the backward pass needs and autograd must not differentiate (the gradients made
    in the forward pass, the row scale and the saved rows). The backward pass scales the
    gradients made in forward by the upstream gradient; what the forward pass did not make
    (every gradient of ``"none"`` or of 16-bit inputs, the gradient to ``target_probs``) it
    computes with :func:`linear_backward`, which recomputes the logits chunk by chunk.
    """

    vmap = refused_vmap("linear_masked_soft_cross_entropy")

    @staticmethod
    def forward(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target_probs: Tensor,
        target_ids: Tensor | None,
        position_mask: Tensor,
        num_valid: Tensor | None,
        num_valid_number: float | None,
        reduction: str,
        chunk_rows: int | None,
        matmul_dtype: torch.dtype | None,
        wanted: tuple[bool, bool, bool],
    ) -> tuple[Tensor, ...]:
        return tuple(
            linear_forward(
                hidden,
                weight,
                bias,
                target_probs,
                target_ids,
                position_mask,
                num_valid,
                num_valid_number,
                reduction,
                chunk_rows,
                matmul_dtype,
                *wanted,
            )
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        hidden, weight, bias, target_probs, target_ids = inputs[:5]
        reduction, chunk_rows, matmul_dtype, wanted = inputs[8:]
        _, *made, row_scale = output[:5]
        saved = output[5:]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.reduction = reduction
        ctx.chunk_rows = chunk_rows
        ctx.matmul_dtype = matmul_dtype
        ctx.made = wanted
        ctx.sparse = target_ids is not None
        ids = target_ids if ctx.sparse else hidden.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, target_probs, ids, row_scale, *made, *saved)

    @staticmethod
    @differentiable_once
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        nothing: tuple[None, ...] = (None,) * 12
        if grad_loss is None:
            return nothing
        hidden, weight, bias, target_probs, ids, row_scale, *rest = ctx.saved_tensors
        made, saved = rest[:3], rest[3:]
        wants = ctx.needs_input_grad[:4]
        upstream = _core.upstream_per_row(grad_loss, ctx.reduction, xp=torch)
        # The gradients made in forward are those of a unit upstream (never of "none").
        grads: list[Tensor | None] = [
            scaled_by_upstream(grad, grad_loss) if want and was_made else None
            for grad, want, was_made in zip(made, wants[:3], ctx.made, strict=True)
        ]
        missing = [want and grad is None for want, grad in zip(wants[:3], grads, strict=True)]
        if not (any(missing) or wants[3]):
            return (*grads, *nothing[3:])
        recomputed = linear_backward(
            hidden,
            weight,
            bias,
            target_probs,
            ids if ctx.sparse else None,
            *saved,
            _core.upstream_row_scale(row_scale, upstream, xp=torch_namespace),
            ctx.chunk_rows,
            ctx.matmul_dtype,
            *missing,
            wants[3],
        )
        grads = [
            fresh if need else grad
            for grad, fresh, need in zip(grads, recomputed[:3], missing, strict=True)
        ]
        return (*grads, recomputed[3] if wants[3] else None, *nothing[4:])


def _setup_linear_forward(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    """The autograd context of :func:`linear_forward`: that of
    :class:`_LinearMaskedSoftCrossEntropyFunction`, whose last input is the operator's three
    flags as one tuple."""
    _LinearMaskedSoftCrossEntropyFunction.setup_context(
        ctx, (*inputs[:11], tuple(inputs[11:])), output
    )


def _linear_forward_backward(ctx: Any, *grad_outputs: Any) -> tuple[Any, ...]:
    """The backward pass of :func:`linear_forward`: that of the autograd function, with no
    gradient for each of the three flags."""
    grads = _LinearMaskedSoftCrossEntropyFunction.backward(ctx, *grad_outputs)
    return (*grads[:11], None, None, None)


linear_forward.register_autograd(_linear_forward_backward, setup_context=_setup_linear_forward)
