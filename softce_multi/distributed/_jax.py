"""The JAX vocabulary-parallel losses: ``jax.custom_vjp``s over a mesh axis.

:func:`vocab_parallel_loss` and :func:`vocab_parallel_linear_loss` take validated inputs inside
``jax.shard_map`` (or ``jax.pmap``) and an ``axis_name``. Their forward passes are the shared
statistics of :mod:`softce_multi.distributed._statistics` with ``pmax`` and ``psum`` over the
axis; their backward passes make each device's gradients from the global statistics with the
JAX adapter's gradient routine, with no communication but the ``psum`` of the linear loss's
hidden gradient. The linear loss runs the one chunk driver of :mod:`softce_multi._linear`
(:func:`~softce_multi._linear.chunked_loss_pass`, a ``lax.scan`` over chunks of rows) with a
row routine that all-reduces each chunk's statistics. Imported on the first call with JAX
arrays, so importing :mod:`softce_multi.distributed` needs no JAX.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from softce_multi import _core, _linear
from softce_multi._adapters import jax as jax_adapter
from softce_multi._types import LinearLossInputs, LossInputs
from softce_multi.distributed._statistics import global_rows, vocab_parallel_forward
from softce_multi.kernels.xla import widened

# --------------------------------------------------------------------------------------------
# The loss of logit shards
# --------------------------------------------------------------------------------------------


def vocab_parallel_loss(inputs: LossInputs, axis_name: Any) -> Any:
    """The JAX loss of validated inputs: constants for the mask and count, then the VJP."""
    logits, targets = inputs.logits, inputs.target_probs
    dtype = _core.compute_dtype(logits, targets, xp=jnp)
    weights, count = _constants(inputs.position_mask, inputs.num_valid, dtype)
    return _loss(logits, targets, weights, count, inputs.reduction, axis_name)


def _constants(position_mask: Any, num_valid: Any, dtype: Any) -> tuple[Any, Any]:
    """The mask and the count as constants of the computation dtype (they get no gradient)."""
    weights = jax.lax.stop_gradient(jnp.astype(position_mask, dtype))
    count = None if num_valid is None else jax.lax.stop_gradient(jnp.asarray(num_valid, dtype))
    return weights, count


def _global_loss_pass(
    logits: Any, targets: Any, weights: Any, count: Any, reduction: str, axis_name: Any
) -> _core.ForwardResult:
    """The loss over the whole vocabulary, and what the backward pass needs, on every device."""
    return vocab_parallel_forward(
        logits,
        targets,
        weights,
        reduction=reduction,
        num_valid=count,
        max_over_shards=functools.partial(jax.lax.pmax, axis_name=axis_name),
        sum_over_shards=functools.partial(jax.lax.psum, axis_name=axis_name),
        block_rows=None,
        xp=jnp,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _loss(
    logits: Any, targets: Any, weights: Any, count: Any, reduction: str, axis_name: Any
) -> Any:
    return _global_loss_pass(logits, targets, weights, count, reduction, axis_name).loss


def _loss_forward(
    logits: Any, targets: Any, weights: Any, count: Any, reduction: str, axis_name: Any
) -> tuple[Any, Any]:
    result = _global_loss_pass(logits, targets, weights, count, reduction, axis_name)
    return result.loss, (logits, targets, result.saved, result.row_scale, weights, count)


def _loss_backward(reduction: str, axis_name: Any, residuals: Any, grad_loss: Any) -> Any:
    """This device's gradients from the global statistics, with no communication."""
    logits, targets, saved, row_scale, weights, count = residuals
    upstream = _core.upstream_per_row(grad_loss, reduction, xp=jnp)
    grads = [
        _core.gradient_pass(
            logits,
            targets,
            saved,
            _core.upstream_row_scale(row_scale, upstream, xp=jnp),
            logits_grad=want_logits,
            targets_grad=not want_logits,
            gradient_routine=jax_adapter.gradient_routine,
            xp=jnp,
        )
        # One computation per gradient, so that jit drops the one that is not used.
        for want_logits in (True, False)
    ]
    zero_count = None if count is None else jnp.zeros_like(count)
    grad_logits = jax_adapter.like_primal(grads[0][0], logits)
    grad_targets = jax_adapter.like_primal(grads[1][1], targets)
    return grad_logits, grad_targets, jnp.zeros_like(weights), zero_count


_loss.defvjp(_loss_forward, _loss_backward)


# --------------------------------------------------------------------------------------------
# The linear loss of weight shards
# --------------------------------------------------------------------------------------------


