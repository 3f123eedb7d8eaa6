"""The loss straight from hidden states, with the logits one chunk of rows at a time.

:func:`softce_multi.linear_masked_soft_cross_entropy` is the loss of the logits
``hidden @ weight.T + bias``. Written that way, the ``[N, V]`` logits, and in training their
gradient, exist in full. Here the rows are processed in chunks of ``chunk`` rows, and only one
chunk's ``[chunk, V]`` logits and logits gradient exist at any time:

1. :func:`chunk_logits`: the chunk's logits, ``hidden_chunk @ weight.T + bias``, in the dtype of
   the matmul's inputs (bfloat16 stays bfloat16; the libraries accumulate in float32);
2. the implementation's :class:`~softce_multi._core.RowRoutine` (the generic core, the torch CPU
   operator, the Triton or Pallas kernel): the chunk's weighted losses, its saved row statistics
   and, when gradients are asked for, its logits gradient, in one pass;
3. :func:`chunk_gradients`: the chunk's rows of the hidden gradient, ``grad_logits @ weight``,
   and its contributions to the weight gradient, ``grad_logits.T @ hidden_chunk``, and to the
   bias gradient, the column sums of ``grad_logits``. The weight and bias gradients are
   accumulated over the chunks in the computation dtype (float32, or float64).

When the gradients are asked for in the forward pass (:func:`forward` with ``hidden_grad``,
``weight_grad`` or ``bias_grad``), a training step does three matmuls per chunk and never
recomputes the logits. :func:`backward` recomputes them chunk by chunk from the saved row
statistics, for what the forward pass could not know: a per-position upstream gradient
(``reduction="none"``) and the gradient to the targets.

Padding rows (weight 0) may hold NaN or inf in ``hidden``. Their logits gradient is exactly 0,
but ``0 * NaN`` is NaN, so the weight gradient multiplies a copy of the chunk's hidden rows in
which they are replaced by zeros with ``where``.

Every function takes the namespace ``xp``; the one-chunk functions (:func:`chunk_logits`,
:func:`chunk_gradients`) are shared by the eager driver here and the ``lax.map`` of the JAX
adapter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import array_api_compat
import array_api_extra as xpx

from softce_multi import _core
from softce_multi._types import Array, LinearGradients, LinearLossInputs, Namespace

__all__ = [
    "CHUNK_BYTES",
    "ChunkLogits",
    "LinearForwardResult",
    "LinearGradients",
    "LinearRows",
    "backward",
    "chunk_gradients",
    "chunk_logits",
    "default_chunk_rows",
    "forward",
]

#: Bytes of the ``[chunk, V]`` arrays that one chunk holds at once (its logits and, unless the
#: row routine writes it over them, their gradient), in the computation dtype, that the default
#: chunk size aims for (:func:`default_chunk_rows`).
CHUNK_BYTES = 32 << 20


class LinearForwardResult(NamedTuple):
    """What one chunked pass produces."""

    loss: Array
    """The reduced loss, in the computation dtype."""
    grads: LinearGradients | None
    """The gradients asked for (None in a field not asked for), for a unit upstream gradient."""
    saved: _core.SavedRows
    """Row statistics of all ``N`` rows, for :func:`backward`."""
    row_scale: Array
    """``d loss / d c_row`` per row, shape ``[N]`` (see :class:`softce_multi._core.Rows`)."""


class LinearRows(NamedTuple):
    """The inputs as rows, with the weights and the denominator of the reduction."""

    hidden: Array
    """``[N, H]``, in its own dtype."""
    weight: Array
    """``[V, H]``, in the matmul dtype."""
    bias: Array | None
    """``[V]`` in the matmul dtype, or None."""
    p: Array
    """The targets as ``[N, V]``, in their own dtype."""
    weights: Array
    """The mask as ``[N]`` weights, in the computation dtype."""
    inv_den: Array
    """``1 / den`` as a 0-d array (see :func:`softce_multi._core.inverse_denominator`)."""

    @property
    def row_scale(self) -> Array:
        """``d loss / d c_row`` for a unit upstream gradient: ``w / den``."""
        return self.weights * self.inv_den


def compute_dtype(*arrays: Array | None, xp: Namespace) -> Any:
    """float64 when any of the (floating) arrays is float64, else float32; None is skipped."""
    if any(array is not None and array.dtype == xp.float64 for array in arrays):
        return xp.float64
    return xp.float32


def default_chunk_rows(vocab_size: int, dtype: Any, *, xp: Namespace, copies: int = 2) -> int:
    """Rows per chunk: ``copies`` ``[chunk, V]`` arrays take :data:`CHUNK_BYTES` in ``dtype``.

    ``dtype`` is the computation dtype (float32 or float64); ``copies`` is 2 for a chunk's
    logits and their gradient, 1 when the gradient is written over the logits. At least one row.
    """
    row_bytes = copies * vocab_size * xp.finfo(dtype).bits // 8
    return max(1, CHUNK_BYTES // max(row_bytes, 1))


def as_linear_rows(
    hidden: Array,
    weight: Array,
    bias: Array | None,
    target_probs: Array,
    position_mask: Array,
    *,
    reduction: str,
    num_valid: Array | float | None,
    xp: Namespace,
    matmul_dtype: Any = None,
) -> LinearRows:
    """Lay out validated inputs as rows; ``weight`` and ``bias`` in the matmul dtype.

    The matmul dtype is ``matmul_dtype`` when given (an autocast dtype), else that of
    ``hidden @ weight.T + bias`` (the promotion of the three).
    """
    dtype = compute_dtype(hidden, weight, bias, target_probs, xp=xp)
    if matmul_dtype is None:
        matmul_dtype = xp.result_type(*(x for x in (hidden, weight, bias) if x is not None))
    n_rows = math.prod(hidden.shape[:-1])
    weights = xp.astype(xp.reshape(position_mask, (n_rows,)), dtype)
    return LinearRows(
        xp.reshape(hidden, (n_rows, hidden.shape[-1])),
        xp.astype(weight, matmul_dtype, copy=False),
        None if bias is None else xp.astype(bias, matmul_dtype, copy=False),
        xp.reshape(target_probs, (n_rows, weight.shape[0])),
        weights,
        _core.inverse_denominator(weights, reduction, num_valid, xp=xp),
    )


def chunk_logits(hidden: Array, weight: Array, bias: Array | None, *, xp: Namespace) -> Array:
    """``hidden @ weight.T + bias`` of a ``[chunk, H]`` block, in the dtype of ``weight``."""
    logits = xp.astype(hidden, weight.dtype, copy=False) @ xp.matrix_transpose(weight)
    return logits if bias is None else logits + bias


#: ``logits(hidden_rows, weight, bias)`` returns a chunk's logits, as :func:`chunk_logits` does;
#: an implementation may return a view of one buffer that it reuses for every chunk.
ChunkLogits = Callable[[Array, Array, "Array | None"], Array]


#: ``add_product(total, a, b)`` returns ``total + a @ b`` in the dtype of ``total``; it may
#: update ``total`` in place.
AddProduct = Callable[[Array, Array, Array], Array]


def add_product(total: Array, a: Array, b: Array, *, xp: Namespace) -> Array:
    """``total + a @ b`` in the dtype of ``total``: the generic :data:`AddProduct`."""
    return total + xp.astype(a @ b, total.dtype, copy=False)


class ChunkGradients(NamedTuple):
    """The contributions of one chunk of rows to the gradients."""

    hidden: Array
    """The chunk's rows of ``d loss / d hidden``, ``[chunk, H]`` in the dtype of ``hidden``."""
    weight: Array | None
    """The weight gradient accumulated so far, this chunk included."""
    bias: Array | None
    """The bias gradient accumulated so far, this chunk included."""


