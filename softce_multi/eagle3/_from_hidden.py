"""The draft model's targets straight from the target model's hidden states, in chunks.

:func:`prepare_targets_from_hidden` gives what :func:`~softce_multi.eagle3.prepare_targets`
gives for ``target_hidden @ target_head_weight.T`` without ever holding those logits: one chunk
loop, written once over :mod:`softce_multi._chunks`, runs eagerly on every backend but JAX and
under one cached ``jax.jit`` on JAX. Its checks (:func:`from_hidden_inputs`), its logits
(:func:`chunk_logits`) and its argmax (:func:`full_vocabulary_top`) serve the top-k targets too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import array_api_extra as xpx

from softce_multi import _chunks, _compat
from softce_multi._core import compute_dtype
from softce_multi._types import Array, Namespace
from softce_multi._validate import (
    check_chunk_rows,
    check_prepare_from_hidden_inputs,
    check_same_device,
    namespace_of,
)
from softce_multi.eagle3._arrays import constant, nan_where, top_index
from softce_multi.eagle3._t2d import checked_draft_size, draft_position_mask, draft_token_ids

__all__ = [
    "DEFAULT_TARGET_CHUNK_ROWS",
    "TARGET_CHUNK_ELEMENTS",
    "ChunkSizes",
    "FromHiddenInputs",
    "chunk_logits",
    "from_hidden_inputs",
    "full_vocabulary_top",
    "prepare_targets_from_hidden",
]

#: Rows per chunk of :func:`prepare_targets_from_hidden` by default: enough rows that each pass
#: over the weight does ``2 * DEFAULT_TARGET_CHUNK_ROWS`` flops per weight element it reads.
DEFAULT_TARGET_CHUNK_ROWS = 1024

#: Elements of one ``[chunk_rows, chunk_vocab]`` block of logits that the default
#: ``chunk_vocab`` of :func:`prepare_targets_from_hidden` aims for (2 MiB in float32).
TARGET_CHUNK_ELEMENTS = 2**19


def prepare_targets_from_hidden(
    target_hidden: Array,
    target_head_weight: Array,
    loss_mask: Array,
    t2d: Array,
    *,
    draft_vocab_size: int | None = None,
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
) -> tuple[Array, Array]:
    """:func:`prepare_targets` of ``target_hidden @ target_head_weight.T``, never materialised.

    The result is that of ``prepare_targets(target_hidden @ target_head_weight.T, loss_mask,
    t2d)``, but the ``[..., V_target]`` logits never exist: the rows are processed in chunks of
    ``chunk_rows``, and within a chunk the target vocabulary in chunks of ``chunk_vocab``
    columns, keeping the running maximum and its first index. The draft columns' logits are
    the chunk's rows times the draft rows of the weight. Only the ``[..., V_draft]`` output is
    full size. See :ref:`eagle3-targets-from-hidden`.

    Parameters
    ----------
    target_hidden : array, shape ``[..., H]``, usually ``[B, T, H]``
        The target model's last hidden states (after its final norm): float16, bfloat16,
        float32 or float64.
    target_head_weight : array, shape ``[V_target, H]``
        The target model's ``lm_head`` weight (the layout of ``torch.nn.Linear.weight``); the
        same dtypes. The matmuls run in the promoted dtype of the two (float32 accumulation on
        the backends that accumulate half precision so).
    loss_mask : array, shape ``[...]`` or ``[..., 1]``
        Which positions to train on: bool, integer or floating weights.
    t2d : array, shape ``[V_target]``, bool
        The draft-vocabulary mask of :func:`build_vocab_mapping`.
    draft_vocab_size : int, optional
        The number of True entries of ``t2d``, checked as in :func:`prepare_targets` (a
        ValueError where ``t2d`` is on the host, NaN targets elsewhere). Give it to avoid a
        device read and to run under ``jax.jit``.
    chunk_rows : int, optional
        Rows per chunk; 1024 by default.
    chunk_vocab : int, optional
        Vocabulary columns per chunk, of the target vocabulary (the argmax) and of the draft
        vocabulary (the softmax); by default ``2**19 // min(chunk_rows, N)``, ``N`` the
        number of positions.

    Returns
    -------
    target_probs : array, shape ``[..., V_draft]``
        The softmax of the draft columns' logits: float32 (float64 when the matmul dtype is
        float64). The logits are computed in the matmul dtype and rounded to it, as the
        materialised product is, on every backend and under every compiler, then converted
        before the softmax.
    position_mask : array, shape ``[..., 1]``
        ``loss_mask`` where the argmax of the same rounded logits over the full target
        vocabulary (the first index among equal maxima, NaN counting as maximal) is in the
        draft vocabulary, 0 (False) elsewhere, of the dtype of ``loss_mask``.

    Raises
    ------
    TypeError
        As :func:`prepare_targets`, for ``target_hidden`` or ``target_head_weight`` not float16
        to float64, and for chunk sizes that are not ints.
    ValueError
        If ``target_head_weight`` is not ``[V_target, H]`` for the ``H`` of ``target_hidden``
        and the ``V_target`` of ``t2d``, ``loss_mask`` does not fit ``target_hidden``, a chunk
        size is below 1, or as :func:`prepare_targets` for ``draft_vocab_size`` and ``t2d``.

    Notes
    -----
    Both outputs are constants: detached on PyTorch, behind ``jax.lax.stop_gradient`` on JAX.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import prepare_targets, prepare_targets_from_hidden
    >>> rng = np.random.default_rng(0)
    >>> hidden, weight = rng.normal(size=(2, 3, 8)), rng.normal(size=(10, 8))
    >>> loss_mask = np.array([[True, True, False], [True, True, True]])
    >>> t2d = np.arange(10) % 3 != 0
    >>> probs, mask = prepare_targets_from_hidden(hidden, weight, loss_mask, t2d, chunk_vocab=4)
    >>> expected = prepare_targets(hidden @ weight.T, loss_mask, t2d)
    >>> probs.shape, bool(np.allclose(probs, expected[0])), bool((mask == expected[1]).all())
    ((2, 3, 6), True, True)
    """
    inputs = from_hidden_inputs(
        target_hidden,
        target_head_weight,
        loss_mask,
        t2d,
        draft_vocab_size=draft_vocab_size,
        chunk_rows=chunk_rows,
        chunk_vocab=chunk_vocab,
    )
    xp = inputs.xp
    by_chunks = _jax_targets_by_chunks() if _compat.is_jax_namespace(xp) else _targets_by_chunks
    probs, top = by_chunks(
        inputs.rows,
        inputs.weight,
        inputs.draft_ids,
        inputs.wrong_size,
        inputs.chunk,
        inputs.matmul_dtype,
        xp=xp,
    )
    target_probs = constant(xp.reshape(probs, (*inputs.batch_shape, inputs.size)), xp=xp)
    top = xp.reshape(top, inputs.batch_shape)
    return target_probs, draft_position_mask(loss_mask, top, t2d, xp=xp)


class ChunkSizes(NamedTuple):
    """The chunk sizes of the loops over rows and vocabulary columns, both at least 1."""

    rows: int
    """Rows of ``target_hidden`` per chunk."""
    vocab: int
    """Vocabulary columns per block, of the target vocabulary and of the draft vocabulary."""


class FromHiddenInputs(NamedTuple):
    """The checked inputs of the targets from hidden states, as the chunk loops take them."""

    xp: Namespace
    """The array namespace of the inputs."""
    rows: Array
    """The hidden states as ``[N, H]`` rows, detached."""
    weight: Array
    """The target model's head weight ``[V_target, H]``, detached."""
    draft_ids: Array
    """The ``[V_draft]`` ascending target ids of the draft vocabulary."""
    size: int
    """``V_draft``."""
    wrong_size: Array
    """A 0-d bool array: whether ``t2d`` disagrees with ``size`` (the targets are then NaN)."""
    chunk: ChunkSizes
    """The chunk sizes, defaults filled in."""
    matmul_dtype: Any
    """The dtype the logits are computed and rounded in."""
    batch_shape: tuple[int, ...]
    """The leading axes of ``target_hidden``."""


