"""PyTorch adapter: custom operators for the per-row work and autograd functions around them.

The core's driver (:func:`softce_multi._core.loss_pass` and
:func:`softce_multi._core.gradient_pass`) lays out the rows and reduces the losses; the per-row work
in between runs in custom operators (``torch.library``), each with a fake implementation (shapes and
dtypes only) and a vmap rule (the batch is folded into the rows):

``softce_multi::torch_row_routine``, ``softce_multi::torch_gradient_routine``
    :func:`torch.library.custom_op` operators for the CPU (and any device where Triton does not
    run): the core's two steps with the elementwise work done in place on block-sized buffers,
    which roughly halves the passes over memory of the generic core. ``torch.compile`` sees
    them as opaque calls.
``softce_multi::triton_row_routine``, ``softce_multi::triton_gradient_routine``
    :func:`torch.library.triton_op` operators of :mod:`softce_multi.kernels.triton`, for CUDA
    tensors with Triton installed (imported on first use). ``torch.compile`` sees the kernels.

:func:`~softce_multi._adapters.torch_shared.row_routine` and
:func:`~softce_multi._adapters.torch_shared.gradient_routine` choose between them by device.
``softce_multi::loss_forward`` (:func:`loss_forward`) is the forward pass of the autograd
function below as one operator, whose autograd formula is the function's: ``torch.export``,
which keeps operators and not autograd functions, exports the loss as it.

:class:`_MaskedSoftCrossEntropyFunction` is an ``autograd.Function`` in the style that
``torch.func`` and ``torch.compile`` support (``forward`` without ``ctx``, a separate
``setup_context``, a vmap rule generated from the operators'). Its forward pass computes the
loss and, for ``"mean"`` and ``"sum"`` with logits that require grad, the logits gradient in the
same pass over the inputs. Its backward pass has two modes:

* Grad mode off (a plain ``backward()``): the logits gradient is the buffer made in forward,
  saved with ``save_for_backward``, times the upstream gradient (on the CPU in eager mode an
  upstream of exactly 1 hands the buffer over as it is). The forward pass makes a 16-bit
  buffer only where :func:`_rewritable_for_upstream` says so (the Triton kernels, eager, dense
  targets); the backward pass turns it into the upstream's in place (:func:`_for_upstream`)
  where no graph is kept. The rest (the logits gradient of ``"none"``, the gradient to
  ``target_probs``) comes from the saved per-row statistics through the gradient routine.
* Grad mode on (``create_graph=True``, ``torch.func.grad``, hessians): the gradients are
  recomputed from the saved inputs with differentiable torch operations, so that derivatives of
  the gradient (gradient penalties, hessians, upstream gradients that require grad) are right.

The function has no ``jvp`` (Dynamo cannot trace one), so forward-mode differentiation is
refused, by :func:`~softce_multi._adapters.torch_shared.refuse_forward_mode` naming the loss.

Like every adapter (:class:`~softce_multi._core.Adapter`), the module has ``loss`` and
``loss_with_grad`` of validated inputs, and ``linear_loss`` and ``linear_loss_with_grad``, which
are those of :mod:`softce_multi._adapters.torch_linear` (the chunked driver of
:mod:`softce_multi._linear` in two operators). Importing it registers every operator. Its public
face is :mod:`softce_multi.torch`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import array_api_compat.torch as torch_namespace
import torch
from torch import Tensor

from softce_multi import _core, kernels
from softce_multi._adapters.torch_linear import linear_loss, linear_loss_with_grad
from softce_multi._adapters.torch_shared import (
    exporting,
    gradient_routine,
    indexable_ids,
    plain_and_eager,
    refuse_forward_mode,
    row_routine,
    scaled_by_upstream,
    scaled_exactly,
    traced_input,
    traced_num_valid,
)
from softce_multi._types import LossInputs
from softce_multi.kernels import torch_sparse

__all__ = ["linear_loss", "linear_loss_with_grad", "loss", "loss_with_grad"]


def loss(inputs: LossInputs, /) -> torch.Tensor:
    """The loss of validated inputs, always through the autograd function.

    Without a gradient to record it records nothing; going through it even then makes PyTorch
    refuse forward-mode differentiation by name (the function has no ``jvp``) rather than lose
    the tangents. Under ``torch.export`` it calls the operator :func:`loss_forward`, whose
    autograd formula is the function's: an exported program keeps operators, not autograd
    functions.
    """
    inputs = _with_indexable_ids(inputs)
    logits, reduction = inputs.logits, inputs.reduction
    refuse_forward_mode("masked_soft_cross_entropy", logits, inputs.target_probs)
    with_logits_grad = (
        torch.is_grad_enabled()
        and logits.requires_grad
        and reduction != "none"
        and (scaled_exactly(logits) or _rewritable_for_upstream(logits, inputs.target_ids))
    )
    if exporting():
        return _exported_loss(inputs, with_logits_grad=with_logits_grad)
    outputs = _MaskedSoftCrossEntropyFunction.apply(*inputs, with_logits_grad)
    return outputs[0]


def _rewritable_for_upstream(logits: Tensor, target_ids: Tensor | None) -> bool:
    """Whether a 16-bit logits gradient made in the forward pass for an upstream of 1 can be
    turned into that of the upstream in the backward pass, in place and rounded once
    (:func:`~softce_multi.kernels.triton.rewrite_for_upstream_`): dense targets on the Triton
    kernels, in eager mode, outside the ``torch.func`` transforms."""
    return target_ids is None and kernels.use_triton(logits) and plain_and_eager(logits)


def _for_upstream(
    logits: Tensor,
    target_probs: Tensor,
    logits_grad: Tensor,
    saved_rows: Sequence[Tensor],
    row_scale: Tensor,
    grad_loss: Tensor,
) -> Tensor:
    """``logits_grad``, made in the forward pass for an upstream of 1, made that of
    ``grad_loss`` (0-d) in place on the device, where the backward pass keeps no graph (no
    later backward pass reads it again); returned as the logits gradient."""
    from softce_multi.kernels import triton as triton_kernels

    vocab_size = logits.shape[-1]
    triton_kernels.rewrite_for_upstream_(
        logits_grad.view(-1, vocab_size),
        logits.reshape(-1, vocab_size),
        target_probs.reshape(-1, vocab_size),
        _core.SavedRows(*saved_rows),
        row_scale,
        grad_loss,
    )
    return logits_grad


def loss_with_grad(inputs: LossInputs, /) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of validated inputs and its logits gradient, from one pass (no autograd)."""
    inputs = _with_indexable_ids(inputs)
    result = _loss_pass(inputs, with_logits_grad=True)
    return result.loss, cast(torch.Tensor, result.logits_grad)