def chunk_gradients(
    grad_logits: Array | None,
    hidden: Array,
    weight: Array,
    live: Array,
    weight_total: Array | None,
    bias_total: Array | None,
    *,
    add: AddProduct,
    xp: Namespace,
    counted: Array | None = None,
) -> ChunkGradients:
    """Turn one chunk's logits gradient into its parts of the three gradients.

    Parameters
    ----------
    grad_logits : array, shape ``[chunk, V]``
        The chunk's logits gradient, exactly 0 in rows that are not ``live``.
    hidden : array, shape ``[chunk, H]``
        The chunk's hidden rows, which may hold anything (NaN included) where not ``live``.
    weight : array, shape ``[V, H]``
        The weight in the matmul dtype.
    live : array of bool, shape ``[chunk]``
        The rows whose gradient may be nonzero (nonzero row scale).
    weight_total, bias_total : array or None
        The weight (``[V, H]``) and bias (``[V]``) gradients accumulated over the previous
        chunks, in the computation dtype; None for a gradient not asked for.
    add
        How to add a product to ``weight_total`` (see :data:`AddProduct`).
    xp
        The array namespace.
    counted : array of bool, shape ``[chunk]``, optional
        The live rows that add to the weight and bias gradients, when not all of them do (a
        chunk that overlaps rows already counted, as the last chunk of a fixed-size loop does).

    Returns
    -------
    ChunkGradients
        The chunk's hidden rows (always computed; the caller drops them if not needed) and the
        updated totals. Rows that are not ``live`` get exactly 0 and add exactly 0.
    """
    assert grad_logits is not None  # the routines return the gradient asked for
    grad_hidden = xp.where(live[:, None], grad_logits @ weight, 0.0)
    grad_hidden = xp.astype(grad_hidden, hidden.dtype, copy=False)
    summed = live if counted is None else counted
    if weight_total is not None:
        # 0 * NaN is NaN: padding rows are replaced by zeros, never multiplied by them.
        safe_hidden = xp.where(summed[:, None], xp.astype(hidden, weight.dtype, copy=False), 0.0)
        weight_total = add(weight_total, xp.matrix_transpose(grad_logits), safe_hidden)
    if bias_total is not None:
        # Rows that are not live hold exact zeros already.
        rows = grad_logits if counted is None else xp.where(counted[:, None], grad_logits, 0.0)
        # Summed in the total's dtype, without a converted [chunk, V] copy.
        bias_total = bias_total + xp.sum(rows, axis=0, dtype=bias_total.dtype)
    return ChunkGradients(grad_hidden, weight_total, bias_total)