def vocab_parallel_linear_loss(inputs: LinearLossInputs, axis_name: Any) -> Any:
    """The JAX linear loss of validated inputs: constants, chunk size, then the VJP
    (``inputs.chunk_rows`` is None: the default chunk).

    Both passes are the driver of :mod:`softce_multi._linear` with two hooks: the forward
    pass's row routine all-reduces each chunk's row statistics over the vocabulary axis
    (:func:`_global_row_routine`), and the accumulators are typed as varying over the mesh axes
    the inputs vary over (:func:`_varying_over`), as ``shard_map`` requires of a scan's carry.
    The backward pass recomputes the chunks' logits, makes the gradients from the global
    statistics with the JAX adapter's gradient routine, then ``psum``s the hidden gradient.
    """
    arrays, reduction, chunk = jax_adapter.linear_arguments(inputs)
    return _linear_loss(arrays, reduction, axis_name, chunk)


def _varying_over(*arrays: Any) -> Callable[[Any], Any]:
    """The ``fresh`` hook: an accumulator made to vary over the axes ``arrays`` vary over."""
    axes = frozenset().union(*(jax_adapter.varying_axes(x) for x in arrays if x is not None))

    def fresh(zeros: Any) -> Any:
        missing = tuple(axes - jax_adapter.varying_axes(zeros))
        return jax.lax.pcast(zeros, missing, to="varying") if missing else zeros

    return fresh


def _global_row_routine(axis_name: Any) -> _core.RowRoutine:
    """The row routine of the forward pass: each chunk's statistics, all-reduced over the axis."""

    def routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
        dtype = rows.weights.dtype
        # The statistics of the logits as the backward pass gets them: rounded to their dtype
        # (which XLA would otherwise skip, see kernels.xla.widened).
        local = _core.row_statistics(widened(rows.z, dtype), jnp.astype(rows.p, dtype), xp=jnp)
        return global_rows(
            local,
            rows.weights,
            max_over_shards=functools.partial(jax.lax.pmax, axis_name=axis_name),
            sum_over_shards=functools.partial(jax.lax.psum, axis_name=axis_name),
            xp=jnp,
        )

    return routine


def _global_linear_loss_pass(
    arrays: jax_adapter.LinearArrays, reduction: str, axis_name: Any, chunk: int
) -> _linear.LinearForwardResult:
    """The chunked forward pass over the whole vocabulary: the loss and the saved statistics."""
    hidden, weight, bias = arrays.hidden, arrays.weight, arrays.bias
    targets, weights, count = arrays.target_probs, arrays.weights, arrays.num_valid
    inputs = LinearLossInputs(hidden, weight, bias, targets, weights, reduction, count, chunk)
    return _linear.chunked_loss_pass(
        inputs,
        hidden_grad=False,
        weight_grad=False,
        bias_grad=False,
        row_routine=_global_row_routine(axis_name),
        xp=jnp,
        # The rows' results are the same on every shard of the vocabulary.
        fresh=_varying_over(hidden, weights),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _linear_loss(
    arrays: jax_adapter.LinearArrays, reduction: str, axis_name: Any, chunk: int
) -> Any:
    return _global_linear_loss_pass(arrays, reduction, axis_name, chunk).loss


def _linear_loss_forward(
    arrays: jax_adapter.LinearArrays, reduction: str, axis_name: Any, chunk: int
) -> tuple[Any, Any]:
    result = _global_linear_loss_pass(arrays, reduction, axis_name, chunk)
    return result.loss, (arrays, result.saved, result.row_scale)


def _linear_loss_backward(
    reduction: str, axis_name: Any, chunk: int, residuals: Any, grad_loss: Any
) -> Any:
    """The cotangents of the linear arrays; the hidden one summed over the vocabulary axis."""
    arrays, saved, row_scale = residuals
    hidden, weight, bias = arrays.hidden, arrays.weight, arrays.bias
    targets, weights, count = arrays.target_probs, arrays.weights, arrays.num_valid
    upstream = _core.upstream_per_row(grad_loss, reduction, xp=jnp)
    row_scale = _core.upstream_row_scale(row_scale, upstream, xp=jnp)
    # This device's shard of the backward pass, from the global statistics; one computation per
    # result, so that jit drops the targets' gradient if unused.
    fresh = _varying_over(hidden, weight, bias, targets, *saved, row_scale)
    grads = jax_adapter.linear_gradient_pass(
        arrays, saved, row_scale, chunk, targets=False, fresh=fresh
    )
    grad_targets = jax_adapter.linear_gradient_pass(
        arrays, saved, row_scale, chunk, targets=True, fresh=fresh
    )
    # Each device's part of the hidden gradient covers its slice of the vocabulary.
    grad_hidden = jax.lax.psum(grads.hidden, axis_name)
    zero_count = None if count is None else jnp.zeros_like(count)
    cotangents = jax_adapter.LinearArrays(
        jax_adapter.like_primal(grad_hidden, hidden),
        jax_adapter.like_primal(grads.weight, weight),
        None if bias is None else jax_adapter.like_primal(grads.bias, bias),
        jax_adapter.like_primal(grad_targets, targets),
        jnp.zeros_like(weights),
        zero_count,
    )
    return (cotangents,)


_linear_loss.defvjp(_linear_loss_forward, _linear_loss_backward)
