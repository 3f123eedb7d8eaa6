"""JAX adapter: a ``jax.custom_vjp`` around the shared core, safe under ``jit`` and ``vmap``.

On XLA (CPU, TPU) the per-row work runs the routines of :mod:`softce_multi.kernels.xla`: the
core, chunk by chunk of rows, so that XLA's compiled step holds temporaries of a few chunks
rather than an ``[N, V]`` float32 softmax (``python -m softce_multi bench`` reports them). The
forward pass keeps only per-row statistics; the backward pass recomputes the gradient rows from
them and the inputs, so a training step reads the logits and targets twice.

On a GPU, with the Triton backend of Pallas available, the per-row work runs the kernels of
:mod:`softce_multi.kernels.pallas` instead (imported on first use). Both versions are then
staged with ``jax.lax.platform_dependent``, which keeps the one for the platform the
computation is compiled for, so arrays placed on the CPU of a GPU host still get the core.

Like every adapter, the module has ``loss`` and ``loss_with_grad`` of validated inputs, which
:func:`softce_multi.masked_soft_cross_entropy` and its ``_with_grad`` twin dispatch to; its
public face is :mod:`softce_multi.jax`. ``linear_loss`` and
``linear_loss_with_grad`` serve :func:`softce_multi.linear_masked_soft_cross_entropy`: a second
``custom_vjp`` whose forward pass is a ``lax.scan`` over chunks of rows (the per-chunk functions
of :mod:`softce_multi._linear`), so that XLA's temporaries are a few chunks whatever ``N``;
under ``jax.grad`` the same scan also accumulates the gradients to ``hidden``, ``weight`` and
``bias``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softce_multi import _chunks, _core, _linear, kernels
from softce_multi._types import LinearLossInputs, LossInputs
from softce_multi.kernels import xla as xla_kernels

__all__ = [
    "gradient_routine",
    "linear_loss",
    "linear_loss_with_grad",
    "loss",
    "loss_with_grad",
    "row_routine",
]

#: Platforms, as ``jax.lax.platform_dependent`` names them, that run the Pallas kernels: those of
#: the Triton backend of Pallas.
_KERNEL_PLATFORMS = ("cuda", "rocm")


def loss(inputs: LossInputs, /) -> jax.Array:
    """The differentiable loss of validated inputs (the adapter interface).

    The computation is jitted and cached by shape, dtype and reduction (as every entry point of
    this module is), so an eager call compiles once per shape, not at every call; under an
    outer ``jax.jit`` it is inlined.
    """
    weights, count = _constants(inputs)
    return _jitted_loss(
        inputs.logits, inputs.target_probs, weights, count, inputs.target_ids, inputs.reduction
    )


def loss_with_grad(inputs: LossInputs, /) -> tuple[jax.Array, jax.Array]:
    """The loss of validated inputs and its logits gradient, from one forward pass.

    On a GPU this is the Pallas forward kernel with its gradient sweep.
    """
    weights, count = _constants(inputs)
    result = _jitted_forward_with_grad(
        inputs.logits, inputs.target_probs, weights, count, inputs.target_ids, inputs.reduction
    )
    assert result.logits_grad is not None  # requested with with_logits_grad=True
    return result.loss, result.logits_grad


def _constants(inputs: LossInputs) -> tuple[jax.Array, jax.Array | None]:
    """The mask and count as constants of the computation dtype (they get no gradient)."""
    dtype = _core.compute_dtype(inputs.logits, inputs.target_probs, xp=jnp)
    weights = jax.lax.stop_gradient(jnp.astype(inputs.position_mask, dtype))
    num_valid = inputs.num_valid
    count = None if num_valid is None else jax.lax.stop_gradient(jnp.asarray(num_valid, dtype))
    return weights, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _loss(
    logits: jax.Array,
    target_probs: jax.Array,
    weights: jax.Array,
    count: jax.Array | None,
    target_ids: jax.Array | None,
    reduction: str,
) -> jax.Array:
    return _loss_pass(
        logits, target_probs, weights, count, target_ids, reduction, with_logits_grad=False
    ).loss


def _loss_pass(
    logits: jax.Array,
    target_probs: jax.Array,
    weights: jax.Array,
    count: jax.Array | None,
    target_ids: jax.Array | None,
    reduction: str,
    *,
    with_logits_grad: bool,
) -> _core.ForwardResult:
    """The driver of the core with the per-row work of the platform (Pallas or the core), or
    that of sparse targets (:data:`sparse_row_routine`) with ``target_ids``."""
    return _core.loss_pass(
        logits,
        target_probs,
        weights,
        reduction=reduction,
        num_valid=count,
        with_logits_grad=with_logits_grad,
        row_routine=row_routine if target_ids is None else sparse_row_routine,
        xp=jnp,
        target_ids=target_ids,
    )


def sparse_row_routine(
    rows: _core.Rows, /, *, with_logits_grad: bool, whole: bool = False
) -> _core.RowResults:
    """The row routine of sparse targets: XLA's, chunk by chunk of rows (the Pallas kernels
    serve dense targets only); ``whole`` is as in :func:`row_routine`."""
    return _xla_routine(xla_kernels.row_routine, rows, whole=whole)(
        rows, with_logits_grad=with_logits_grad
    )


def sparse_gradient_routine(
    rows: _core.BackwardRows, /, *, logits_grad: bool, targets_grad: bool, whole: bool = False
) -> tuple[jax.Array | None, jax.Array | None]:
    """The gradient routine of sparse targets, XLA's; ``whole`` is as in :func:`row_routine`."""
    return _xla_routine(xla_kernels.gradient_routine, rows, whole=whole)(
        rows, logits_grad=logits_grad, targets_grad=targets_grad
    )