def forward(
    inputs: LinearLossInputs,
    /,
    *,
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    row_routine: _core.RowRoutine,
    xp: Namespace,
    add: AddProduct | None = None,
    logits: ChunkLogits | None = None,
    logits_copies: int = 2,
    matmul_dtype: Any = None,
) -> LinearForwardResult:
    """The loss of validated inputs, and the gradients asked for, chunk by chunk of rows.

    Parameters
    ----------
    inputs
        Validated inputs: ``hidden`` ``[..., H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or
        None, ``target_probs`` ``[..., V]``, ``position_mask`` ``[...]`` or ``[..., 1]``, and
        ``chunk_rows`` (rows per chunk; None for :func:`default_chunk_rows`).
    hidden_grad, weight_grad, bias_grad
        Which gradients to compute, for a unit upstream gradient; not with ``"none"``.
    row_routine
        The implementation's per-row work, for example
        :func:`softce_multi._core.blocked_row_routine`.
    xp
        The array namespace of the inputs.
    add
        How to add a product to the weight gradient (:data:`AddProduct`); the generic
        :func:`add_product` by default.
    logits
        How to compute a chunk's logits (:data:`ChunkLogits`); :func:`chunk_logits` by
        default.
    logits_copies
        How many ``[chunk, V]`` arrays a chunk holds, for the default chunk size
        (:func:`default_chunk_rows`): 2, or 1 when ``row_routine`` writes the logits gradient
        over the logits.
    matmul_dtype
        The dtype of the chunks' matmuls (an autocast dtype); by default that of
        ``hidden @ weight.T + bias``. The gradients come back in their inputs' dtypes.
    """
    rows = as_linear_rows(
        *inputs[:5],
        reduction=inputs.reduction,
        num_valid=inputs.num_valid,
        xp=xp,
        matmul_dtype=matmul_dtype,
    )
    dtype = rows.weights.dtype
    n_rows, vocab_size = rows.p.shape
    chunk = inputs.chunk_rows or default_chunk_rows(vocab_size, dtype, xp=xp, copies=logits_copies)
    wants_grads = hidden_grad or weight_grad or bias_grad
    add = add or _generic_add(xp)
    logits = logits or functools.partial(chunk_logits, xp=xp)
    row_scale = rows.row_scale
    sums = _zero_sums(rows, hidden_grad, weight_grad, bias_grad, xp=xp)
    weighted, saved = [], []
    for block in _core.row_blocks(n_rows, chunk):
        h = rows.hidden[block, ...]
        z = logits(h, rows.weight, rows.bias)
        piece = _core.Rows(z, rows.p[block, ...], rows.weights[block], rows.inv_den)
        results = row_routine(piece, with_logits_grad=wants_grads)
        del z, piece  # the chunk's logits are no longer needed
        weighted.append(results.weighted)
        saved.append(results.saved)
        if wants_grads:
            sums = _add_chunk(sums, block, results.logits_grad, h, rows, row_scale, add=add, xp=xp)
        del results
    loss = _core.reduce_loss(
        _concat(weighted, rows.weights, xp=xp),
        # reduce_loss reads only the denominator of the rows.
        _core.Rows(rows.hidden, rows.p, rows.weights, rows.inv_den),
        reduction=inputs.reduction,
        batch_shape=inputs.hidden.shape[:-1],
        xp=xp,
    )
    grads = _finish_gradients(*inputs[:3], sums, xp=xp) if wants_grads else None
    saved_rows = _core.SavedRows(
        *(_concat([s[i] for s in saved], rows.weights, xp=xp) for i in range(3))
    )
    return LinearForwardResult(loss, grads, saved_rows, row_scale)


