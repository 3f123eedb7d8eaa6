"""The loss for JAX: :func:`masked_soft_cross_entropy` of ``jax.Array`` inputs.

The public functions of :mod:`softce_multi` take JAX arrays as they are; this module is the
same loss under a JAX-only signature, for code that wants to say so.
"""

from __future__ import annotations

from typing import Any

from softce_multi import _compat

try:
    import jax
    import jax.numpy as jnp
except ModuleNotFoundError as error:
    raise _compat.missing_framework("jax", "softce_multi.jax") from error
import numpy as np

from softce_multi._adapters import jax as _adapter
from softce_multi._types import LossInputs, Reduction
from softce_multi._validate import check_library, validate_inputs

__all__ = ["masked_soft_cross_entropy"]


def masked_soft_cross_entropy(
    logits: jax.Array,
    target_probs: jax.Array,
    position_mask: jax.Array,
    *,
    reduction: Reduction = "mean",
    num_valid: jax.Array | float | None = None,
    target_ids: jax.Array | None = None,
) -> jax.Array:
    """Masked soft-target cross entropy for JAX, differentiable with a custom VJP.

    Same function as :func:`softce_multi.masked_soft_cross_entropy`, for ``jax.Array`` inputs;
    safe under ``jax.jit``, ``jax.grad`` and ``jax.vmap``. NumPy arrays are converted with
    ``jnp.asarray``, as JAX's own functions convert them, so they may stand beside JAX arrays
    and tracers (under ``jax.grad`` of one argument, for example).

    Parameters
    ----------
    logits : jax.Array, shape ``[..., V]``
        The draft logits: float16, bfloat16, float32 or float64.
    target_probs : jax.Array, shape ``[..., V]``
        The target distribution over the same vocabulary; need not be normalised. Its gradient
        is ``-w / den * log_softmax(logits)``: wrap it in ``jax.lax.stop_gradient`` when it is
        a constant target.
    position_mask : jax.Array, shape ``[...]`` or ``[..., 1]``
        Position weights: bool, integer or float. Positions of weight 0 are ignored, even if
        they hold NaN or inf.
    reduction : {"mean", "sum", "none"}
        ``"mean"`` is ``sum(w * c) / max(sum(w), 1)``.
    num_valid : jax.Array or float, optional
        Replaces the denominator of ``"mean"``: a number or a 0-d array (traced values are
        fine). 0 gives a loss of 0.
    target_ids : jax.Array, shape ``[..., K]``, optional
        Sparse targets: ``target_probs`` is then ``[..., K]``, the probabilities of these ids
        (see :func:`softce_multi.masked_soft_cross_entropy`). They get no gradient.

    Returns
    -------
    jax.Array
        The loss in float32 (float64 when an input is float64 and x64 is enabled), of shape
        ``()``, or ``logits.shape[:-1]`` for ``"none"``. Gradients come back in the inputs'
        dtypes.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from softce_multi.jax import masked_soft_cross_entropy
    >>> logits = jax.random.normal(jax.random.key(0), (2, 4, 16))
    >>> target = jax.nn.softmax(jax.random.normal(jax.random.key(1), (2, 4, 16)))
    >>> mask = jnp.ones((2, 4, 1), dtype=bool)
    >>> grad = jax.jit(jax.grad(masked_soft_cross_entropy))(logits, target, mask)
    >>> grad.shape
    (2, 4, 16)
    """
    inputs = LossInputs(
        _as_jax(logits),
        _as_jax(target_probs),
        _as_jax(position_mask),
        reduction,
        _as_jax(num_valid),
        _as_jax(target_ids),
    )
    xp = validate_inputs(inputs)
    check_library(xp, ("jax",), function="softce_multi.jax.masked_soft_cross_entropy")
    return _adapter.loss(inputs)


def _as_jax(x: Any) -> Any:
    """A NumPy array of bools, integers or floats (bfloat16 included) as a JAX array; anything
    else as it is (NumPy scalars, masked arrays, and dtypes JAX cannot hold, which the checks
    then refuse by the argument's name)."""
    if type(x) is not np.ndarray or not (x.dtype.kind in "biuf" or x.dtype.name == "bfloat16"):
        return x
    return jnp.asarray(x)