def from_hidden_inputs(
    target_hidden: Array,
    target_head_weight: Array,
    loss_mask: Array,
    t2d: Array,
    *,
    draft_vocab_size: int | None,
    chunk_rows: int | None,
    chunk_vocab: int | None,
) -> FromHiddenInputs:
    """Check the arguments of :func:`prepare_targets_from_hidden` and prepare its inputs.

    Parameters
    ----------
    target_hidden, target_head_weight, loss_mask, t2d, draft_vocab_size, chunk_rows, chunk_vocab
        As :func:`prepare_targets_from_hidden` takes them.

    Returns
    -------
    FromHiddenInputs
        The namespace, the detached ``[N, H]`` rows and weight, the draft ids, the chunk sizes
        (defaults filled in) and the matmul dtype.

    Raises
    ------
    TypeError, ValueError
        As :func:`prepare_targets_from_hidden` documents.
    """
    xp = namespace_of(
        target_hidden=target_hidden,
        target_head_weight=target_head_weight,
        loss_mask=loss_mask,
        t2d=t2d,
    )
    check_same_device(
        target_hidden=target_hidden,
        target_head_weight=target_head_weight,
        loss_mask=loss_mask,
        t2d=t2d,
    )
    check_prepare_from_hidden_inputs(xp, target_hidden, target_head_weight, loss_mask, t2d)
    _refuse_torch_vmap(xp)
    _chunks.check_not_split(
        "prepare_targets_from_hidden (and its top-k sibling)",
        target_hidden=target_hidden,
        target_head_weight=target_head_weight,
        loss_mask=loss_mask,
        t2d=t2d,
    )
    rows_per_chunk = check_chunk_rows(chunk_rows)
    columns_per_chunk = check_chunk_rows(chunk_vocab, name="chunk_vocab")
    size, wrong_size = checked_draft_size(t2d, draft_vocab_size, xp=xp)
    if rows_per_chunk is None:
        rows_per_chunk = DEFAULT_TARGET_CHUNK_ROWS
    if columns_per_chunk is None:  # for the rows a chunk holds, never more than N
        rows_held = min(rows_per_chunk, max(math.prod(target_hidden.shape[:-1]), 1))
        columns_per_chunk = max(1, TARGET_CHUNK_ELEMENTS // rows_held)

    hidden = constant(target_hidden, xp=xp)
    weight = constant(target_head_weight, xp=xp)
    batch_shape = tuple(hidden.shape[:-1])
    return FromHiddenInputs(
        xp=xp,
        rows=xp.reshape(hidden, (math.prod(batch_shape), hidden.shape[-1])),
        weight=weight,
        draft_ids=draft_token_ids(t2d, size, xp=xp),
        size=size,
        wrong_size=wrong_size,
        chunk=ChunkSizes(rows_per_chunk, columns_per_chunk),
        matmul_dtype=xp.result_type(hidden.dtype, weight.dtype),
        batch_shape=batch_shape,
    )


def _refuse_torch_vmap(xp: Namespace) -> None:
    """Raise NotImplementedError inside ``torch.func.vmap``: the chunks are written in place."""
    if not _compat.is_torch_namespace(xp):
        return
    from softce_multi._adapters import torch_shared

    if torch_shared.under_vmap():
        msg = (
            "prepare_targets_from_hidden and prepare_top_k_targets_from_hidden do not support "
            "torch.func.vmap: their leading dimensions are a batch already, so fold the mapped "
            "dimension into them (target_hidden [B, ..., H] with a loss_mask [B, ...])"
        )
        raise NotImplementedError(msg)


def chunk_logits(h: Array, w: Array, matmul_dtype: Any, dtype: Any, *, xp: Namespace) -> Array:
    """Return ``h @ w.T`` computed in ``matmul_dtype``, then converted to ``dtype``.

    The argmax and the softmax alike see the logits rounded to the matmul dtype, as the
    materialised product holds them.

    Parameters
    ----------
    h : array, shape ``[n, H]``
        Hidden states.
    w : array, shape ``[v, H]``
        Rows of the head weight.
    matmul_dtype : dtype
        The dtype of the product.
    dtype : dtype
        The compute dtype, at least as wide.
    xp : namespace
        The array namespace of both.

    Returns
    -------
    array, shape ``[n, v]``
        Of dtype ``dtype``.
    """
    product = xp.astype(h, matmul_dtype, copy=False) @ xp.matrix_transpose(
        xp.astype(w, matmul_dtype, copy=False)
    )
    return _widened(product, dtype, xp=xp)


def full_vocabulary_top(
    h: Array, weight: Array, columns: int, matmul_dtype: Any, *, xp: Namespace
) -> Array:
    """Return the full-vocabulary argmax of the logits ``h @ weight.T``, in column blocks.

    Parameters
    ----------
    h : array, shape ``[n, H]``
        Hidden states.
    weight : array, shape ``[V_target, H]``
        The target model's head weight.
    columns : int
        Vocabulary columns per block, at least 1.
    matmul_dtype : dtype
        The dtype the logits are computed and rounded in.
    xp : namespace
        The array namespace of both.

    Returns
    -------
    array, shape ``[n]``
        The first index of the maximum logit, NaN counting as maximal, of the default index
        dtype.
    """
    loops = _chunks.loop_for(xp)
    device = _compat.device(h)
    index_dtype = xpx.default_dtype(xp, "indexing", device=device)
    dtype = compute_dtype(h, weight, xp=xp)
    hidden_size = h.shape[1]

    def step(start: Any, size: int, best: tuple[Array, Array]) -> tuple[Array, Array]:
        w = loops.get(weight, (start, 0), (size, hidden_size))
        z = chunk_logits(h, w, matmul_dtype, dtype, xp=xp)
        value, index = xp.max(z, axis=-1), xp.astype(top_index(z, xp=xp), index_dtype)
        # Later chunks hold later ids: they win only with a strictly larger value, or the
        # first NaN; so equal maxima keep the first index, as argmax does.
        wins = (value > best[0]) | (xp.isnan(value) & ~xp.isnan(best[0]))
        return xp.where(wins, value, best[0]), xp.where(wins, index + start, best[1])

    n = h.shape[0]
    lowest = xp.full((n,), -math.inf, dtype=dtype, device=device)
    first = xp.zeros((n,), dtype=index_dtype, device=device)
    return _chunks.over_chunks(weight.shape[0], columns, step, (lowest, first), loops)[1]


def _targets_by_chunks(
    rows: Array,
    weight: Array,
    draft_ids: Array,
    wrong_size: Array,
    chunk: ChunkSizes,
    matmul_dtype: Any,
    *,
    xp: Namespace,
) -> tuple[Array, Array]:
    """Return the draft softmax and the full-vocabulary argmax of the logits of ``rows``.

    Per chunk of rows: the draft logits go into the output block by block (with their running
    maximum), then become ``exp(z - max)`` (with their running sum), then are divided by the
    sum; the argmax comes from a pass over the target vocabulary. Every temporary is one
    ``[chunk.rows, chunk.vocab]`` block.

    Parameters
    ----------
    rows : array, shape ``[N, H]``
        The hidden states, detached.
    weight : array, shape ``[V_target, H]``
        The target model's head weight, detached.
    draft_ids : array, shape ``[V_draft]``, integer
        The target ids of the draft vocabulary, ascending, in ``[0, V_target)``.
    wrong_size : array, shape ``()``, bool
        Whether the draft vocabulary size disagrees with ``t2d``: the softmax is then NaN.
    chunk : ChunkSizes
        Rows per chunk and columns per block.
    matmul_dtype : dtype
        The dtype the logits are computed and rounded in.
    xp : namespace
        The array namespace of the arrays.

    Returns
    -------
    probs : array, shape ``[N, V_draft]``
        The softmax of the draft columns' logits, in the compute dtype of ``rows`` and
        ``weight`` (:func:`softce_multi._core.compute_dtype`).
    top : array, shape ``[N]``
        The first index of the maximum logit over the target vocabulary, NaN counting as
        maximal, of the default index dtype.
    """
    loops = _chunks.loop_for(xp)
    device = _compat.device(rows)
    index_dtype = xpx.default_dtype(xp, "indexing", device=device)
    dtype = compute_dtype(rows, weight, xp=xp)
    hidden_size, draft_size = rows.shape[1], draft_ids.shape[0]

    def row_step(row: Any, n: int, out: tuple[Array, Array]) -> tuple[Array, Array]:
        h = loops.get(rows, (row, 0), (n, hidden_size))

        def write_logits(column: Any, size: int, state: tuple[Array, Array]) -> Any:
            # The draft rows of the weight, gathered one block at a time.
            w = xp.take(weight, loops.get(draft_ids, (column,), (size,)), axis=0)
            z = chunk_logits(h, w, matmul_dtype, dtype, xp=xp)
            return loops.put(state[0], (row, column), z), xp.maximum(state[1], xp.max(z, axis=-1))

        def exponentiate(column: Any, size: int, state: tuple[Array, Array]) -> Any:
            shifted = xp.exp(loops.get(state[0], (row, column), (n, size)) - draft_max[:, None])
            return loops.put(state[0], (row, column), shifted), state[1] + xp.sum(shifted, axis=-1)

        def normalise(column: Any, size: int, probs: Array) -> Array:
            block = loops.get(probs, (row, column), (n, size))
            return loops.put(probs, (row, column), block / total[:, None])

        lowest = xp.full((n,), -math.inf, dtype=dtype, device=device)
        probs, draft_max = _chunks.over_chunks(
            draft_size, chunk.vocab, write_logits, (out[0], lowest), loops
        )
        zero = xp.zeros((n,), dtype=dtype, device=device)
        probs, total = _chunks.over_chunks(
            draft_size, chunk.vocab, exponentiate, (probs, zero), loops
        )
        total = nan_where(wrong_size, total, xp=xp)
        probs = _chunks.over_chunks(draft_size, chunk.vocab, normalise, probs, loops)
        top = full_vocabulary_top(h, weight, chunk.vocab, matmul_dtype, xp=xp)
        return probs, loops.put(out[1], (row,), top)

    n_rows = rows.shape[0]
    probs = xp.empty((n_rows, draft_size), dtype=dtype, device=device)
    top = xp.empty((n_rows,), dtype=index_dtype, device=device)
    return _chunks.over_chunks(n_rows, chunk.rows, row_step, (probs, top), loops)


@functools.cache
def _jax_targets_by_chunks() -> Callable[..., tuple[Array, Array]]:
    """Return :func:`_targets_by_chunks` under ``jax.jit``.

    It is compiled once per shapes, chunk sizes and dtype; called eagerly, JAX would compile
    each of its chunk loops again at every call.

    Returns
    -------
    callable
        The jitted function, with ``chunk``, ``matmul_dtype`` and ``xp`` static.
    """
    import jax

    return jax.jit(_targets_by_chunks, static_argnums=(4, 5), static_argnames=("xp",))


def _widened(x: Array, dtype: Any, *, xp: Namespace) -> Array:
    """Return ``x`` converted to a floating dtype at least as wide, holding ``x``'s values.

    On JAX a plain conversion may carry more precision than ``x``'s dtype has (see
    :func:`softce_multi.kernels.xla.widened`, which rounds in any case).

    Parameters
    ----------
    x : array
        Real floating values.
    dtype : dtype
        A real floating dtype at least as wide as that of ``x``.
    xp : namespace
        The array namespace of ``x``.

    Returns
    -------
    array
        Shape of ``x``, dtype ``dtype``: exactly the values of ``x`` in its own dtype.
    """
    if x.dtype == dtype or not _compat.is_jax_namespace(xp):
        return xp.astype(x, dtype, copy=False)
    from softce_multi.kernels.xla import widened

    return widened(x, dtype)
