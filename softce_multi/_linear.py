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

When the gradients are asked for in the forward pass (:func:`chunked_loss_pass` with
``hidden_grad``, ``weight_grad`` or ``bias_grad``), a training step does three matmuls per chunk and
never recomputes the logits. :func:`chunked_gradient_pass` recomputes them chunk by chunk from the
saved row statistics, for what the forward pass could not know: a per-position upstream gradient
(``reduction="none"``) and the gradient to the targets.

Padding rows (weight 0) may hold NaN or inf in ``hidden``. Their logits gradient is exactly 0,
but ``0 * NaN`` is NaN, so the weight gradient multiplies a copy of the chunk's hidden rows in
which they are replaced by zeros with ``where``.

Every function takes the namespace ``xp``. :func:`chunked_loss_pass` and
:func:`chunked_gradient_pass` are the one driver of every engine: a Python loop over the chunks for
the eager libraries, a ``lax.scan`` for JAX (:mod:`softce_multi._chunks`). The vocabulary-parallel
loss runs the same driver with a row routine that all-reduces the row statistics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from softce_multi import _chunks, _compat, _core
from softce_multi._types import Array, LinearGradients, LinearLossInputs, Namespace

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_WEIGHTS",
    "ChunkLogits",
    "LinearForwardResult",
    "LinearGradients",
    "LinearRows",
    "chunk_gradients",
    "chunk_logits",
    "chunked_gradient_pass",
    "chunked_loss_pass",
    "default_chunk_rows",
    "finish_gradients",
]

#: Bytes of the ``[chunk, V]`` arrays that one chunk holds at once (its logits and, unless the
#: row routine writes it over them, their gradient), in the computation dtype, that the default
#: chunk size aims for at least (:func:`default_chunk_rows`).
CHUNK_BYTES = 32 << 20

#: How many ``[V, H]`` arrays (the size of the weight gradient) the default chunk's ``[chunk, V]``
#: arrays may take instead, when that is more than :data:`CHUNK_BYTES`: ``H`` rows with one such
#: array (:func:`default_chunk_rows`).
CHUNK_WEIGHTS = 1


class LinearForwardResult(NamedTuple):
    """What one chunked pass produces."""

    loss: Array
    """The reduced loss, in the computation dtype."""
    grads: LinearGradients | None
    """The gradients asked for (None in a field not asked for), for a unit upstream gradient."""
    saved: _core.SavedRows
    """Row statistics of all ``N`` rows, for :func:`chunked_gradient_pass`."""
    row_scale: Array
    """``d loss / d c_row`` per row, shape ``[N]`` (see :class:`softce_multi._core.Rows`)."""


class _LinearRowsFields(NamedTuple):
    hidden: Array
    """``[N, H]``, in its own dtype."""
    weight: Array
    """``[V, H]``, in the matmul dtype."""
    bias: Array | None
    """``[V]`` in the matmul dtype, or None."""
    p: Array
    """The targets as ``[N, V]`` (``[N, K]`` with :attr:`ids`), in their own dtype."""
    weights: Array
    """The mask as ``[N]`` weights, in the computation dtype."""
    inv_den: Array
    """``1 / den`` as a 0-d array (see :func:`softce_multi._core.inverse_denominator`)."""
    ids: Array | None = None
    """The ids of sparse targets, ``[N, K]`` (see :class:`softce_multi._core.Rows`)."""


class LinearRows(_LinearRowsFields, _core.WeightedRows):
    """The inputs of the linear loss as rows, with the weights and the denominator of the
    reduction: ``LinearRows(hidden, weight, bias, p, weights, inv_den)``."""

    __slots__ = ()