def row_routine(
    rows: _core.Rows, /, *, with_logits_grad: bool, whole: bool = False
) -> _core.RowResults:
    """:class:`softce_multi._core.RowRoutine` of the Pallas kernel where it runs, else of XLA.

    XLA's routine walks the rows in chunks of its own, unless ``whole``: then it takes them in
    one piece (a chunk of the linear loss, small already).
    """
    return _per_platform(
        _xla_routine(xla_kernels.row_routine, rows, whole=whole),
        lambda pallas: pallas.row_routine,
        rows,
        with_logits_grad=with_logits_grad,
    )


def gradient_routine(
    rows: _core.BackwardRows, /, *, logits_grad: bool, targets_grad: bool, whole: bool = False
) -> tuple[jax.Array | None, jax.Array | None]:
    """The gradient routine of the Pallas kernel on a GPU, else of XLA; ``whole`` is as in
    :func:`row_routine`."""
    return _per_platform(
        _xla_routine(xla_kernels.gradient_routine, rows, whole=whole),
        lambda pallas: pallas.gradient_routine,
        rows,
        logits_grad=logits_grad,
        targets_grad=targets_grad,
    )


def _loss_fwd(
    logits: jax.Array,
    target_probs: jax.Array,
    weights: jax.Array,
    count: jax.Array | None,
    target_ids: jax.Array | None,
    reduction: str,
) -> tuple[jax.Array, tuple[Any, ...]]:
    result = _loss_pass(
        logits, target_probs, weights, count, target_ids, reduction, with_logits_grad=False
    )
    residuals = (logits, target_probs, result.saved, result.row_scale, weights, count, target_ids)
    return result.loss, residuals


def _loss_bwd(
    reduction: str, residuals: tuple[Any, ...], grad_output: jax.Array
) -> tuple[Any, ...]:
    logits, target_probs, saved, row_scale, weights, count, target_ids = residuals
    upstream = _core.upstream_per_row(grad_output, reduction, xp=jnp)
    row_scale = _core.upstream_row_scale(row_scale, upstream, xp=jnp)
    routine = gradient_routine if target_ids is None else sparse_gradient_routine
    # One computation per gradient, so that jit drops the one that is not used.
    grad_logits, _ = _core.gradient_pass(
        logits,
        target_probs,
        saved,
        row_scale,
        logits_grad=True,
        targets_grad=False,
        gradient_routine=routine,
        xp=jnp,
        target_ids=target_ids,
    )
    _, grad_targets = _core.gradient_pass(
        logits,
        target_probs,
        saved,
        row_scale,
        logits_grad=False,
        targets_grad=True,
        gradient_routine=routine,
        xp=jnp,
        target_ids=target_ids,
    )
    zero_count = None if count is None else jnp.zeros_like(count)
    return (
        like_primal(grad_logits, logits),
        like_primal(grad_targets, target_probs),
        jnp.zeros_like(weights),
        zero_count,
        _no_cotangent(target_ids),
    )