def backward(
    hidden: Array,
    weight: Array,
    bias: Array | None,
    target_probs: Array,
    saved: _core.SavedRows,
    row_scale: Array,
    *,
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    targets_grad: bool,
    chunk_rows: int | None,
    gradient_routine: _core.GradientRoutine,
    xp: Namespace,
    add: AddProduct | None = None,
    logits: ChunkLogits | None = None,
    logits_copies: int = 2,
    matmul_dtype: Any = None,
) -> tuple[LinearGradients | None, Array | None]:
    """Recompute the logits chunk by chunk and return the gradients asked for.

    ``saved`` and ``row_scale`` come from :func:`forward`; ``row_scale`` is already multiplied by
    the upstream gradient (per row for ``"none"``). ``logits``, ``logits_copies`` and
    ``matmul_dtype`` must be those of the forward pass, which then gets the same chunks and the
    same logits, to the last bit (the saved statistics are theirs). Returns the
    :class:`LinearGradients` (None in a field not asked for; None altogether if none of the
    three is) and the gradient to ``target_probs`` in its dtype and shape (None if not asked
    for).
    """
    wants_grads = hidden_grad or weight_grad or bias_grad
    add = add or _generic_add(xp)
    logits = logits or functools.partial(chunk_logits, xp=xp)
    n_rows = math.prod(hidden.shape[:-1])
    vocab_size = weight.shape[0]
    # The row scale as the weights of "sum", whose denominator is 1.
    rows = as_linear_rows(
        hidden,
        weight,
        bias,
        target_probs,
        row_scale,
        reduction="sum",
        num_valid=None,
        xp=xp,
        matmul_dtype=matmul_dtype,
    )
    dtype = row_scale.dtype
    chunk = chunk_rows or default_chunk_rows(vocab_size, dtype, xp=xp, copies=logits_copies)
    sums = _zero_sums(rows, hidden_grad, weight_grad, bias_grad, xp=xp)
    grad_targets = _empty(rows.p, xp=xp) if targets_grad else None
    for block in _core.row_blocks(n_rows, chunk):
        h = rows.hidden[block, ...]
        z = logits(h, rows.weight, rows.bias)
        block_rows = _core.BackwardRows(
            z, rows.p[block, ...], _core.SavedRows(*(s[block] for s in saved)), row_scale[block]
        )
        grad_z, grad_p = gradient_routine(
            block_rows,
            logits_grad=wants_grads,
            targets_grad=targets_grad,
        )
        del z, block_rows
        if grad_targets is not None:
            grad_targets = xpx.at(grad_targets, (block, ...)).set(cast(Array, grad_p), xp=xp)
        if wants_grads:
            sums = _add_chunk(sums, block, grad_z, h, rows, row_scale, add=add, xp=xp)
        del grad_z, grad_p
    grads = _finish_gradients(hidden, weight, bias, sums, xp=xp) if wants_grads else None
    if grad_targets is not None:
        grad_targets = xp.reshape(grad_targets, target_probs.shape)
    return grads, grad_targets