def default_chunk_rows(
    vocab_size: int, dtype: Any, *, xp: Namespace, copies: int = 2, hidden_size: int = 0
) -> int:
    """Rows per chunk: ``copies`` ``[chunk, V]`` arrays in ``dtype`` take the larger of
    :data:`CHUNK_BYTES` and :data:`CHUNK_WEIGHTS` ``[V, H]`` arrays (``H`` = ``hidden_size``).

    ``dtype`` is the computation dtype (float32 or float64); ``copies`` is 2 for a chunk's
    logits and their gradient, 1 when the gradient is written over the logits. At least one row.

    Every chunk reads the whole weight twice (its logits, its hidden gradient) and adds to the
    whole weight gradient, so a chunk of few rows makes those matmuls as slow as their memory
    traffic: at least ``H / copies`` rows give each of them about ``H`` multiply-adds per
    element of the weight moved, and their chunk holds no more than the weight gradient the
    pass makes anyway.
    """
    row_bytes = copies * vocab_size * xp.finfo(dtype).bits // 8
    return max(1, CHUNK_BYTES // max(row_bytes, 1), CHUNK_WEIGHTS * hidden_size // copies)


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
    target_ids: Array | None = None,
) -> LinearRows:
    """Lay out validated inputs as rows; ``weight`` and ``bias`` in the matmul dtype.

    The matmul dtype is ``matmul_dtype`` when given (an autocast dtype), else that of
    ``hidden @ weight.T + bias`` (the promotion of the three).
    """
    dtype = _core.compute_dtype(hidden, weight, bias, target_probs, xp=xp)
    if matmul_dtype is None:
        matmul_dtype = xp.result_type(*(x for x in (hidden, weight, bias) if x is not None))
    n_rows = math.prod(hidden.shape[:-1])
    weights = xp.astype(xp.reshape(position_mask, (n_rows,)), dtype)
    return LinearRows(
        xp.reshape(hidden, (n_rows, hidden.shape[-1])),
        xp.astype(weight, matmul_dtype, copy=False),
        None if bias is None else xp.astype(bias, matmul_dtype, copy=False),
        xp.reshape(target_probs, (n_rows, target_probs.shape[-1])),
        weights,
        _core.inverse_denominator(weights, reduction, num_valid, xp=xp),
        None if target_ids is None else xp.reshape(target_ids, (n_rows, target_ids.shape[-1])),
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

    Returns
    -------
    ChunkGradients
        The chunk's hidden rows (always computed; the caller drops them if not needed) and the
        updated totals. Rows that are not ``live`` get exactly 0 and add exactly 0.
    """
    assert grad_logits is not None  # the routines return the gradient asked for
    grad_hidden = xp.where(live[:, None], grad_logits @ weight, 0.0)
    grad_hidden = xp.astype(grad_hidden, hidden.dtype, copy=False)
    if weight_total is not None:
        # 0 * NaN is NaN: padding rows are replaced by zeros, never multiplied by them.
        safe_hidden = xp.where(live[:, None], xp.astype(hidden, weight.dtype, copy=False), 0.0)
        weight_total = add(weight_total, xp.matrix_transpose(grad_logits), safe_hidden)
    if bias_total is not None:
        # Rows that are not live hold exact zeros already. Summed in the total's dtype, without
        # a converted [chunk, V] copy.
        bias_total = bias_total + xp.sum(grad_logits, axis=0, dtype=bias_total.dtype)
    return ChunkGradients(grad_hidden, weight_total, bias_total)


def chunked_loss_pass(
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
    fresh: Fresh | None = None,
    finish: bool = True,
) -> LinearForwardResult:
    """The loss of validated inputs, and the gradients asked for, chunk by chunk of rows.

    The one driver of the linear loss, eager (NumPy, CuPy, torch) or traced (JAX, a
    ``lax.scan``), by the loop of :func:`softce_multi._chunks.loop_for`.

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
        :func:`softce_multi.kernels.blocked.blocked_row_routine`; the vocabulary-parallel loss
        passes one that all-reduces the row statistics.
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
    fresh
        Applied to every accumulator before the first chunk (see :data:`Fresh`).
    finish
        Whether to return the gradients in the shapes and dtypes of their inputs; False returns
        the sums as accumulated (``[N, H]`` rows, the weight and bias gradients in the
        computation dtype), for a caller that frees what the chunks held (a reused logits
        buffer) before :func:`finish_gradients` makes its copies.

    Returns
    -------
    LinearForwardResult
        Padding rows (weight 0) enter the matmuls as zeros, so that no derivative of any order
        meets what they hold.
    """
    rows = as_linear_rows(
        inputs.hidden,
        inputs.weight,
        inputs.bias,
        inputs.target_probs,
        inputs.position_mask,
        reduction=inputs.reduction,
        num_valid=inputs.num_valid,
        xp=xp,
        matmul_dtype=matmul_dtype,
        target_ids=inputs.target_ids,
    )
    n_rows, vocab_size = rows.p.shape[0], rows.weight.shape[0]
    hidden_size = rows.hidden.shape[1]
    dtype = rows.weights.dtype
    chunk = inputs.chunk_rows or default_chunk_rows(
        vocab_size, dtype, xp=xp, copies=logits_copies, hidden_size=hidden_size
    )
    wants_grads = hidden_grad or weight_grad or bias_grad
    add = add or functools.partial(add_product, xp=xp)
    logits = logits or functools.partial(chunk_logits, xp=xp)
    fresh = fresh or _unchanged
    loop = _chunks.loop_for(xp)
    row_scale = _core.row_scale(rows)

    def vector() -> Array:
        return fresh(xp.zeros((n_rows,), dtype=dtype, device=_compat.device(rows.p)))

    state = _ForwardState(
        vector(),
        _core.SavedRows(vector(), vector(), vector()),
        _zero_sums(rows, hidden_grad, weight_grad, bias_grad, fresh=fresh, xp=xp)
        if wants_grads
        else None,
    )

    def step(start: Any, size: int, state: _ForwardState) -> _ForwardState:
        weights = loop.get(rows.weights, (start,), (size,))
        hidden = _live_rows(loop.get(rows.hidden, (start, 0), (size, hidden_size)), weights, xp=xp)
        targets, ids = _target_rows(rows, start, size, loop)
        piece = _core.Rows(
            logits(hidden, rows.weight, rows.bias), targets, weights, rows.inv_den, ids
        )
        results = row_routine(piece, with_logits_grad=wants_grads)
        del piece  # the chunk's logits are no longer needed
        grads = state.grads
        if grads is not None:
            scale = loop.get(row_scale, (start,), (size,))
            grads = _add_chunk(grads, start, results.logits_grad, hidden, rows, scale, loop, add)
        return _ForwardState(
            loop.put(state.weighted, (start,), results.weighted),
            _core.SavedRows(
                *(
                    loop.put(total, (start,), part)
                    for total, part in zip(state.saved, results.saved, strict=True)
                )
            ),
            grads,
        )

    state = _chunks.over_chunks(n_rows, chunk, step, state, loop)
    loss = _core.reduce_loss(
        state.weighted,
        rows.inv_den,
        reduction=inputs.reduction,
        batch_shape=inputs.hidden.shape[:-1],
        xp=xp,
    )
    grads = state.grads
    if grads is not None and finish:
        grads = finish_gradients(inputs.hidden, inputs.weight, inputs.bias, grads, xp=xp)
    return LinearForwardResult(loss, grads, state.saved, row_scale)


def chunked_gradient_pass(
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
    fresh: Fresh | None = None,
    target_ids: Array | None = None,
    finish: bool = True,
) -> tuple[LinearGradients | None, Array | None]:
    """Recompute the logits chunk by chunk and return the gradients asked for.

    ``saved`` and ``row_scale`` come from :func:`chunked_loss_pass`; ``row_scale`` is already
    multiplied by the upstream gradient (per row for ``"none"``). ``logits``, ``logits_copies`` and
    ``matmul_dtype`` must be those of the forward pass, which then gets the same chunks and the same
    logits, to the last bit (the saved statistics are theirs); ``fresh`` is as in
    :func:`chunked_loss_pass`, as is ``finish``. Returns the
    :class:`~softce_multi._types.LinearGradients` (None in a field not asked for; None
    altogether if none of the three is) and the gradient to
    ``target_probs`` in its dtype and shape (None if not asked for). With ``target_ids`` (sparse
    targets), ``gradient_routine`` must take them.
    """
    wants_grads = hidden_grad or weight_grad or bias_grad
    add = add or functools.partial(add_product, xp=xp)
    logits = logits or functools.partial(chunk_logits, xp=xp)
    fresh = fresh or _unchanged
    loop = _chunks.loop_for(xp)
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
        target_ids=target_ids,
    )
    n_rows, vocab_size = rows.p.shape[0], rows.weight.shape[0]
    hidden_size = rows.hidden.shape[1]
    dtype = row_scale.dtype
    chunk = chunk_rows or default_chunk_rows(
        vocab_size, dtype, xp=xp, copies=logits_copies, hidden_size=hidden_size
    )
    state = _BackwardState(
        _zero_sums(rows, hidden_grad, weight_grad, bias_grad, fresh=fresh, xp=xp)
        if wants_grads
        else None,
        fresh(_empty(rows.p, xp=xp)) if targets_grad else None,
    )

    def step(start: Any, size: int, state: _BackwardState) -> _BackwardState:
        scale = loop.get(row_scale, (start,), (size,))
        hidden = _live_rows(loop.get(rows.hidden, (start, 0), (size, hidden_size)), scale, xp=xp)
        targets, ids = _target_rows(rows, start, size, loop)
        block = _core.BackwardRows(
            logits(hidden, rows.weight, rows.bias),
            targets,
            _core.SavedRows(*(loop.get(field, (start,), (size,)) for field in saved)),
            scale,
            ids,
        )
        grad_z, grad_p = gradient_routine(block, logits_grad=wants_grads, targets_grad=targets_grad)
        del block
        grads, grad_targets = state
        if grad_targets is not None:
            grad_targets = loop.put(grad_targets, (start, 0), cast(Array, grad_p))
        if grads is not None:
            grads = _add_chunk(grads, start, grad_z, hidden, rows, scale, loop, add)
        return _BackwardState(grads, grad_targets)

    state = _chunks.over_chunks(n_rows, chunk, step, state, loop)
    grads = state.grads
    if grads is not None and finish:
        grads = finish_gradients(hidden, weight, bias, grads, xp=xp)
    grad_targets = state.grad_targets
    if grad_targets is not None:
        grad_targets = xp.reshape(grad_targets, target_probs.shape)
    return grads, grad_targets


#: ``fresh(accumulator)``: an accumulator (zeros, or an empty array) made ready for the chunk
#: loop, before the first chunk. The identity, unless the loop's carry must be typed as varying
#: over mesh axes (the vocabulary-parallel loss inside ``shard_map``).
Fresh = Callable[[Array], Array]


def _unchanged(x: Array) -> Array:
    return x


class _ForwardState(NamedTuple):
    """What the chunks of :func:`chunked_loss_pass` accumulate."""

    weighted: Array
    saved: _core.SavedRows
    grads: LinearGradients | None


class _BackwardState(NamedTuple):
    """What the chunks of :func:`chunked_gradient_pass` accumulate."""

    grads: LinearGradients | None
    grad_targets: Array | None


def _target_rows(
    rows: LinearRows, start: Any, size: int, loop: _chunks.Loop
) -> tuple[Array, Array | None]:
    """The targets of the chunk of ``size`` rows at ``start``, and their ids if sparse."""
    width = rows.p.shape[1]
    targets = loop.get(rows.p, (start, 0), (size, width))
    ids = None if rows.ids is None else loop.get(rows.ids, (start, 0), (size, width))
    return targets, ids


def _live_rows(hidden: Array, scale: Array, *, xp: Namespace) -> Array:
    """The chunk's hidden rows, zeros in the rows whose ``scale`` (weight) is 0.

    Padding may hold NaN or inf: with zeros in, its logits and every derivative through them
    are finite, and the row routines give the row exactly 0.
    """
    zero = xp.zeros((), dtype=hidden.dtype, device=_compat.device(hidden))
    return xp.where(scale[:, None] != 0, hidden, zero)


def _zero_sums(
    rows: LinearRows,
    hidden_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    *,
    fresh: Fresh,
    xp: Namespace,
) -> LinearGradients:
    """The running sums of the gradients asked for, before the first chunk.

    The hidden gradient is an ``[N, H]`` array in the dtype of ``hidden`` (each chunk writes its
    rows); the weight and bias gradients are zeros in the computation dtype.
    """
    dtype = rows.weights.dtype
    device = _compat.device(rows.weight)
    return LinearGradients(
        fresh(_empty(rows.hidden, xp=xp)) if hidden_grad else None,
        fresh(xp.zeros(rows.weight.shape, dtype=dtype, device=device)) if weight_grad else None,
        (
            fresh(xp.zeros((rows.weight.shape[0],), dtype=dtype, device=device))
            if bias_grad and rows.bias is not None
            else None
        ),
    )


def _add_chunk(
    sums: LinearGradients,
    start: Any,
    grad_logits: Array | None,
    hidden_rows: Array,
    rows: LinearRows,
    scale: Array,
    loop: _chunks.Loop,
    add: AddProduct,
) -> LinearGradients:
    """``sums`` with the parts of the chunk at ``start`` added (see :func:`chunk_gradients`)."""
    parts = chunk_gradients(
        grad_logits,
        hidden_rows,
        rows.weight,
        scale != 0,
        sums.weight,
        sums.bias,
        add=add,
        xp=_compat.array_namespace(hidden_rows),
    )
    grad_hidden = sums.hidden
    if grad_hidden is not None:
        grad_hidden = loop.put(grad_hidden, (start, 0), parts.hidden)
    return LinearGradients(grad_hidden, parts.weight, parts.bias)


def _empty(x: Array, *, xp: Namespace) -> Array:
    return xp.empty(x.shape, dtype=x.dtype, device=_compat.device(x))


def finish_gradients(
    hidden: Array, weight: Array, bias: Array | None, sums: LinearGradients, *, xp: Namespace
) -> LinearGradients:
    """The summed gradients of a chunked pass (``finish=False``) in the shapes and dtypes of
    their inputs."""
    return LinearGradients(
        None if sums.hidden is None else xp.reshape(sums.hidden, hidden.shape),
        None if sums.weight is None else xp.astype(sums.weight, weight.dtype, copy=False),
        None if sums.bias is None or bias is None else xp.astype(sums.bias, bias.dtype, copy=False),
    )