def _xla_routine(routine: Callable[..., Any], rows: Any, *, whole: bool) -> Callable[..., Any]:
    """``routine`` of :mod:`softce_multi.kernels.xla`, over all of ``rows`` at once if ``whole``."""
    return functools.partial(routine, chunk=rows.z.shape[0]) if whole else routine


def _per_platform(
    core: Callable[..., Any],
    kernel_of: Callable[[ModuleType], Callable[..., Any]],
    rows: Any,
    **flags: bool,
) -> Any:
    """``core(rows, **flags)``, or the Pallas routine ``kernel_of(pallas)`` where it runs.

    ``kernel_of`` picks the routine from :mod:`softce_multi.kernels.pallas`, which is imported
    only when needed. Where :func:`softce_multi.kernels.use_pallas` says no (no GPU, or no
    Pallas), only ``core`` is traced. Otherwise both are, and the platform the computation is
    compiled for picks one.
    """
    if not kernels.use_pallas(rows.z):
        return core(rows, **flags)
    from softce_multi.kernels import pallas

    kernel = _differentiated_as(
        functools.partial(kernel_of(pallas), **flags), functools.partial(core, **flags)
    )
    branches = dict.fromkeys(_KERNEL_PLATFORMS, kernel)
    return jax.lax.platform_dependent(rows, default=functools.partial(core, **flags), **branches)


def _differentiated_as(kernel: Callable[[Any], Any], core: Callable[[Any], Any]) -> Any:
    """``kernel``, differentiated as ``core`` is: the derivative of a Pallas call is not defined.

    The loss's own derivative is a ``custom_vjp`` and never differentiates the kernels; a
    derivative of that derivative (a gradient penalty, a hessian) differentiates the backward
    pass's kernel. It gets the derivative of XLA's core routine, which computes the same values.
    """
    differentiable = jax.custom_jvp(kernel)

    def derivative(primals: tuple[Any], tangents: tuple[Any]) -> tuple[Any, Any]:
        return kernel(*primals), jax.jvp(core, primals, tangents)[1]

    differentiable.defjvp(derivative)
    return differentiable


def _no_cotangent(target_ids: jax.Array | None) -> Any:
    """The cotangent of integer ``target_ids`` (``float0`` zeros), or None without them."""
    if target_ids is None:
        return None
    return np.zeros(target_ids.shape, dtype=jax.dtypes.float0)


_loss.defvjp(_loss_fwd, _loss_bwd)
_jitted_loss = jax.jit(_loss, static_argnums=5)
_jitted_forward_with_grad = jax.jit(
    functools.partial(_loss_pass, with_logits_grad=True), static_argnums=5
)


# --------------------------------------------------------------------------------------------
# The loss straight from hidden states
# --------------------------------------------------------------------------------------------


def linear_loss(inputs: LinearLossInputs, /) -> jax.Array:
    """The differentiable linear loss of validated inputs (the adapter interface).

    Under ``jax.grad`` the forward pass computes the gradients to ``hidden``, ``weight`` and
    ``bias`` in the same ``lax.scan`` over chunks as the loss (for ``"mean"`` and ``"sum"``).
    """
    return _jitted_linear_loss(*linear_arguments(inputs))


def linear_loss_with_grad(inputs: LinearLossInputs, /) -> tuple[jax.Array, _linear.LinearGradients]:
    """The linear loss of validated inputs and its three gradients, from one ``lax.scan``."""
    result = _jitted_linear_forward_with_grads(*linear_arguments(inputs))
    assert result.grads is not None  # asked for
    return result.loss, result.grads


