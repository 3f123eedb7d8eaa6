"""Public functions: validate the arguments, look up the backend's adapter, call it.

Every adapter is a module of :mod:`softce_multi._adapters` that implements
:class:`~softce_multi._core.Adapter`: four functions of one validated record, ``loss`` and
``loss_with_grad`` of a :class:`~softce_multi._types.LossInputs` (the loss of logits), and
``linear_loss`` and ``linear_loss_with_grad`` of a :class:`~softce_multi._types.LinearLossInputs`
(the loss of hidden states and an output projection, :mod:`softce_multi._linear`):
:mod:`softce_multi._adapters.torch` (autograd, the torch CPU path and the Triton kernels),
:mod:`softce_multi._adapters.jax` (``custom_vjp``, XLA and the Pallas kernels), and
:mod:`softce_multi._adapters.generic` (the blocked core) for every other library. The adapters
are imported on first use, so that importing the package imports no framework: NumPy,
array-api-compat and array-api-extra only.
"""

from __future__ import annotations

from typing import Literal

from softce_multi import _compat
from softce_multi._core import Adapter
from softce_multi._types import (
    Array,
    LinearGradients,
    LinearLossInputs,
    LossInputs,
    Namespace,
    Reduction,
)
from softce_multi._validate import check_reduction, validate_inputs, validate_linear_inputs


def _adapter(xp: Namespace) -> Adapter:
    """Return the adapter module for the namespace ``xp``, importing it on first use.

    ``import`` statements rather than :func:`importlib.import_module`, which ``torch.compile``
    refuses to trace: with them the public functions compile into one graph. Each module is
    returned as an :class:`~softce_multi._core.Adapter`, which mypy checks it against.
    """
    adapter: Adapter
    if _compat.is_torch_namespace(xp):
        from softce_multi._adapters import torch as adapter
    elif _compat.is_jax_namespace(xp):
        from softce_multi._adapters import jax as adapter
    else:
        from softce_multi._adapters import generic as adapter
    return adapter


def masked_soft_cross_entropy(
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    *,
    reduction: Reduction = "mean",
    num_valid: Array | float | None = None,
    target_ids: Array | None = None,
) -> Array:
    """Masked soft-target cross entropy, the loss of EAGLE-3 draft models.

    Per position, ``c = -sum_v p_v * log_softmax(z)_v``, where a term with ``p_v == 0`` is
    exactly 0. The positions are weighted by ``position_mask`` and reduced.

    Parameters
    ----------
    logits : array, shape ``[..., V]``
        Draft logits ``z`` in float16, bfloat16, float32 or float64.
    target_probs : array, shape ``[..., V]``
        Target distribution ``p`` over the same vocabulary, floating. It need not sum to 1.
    position_mask : array, shape ``[...]`` or ``[..., 1]``
        Weights ``w`` of the positions: bool, 0/1 or non-negative numbers. Positions with
        ``w == 0`` are padding: whatever their logits and targets hold, NaN and inf included,
        they change neither the loss nor the gradient.
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` gives ``sum(w * c) / max(sum(w), 1)``; ``"sum"`` gives ``sum(w * c)``;
        ``"none"`` gives ``w * c`` with shape ``logits.shape[:-1]``.
    num_valid : number or 0-d array, optional
        Replaces the denominator of ``"mean"``, for example the global count of valid positions
        under data parallelism, or ``batch * seq`` to reproduce the EAGLE/SpecForge reduction.
        A 0-d array stays on its device (it is never read on the host). 0 gives a loss of 0.
    target_ids : integer array, shape ``[..., K]``, optional
        Sparse (top-k) targets: ``target_probs`` is then ``[..., K]`` and holds the
        probabilities of these vocabulary ids. The loss is exactly that of the dense targets
        made by adding each ``target_probs[..., k]`` at ``target_ids[..., k]`` into zeros of
        shape ``[..., V]`` (duplicate ids add up; the mass outside the ``K`` ids is simply
        absent), but no ``[..., V]`` target is ever formed. A slot of probability 0 never
        matters, whatever its id (``-1`` padding included); an id outside ``[0, V)`` with a
        nonzero probability at a valid position makes that position's loss NaN. The gradient
        to ``target_probs`` is the dense one gathered at the ids. See :doc:`sparse`.

    Returns
    -------
    array
        The loss, in float32 (float64 when either input is float64), of the inputs' namespace
        and device. On PyTorch it is differentiable with respect to ``logits`` and
        ``target_probs``; on JAX it works under ``jax.grad``, ``jax.jit`` and ``jax.vmap``.

    Raises
    ------
    TypeError
        If an argument is not an array of a floating (mask: bool, integer or floating) dtype,
        or the arrays come from different libraries.
    ValueError
        If shapes disagree, the vocabulary axis is empty, the arrays are on different devices,
        ``reduction`` is unknown or ``num_valid`` is a negative number. Values inside
        arrays (a negative mask weight, a negative 0-d ``num_valid``) are not checked: that
        would read them back to the host.

    Examples
    --------
    >>> import numpy as np
    >>> import softce_multi as sc
    >>> logits = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]])
    >>> target = np.array([[[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]])
    >>> mask = np.array([[[True], [False]]])
    >>> round(float(sc.masked_soft_cross_entropy(logits, target, mask)), 6)
    0.169846
    """
    inputs = LossInputs(logits, target_probs, position_mask, reduction, num_valid, target_ids)
    return _adapter(validate_inputs(inputs)).loss(inputs)


