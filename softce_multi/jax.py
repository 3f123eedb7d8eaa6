"""JAX adapter: a ``jax.custom_vjp`` around the shared core, safe under ``jit`` and ``vmap``.

The core runs unblocked here and XLA fuses it under ``jax.jit``. The forward pass keeps only
per-row statistics; the backward pass recomputes the gradient rows from them and the inputs,
so a training step reads the logits and targets twice. XLA's compiled step holds one ``[N, V]``
float32 temporary (``python -m softce_multi bench`` reports it).

On a GPU, with the Triton backend of Pallas available, the per-row work runs the kernels of
:mod:`softce_multi.kernels.pallas` instead (imported on first use). Both versions are then
staged with ``jax.lax.platform_dependent``, which keeps the one for the platform the
computation is compiled for, so arrays placed on the CPU of a GPU host still get the core.

Like every adapter, the module has ``loss`` and ``loss_with_grad`` of validated inputs, which
:func:`softce_multi.masked_soft_cross_entropy` and its ``_with_grad`` twin dispatch to; its
public entry point is :func:`masked_soft_cross_entropy`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from softce_multi import _core, kernels
from softce_multi._types import Reduction
from softce_multi._validate import validate_inputs

__all__ = ["masked_soft_cross_entropy"]

#: Platforms, as ``jax.lax.platform_dependent`` names them, that run the Pallas kernels: those of
#: the Triton backend of Pallas.
_KERNEL_PLATFORMS = ("cuda", "rocm")


def masked_soft_cross_entropy(
    logits: jax.Array,
    target_probs: jax.Array,
    position_mask: jax.Array,
    /,
    *,
    reduction: Reduction = "mean",
    num_valid: jax.Array | float | None = None,
) -> jax.Array:
    """Masked soft-target cross entropy for JAX, differentiable with a custom VJP.

    Same function as :func:`softce_multi.masked_soft_cross_entropy`, for ``jax.Array`` inputs.

    Args:
      logits: draft logits, shape ``[..., V]``, float16/bfloat16/float32/float64.
      target_probs: target distribution over the same vocabulary, shape ``[..., V]``; need not
        be normalised. Its gradient is ``-w / den * log_softmax(logits)``; wrap it in
        ``jax.lax.stop_gradient`` when it is a constant target.
      position_mask: position weights, shape ``[...]`` or ``[..., 1]``, bool, integer or float.
        Positions with weight 0 are ignored, even if they hold NaN or inf.
      reduction: ``"mean"`` (``sum(w*c) / max(sum(w), 1)``), ``"sum"`` or ``"none"``.
      num_valid: replaces the denominator of ``"mean"``; a number or a 0-d ``jax.Array``
        (traced values are fine). 0 gives a loss of 0.

    Returns:
      The loss in float32 (float64 when an input is float64 and x64 is enabled); shape ``()``,
      or ``logits.shape[:-1]`` for ``"none"``. Gradients come back in the inputs' dtypes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from softce_multi.jax import masked_soft_cross_entropy
      >>> logits = jax.random.normal(jax.random.key(0), (2, 4, 16))
      >>> target = jax.nn.softmax(jax.random.normal(jax.random.key(1), (2, 4, 16)))
      >>> mask = jnp.ones((2, 4, 1), dtype=bool)
      >>> grad = jax.jit(jax.grad(masked_soft_cross_entropy))(logits, target, mask)
      >>> grad.shape
      (2, 4, 16)
    """
    validate_inputs(logits, target_probs, position_mask, reduction, num_valid)
    return loss(logits, target_probs, position_mask, reduction=reduction, num_valid=num_valid)


def loss(
    logits: jax.Array,
    target_probs: jax.Array,
    position_mask: jax.Array,
    /,
    *,
    reduction: str,
    num_valid: jax.Array | float | None,
) -> jax.Array:
    """The differentiable loss of validated inputs (the adapter interface)."""
    weights, count = _constants(logits, target_probs, position_mask, num_valid)
    return _loss(logits, target_probs, weights, count, reduction)


def loss_with_grad(
    logits: jax.Array,
    target_probs: jax.Array,
    position_mask: jax.Array,
    /,
    *,
    reduction: str,
    num_valid: jax.Array | float | None,
) -> tuple[jax.Array, jax.Array]:
    """The loss of validated inputs and its logits gradient, from one forward pass.

    On a GPU this is the Pallas forward kernel with its gradient sweep.
    """
    weights, count = _constants(logits, target_probs, position_mask, num_valid)
    result = _forward(logits, target_probs, weights, count, reduction, with_logits_grad=True)
    assert result.logits_grad is not None  # requested with with_logits_grad=True
    return result.loss, result.logits_grad


def _constants(
    logits: jax.Array,
    target_probs: jax.Array,
    position_mask: jax.Array,
    num_valid: jax.Array | float | None,
) -> tuple[jax.Array, jax.Array | None]:
    """The mask and count as constants of the computation dtype (they get no gradient)."""
    dtype = _core.compute_dtype(logits, target_probs, xp=jnp)
    weights = jax.lax.stop_gradient(jnp.astype(position_mask, dtype))
    count = None if num_valid is None else jax.lax.stop_gradient(jnp.asarray(num_valid, dtype))
    return weights, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loss(
    logits: jax.Array,
    target_probs: jax.Array,
    weights: jax.Array,
    count: jax.Array | None,
    reduction: str,
) -> jax.Array:
    return _forward(logits, target_probs, weights, count, reduction, with_logits_grad=False).loss


def _forward(
    logits: jax.Array,
    target_probs: jax.Array,
    weights: jax.Array,
    count: jax.Array | None,
    reduction: str,
    *,
    with_logits_grad: bool,
) -> _core.ForwardResult:
    """The driver of the core with the per-row work of the platform (Pallas or the core)."""
    return _core.forward(
        logits,
        target_probs,
        weights,
        reduction=reduction,
        num_valid=count,
        with_logits_grad=with_logits_grad,
        row_routine=row_routine,
        xp=jnp,
    )


def row_routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """:class:`softce_multi._core.RowRoutine` of the Pallas kernel where it runs, else the core."""

    def core(rows: _core.Rows) -> _core.RowResults:
        routine = _core.blocked_row_routine(None, xp=jnp)
        return routine(rows, with_logits_grad=with_logits_grad)

    def kernel(rows: _core.Rows) -> _core.RowResults:
        from softce_multi.kernels import pallas

        return pallas.row_routine(rows, with_logits_grad=with_logits_grad)

    return _per_platform(kernel, core, rows.z, rows)


def gradient_routine(
    z: jax.Array,
    p: jax.Array,
    saved: _core.SavedRows,
    row_scale: jax.Array,
    /,
    *,
    logits_grad: bool,
    targets_grad: bool,
) -> tuple[jax.Array | None, jax.Array | None]:
    """The gradient routine of the Pallas kernel on a GPU, else of the core."""

    def core(z: Any, p: Any, saved: Any, row_scale: Any) -> Any:
        routine = _core.blocked_gradient_routine(None, xp=jnp)
        return routine(z, p, saved, row_scale, logits_grad=logits_grad, targets_grad=targets_grad)

    def kernel(z: Any, p: Any, saved: Any, row_scale: Any) -> Any:
        from softce_multi.kernels import pallas

        return pallas.gradient_routine(
            z, p, saved, row_scale, logits_grad=logits_grad, targets_grad=targets_grad
        )

    return _per_platform(kernel, core, z, z, p, saved, row_scale)


def _loss_fwd(
    logits: jax.Array,
    target_probs: jax.Array,
    weights: jax.Array,
    count: jax.Array | None,
    reduction: str,
) -> tuple[jax.Array, tuple[Any, ...]]:
    result = _forward(logits, target_probs, weights, count, reduction, with_logits_grad=False)
    residuals = (logits, target_probs, result.saved, result.row_scale, weights, count)
    return result.loss, residuals


def _loss_bwd(
    reduction: str, residuals: tuple[Any, ...], grad_output: jax.Array
) -> tuple[Any, ...]:
    logits, target_probs, saved, row_scale, weights, count = residuals
    upstream = jnp.reshape(grad_output, (-1,)) if reduction == "none" else grad_output
    row_scale = row_scale * upstream
    # One computation per gradient, so that jit drops the one that is not used.
    grad_logits, _ = _core.backward(
        logits,
        target_probs,
        saved,
        row_scale,
        logits_grad=True,
        targets_grad=False,
        gradient_routine=gradient_routine,
        xp=jnp,
    )
    _, grad_targets = _core.backward(
        logits,
        target_probs,
        saved,
        row_scale,
        logits_grad=False,
        targets_grad=True,
        gradient_routine=gradient_routine,
        xp=jnp,
    )
    zero_count = None if count is None else jnp.zeros_like(count)
    return grad_logits, grad_targets, jnp.zeros_like(weights), zero_count


def _per_platform(kernel: Any, core: Any, probe: jax.Array, *arrays: Any) -> Any:
    """Return ``kernel(*arrays)`` where the Pallas kernels run on ``probe``, else ``core(...)``.

    Where :func:`softce_multi.kernels.use_pallas` says no (no GPU, or no Pallas), only the core
    is traced. Otherwise both are, and the platform the computation is compiled for picks one.
    """
    if not kernels.use_pallas(probe):
        return core(*arrays)
    branches = dict.fromkeys(_KERNEL_PLATFORMS, kernel)
    return jax.lax.platform_dependent(*arrays, default=core, **branches)


_loss.defvjp(_loss_fwd, _loss_bwd)