class LinearArrays(NamedTuple):
    """The arrays of the linear loss, one pytree: what its ``custom_vjp`` differentiates."""

    hidden: jax.Array
    weight: jax.Array
    bias: jax.Array | None
    target_probs: jax.Array
    weights: jax.Array
    """The mask as ``[N]`` weights, a constant of the computation dtype."""
    num_valid: jax.Array | None
    """``num_valid`` as a constant of the computation dtype, or None."""
    target_ids: jax.Array | None = None
    """The ids of sparse targets (``target_probs`` is then ``[..., K]``), or None."""


def linear_arguments(inputs: LinearLossInputs) -> tuple[LinearArrays, str, int]:
    """The arguments of the linear losses' VJPs: the arrays, the reduction and the rows per
    chunk (``chunk_rows``, at most the number of rows, at least 1; all of them when their
    number is symbolic, :func:`_chunks.is_static`).

    By default a chunk's ``[chunk, V]`` arrays take the budget of
    :func:`softce_multi._linear.default_chunk_rows` counted once, not twice as in the eager
    driver: XLA fuses the row routine into one pass
    whose gradient takes the place of the chunk's logits, so the compiled step holds one such
    array (``memory_analysis`` of the step says so), and the longer chunks read the weight, and
    write its gradient, half as often per row.
    """
    hidden, weight, bias = inputs.hidden, inputs.weight, inputs.bias
    target_probs, position_mask = inputs.target_probs, inputs.position_mask
    reduction, num_valid, chunk_rows = inputs.reduction, inputs.num_valid, inputs.chunk_rows
    _chunks.check_not_split(
        "linear_masked_soft_cross_entropy",
        hidden=hidden,
        weight=weight,
        bias=bias,
        target_probs=target_probs,
        position_mask=position_mask,
    )
    dtype = _core.compute_dtype(hidden, weight, bias, target_probs, xp=jnp)
    weights = jax.lax.stop_gradient(jnp.reshape(jnp.astype(position_mask, dtype), (-1,)))
    count = None if num_valid is None else jax.lax.stop_gradient(jnp.asarray(num_valid, dtype))
    if chunk_rows is None:
        hidden_size = weight.shape[1] if _chunks.is_static(weight.shape[1]) else 0
        chunk_rows = _linear.default_chunk_rows(
            weight.shape[0], dtype, xp=jnp, copies=1, hidden_size=hidden_size
        )
    rows = math.prod(hidden.shape[:-1])
    chunk = max(1, min(chunk_rows, rows)) if _chunks.is_static(rows) else rows
    arrays = LinearArrays(hidden, weight, bias, target_probs, weights, count, inputs.target_ids)
    return arrays, reduction, chunk


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _linear_loss(arrays: LinearArrays, reduction: str, chunk: int) -> jax.Array:
    return _linear_loss_pass(arrays, reduction, chunk, with_grads=False).loss


def _linear_loss_fwd(
    arrays: LinearArrays, reduction: str, chunk: int
) -> tuple[jax.Array, tuple[Any, ...]]:
    # A 16-bit gradient made for a unit upstream would be rounded again when scaled: those are
    # made in the backward pass, with the upstream inside their one rounding.
    scaled_exactly = all(
        x.dtype.itemsize >= 4 for x in (arrays.hidden, arrays.weight, arrays.bias) if x is not None
    )
    with_grads = reduction != "none" and scaled_exactly
    result = _linear_loss_pass(arrays, reduction, chunk, with_grads=with_grads)
    return result.loss, (arrays, result.saved, result.row_scale, result.grads)


def _linear_loss_bwd(
    reduction: str, chunk: int, residuals: tuple[Any, ...], grad_output: jax.Array
) -> tuple[LinearArrays]:
    arrays, saved, row_scale, grads = residuals
    weights, count = arrays.weights, arrays.num_valid
    upstream = _core.upstream_per_row(grad_output, reduction, xp=jnp)
    row_scale = _core.upstream_row_scale(row_scale, upstream, xp=jnp)
    if grads is None:  # "none" or 16-bit: the gradients come now, the upstream inside
        grads = linear_gradient_pass(arrays, saved, row_scale, chunk, targets=False)
    else:
        grads = jax.tree.map(lambda grad: jnp.astype(grad * grad_output, grad.dtype), grads)
    # A computation of its own, which jit drops when the targets' gradient is not used.
    grad_targets = linear_gradient_pass(arrays, saved, row_scale, chunk, targets=True)
    zero_count = None if count is None else jnp.zeros_like(count)
    grad_hidden, grad_weight, grad_bias = grads
    cotangents = LinearArrays(
        like_primal(grad_hidden, arrays.hidden),
        like_primal(grad_weight, arrays.weight),
        None if grad_bias is None else like_primal(grad_bias, arrays.bias),
        like_primal(grad_targets, arrays.target_probs),
        jnp.zeros_like(weights),
        zero_count,
        _no_cotangent(arrays.target_ids),
    )
    return (cotangents,)