def masked_soft_cross_entropy_with_grad(
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    *,
    reduction: Literal["mean", "sum"] = "mean",
    num_valid: Array | float | None = None,
    target_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Return the loss of :func:`masked_soft_cross_entropy` and its gradient to the logits.

    This is how NumPy and CuPy users train, and it works for every backend. The loss and the
    gradient come out of one pass over the inputs; the inputs are never written to.

    Parameters
    ----------
    logits, target_probs, position_mask, num_valid, target_ids
        As in :func:`masked_soft_cross_entropy`.
    reduction : {"mean", "sum"}, default "mean"
        ``"none"`` is refused: it has no single gradient.

    Returns
    -------
    loss : array, shape ``()``
        As :func:`masked_soft_cross_entropy` returns it.
    grad_logits : array, shape and dtype of ``logits``
        ``w / den * (sum(p) * softmax(z) - p)``, exactly 0 at masked positions.

    Examples
    --------
    >>> import numpy as np
    >>> import softce_multi as sc
    >>> logits = np.array([[0.0, 0.0]])
    >>> target = np.array([[1.0, 0.0]])
    >>> loss, grad = sc.masked_soft_cross_entropy_with_grad(logits, target, np.array([1]))
    >>> grad
    array([[-0.5,  0.5]])
    """
    inputs = LossInputs(logits, target_probs, position_mask, reduction, num_valid, target_ids)
    xp = validate_inputs(inputs)
    check_reduction(reduction, with_grad=True)
    return _adapter(xp).loss_with_grad(inputs)


def linear_masked_soft_cross_entropy(
    hidden: Array,
    weight: Array,
    target_probs: Array,
    position_mask: Array,
    *,
    bias: Array | None = None,
    reduction: Reduction = "mean",
    num_valid: Array | float | None = None,
    chunk_rows: int | None = None,
    target_ids: Array | None = None,
) -> Array:
    """The loss of the logits ``hidden @ weight.T + bias``, without ever forming all of them.

    Equals ``masked_soft_cross_entropy(hidden @ weight.T + bias, target_probs, position_mask)``
    with every rule of :func:`masked_soft_cross_entropy`, padding included, but the rows are
    processed in chunks: no more than one chunk's ``[chunk_rows, V]`` logits, and in training
    their gradient, exist at any time, forward or backward. The matmuls run in the inputs'
    dtype (bfloat16 stays bfloat16); the loss is float32 (float64 with a float64 input). See
    :doc:`memory` for what it saves.

    Parameters
    ----------
    hidden : array, shape ``[..., H]``
        Hidden states of the positions, floating. Rows at padding positions may hold NaN or
        inf: they reach no gradient, not even that of ``weight`` or ``bias``.
    weight : array, shape ``[V, H]``
        The output projection in the layout of ``torch.nn.Linear.weight`` (an EAGLE-3 draft
        ``lm_head``).
    target_probs : array, shape ``[..., V]``
        Target distribution over the vocabulary of ``weight``, per position of ``hidden``.
    position_mask : array, shape ``[...]`` or ``[..., 1]``
        Weights of the positions, as in :func:`masked_soft_cross_entropy`.
    bias : array, shape ``[V]``, optional
        Added to the logits.
    reduction, num_valid
        As in :func:`masked_soft_cross_entropy`.
    chunk_rows : int, optional
        Rows per chunk. By default a chunk takes about 32 MiB in the computation dtype, or as
        much as one ``[V, H]`` array (the size of the weight gradient) where that is more: its
        logits and their gradient side by side (131 rows of a 32000-token vocabulary in
        float32, ``H / 2`` rows if more), or on PyTorch and JAX one buffer that takes the
        gradient over the logits (262 rows, ``H`` rows if more).
    target_ids : integer array, shape ``[..., K]``, optional
        Sparse targets, as in :func:`masked_soft_cross_entropy`: ``target_probs`` is then
        ``[..., K]``, the probabilities of these ids of the vocabulary of ``weight``.

    Returns
    -------
    array
        The loss, as :func:`masked_soft_cross_entropy` returns it. On PyTorch it is
        differentiable with respect to ``hidden``, ``weight``, ``bias`` and ``target_probs``
        (once: not twice); on JAX it works under ``jax.grad`` and ``jax.jit``.

    Raises
    ------
    TypeError, ValueError
        As :func:`masked_soft_cross_entropy`; a shape error names the two arguments that
        disagree (``weight`` and ``hidden``, ``target_probs`` and ``weight``, ``bias`` and
        ``weight``).

    Examples
    --------
    >>> import numpy as np
    >>> import softce_multi as sc
    >>> rng = np.random.default_rng(0)
    >>> hidden = rng.standard_normal((2, 8, 16))
    >>> weight = rng.standard_normal((50, 16))
    >>> target = rng.dirichlet(np.ones(50), size=(2, 8))
    >>> mask = rng.random((2, 8)) < 0.8
    >>> loss = sc.linear_masked_soft_cross_entropy(hidden, weight, target, mask, chunk_rows=3)
    >>> plain = sc.masked_soft_cross_entropy(hidden @ weight.T, target, mask)
    >>> bool(np.isclose(loss, plain, rtol=1e-12))
    True
    """
    inputs = LinearLossInputs(
        hidden,
        weight,
        bias,
        target_probs,
        position_mask,
        reduction,
        num_valid,
        chunk_rows,
        target_ids,
    )
    return _adapter(validate_linear_inputs(inputs)).linear_loss(inputs)


def linear_masked_soft_cross_entropy_with_grad(
    hidden: Array,
    weight: Array,
    target_probs: Array,
    position_mask: Array,
    *,
    bias: Array | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    num_valid: Array | float | None = None,
    chunk_rows: int | None = None,
    target_ids: Array | None = None,
) -> tuple[Array, LinearGradients]:
    """Return the loss of :func:`linear_masked_soft_cross_entropy` and its gradients.

    For every backend, NumPy and CuPy included. The gradients come out of the same chunked pass
    as the loss: three matmuls per chunk, the logits of one chunk at a time.

    Parameters
    ----------
    hidden, weight, target_probs, position_mask, bias, num_valid, chunk_rows, target_ids
        As in :func:`linear_masked_soft_cross_entropy`.
    reduction : {"mean", "sum"}, default "mean"
        ``"none"`` is refused: it has no single gradient.

    Returns
    -------
    loss : array, shape ``()``
        As :func:`linear_masked_soft_cross_entropy` returns it.
    grads : LinearGradients
        The named tuple ``(hidden, weight, bias)`` of the gradients, each in the shape and dtype
        of its input (``bias`` is None without a bias). Padding rows of ``hidden`` get exactly
        0; the weight and bias gradients are accumulated in float32 (float64) over the chunks.

    Examples
    --------
    >>> import numpy as np
    >>> import softce_multi as sc
    >>> hidden = np.array([[1.0, 0.0], [np.nan, np.nan]])  # the second row is padding
    >>> weight = np.array([[1.0, 2.0], [0.0, -1.0], [0.5, 0.5]])
    >>> target = np.full((2, 3), 1 / 3)
    >>> loss, grads = sc.linear_masked_soft_cross_entropy_with_grad(
    ...     hidden, weight, target, np.array([True, False]), bias=np.zeros(3)
    ... )
    >>> grads.hidden[1]
    array([0., 0.])
    >>> bool(np.isfinite(grads.weight).all())
    True
    """
    inputs = LinearLossInputs(
        hidden,
        weight,
        bias,
        target_probs,
        position_mask,
        reduction,
        num_valid,
        chunk_rows,
        target_ids,
    )
    xp = validate_linear_inputs(inputs)
    check_reduction(reduction, with_grad=True, loss="linear_masked_soft_cross_entropy")
    return _adapter(xp).linear_loss_with_grad(inputs)