def _generic_add(xp: Namespace) -> AddProduct:
    def add(total: Array, a: Array, b: Array) -> Array:
        return add_product(total, a, b, xp=xp)

    return add


def _zero_sums(
    rows: LinearRows, hidden_grad: bool, weight_grad: bool, bias_grad: bool, *, xp: Namespace
) -> LinearGradients:
    """The running sums of the gradients asked for, before the first chunk.

    The hidden gradient is an uninitialised ``[N, H]`` array in the dtype of ``hidden`` (each
    chunk writes its rows); the weight and bias gradients are zeros in the computation dtype.
    """
    dtype = rows.weights.dtype
    device = array_api_compat.device(rows.weight)
    return LinearGradients(
        _empty(rows.hidden, xp=xp) if hidden_grad else None,
        xp.zeros(rows.weight.shape, dtype=dtype, device=device) if weight_grad else None,
        (
            xp.zeros((rows.weight.shape[0],), dtype=dtype, device=device)
            if bias_grad and rows.bias is not None
            else None
        ),
    )


def _add_chunk(
    sums: LinearGradients,
    block: slice,
    grad_logits: Array | None,
    hidden_rows: Array,
    rows: LinearRows,
    row_scale: Array,
    *,
    add: AddProduct,
    xp: Namespace,
) -> LinearGradients:
    """``sums`` with the parts of the rows ``block`` added (see :func:`chunk_gradients`)."""
    parts = chunk_gradients(
        grad_logits,
        hidden_rows,
        rows.weight,
        row_scale[block] != 0,
        sums.weight,
        sums.bias,
        add=add,
        xp=xp,
    )
    grad_hidden = sums.hidden
    if grad_hidden is not None:
        grad_hidden = xpx.at(grad_hidden, (block, ...)).set(parts.hidden, xp=xp)
    return LinearGradients(grad_hidden, parts.weight, parts.bias)


def _empty(x: Array, *, xp: Namespace) -> Array:
    return xp.empty(x.shape, dtype=x.dtype, device=array_api_compat.device(x))


def _concat(parts: list[Array], like: Array, *, xp: Namespace) -> Array:
    """The ``[N]`` vectors of the chunks as one; ``[0]`` of the dtype and device of ``like``."""
    if not parts:
        return xp.zeros((0,), dtype=like.dtype, device=array_api_compat.device(like))
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def _finish_gradients(
    hidden: Array, weight: Array, bias: Array | None, sums: LinearGradients, *, xp: Namespace
) -> LinearGradients:
    """The summed gradients in the shapes and dtypes of their inputs."""
    return LinearGradients(
        None if sums.hidden is None else xp.reshape(sums.hidden, hidden.shape),
        None if sums.weight is None else xp.astype(sums.weight, weight.dtype, copy=False),
        None if sums.bias is None or bias is None else xp.astype(sums.bias, bias.dtype, copy=False),
    )
