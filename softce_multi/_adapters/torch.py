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
That function is differentiable once (its backward pass is :func:`differentiable_once`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any, cast

import array_api_compat
import torch
from torch import Tensor

from softce_multi import _core, _linear, kernels
from softce_multi._types import LinearLossInputs, LossInputs, Reduction
from softce_multi._validate import (
    check_chunk_rows,
    check_reduction,
    validate_inputs,
    validate_linear_inputs,
)
from softce_multi.kernels import torch_cpu

__all__ = [
    "LinearMaskedSoftCrossEntropy",
    "MaskedSoftCrossEntropy",
    "gradient_routine",
    "kernels_for",
    "masked_soft_cross_entropy",
    "row_routine",
]


def masked_soft_cross_entropy(
    logits: torch.Tensor,
    target_probs: torch.Tensor,
    position_mask: torch.Tensor,
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
    inputs = LossInputs(logits, target_probs, position_mask, reduction, num_valid)
    validate_inputs(inputs)
    return loss(inputs)


def loss(inputs: LossInputs, /) -> torch.Tensor:
    """The loss of validated inputs, always through the autograd function.

    Without a gradient to record it records nothing; going through it even then makes PyTorch
    refuse forward-mode differentiation by name (the function has no ``jvp``) rather than lose
    the tangents.
    """
    logits, reduction = inputs.logits, inputs.reduction
    with_logits_grad = (
        torch.is_grad_enabled()
        and logits.requires_grad
        and reduction != "none"
        and _scaled_exactly(logits)
    )
    outputs = _MaskedSoftCrossEntropyFunction.apply(*inputs, with_logits_grad)
    return outputs[0]


def loss_with_grad(inputs: LossInputs, /) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of validated inputs and its logits gradient, from one pass (no autograd)."""
    result = forward(inputs, with_logits_grad=True)
    return result.loss, cast(torch.Tensor, result.logits_grad)


@torch.no_grad()
def forward(inputs: LossInputs, /, *, with_logits_grad: bool) -> _core.ForwardResult:
    """:func:`softce_multi._core.forward` with the per-row work of :func:`row_routine`."""
    return _core.forward(
        *inputs[:3],
        reduction=inputs.reduction,
        num_valid=inputs.num_valid,
        with_logits_grad=with_logits_grad,
        row_routine=row_routine,
        xp=array_api_compat.array_namespace(inputs.logits),
    )


# --------------------------------------------------------------------------------------------
# The routines: which operator runs the rows
# --------------------------------------------------------------------------------------------


def row_routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of torch tensors: that of :func:`kernels_for`."""
    return kernels_for(rows.z).row_routine(rows, with_logits_grad=with_logits_grad)


def gradient_routine(
    rows: _core.BackwardRows, /, *, logits_grad: bool, targets_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The :class:`~softce_multi._core.GradientRoutine` of :func:`kernels_for` the logits."""
    return kernels_for(rows.z).gradient_routine(
        rows, logits_grad=logits_grad, targets_grad=targets_grad
    )


def kernels_for(z: torch.Tensor) -> ModuleType:
    """The kernel module that runs the rows of ``z``.

    :mod:`softce_multi.kernels.triton` (imported on first use) where
    :func:`softce_multi.kernels.use_triton` says it applies (CUDA tensors, Triton installed),
    else :mod:`softce_multi.kernels.torch_cpu`.
    """
    if kernels.use_triton(z):
        from softce_multi.kernels import triton as triton_kernels

        return triton_kernels
    return torch_cpu


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
        inputs = LossInputs(logits, target_probs, position_mask, reduction, num_valid)
        result = forward(inputs, with_logits_grad=with_logits_grad)
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
    z = torch.where(defined, z, 0.0)
    scale = (row_scale * upstream)[:, None]
    grad_z = grad_p = None
    if logits_grad:
        target_sum = p.sum(dim=-1, keepdim=True)
        # softmax, not exp(log_softmax): one rounded exponential per entry.
        rows = scale * (target_sum * torch.softmax(z, dim=-1) - p)
        rows = torch.where(defined | (target_sum == 0), rows, torch.nan)
        grad_z = rows.to(logits.dtype).reshape(logits.shape)
    if targets_grad:
        rows = torch.where(defined, -scale * torch.log_softmax(z, dim=-1), torch.nan)
        grad_p = rows.to(target_probs.dtype).reshape(target_probs.shape)
    return grad_z, grad_p


def _is_one_on_the_cpu(upstream: Tensor) -> bool:
    """Whether ``upstream`` is exactly 1, asked only where the answer is free and traceable
    (:func:`readable_for_free`)."""
    return readable_for_free(upstream) and bool(upstream == 1)


def readable_for_free(x: Tensor) -> bool:
    """Whether reading a value of ``x`` on the host waits for no device and breaks no trace.

    That is for a plain tensor on the CPU (no device to wait for), in eager mode
    (``torch.compile`` would break its graph on reading a value), and not batched by
    ``torch.func.vmap`` or ``is_grads_batched`` (a batch of values has no single value).
    """
    return (
        type(x) is torch.Tensor
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and not torch._C._functorch.is_legacy_batchedtensor(x)
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
        *,
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


def linear_loss(inputs: LinearLossInputs, /) -> Tensor:
    """The linear loss of validated inputs, through :class:`_LinearMaskedSoftCrossEntropyFunction`.

    For ``"mean"`` and ``"sum"``, the gradients of the inputs that require grad are computed in
    the forward pass, when scaling them by the upstream gradient later rounds nothing twice
    (:func:`_scaled_exactly`: no 16-bit input, no 16-bit logits); otherwise the backward pass
    computes them with the upstream gradient inside. Under ``torch.autocast`` the chunks'
    matmuls run in the autocast dtype (:func:`autocast_dtype`).
    """
    arguments = _operator_arguments(inputs)
    hidden, weight, bias = inputs[:3]
    matmul_dtype = arguments[-1]
    wanted = (False, False, False)
    if (
        torch.is_grad_enabled()
        and inputs.reduction != "none"
        and _scaled_exactly(*(x for x in (hidden, weight, bias) if x is not None))
        and (matmul_dtype is None or matmul_dtype.itemsize >= 4)
    ):
        with_bias_grad = bias is not None and bias.requires_grad
        wanted = (hidden.requires_grad, weight.requires_grad, with_bias_grad)
    return _LinearMaskedSoftCrossEntropyFunction.apply(*arguments, wanted)[0]


def linear_loss_with_grad(inputs: LinearLossInputs, /) -> tuple[Tensor, _linear.LinearGradients]:
    """The linear loss of validated inputs and its three gradients, from one chunked pass."""
    with_bias = inputs.bias is not None
    loss, *grads = linear_forward(*_operator_arguments(inputs), True, True, with_bias)[:4]
    return loss, _linear.LinearGradients(grads[0], grads[1], grads[2] if with_bias else None)


def _scaled_exactly(*tensors: Tensor) -> bool:
    """Whether gradients made for a unit upstream gradient can be scaled without a second
    rounding: none of the tensors (whose gradients they are) is of a 16-bit dtype.

    A 16-bit gradient made in the forward pass is rounded once there; multiplied by the
    upstream gradient, it would be rounded again.
    """
    return all(tensor.dtype.itemsize >= 4 for tensor in tensors)


def autocast_dtype(*tensors: Tensor) -> torch.dtype | None:
    """The dtype of the matmuls of ``torch.nn.functional.linear`` of ``tensors`` under autocast.

    ``torch.get_autocast_dtype`` of the tensors' device type while ``torch.autocast`` is on
    there, unless one of them is float64 (autocast leaves float64 as it is); None otherwise,
    for the dtype the tensors promote to.
    """
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    if any(tensor.dtype == torch.float64 for tensor in tensors):
        return None
    return torch.get_autocast_dtype(device_type)


def _operator_arguments(inputs: LinearLossInputs) -> tuple[Any, ...]:
    """The arguments of :func:`linear_forward` before its three flags, from validated inputs.

    ``num_valid`` goes in as a tensor or as a number, two arguments: an operator's schema
    takes no union of the two. The last one is the :func:`autocast_dtype` of the matmuls.
    """
    hidden, weight, bias, target_probs, position_mask, reduction, num_valid, chunk_rows = inputs
    is_tensor = isinstance(num_valid, Tensor)
    return (
        hidden,
        weight,
        bias,
        target_probs,
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

    :func:`softce_multi._linear.forward` in place where torch allows it: every chunk's logits
    go into one buffer (:class:`LogitsBuffer`), the row routine of :func:`kernels_for` them
    writes their gradient over them (``row_routine_over_logits``), so a chunk holds one
    ``[chunk, V]`` tensor, and the weight gradient is accumulated in place. One opaque
    operator, so that ``torch.compile`` traces the loss as one call, whatever the number of
    chunks.

    Parameters
    ----------
    hidden, weight, bias, target_probs, position_mask, reduction, chunk_rows
        Validated inputs, as in :func:`softce_multi.linear_masked_soft_cross_entropy`.
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
    )
    with torch.no_grad(), _explicit_dtypes(hidden):
        result = _linear.forward(
            inputs,
            hidden_grad=hidden_grad,
            weight_grad=weight_grad,
            bias_grad=bias_grad,
            row_routine=kernels_for(hidden).row_routine_over_logits,
            xp=array_api_compat.array_namespace(hidden),
            add=_add_product,
            logits=LogitsBuffer(),
            logits_copies=1,
            matmul_dtype=matmul_dtype,
        )
    grads = result.grads or _linear.LinearGradients(None, None, None)
    made = tuple(hidden.new_empty(0) if grad is None else grad for grad in grads)
    return (result.loss, *made, result.row_scale, *result.saved)


@linear_forward.register_fake
def _(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target_probs: Tensor,
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
    dtype = _linear.compute_dtype(hidden, weight, bias, target_probs, xp=torch)
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

    :func:`softce_multi._linear.backward` with the chunks and logits of :func:`linear_forward`,
    to the last bit (its saved statistics are theirs), and the logits gradient of each chunk
    written over its logits (``gradient_routine_over_logits``). ``row_scale`` is
    ``d loss / d c_row`` times the upstream gradient, which so enters every gradient before its
    one rounding. Returns the gradients to ``hidden``, ``weight``, ``bias`` and
    ``target_probs``, ``[0]`` for one not asked for.
    """
    with torch.no_grad(), _explicit_dtypes(hidden):
        grads, grad_targets = _linear.backward(
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
            gradient_routine=kernels_for(hidden).gradient_routine_over_logits,
            xp=array_api_compat.array_namespace(hidden),
            add=_add_product,
            logits=LogitsBuffer(),
            logits_copies=1,
            matmul_dtype=matmul_dtype,
        )
    made = grads or _linear.LinearGradients(None, None, None)
    return tuple(  # type: ignore[return-value]
        hidden.new_empty(0) if grad is None else grad for grad in (*made, grad_targets)
    )


@linear_backward.register_fake
def _(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target_probs: Tensor,
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


class LogitsBuffer:
    """A :data:`softce_multi._linear.ChunkLogits` that writes every chunk into one buffer.

    The buffer is made for the first chunk, the longest; later chunks take its leading rows.
    Reusing it spares the allocator a ``[chunk, V]`` block per chunk, which it would otherwise
    map and fault in afresh (or keep, fragmented, in the process's peak memory).
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def __call__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        rows = hidden.shape[0]
        if self._buffer is None or self._buffer.shape[0] < rows:
            self._buffer = weight.new_empty((rows, weight.shape[0]))
        out = self._buffer[:rows]
        hidden = hidden.to(weight.dtype)
        if bias is None:
            return torch.mm(hidden, weight.T, out=out)
        return torch.addmm(bias, hidden, weight.T, out=out)


def _add_product(total: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``total += a @ b`` in place: one pass over ``total`` where the dtypes allow it."""
    if a.dtype == total.dtype:
        return total.addmm_(a, b)
    return total.add_(a @ b)


def differentiable_once(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Mark an autograd function's ``backward`` as not differentiable, loudly.

    ``backward`` runs without grad. When autograd records the backward pass
    (``create_graph=True``), its gradients come back attached to a node that raises if anything
    differentiates through it, naming the loss. ``torch.autograd.function.once_differentiable``
    attaches that node only when an upstream gradient requires grad; otherwise it returns
    gradients that look constant, and a gradient penalty plus any other term (weight decay, say)
    would be differentiated without the penalty's term, silently.
    """

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grad_outputs: Any) -> Any:
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        msg = (
            "softce_multi's linear and vocabulary-parallel losses are differentiable once: the "
            "derivative of their gradients (a gradient penalty, a hessian) is not computed"
        )
        refuse = torch._C._functions.DelayedError(msg, len(grads))
        return cast(Any, refuse)(*(_requiring_grad(grad) for grad in grads))

    return wrapper


def _requiring_grad(grad: Tensor | None) -> Tensor | None:
    """A detached alias of ``grad`` that requires grad, for a node to hang on; None stays."""
    if grad is None:
        return None
    return grad.detach().requires_grad_(True)


class _LinearMaskedSoftCrossEntropyFunction(torch.autograd.Function):
    """The linear loss as an autograd function, differentiable once.

    ``forward`` runs the operator :func:`linear_forward` and returns its outputs: the loss,
    then what the backward pass needs and autograd must not differentiate (the gradients made
    in the forward pass, the row scale and the saved rows). The backward pass scales the
    gradients made in forward by the upstream gradient; what the forward pass did not make
    (every gradient of ``"none"`` or of 16-bit inputs, the gradient to ``target_probs``) it
    computes with :func:`linear_backward`, which recomputes the logits chunk by chunk.
    """

    @staticmethod
    def forward(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target_probs: Tensor,
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
        hidden, weight, bias, target_probs = inputs[:4]
        reduction, chunk_rows, matmul_dtype, wanted = inputs[7:]
        _, *made, row_scale = output[:5]
        saved = output[5:]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.reduction = reduction
        ctx.chunk_rows = chunk_rows
        ctx.matmul_dtype = matmul_dtype
        ctx.made = wanted
        ctx.save_for_backward(hidden, weight, bias, target_probs, row_scale, *made, *saved)

    @staticmethod
    @differentiable_once
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        nothing: tuple[None, ...] = (None,) * 11
        if grad_loss is None:
            return nothing
        hidden, weight, bias, target_probs, row_scale, *rest = ctx.saved_tensors
        made, saved = rest[:3], rest[3:]
        wants = ctx.needs_input_grad[:4]
        upstream = grad_loss.reshape(-1) if ctx.reduction == "none" else grad_loss
        # The gradients made in forward are those of a unit upstream (never of "none").
        scaled = any(ctx.made) and _is_one_on_the_cpu(grad_loss)
        grads: list[Tensor | None] = [
            (grad if scaled else grad * grad_loss) if want and was_made else None
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
            *saved,
            row_scale * upstream,
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
    ) -> torch.Tensor:
        """Return the loss; ``num_valid`` replaces the denominator of ``"mean"``."""
        inputs = LinearLossInputs(
            hidden,
            weight,
            bias,
            target_probs,
            position_mask,
            self.reduction,
            num_valid,
            self.chunk_rows,
        )
        validate_linear_inputs(inputs)
        return linear_loss(inputs)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, chunk_rows={self.chunk_rows!r}"