_linear_loss.defvjp(_linear_loss_fwd, _linear_loss_bwd)
_jitted_linear_loss = jax.jit(_linear_loss, static_argnums=(1, 2))


def _linear_loss_pass(
    arrays: LinearArrays, reduction: str, chunk: int, *, with_grads: bool
) -> _linear.LinearForwardResult:
    """The loss, the saved rows and optionally the three gradients: the driver of
    :mod:`softce_multi._linear`, a ``lax.scan`` over chunks, with this adapter's row routine."""
    hidden, weight, bias, target_probs, weights, count, target_ids = arrays
    inputs = LinearLossInputs(
        hidden, weight, bias, target_probs, weights, reduction, count, chunk, target_ids
    )
    return _linear.chunked_loss_pass(
        inputs,
        hidden_grad=with_grads,
        weight_grad=with_grads,
        bias_grad=with_grads,
        row_routine=functools.partial(
            row_routine if target_ids is None else sparse_row_routine, whole=True
        ),
        xp=jnp,
    )


_jitted_linear_forward_with_grads = jax.jit(
    functools.partial(_linear_loss_pass, with_grads=True), static_argnums=(1, 2)
)


def linear_gradient_pass(
    arrays: LinearArrays,
    saved: _core.SavedRows,
    row_scale: jax.Array,
    chunk: int,
    *,
    targets: bool,
    fresh: _linear.Fresh | None = None,
) -> Any:
    """The three gradients (``targets=False``) or the targets' gradient, by the ``lax.scan`` of
    :func:`softce_multi._linear.chunked_gradient_pass`.

    ``row_scale`` includes the upstream gradient; ``fresh`` is the driver's hook for the
    accumulators (the vocabulary-parallel loss types them as varying over mesh axes).
    """
    hidden, weight, bias, target_probs = (
        arrays.hidden,
        arrays.weight,
        arrays.bias,
        arrays.target_probs,
    )
    routine = gradient_routine if arrays.target_ids is None else sparse_gradient_routine
    grads, grad_targets = _linear.chunked_gradient_pass(
        hidden,
        weight,
        bias,
        target_probs,
        saved,
        row_scale,
        hidden_grad=not targets,
        weight_grad=not targets,
        bias_grad=not targets,
        targets_grad=targets,
        chunk_rows=chunk,
        gradient_routine=functools.partial(routine, whole=True),
        xp=jnp,
        fresh=fresh,
        target_ids=arrays.target_ids,
    )
    return grad_targets if targets else grads


# --------------------------------------------------------------------------------------------
# Inside jax.shard_map
# --------------------------------------------------------------------------------------------


def varying_axes(x: Any) -> frozenset[Any]:
    """The mesh axes over which the JAX array ``x`` varies inside ``shard_map`` (none outside).

    JAX types record them as ``mat.varying`` (0.10) or ``vma`` (0.6 to 0.9).
    """
    aval = jax.typeof(x)
    manual = getattr(aval, "mat", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def like_primal(cotangent: Any, primal: Any) -> Any:
    """``cotangent`` varying over the mesh axes ``primal`` varies over, as a VJP must return it.

    Summed over the axes where only the cotangent varies (a weight replicated over a data axis
    gets the sum of the data blocks' gradients, as JAX's own transpose rules do), broadcast to
    those where only the primal does.
    """
    have, want = varying_axes(cotangent), varying_axes(primal)
    if have - want:
        cotangent = jax.lax.psum(cotangent, tuple(have - want))
    if want - have:
        cotangent = jax.lax.pcast(cotangent, tuple(want - have), to="varying")
    return cotangent