def _with_indexable_ids(inputs: LossInputs) -> LossInputs:
    """``inputs`` with ``target_ids`` as PyTorch indexes with them, and ``logits``,
    ``target_probs`` and ``num_valid`` as :func:`~softce_multi._adapters.torch_shared.traced_input`
    and :func:`~softce_multi._adapters.torch_shared.traced_num_valid` make them, built field by
    field: Dynamo before torch 2.11 traces neither ``NamedTuple._replace`` nor a star-argument
    construction."""
    logits, target_probs, position_mask, reduction, num_valid, target_ids = inputs
    ids = indexable_ids(target_ids)
    logits, target_probs = (
        cast(Tensor, traced_input(logits)),
        cast(Tensor, traced_input(target_probs)),
    )
    dtype = _core.compute_dtype(logits, target_probs, xp=torch)
    num_valid = traced_num_valid(num_valid, logits, dtype)
    return LossInputs(logits, target_probs, position_mask, reduction, num_valid, ids)


@torch.no_grad()
def _loss_pass(inputs: LossInputs, /, *, with_logits_grad: bool) -> _core.ForwardResult:
    """The core's loss pass (:func:`softce_multi._core.loss_pass`) over torch rows, with the
    per-row work of :func:`~softce_multi._adapters.torch_shared.row_routine`."""
    sparse = inputs.target_ids is not None
    return _core.loss_pass(
        inputs.logits,
        inputs.target_probs,
        inputs.position_mask,
        reduction=inputs.reduction,
        num_valid=inputs.num_valid,
        with_logits_grad=with_logits_grad,
        row_routine=torch_sparse.row_routine if sparse else row_routine,
        xp=torch_namespace,
        target_ids=inputs.target_ids,
    )


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
        target_ids: Tensor | None,
        with_logits_grad: bool,
    ) -> tuple[Tensor, ...]:
        inputs = LossInputs(logits, target_probs, position_mask, reduction, num_valid, target_ids)
        result = _loss_pass(inputs, with_logits_grad=with_logits_grad)
        logits_grad = logits.new_empty(0) if result.logits_grad is None else result.logits_grad
        return (result.loss, logits_grad, result.row_scale, *result.saved)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        logits, target_probs, _, reduction, _, target_ids, with_logits_grad = inputs
        _, logits_grad, row_scale, *saved = output
        ctx.mark_non_differentiable(logits_grad, row_scale, *saved)
        ctx.set_materialize_grads(False)
        ctx.reduction = reduction
        ctx.has_logits_grad = with_logits_grad
        ctx.sparse = target_ids is not None
        ids = target_ids if ctx.sparse else logits.new_empty(0)
        ctx.save_for_backward(logits, target_probs, ids, row_scale, logits_grad, *saved)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        nothing = (None,) * 7
        if grad_loss is None:
            return nothing
        logits, target_probs, ids, row_scale, logits_grad, *saved_rows = ctx.saved_tensors
        target_ids = ids if ctx.sparse else None
        upstream = _core.upstream_per_row(grad_loss, ctx.reduction, xp=torch)
        wants_logits, wants_targets = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            grad_z, grad_p = _differentiable_gradients(
                logits,
                target_probs,
                row_scale,
                upstream,
                logits_grad=wants_logits,
                targets_grad=wants_targets,
                target_ids=target_ids,
            )
            return grad_z, grad_p, *nothing[2:]
        grad_z = None
        if wants_logits and ctx.has_logits_grad:
            if scaled_exactly(logits):
                grad_z = scaled_by_upstream(logits_grad, grad_loss)
            elif (
                plain_and_eager(grad_loss)
                and not torch._C._autograd._get_current_graph_task_keep_graph()
            ):
                grad_z = _for_upstream(
                    logits, target_probs, logits_grad, saved_rows, row_scale, grad_loss
                )
            # Else (a graph kept, a batched upstream, a compiled backward pass) the 16-bit
            # gradient is computed again below, into a new tensor.
        recomputed, grad_p = _core.gradient_pass(
            logits,
            target_probs,
            _core.SavedRows(*saved_rows),
            _core.upstream_row_scale(row_scale, upstream, xp=torch_namespace),
            logits_grad=wants_logits and grad_z is None,
            targets_grad=wants_targets,
            gradient_routine=torch_sparse.gradient_routine if ctx.sparse else gradient_routine,
            xp=torch_namespace,
            target_ids=target_ids,
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
    target_ids: Tensor | None = None,
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
    target_ids : Tensor, shape ``[..., K]``, optional
        The ids of sparse targets (``target_probs`` is then ``[..., K]``). This path, for
        derivatives of the gradient only, scatters them into dense ``[N, V]`` targets and
        gathers the targets gradient back at the ids.
    """
    vocab_size = logits.shape[-1]
    dtype = row_scale.dtype
    live = (row_scale != 0)[:, None]
    z = torch.where(live, logits.reshape(-1, vocab_size).to(dtype), 0.0)
    probs = target_probs.reshape(-1, target_probs.shape[-1]).to(dtype)
    if target_ids is not None:
        ids = target_ids.reshape(probs.shape).long()
        valid = (ids >= 0) & (ids < vocab_size)
        mass = torch.where(probs == 0, 0.0, torch.where(valid, probs, torch.nan))
        safe_ids = torch.where(valid, ids, 0)
        probs = torch.zeros_like(z).scatter_add(1, safe_ids, mass)
    p = torch.where(live, probs, 0.0)
    defined = z.amax(dim=-1, keepdim=True).isfinite()
    z = torch.where(defined, z, 0.0)
    scale = _core.upstream_row_scale(row_scale, upstream, xp=torch_namespace)[:, None]
    grad_z = grad_p = None
    if logits_grad:
        target_sum = p.sum(dim=-1, keepdim=True)
        # softmax, not exp(log_softmax): one rounded exponential per entry.
        rows = scale * (target_sum * torch.softmax(z, dim=-1) - p)
        rows = torch.where(defined | (target_sum == 0), rows, torch.nan)
        grad_z = rows.to(logits.dtype).reshape(logits.shape)
    if targets_grad:
        rows = torch.where(defined, -scale * torch.log_softmax(z, dim=-1), torch.nan)
        if target_ids is not None:
            sparse_probs = target_probs.reshape(-1, target_probs.shape[-1])
            rows = rows.gather(1, safe_ids)
            rows = torch.where(valid, rows, torch.where(sparse_probs == 0, 0.0, torch.nan))
        grad_p = rows.to(target_probs.dtype).reshape(target_probs.shape)
    return grad_z, grad_p


def _exported_loss(inputs: LossInputs, /, *, with_logits_grad: bool) -> Tensor:
    """The loss through :func:`loss_forward`, ``num_valid`` split into a tensor and a number."""
    logits, target_probs, position_mask, reduction, num_valid, target_ids = inputs
    is_tensor = isinstance(num_valid, Tensor)
    number = None if is_tensor or num_valid is None else float(num_valid)
    return loss_forward(
        logits,
        target_probs,
        position_mask,
        target_ids,
        num_valid if is_tensor else None,
        number,
        reduction,
        with_logits_grad,
    )[0]


@torch.library.custom_op("softce_multi::loss_forward", mutates_args=())
def loss_forward(
    logits: Tensor,
    target_probs: Tensor,
    position_mask: Tensor,
    target_ids: Tensor | None,
    num_valid: Tensor | None,
    num_valid_number: float | None,
    reduction: str,
    with_logits_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward pass of :class:`_MaskedSoftCrossEntropyFunction` as one operator, for
    ``torch.export``, which keeps operators and not autograd functions; its autograd formula is
    the function's ``setup_context`` and ``backward``.

    ``num_valid`` comes as a tensor or as a number (``num_valid_number``), None for both
    without it; the other arguments and the outputs are those of the function.
    """
    count = num_valid if num_valid is not None else num_valid_number
    return _MaskedSoftCrossEntropyFunction.forward(  # type: ignore[return-value]
        logits, target_probs, position_mask, reduction, count, target_ids, with_logits_grad
    )


@loss_forward.register_fake
def _(
    logits: Tensor,
    target_probs: Tensor,
    position_mask: Tensor,
    target_ids: Tensor | None,
    num_valid: Tensor | None,
    num_valid_number: float | None,
    reduction: str,
    with_logits_grad: bool,
) -> tuple[Tensor, ...]:
    dtype = _core.compute_dtype(logits, target_probs, xp=torch)
    batch_shape = logits.shape[:-1]
    loss = logits.new_empty(batch_shape if reduction == "none" else (), dtype=dtype)
    logits_grad = logits.new_empty(logits.shape if with_logits_grad else (0,))
    rows = [logits.new_empty(math.prod(batch_shape), dtype=dtype) for _ in range(4)]
    return (loss, logits_grad, *rows)


def _setup_loss_forward(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    """The autograd context of :func:`loss_forward`: that of the autograd function, whose
    inputs come in another order."""
    logits, target_probs, position_mask, target_ids, _, _, reduction, with_logits_grad = inputs
    function_inputs = (logits, target_probs, position_mask, reduction, None, target_ids)
    _MaskedSoftCrossEntropyFunction.setup_context(ctx, (*function_inputs, with_logits_grad), output)


def _loss_forward_backward(ctx: Any, *grad_outputs: Any) -> tuple[Any, ...]:
    """The backward pass of :func:`loss_forward`: that of the autograd function, whose
    gradients to ``logits`` and ``target_probs`` are the first two of either."""
    grads = _MaskedSoftCrossEntropyFunction.backward(ctx, *grad_outputs)
    return (*grads[:2], None, None, None, None, None, None)


loss_forward.register_autograd(_loss_forward_backward, setup_context=_setup_loss_forward)
