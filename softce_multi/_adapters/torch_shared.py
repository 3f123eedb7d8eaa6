"""What the torch losses share: the row routines by device, and the pieces around them.

:func:`row_routine` and :func:`gradient_routine` are the :class:`~softce_multi._core.RowRoutine`
and :class:`~softce_multi._core.GradientRoutine` of torch tensors: they run those of the kernel
module that :func:`kernels_for` picks by device. The torch adapters
(:mod:`softce_multi._adapters.torch`, :mod:`softce_multi._adapters.torch_linear`), the
vocabulary-parallel losses of :mod:`softce_multi.distributed` and :mod:`softce_multi.eagle3`
build on them and on the rest of this module: when a value can be read on the host for free
(:func:`readable_for_free`), when gradients made for a unit upstream can be scaled without a
second rounding (:func:`scaled_exactly`), the dtype of the matmuls under autocast
(:func:`autocast_dtype`), the chunk buffer of the linear losses (:class:`LogitsBuffer`,
:func:`add_product`) and the marker of a backward pass that is not differentiable
(:func:`differentiable_once`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any, cast

import torch
from torch import Tensor

from softce_multi import _core, kernels
from softce_multi.kernels import torch_cpu


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


#: The unsigned integer dtypes whose comparisons and gathers PyTorch's CPU kernels lack.
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def indexable_ids(ids: Tensor | None) -> Tensor | None:
    """``target_ids`` as PyTorch compares and indexes with them: wide unsigned ones as int64.

    A ``uint64`` id beyond the int64 range becomes negative, outside the vocabulary as it was.
    """
    return ids.long() if ids is not None and ids.dtype in _WIDE_UNSIGNED else ids


def exporting() -> bool:
    """Whether ``torch.export`` is tracing (not ``torch.compile``).

    Dynamo before torch 2.13 answers ``torch.compiler.is_exporting()`` with True under every
    ``torch.compile``; the flag that ``torch.export`` sets while it traces says the truth, and
    is read where it exists.
    """
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def traced_input(tensor: Tensor | None) -> Tensor | None:
    """``tensor``, under ``torch.compile`` as a view of itself, so that Dynamo knows whether it
    requires grad.

    Dynamo records whether a tensor requires grad when the tensor enters the trace; an input
    that ``torch.func.grad`` makes differentiable after that looks constant to it, and it then
    inlines an autograd function applied to the input, differentiating its ``forward`` in
    place of its ``backward``: a wrong gradient, or none. A view made inside the trace records
    what is true. Outside ``torch.compile`` the tensor itself.
    """
    if tensor is None or not torch.compiler.is_compiling():
        return tensor
    return tensor.view_as(tensor)


def traced_num_valid(num_valid: Any, like: Tensor, dtype: torch.dtype) -> Any:
    """``num_valid`` as the losses take it: a Python number as a 0-d tensor under ``torch.compile``.

    Dynamo makes a Python number that changes between calls symbolic, but a symbolic float
    filled into a tensor (``torch.full``) or passed to an operator as a number is specialized
    again, a graph per value. Multiplied into a tensor it stays symbolic: the result is
    ``float(num_valid)`` rounded once to ``dtype`` (the computation dtype) on the device of
    ``like``, the value the loss computes with in eager mode. Anything else is returned as it
    is: None, a tensor, a number in eager mode, and host numbers that are neither ``int`` nor
    ``float`` (a ``Fraction``), which Dynamo keeps constant.
    """
    if not torch.compiler.is_compiling() or not isinstance(num_valid, (int, float)):
        return num_valid
    return like.new_ones((), dtype=dtype) * float(num_valid)


def readable_for_free(x: Tensor) -> bool:
    """Whether reading a value of ``x`` on the host waits for no device and breaks no trace.

    That is for a plain tensor on the CPU (no device to wait for), in eager mode
    (``torch.compile`` would break its graph on reading a value), and not batched by
    ``torch.func.vmap`` or ``is_grads_batched`` (a batch of values has no single value).
    """
    return x.device.type == "cpu" and plain_and_eager(x)


def plain_and_eager(x: Tensor) -> bool:
    """Whether ``x`` is a plain tensor (no subclass, not wrapped by a ``torch.func`` transform,
    not batched by ``is_grads_batched``) seen in eager mode (not under ``torch.compile`` or
    ``torch.export``)."""
    return (
        type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not exporting()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and not torch._C._functorch.is_legacy_batchedtensor(x)
    )


def under_vmap() -> bool:
    """Whether the code runs inside ``torch.func.vmap`` (asked outside ``torch.compile`` only)."""
    if torch.compiler.is_compiling():
        return False
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack)


def refuse_forward_mode(loss: str, *tensors: Tensor | None) -> None:
    """Raise NotImplementedError, naming ``loss``, where ``tensors`` carry forward-mode tangents.

    The autograd functions have no ``jvp`` (Dynamo cannot trace one); this names the loss and
    the reverse-mode transforms that work where PyTorch's own error would name neither. Asked
    in eager mode, of ``tensors`` only: with a tangent of ``torch.func.jvp`` (``jacfwd``) or of
    ``torch.autograd.forward_ad``, or wrapped by a transform inside a ``jvp`` (the reverse pass
    of ``torch.func.hessian``). A loss that does not depend on what a ``jvp`` differentiates
    runs under it.
    """
    if torch.compiler.is_compiling():
        return
    functorch = torch._C._functorch
    stack = functorch.get_interpreter_stack() or ()
    jvp_levels = {level.level() for level in stack if level.key() == functorch.TransformType.Jvp}

    def differentiated(tensor: Tensor) -> bool:
        if jvp_levels and functorch.maybe_get_level(tensor) > max(jvp_levels):
            return True
        while functorch.is_functorch_wrapped_tensor(tensor):
            if functorch.maybe_get_level(tensor) in jvp_levels and _has_tangent(tensor):
                return True
            tensor = functorch.get_unwrapped(tensor)
        return _has_tangent(tensor)

    if any(tensor is not None and differentiated(tensor) for tensor in tensors):
        msg = (
            f"softce_multi's {loss} has no forward-mode derivative (jvp), so torch.func.jvp, "
            "jacfwd, torch.func.hessian and forward_ad dual tensors are not supported; use "
            "reverse mode: torch.autograd.functional.hessian, or torch.func.jacrev of "
            "torch.func.jacrev"
        )
        raise NotImplementedError(msg)


def _has_tangent(tensor: Tensor) -> bool:
    return torch.autograd.forward_ad.unpack_dual(tensor).tangent is not None


def scaled_by_upstream(grad: Tensor, upstream: Tensor) -> Tensor:
    """``grad * upstream``, or ``grad`` itself where that is the same and nothing else gets it.

    ``grad`` is a gradient made in the forward pass for a unit upstream gradient and kept by the
    autograd node. It is handed over as it is only when ``upstream`` is exactly 1, asked where
    the answer is free and traceable (:func:`readable_for_free`), and when the backward pass
    keeps no graph (no ``retain_graph``): a later backward pass through the same node would
    otherwise return the same tensor, which the caller of the first owns and may change.
    """
    if (
        readable_for_free(upstream)
        and not torch._C._autograd._get_current_graph_task_keep_graph()
        and bool(upstream == 1)
    ):
        return grad
    return grad * upstream


def scaled_exactly(*tensors: Tensor) -> bool:
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
    # A device type autocast does not know ("meta", say); Dynamo before torch 2.11 cannot
    # trace the question, and a compiled call has the real device types.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    if any(tensor.dtype == torch.float64 for tensor in tensors):
        return None
    return torch.get_autocast_dtype(device_type)


class LogitsBuffer:
    """A :data:`softce_multi._linear.ChunkLogits` that writes every chunk into one buffer.

    The buffer is made for the first chunk, the longest; later chunks take its leading rows.
    Reusing it spares the allocator a ``[chunk, V]`` block per chunk, which it would otherwise
    map and fault in afresh (or keep, fragmented, in the process's peak memory).
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def release(self) -> None:
        """Drop the buffer: its memory is freed once no chunk's logits view it."""
        self._buffer = None

    def __call__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        rows = hidden.shape[0]
        if self._buffer is None or self._buffer.shape[0] < rows:
            self._buffer = weight.new_empty((rows, weight.shape[0]))
        out = self._buffer[:rows]
        hidden = hidden.to(weight.dtype)
        if bias is None:
            return torch.mm(hidden, weight.T, out=out)
        return torch.addmm(bias, hidden, weight.T, out=out)


def add_product(total: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``total += a @ b`` in place: one pass over ``total`` where the dtypes and device allow it.

    Of one dtype, ``addmm_``. 16-bit products into a float32 ``total`` on a CUDA device of
    compute capability 8 or more: ``torch.addmm`` with ``out_dtype``, whose matmul accumulates
    into ``total`` in float32, with no 16-bit product, and no ``[V, H]`` temporary, on the
    way. Elsewhere the product is made in the dtype of ``a`` and ``b``, then added.
    """
    if a.dtype == total.dtype:
        return total.addmm_(a, b)
    if _accumulates_in_float32(total, a, b):
        return torch.addmm(total, a, b, out_dtype=total.dtype, out=total)
    return total.add_(a @ b)


def _accumulates_in_float32(total: Tensor, a: Tensor, b: Tensor) -> bool:
    """Whether ``torch.addmm(total, a, b, out_dtype=torch.float32)`` runs: a float32 ``total``,
    16-bit ``a`` and ``b`` of one dtype, on an NVIDIA device of compute capability 8 or more
    (not a ROCm build, whose ``"cuda"`` devices this kernel is not known to serve)."""
    return (
        total.dtype == torch.float32
        and a.dtype in (torch.bfloat16, torch.float16)
        and b.dtype == a.dtype
        and total.device.type == "cuda"
        and torch.version.hip is None
        and torch.cuda.get_device_capability(total.device)[0] >= 8
    )


def differentiable_once(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Mark an autograd function's ``backward`` as not differentiable, loudly.

    ``backward`` runs without grad. When autograd records the backward pass
    (``create_graph=True``), its gradients come back from a node that raises if anything
    differentiates through it, naming the loss. That node also takes the function's saved
    tensors and upstream gradients that require grad, so that it lies on every path from the
    gradients to the function's inputs: ``torch.autograd.grad(penalty, inputs)`` meets it as
    ``backward()`` does. ``torch.autograd.function.once_differentiable`` hangs its node on the
    upstream gradients only; with a constant upstream, its gradients look constant, and a
    gradient penalty plus any other term (weight decay, say) would be differentiated without the
    penalty's term, silently. The gradients are plain aliases (no views), which the caller may
    change in place.
    """

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grad_outputs: Any) -> Any:
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        anchors = [
            tensor
            for tensor in (*ctx.saved_tensors, *grad_outputs)
            if isinstance(tensor, Tensor) and tensor.requires_grad
        ]
        made = [grad.detach() for grad in grads if grad is not None]
        if not (anchors and made):
            return grads
        msg = (
            "softce_multi's losses from hidden states (linear_masked_soft_cross_entropy and "
            "vocab_parallel_linear_masked_soft_cross_entropy) are differentiable once: the "
            "derivative of their gradients (a gradient penalty, a hessian) is not computed"
        )
        refuse = torch._C._functions.DelayedError(msg, len(made) + len(anchors))
        refused = iter(cast(Any, refuse)(*made, *anchors)[: len(made)])
        return tuple(None if grad is None else next(refused) for grad in grads)

    return wrapper


def refused_vmap(loss: str) -> Any:
    """An autograd function's ``vmap`` rule that refuses ``torch.func.vmap``, naming ``loss``."""

    def vmap(info: Any, in_dims: Any, *args: Any) -> Any:
        msg = (
            f"{loss} does not support torch.func.vmap: its leading dimensions are a batch "
            "already, so fold the mapped dimension into them (hidden [B, ..., H] with "
            "target_probs [B, ..., V] and a mask [B, ...]) and take reduction='none' for one "
            "loss per position"
        )
        raise NotImplementedError(msg)

    return staticmethod(vmap)
