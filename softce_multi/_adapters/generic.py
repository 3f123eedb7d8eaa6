"""The generic adapter: the blocked core for CuPy, array-api-strict and any other library, and
an in-place routine for NumPy.

It has the interface of every adapter (:class:`~softce_multi._core.Adapter`, as
:mod:`softce_multi._adapters.torch` and :mod:`softce_multi._adapters.jax`): ``loss`` and
``loss_with_grad`` of validated inputs, and ``linear_loss`` and ``linear_loss_with_grad`` (the
chunked loss of :mod:`softce_multi._linear`). These libraries have no autodiff, so the
gradients are computed in the same pass as the loss when asked for.
"""

from __future__ import annotations

import numpy as np

from softce_multi import _compat, _core, _linear
from softce_multi._types import Array, LinearGradients, LinearLossInputs, LossInputs, Namespace
from softce_multi.kernels import blocked
from softce_multi.kernels import numpy as numpy_kernels
from softce_multi.kernels import sparse as sparse_kernels


def loss(inputs: LossInputs, /) -> Array:
    """The loss of validated inputs."""
    return _loss_pass(inputs, with_logits_grad=False).loss


def loss_with_grad(inputs: LossInputs, /) -> tuple[Array, Array]:
    """The loss of validated inputs and its gradient to the logits, from one pass."""
    result = _loss_pass(inputs, with_logits_grad=True)
    return result.loss, result.logits_grad


def _loss_pass(inputs: LossInputs, *, with_logits_grad: bool) -> _core.ForwardResult:
    """The core's loss pass (:func:`softce_multi._core.loss_pass`) with the library's routine."""
    logits, target_probs = _native(inputs.logits), _native(inputs.target_probs)
    _, _, position_mask, reduction, num_valid, target_ids = inputs
    xp = _compat.array_namespace(logits)
    # Padding may hold NaN or inf: the core discards what they produce with where(), but NumPy
    # (under NumPy and array-api-strict) would still warn about computing it.
    with np.errstate(all="ignore"):
        return _core.loss_pass(
            logits,
            target_probs,
            position_mask,
            reduction=reduction,
            num_valid=num_valid,
            with_logits_grad=with_logits_grad,
            row_routine=_row_routine(logits.shape[-1], sparse=target_ids is not None, xp=xp),
            xp=xp,
            target_ids=target_ids,
        )


def _row_routine(vocab_size: int, *, sparse: bool, xp: Namespace) -> _core.RowRoutine:
    """The row routine for rows of ``vocab_size`` entries of the namespace ``xp``.

    Sparse targets get :func:`softce_multi.kernels.sparse.sparse_row_routine`. For dense ones,
    NumPy gets its in-place routine (:mod:`softce_multi.kernels.numpy`); every other library,
    array-api-strict and CuPy among them, the blocked core.
    """
    if sparse:
        return sparse_kernels.sparse_row_routine(_core.default_block_rows(vocab_size), xp=xp)
    if _compat.is_numpy_namespace(xp):
        return numpy_kernels.row_routine
    return blocked.blocked_row_routine(_core.default_block_rows(vocab_size), xp=xp)


def linear_loss(inputs: LinearLossInputs, /) -> Array:
    """The linear loss of validated inputs (no gradient)."""
    return _linear_loss_pass(inputs, with_grads=False).loss


def linear_loss_with_grad(inputs: LinearLossInputs, /) -> tuple[Array, LinearGradients]:
    """The linear loss of validated inputs and its three gradients, from one chunked pass."""
    result = _linear_loss_pass(inputs, with_grads=True)
    assert result.grads is not None  # asked for
    return result.loss, result.grads


def _linear_loss_pass(inputs: LinearLossInputs, *, with_grads: bool) -> _linear.LinearForwardResult:
    """The chunked loss pass (:func:`softce_multi._linear.chunked_loss_pass`), with all three
    gradients when ``with_grads``."""
    xp = _compat.array_namespace(inputs.hidden)
    inputs = inputs._replace(
        **{name: _native(getattr(inputs, name)) for name in ("hidden", "weight", "target_probs")}
    )
    if inputs.bias is not None:
        inputs = inputs._replace(bias=_native(inputs.bias))
    with np.errstate(all="ignore"):  # padding rows of hidden may hold NaN or inf
        return _linear.chunked_loss_pass(
            inputs,
            hidden_grad=with_grads,
            weight_grad=with_grads,
            bias_grad=with_grads and inputs.bias is not None,
            row_routine=_row_routine(
                inputs.weight.shape[0], sparse=inputs.target_ids is not None, xp=xp
            ),
            xp=xp,
        )


def _native(x: Array) -> Array:
    """A NumPy array in the machine's byte order (``>f8`` on x86 is float64 to compute in, but
    compares unequal to it); any other array as it is."""
    if isinstance(x, np.ndarray) and not x.dtype.isnative:
        return x.astype(x.dtype.newbyteorder("="))
    return x
