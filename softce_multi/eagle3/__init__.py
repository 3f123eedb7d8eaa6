"""The steps around the loss that every EAGLE-3 trainer needs, for every array-API backend.

An EAGLE-3 draft model predicts over a *draft vocabulary*, a subset of the target model's
vocabulary. Per training step: :func:`build_vocab_mapping` (once, before training) chooses it
and returns the ``d2t``/``t2d`` mappings, which :func:`draft_to_target_ids` and
:func:`target_to_draft_ids` apply to token ids; :func:`shift_left` aligns the target logits, the
input ids and the loss mask with the draft's predictions; :func:`prepare_targets` gives the
target probabilities over the draft vocabulary and the position mask;
:func:`softce_multi.masked_soft_cross_entropy` the loss of a test-time step and
:func:`draft_accuracy` its top-1 agreement; :func:`multi_step_loss` combines the steps.
The whole recipe, with the reasons behind it, is in the documentation (:doc:`/eagle3`).

Every function takes NumPy, PyTorch, JAX, CuPy or array-api-strict arrays and returns arrays of
the same library on the same device. Nothing reads a device array back to the host, except
:func:`build_vocab_mapping` when ``always_include`` is an array and :func:`prepare_targets` and
:func:`prepare_targets_from_hidden` when ``draft_vocab_size`` is not given; given, it is checked
against ``t2d`` on the host where ``t2d`` is there already, on the device elsewhere. The targets
are constants: on PyTorch they come back detached, on JAX behind ``jax.lax.stop_gradient``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import array_api_compat
import array_api_extra as xpx

from softce_multi import _chunks
from softce_multi._core import compute_dtype
from softce_multi._types import Array, LossInputs, Namespace
from softce_multi._validate import (
    check_1d,
    check_always_include,
    check_axis,
    check_chunk_rows,
    check_decay,
    check_fill,
    check_integer,
    check_mapping,
    check_normalize,
    check_prepare_from_hidden_inputs,
    check_prepare_inputs,
    check_same_device,
    check_signed,
    check_size,
    check_step_losses,
    check_step_weights_fit,
    check_token_counts,
    namespace_of,
    validate_inputs,
)

__all__ = [
    "build_vocab_mapping",
    "draft_accuracy",
    "draft_to_target_ids",
    "multi_step_loss",
    "prepare_targets",
    "prepare_targets_from_hidden",
    "shift_left",
    "target_to_draft_ids",
]


def build_vocab_mapping(
    token_counts: Array,
    draft_vocab_size: int,
    *,
    always_include: Iterable[int] | Array | None = None,
) -> tuple[Array, Array]:
    """Choose the draft vocabulary: the ``draft_vocab_size`` most frequent target tokens.

    Tokens are ranked by count, most frequent first, equal counts by lower id first; the ids of
    ``always_include`` come before all others. Draft id ``k`` is the ``k``-th smallest chosen
    target id. See :ref:`eagle3-vocabulary`.

    Parameters
    ----------
    token_counts : array, shape ``[V_target]``
        How often each target token occurs in the training data; integer or real floating.
    draft_vocab_size : int
        ``V_draft``, the number of tokens to choose, from 1 to ``V_target``.
    always_include : iterable of int or 1-D integer array, optional
        Target ids to choose whatever their counts (special tokens, for example): at most
        ``draft_vocab_size`` distinct ids in ``[0, V_target)``; repeats are allowed. An array is
        read on the host.

    Returns
    -------
    d2t : array, shape ``[V_draft]``
        Offsets such that ``target_id = draft_id + d2t[draft_id]`` (EAGLE-3 checkpoints'
        convention), non-negative and non-decreasing, of the default index dtype (int64; int32
        on JAX without x64).
    t2d : array, shape ``[V_target]``, bool
        True exactly at the ``V_draft`` target ids of the draft vocabulary.

    Raises
    ------
    TypeError
        If ``token_counts`` is not an integer or real floating array, ``draft_vocab_size`` is not
        an int, or ``always_include`` is not an iterable of ints (a string, a single int) or a
        1-D integer array.
    ValueError
        If ``token_counts`` is not 1-D, ``draft_vocab_size`` is out of ``[1, V_target]``, or
        ``always_include`` holds ids out of ``[0, V_target)`` or more than
        ``draft_vocab_size`` distinct ids.

    Notes
    -----
    Unless ``always_include`` is an array, nothing is read on the host, and the function runs
    under ``jax.jit`` with ``draft_vocab_size`` and ``always_include`` static.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import build_vocab_mapping
    >>> counts = np.array([5, 0, 9, 9, 1, 7])
    >>> d2t, t2d = build_vocab_mapping(counts, 3)
    >>> d2t  # draft ids 0, 1, 2 are target ids 2, 3, 5
    array([2, 2, 3])
    >>> t2d
    array([False, False,  True,  True, False,  True])
    >>> d2t, t2d = build_vocab_mapping(counts, 3, always_include=[1])
    >>> np.arange(3) + d2t
    array([1, 2, 3])
    """
    xp = namespace_of(token_counts=token_counts)
    check_token_counts(xp, token_counts)
    target_vocab_size = token_counts.shape[0]
    size = check_size(draft_vocab_size, target_vocab_size, name="draft_vocab_size")
    forced = check_always_include(always_include, target_vocab_size, size)

    device = array_api_compat.device(token_counts)
    index_dtype = xpx.default_dtype(xp, "indexing", device=device)
    target_ids = xp.arange(target_vocab_size, dtype=index_dtype, device=device)
    # Two stable sorts: by count (descending, ties in id order), then forced ids first.
    order = xp.argsort(token_counts, descending=True, stable=True)
    if forced:
        forced_ids = xp.asarray(forced, dtype=index_dtype, device=device)
        is_forced = xp.astype(_is_member(target_ids, forced_ids, xp=xp), xp.int8)
        order = xp.take(order, xp.argsort(xp.take(is_forced, order), descending=True, stable=True))
    chosen = xp.sort(xp.astype(order[:size], index_dtype))
    d2t = chosen - target_ids[:size]
    t2d = _is_member(target_ids, chosen, xp=xp)
    return d2t, t2d


def draft_to_target_ids(draft_ids: Array, d2t: Array) -> Array:
    """Translate draft token ids to target token ids: ``draft_id + d2t[draft_id]``.

    Parameters
    ----------
    draft_ids : array, any shape, integer
        Draft token ids, for example the argmax of draft logits; any integer dtype.
    d2t : array, shape ``[V_draft]``, integer
        The offsets of :func:`build_vocab_mapping`.

    Returns
    -------
    array, shape of ``draft_ids``
        The target ids, of the default index dtype (int64; int32 on JAX without x64), which
        holds every target id whatever the dtypes of the arguments. Ids outside
        ``[0, V_draft)`` map to -1.

    Raises
    ------
    TypeError
        If an argument is not an integer array, or the two come from different libraries.
    ValueError
        If ``d2t`` is not 1-D or the arrays are on different devices.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import draft_to_target_ids
    >>> d2t = np.array([2, 2, 3])
    >>> draft_to_target_ids(np.array([[0, 2], [1, 7]], dtype=np.int8), d2t)
    array([[ 2,  5],
           [ 3, -1]])
    """
    xp = namespace_of(draft_ids=draft_ids, d2t=d2t)
    check_same_device(draft_ids=draft_ids, d2t=d2t)
    check_integer(xp, draft_ids=draft_ids, d2t=d2t)
    check_1d(d2t, name="d2t", meaning="one offset per draft token")
    dtype = xpx.default_dtype(xp, "indexing", device=array_api_compat.device(d2t))

    # The offsets in the index dtype before the lookup: PyTorch's take has no unsigned
    # integers wider than 8 bits.
    offsets = xp.astype(d2t, dtype, copy=False)

    def target_of(ids: Array) -> tuple[Array | bool, Array]:
        return True, ids + xp.take(offsets, ids)

    # Unsigned ids beyond the index dtype wrap to negative ones, which map to -1 as they should.
    return _translate_ids(draft_ids, d2t.shape[0], dtype, target_of, xp=xp)


def target_to_draft_ids(target_ids: Array, t2d: Array) -> Array:
    """Translate target token ids to draft token ids, -1 where a token has no draft id.

    Parameters
    ----------
    target_ids : array, any shape, signed integer
        Target token ids, for example labels; any signed integer dtype.
    t2d : array, shape ``[V_target]``, bool
        The draft-vocabulary mask of :func:`build_vocab_mapping`.

    Returns
    -------
    array, shape and dtype of ``target_ids``
        The draft id of each target id (the number of True entries of ``t2d`` before it; never
        more than the target id, so it fits the dtype). -1 for ids outside the draft
        vocabulary, and for ids outside ``[0, V_target)`` such as the -100 of ignored labels.

    Raises
    ------
    TypeError
        If ``target_ids`` is not a signed integer array, ``t2d`` is not a bool array, or they
        come from different libraries.
    ValueError
        If ``t2d`` is not 1-D or the arrays are on different devices.

    Examples
    --------
    With the mappings of the example of :func:`build_vocab_mapping`, and back:

    >>> import numpy as np
    >>> from softce_multi import eagle3
    >>> d2t, t2d = eagle3.build_vocab_mapping(np.array([5, 0, 9, 9, 1, 7]), 3)
    >>> draft_ids = eagle3.target_to_draft_ids(np.array([5, 4, 2, -100], dtype=np.int16), t2d)
    >>> draft_ids
    array([ 2, -1,  0, -1], dtype=int16)
    >>> eagle3.draft_to_target_ids(draft_ids[draft_ids >= 0], d2t)
    array([5, 2])
    """
    xp = namespace_of(target_ids=target_ids, t2d=t2d)
    check_same_device(target_ids=target_ids, t2d=t2d)
    check_integer(xp, target_ids=target_ids)
    check_signed(xp, target_ids.dtype, name="target_ids")
    check_mapping(xp, t2d)
    # Indices of the index dtype (PyTorch takes no other); narrow ids would also overflow
    # the comparison with the vocabulary size.
    index_dtype = xpx.default_dtype(xp, "indexing", device=array_api_compat.device(t2d))
    dtype = xp.result_type(target_ids.dtype, index_dtype)
    positions = xp.cumulative_sum(xp.astype(t2d, dtype)) - 1

    def draft_of(ids: Array) -> tuple[Array | bool, Array]:
        return xp.take(t2d, ids), xp.take(positions, ids)

    draft = _translate_ids(target_ids, t2d.shape[0], dtype, draft_of, xp=xp)
    return xp.astype(draft, target_ids.dtype)


def _translate_ids(
    ids: Array,
    table_size: int,
    dtype: Any,
    translate: Callable[[Array], tuple[Array | bool, Array]],
    *,
    xp: Namespace,
) -> Array:
    """Translate token ids by a table of ``table_size`` entries; -1 where there is no entry.

    The ids are converted to ``dtype``; ``translate(ids)``, given ids in ``[0, table_size)``
    only, returns whether each has a translation and the translation. The result has the shape
    of ``ids`` and the dtype of the translation.
    """
    flat = xp.astype(xp.reshape(ids, (-1,)), dtype)
    in_table = (flat >= 0) & (flat < table_size)
    found, translated = translate(xp.where(in_table, flat, 0))
    return xp.reshape(xp.where(in_table & found, translated, -1), ids.shape)


def prepare_targets(
    target_logits: Array,
    loss_mask: Array,
    t2d: Array,
    *,
    draft_vocab_size: int | None = None,
) -> tuple[Array, Array]:
    """Turn the target model's logits into the draft model's targets and position mask.

    ``target_probs = softmax(target_logits[..., t2d])``; a position is trained on where its
    loss mask is set *and* the target model's top token (the argmax over the full vocabulary,
    in the logits' dtype) is in the draft vocabulary. Only the draft columns are converted to
    float32. The inputs must already be aligned with the draft's predictions
    (:func:`shift_left`). See :ref:`eagle3-targets`.

    Parameters
    ----------
    target_logits : array, shape ``[..., V_target]``, usually ``[B, T, V_target]``
        The target model's logits over its full vocabulary: float16, bfloat16, float32 or
        float64.
    loss_mask : array, shape ``[...]`` or ``[..., 1]``
        Which positions to train on: bool, integer or floating weights.
    t2d : array, shape ``[V_target]``, bool
        The draft-vocabulary mask of :func:`build_vocab_mapping`.
    draft_vocab_size : int, optional
        The number of True entries of ``t2d`` (``d2t.shape[0]``). Give it to keep the function
        free of device reads and usable under ``jax.jit``; without it, ``sum(t2d)`` is read on
        the host at every call. It is checked against ``t2d`` without a device read: where
        ``t2d`` is on the host (NumPy, array-api-strict, PyTorch CPU tensors outside
        ``torch.compile``, JAX CPU arrays outside ``jax.jit``) a different number is a
        ValueError; elsewhere (a GPU, ``jax.jit``) it makes every target probability NaN.

    Returns
    -------
    target_probs : array, shape ``[..., V_draft]``
        Rows that sum to 1, in float32 (float64 when ``target_logits`` is float64); NaN where
        ``draft_vocab_size`` disagrees with ``t2d`` on a device.
    position_mask : array, shape ``[..., 1]``
        ``loss_mask`` where ``argmax(target_logits)`` is in the draft vocabulary, 0 (False)
        elsewhere, of the dtype of ``loss_mask``.

    Both outputs are constants: detached on PyTorch, behind ``jax.lax.stop_gradient`` on JAX.

    Raises
    ------
    TypeError
        If ``target_logits`` is not float16 to float64, ``loss_mask`` not bool/integer/floating,
        ``t2d`` not bool, the arrays come from different libraries, or ``t2d`` is traced under
        ``jax.jit`` and ``draft_vocab_size`` is not given.
    ValueError
        If the shapes disagree, ``draft_vocab_size`` is out of ``[1, V_target]`` or (``t2d`` on
        the host) is not ``sum(t2d)``, ``t2d`` selects no token, or the arrays are on different
        devices.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import prepare_targets
    >>> logits = np.array([[[0.0, 3.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]]], dtype=np.float16)
    >>> loss_mask = np.array([[1, 1]])
    >>> t2d = np.array([False, True, True, False])
    >>> probs, position_mask = prepare_targets(logits, loss_mask, t2d, draft_vocab_size=2)
    >>> probs.shape, probs.dtype
    ((1, 2, 2), dtype('float32'))
    >>> np.round(probs[0, 0], 4)
    array([0.8808, 0.1192], dtype=float32)
    >>> position_mask[..., 0]  # the top token of position 1 (id 0) is not a draft token
    array([[1, 0]])
    """
    xp = namespace_of(target_logits=target_logits, loss_mask=loss_mask, t2d=t2d)
    check_same_device(target_logits=target_logits, loss_mask=loss_mask, t2d=t2d)
    check_prepare_inputs(xp, target_logits, loss_mask, t2d)
    size, wrong_size = _draft_vocab_size(t2d, draft_vocab_size, xp=xp)

    logits = _constant(target_logits, xp=xp)
    dtype = compute_dtype(logits, xp=xp)
    draft_logits = xp.astype(xp.take(logits, _draft_token_ids(t2d, size, xp=xp), axis=-1), dtype)
    target_probs = _softmax(draft_logits, wrong_size, xp=xp)

    top = _top_index(logits, xp=xp)
    return target_probs, _position_mask(loss_mask, top, t2d, xp=xp)


def _position_mask(loss_mask: Array, top: Array, t2d: Array, *, xp: Namespace) -> Array:
    """``loss_mask`` where the top token ``top`` (``[...]``) is a draft token, as ``[..., 1]``."""
    in_draft = xp.reshape(xp.take(t2d, xp.reshape(top, (-1,))), top.shape)
    mask = xp.reshape(loss_mask, top.shape)
    if mask.dtype == xp.bool:
        position_mask = mask & in_draft
    else:
        position_mask = xp.where(in_draft, mask, xp.zeros_like(mask))
    return _constant(position_mask[..., None], xp=xp)


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
        vocabulary (the softmax); by default ``2**19 // chunk_rows``.

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

    Both outputs are constants: detached on PyTorch, behind ``jax.lax.stop_gradient`` on JAX.

    Raises
    ------
    TypeError
        As :func:`prepare_targets`, for ``target_hidden`` or ``target_head_weight`` not float16
        to float64, and for chunk sizes that are not ints.
    ValueError
        If ``target_head_weight`` is not ``[V_target, H]`` for the ``H`` of ``target_hidden``
        and the ``V_target`` of ``t2d``, ``loss_mask`` does not fit ``target_hidden``, a chunk
        size is below 1, or as :func:`prepare_targets` for ``draft_vocab_size`` and ``t2d``.

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
    rows_per_chunk = check_chunk_rows(chunk_rows)
    columns_per_chunk = check_chunk_rows(chunk_vocab, name="chunk_vocab")
    size, wrong_size = _draft_vocab_size(t2d, draft_vocab_size, xp=xp)
    if rows_per_chunk is None:
        rows_per_chunk = DEFAULT_TARGET_CHUNK_ROWS
    if columns_per_chunk is None:
        columns_per_chunk = max(1, TARGET_CHUNK_ELEMENTS // rows_per_chunk)

    hidden = _constant(target_hidden, xp=xp)
    weight = _constant(target_head_weight, xp=xp)
    matmul_dtype = xp.result_type(hidden.dtype, weight.dtype)
    batch_shape = tuple(hidden.shape[:-1])
    rows = xp.reshape(hidden, (math.prod(batch_shape), hidden.shape[-1]))
    by_chunks = (
        _jax_targets_by_chunks() if array_api_compat.is_jax_namespace(xp) else _targets_by_chunks
    )
    probs, top = by_chunks(
        rows,
        weight,
        _draft_token_ids(t2d, size, xp=xp),
        wrong_size,
        _ChunkSizes(rows_per_chunk, columns_per_chunk),
        matmul_dtype,
        xp=xp,
    )
    target_probs = _constant(xp.reshape(probs, (*batch_shape, size)), xp=xp)
    return target_probs, _position_mask(loss_mask, xp.reshape(top, batch_shape), t2d, xp=xp)


#: Rows per chunk of :func:`prepare_targets_from_hidden` by default: enough rows that each pass
#: over the weight does ``2 * DEFAULT_TARGET_CHUNK_ROWS`` flops per weight element it reads.
DEFAULT_TARGET_CHUNK_ROWS = 1024

#: Elements of one ``[chunk_rows, chunk_vocab]`` block of logits that the default
#: ``chunk_vocab`` of :func:`prepare_targets_from_hidden` aims for (2 MiB in float32).
TARGET_CHUNK_ELEMENTS = 2**19


class _ChunkSizes(NamedTuple):
    rows: int
    vocab: int


def _targets_by_chunks(
    rows: Array,
    weight: Array,
    draft_ids: Array,
    wrong_size: Array,
    chunk: _ChunkSizes,
    matmul_dtype: Any,
    *,
    xp: Namespace,
) -> tuple[Array, Array]:
    """The draft softmax ``[N, V_draft]`` and the full-vocabulary argmax ``[N]`` of ``rows``.

    Per chunk of rows: the draft logits go into the output block by block (with their running
    maximum), then become ``exp(z - max)`` (with their running sum), then are divided by the
    sum, or by NaN where the 0-d bool ``wrong_size`` is True; the argmax comes from a pass over
    the target vocabulary. Every temporary is one ``[chunk.rows, chunk.vocab]`` block.
    """
    loops = _chunks.loop_for(xp)
    device = array_api_compat.device(rows)
    index_dtype = xpx.default_dtype(xp, "indexing", device=device)
    dtype = compute_dtype(rows, weight, xp=xp)
    hidden_size, draft_size = rows.shape[1], draft_ids.shape[0]

    def logits(h: Array, w: Array) -> Array:
        """``h @ w.T`` in the matmul dtype, then in ``dtype``: the argmax and the softmax alike
        see the logits rounded to the matmul dtype, as the materialised product holds them."""
        product = xp.astype(h, matmul_dtype, copy=False) @ xp.matrix_transpose(
            xp.astype(w, matmul_dtype, copy=False)
        )
        return _widened(product, dtype, xp=xp)

    def top_of(h: Array) -> Array:
        def step(start: Any, size: int, best: tuple[Array, Array]) -> tuple[Array, Array]:
            z = logits(h, loops.get(weight, (start, 0), (size, hidden_size)))
            value, index = xp.max(z, axis=-1), xp.astype(_top_index(z, xp=xp), index_dtype)
            # Later chunks hold later ids: they win only with a strictly larger value, or the
            # first NaN; so equal maxima keep the first index, as argmax does.
            wins = (value > best[0]) | (xp.isnan(value) & ~xp.isnan(best[0]))
            return xp.where(wins, value, best[0]), xp.where(wins, index + start, best[1])

        n = h.shape[0]
        lowest = xp.full((n,), -math.inf, dtype=dtype, device=device)
        first = xp.zeros((n,), dtype=index_dtype, device=device)
        return _chunks.over_chunks(weight.shape[0], chunk.vocab, step, (lowest, first), loops)[1]

    def row_step(row: Any, n: int, out: tuple[Array, Array]) -> tuple[Array, Array]:
        h = loops.get(rows, (row, 0), (n, hidden_size))

        def write_logits(column: Any, size: int, state: tuple[Array, Array]) -> Any:
            # The draft rows of the weight, gathered one block at a time.
            w = xp.take(weight, loops.get(draft_ids, (column,), (size,)), axis=0)
            z = logits(h, w)
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
        total = _nan_where(wrong_size, total, xp=xp)
        probs = _chunks.over_chunks(draft_size, chunk.vocab, normalise, probs, loops)
        return probs, loops.put(out[1], (row,), top_of(h))

    n_rows = rows.shape[0]
    probs = xp.empty((n_rows, draft_size), dtype=dtype, device=device)
    top = xp.empty((n_rows,), dtype=index_dtype, device=device)
    return _chunks.over_chunks(n_rows, chunk.rows, row_step, (probs, top), loops)


@functools.cache
def _jax_targets_by_chunks() -> Callable[..., tuple[Array, Array]]:
    """:func:`_targets_by_chunks` under ``jax.jit``, compiled once per shapes, chunk sizes and
    dtype: called eagerly, JAX would compile each of its chunk loops again at every call."""
    import jax

    return jax.jit(_targets_by_chunks, static_argnums=(4, 5), static_argnames=("xp",))


def _widened(x: Array, dtype: Any, *, xp: Namespace) -> Array:
    """``x`` converted to the floating ``dtype``, at least as wide: the values of ``x``'s dtype.

    On JAX a plain conversion may carry more precision than ``x``'s dtype has (see
    :func:`softce_multi.kernels.xla.widened`, which rounds in any case).
    """
    if x.dtype == dtype or not array_api_compat.is_jax_namespace(xp):
        return xp.astype(x, dtype, copy=False)
    from softce_multi.kernels.xla import widened

    return widened(x, dtype)


def _softmax(x: Array, wrong_size: Array, *, xp: Namespace) -> Array:
    """``softmax(x)`` over the last axis, in the dtype of ``x``; NaN if ``wrong_size`` is True."""
    shifted = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    return shifted / _nan_where(wrong_size, xp.sum(shifted, axis=-1, keepdims=True), xp=xp)


def _nan_where(condition: Array, x: Array, *, xp: Namespace) -> Array:
    """``x``, or NaN everywhere if the 0-d bool ``condition`` is True: an error on the device."""
    nan = xp.asarray(math.nan, dtype=x.dtype, device=array_api_compat.device(x))
    return xp.where(condition, nan, x)


def shift_left(x: Array, *, axis: int = 1, fill: bool | float = 0) -> Array:
    """Shift ``x`` one position to the left along ``axis``, filling the last position.

    ``out[..., t, ...] = x[..., t + 1, ...]`` and ``out[..., -1, ...] = fill``. An EAGLE-3
    trainer shifts the target logits, the input ids and the loss mask *together*, before the
    first test-time step and after each one; :ref:`eagle3-shift` explains which tensors to
    shift and why.

    Parameters
    ----------
    x : array, at least 1-D
        Any dtype; gradients flow through the shifted values.
    axis : int, default 1
        The sequence axis (``[B, T, ...]`` layouts); negative values count from the end.
    fill : bool or real number, default 0
        The value of the last position; 0 (False) marks it as padding. It must fit the dtype
        of ``x`` exactly: 0, 1, False or True for bool; a whole number within the dtype's
        range for integers (True and False count as 1 and 0); for floating dtypes a number of
        at most the dtype's largest magnitude, or an infinity or NaN.

    Returns
    -------
    array
        Same shape, dtype, namespace and device as ``x``.

    Raises
    ------
    TypeError
        If ``x`` is not an array, ``axis`` is not an int, or ``fill`` does not fit the dtype
        of ``x`` (out of its range, a fraction for integers, a number other than 0 and 1 for
        bool), on every backend: ``fill`` never wraps around or rounds to infinity.
    ValueError
        If ``axis`` is out of range for the shape of ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import shift_left
    >>> input_ids = np.array([[11, 12, 13, 14]])
    >>> loss_mask = np.array([[False, True, True, True]])
    >>> shift_left(input_ids)
    array([[12, 13, 14,  0]])
    >>> shift_left(loss_mask)
    array([[ True,  True,  True, False]])
    """
    xp = namespace_of(x=x)
    axis = check_axis(axis, tuple(x.shape))
    value = check_fill(xp, fill, x.dtype)
    step = min(x.shape[axis], 1)  # 0 for an empty axis, which stays empty
    rest = [slice(None)] * x.ndim
    rest[axis] = slice(step, None)
    pad_shape = list(x.shape)
    pad_shape[axis] = step
    pad = xp.full(tuple(pad_shape), value, dtype=x.dtype, device=array_api_compat.device(x))
    return xp.concat([x[tuple(rest)], pad], axis=axis)


def draft_accuracy(logits: Array, target_probs: Array, position_mask: Array) -> Array:
    """Fraction of the valid positions where the draft's top token is the target's.

    ``sum(valid & (argmax(logits) == argmax(target_probs))) / sum(valid)`` with
    ``valid = position_mask != 0``: every valid position counts once, whatever its weight; 0
    when no position is valid. Nothing is read on the host.

    Parameters
    ----------
    logits : array, shape ``[..., V_draft]``
        Draft logits: float16, bfloat16, float32 or float64.
    target_probs : array, shape ``[..., V_draft]``
        Target probabilities, as :func:`prepare_targets` returns them; the same dtypes.
    position_mask : array, shape ``[...]`` or ``[..., 1]``
        The positions to count: bool, integer or floating.

    Returns
    -------
    array, shape ``()``
        In float32 (float64 when an input is float64); no gradient flows through it.

    Raises
    ------
    TypeError, ValueError
        As :func:`softce_multi.masked_soft_cross_entropy` raises for the same arguments.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import draft_accuracy
    >>> logits = np.array([[[2.0, 1.0], [0.0, 1.0], [5.0, 0.0]]])
    >>> target = np.array([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]])
    >>> mask = np.array([[[True], [True], [False]]])
    >>> draft_accuracy(logits, target, mask)
    array(0.5)
    """
    xp = validate_inputs(LossInputs(logits, target_probs, position_mask, "mean", None))
    hit = _top_index(logits, xp=xp) == _top_index(target_probs, xp=xp)
    valid = xp.reshape(position_mask, hit.shape)
    if valid.dtype != xp.bool:
        valid = valid != 0
    dtype = compute_dtype(logits, target_probs, xp=xp)
    count_dtype = xpx.default_dtype(xp, "integral", device=array_api_compat.device(logits))
    hits = xp.astype(xp.sum(xp.astype(hit & valid, count_dtype)), dtype)
    count = xp.astype(xp.sum(xp.astype(valid, count_dtype)), dtype)
    return _constant(_zero_d(hits / xp.maximum(count, xp.ones_like(count)), xp=xp), xp=xp)


def multi_step_loss(
    step_losses: Sequence[Array] | Array,
    *,
    decay: float = 0.8,
    normalize: bool = True,
) -> Array:
    """Combine the losses of the test-time steps: ``sum_i decay**i * loss_i``.

    With ``normalize=True`` (NeMo AutoModel's choice) the sum is divided by ``sum_i decay**i``,
    a weighted mean on the scale of one step's loss; with ``normalize=False`` (SpecForge's and
    the original EAGLE-3 code's) it is the plain weighted sum. See :ref:`eagle3-steps`.

    Parameters
    ----------
    step_losses : sequence of 0-d arrays, or a 1-D array
        ``loss_i`` for ``i = 0, 1, ...``, real floating, at least one. Gradients flow to each.
    decay : float, default 0.8
        The weight ratio between consecutive steps, finite and non-negative.
    normalize : bool, default True
        Whether to divide by the sum of the weights.

    Returns
    -------
    array, shape ``()``
        In the dtype of the stacked losses, of their namespace and device. The normalized
        weights are computed relative to the largest one, so that any finite decay and any
        number of steps give a finite result.

    Raises
    ------
    TypeError
        If ``step_losses`` holds something other than real floating arrays of one library, or
        ``decay`` or ``normalize`` has the wrong type.
    ValueError
        If ``step_losses`` is empty, its arrays are not 0-d (or it is not 1-D), they are on
        different devices, ``decay`` is negative or not finite, or (``normalize=False``) the
        weights sum beyond the largest number of the losses' dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import multi_step_loss
    >>> losses = [np.asarray(2.0), np.asarray(3.0)]
    >>> float(multi_step_loss(losses, decay=1.0))  # (2 + 3) / 2
    2.5
    >>> float(multi_step_loss(losses, decay=0.5, normalize=False))  # 2 + 0.5 * 3
    3.5
    """
    xp = check_step_losses(step_losses)
    ratio = check_decay(decay)
    check_normalize(normalize)
    is_stacked = array_api_compat.is_array_api_obj(step_losses)
    losses: Array = step_losses if is_stacked else xp.stack(list(step_losses))
    steps = losses.shape[0]
    if normalize:
        weights = _normalized_weights(ratio, steps)
    else:
        check_step_weights_fit(ratio, steps, xp=xp, dtype=losses.dtype)
        weights = [ratio**i for i in range(steps)]
    device = array_api_compat.device(losses)
    total = xp.sum(xp.asarray(weights, dtype=losses.dtype, device=device) * losses)
    return _zero_d(total, xp=xp)


def _normalized_weights(decay: float, steps: int) -> list[float]:
    """``decay**i / sum_j decay**j`` for ``i < steps``, without overflow for any finite decay."""
    # Powers relative to the largest weight (the first, or the last when decay > 1) are at
    # most 1; the smallest may underflow to 0, which is their value to float precision.
    largest = steps - 1 if decay > 1 else 0
    relative = [decay ** (i - largest) for i in range(steps)]
    total = math.fsum(relative)
    return [weight / total for weight in relative]


def _is_member(values: Array, unique_values: Array, *, xp: Namespace) -> Array:
    """``values[i] in unique_values`` elementwise, both arrays without repeats."""
    # By sorting: JAX's default compares all pairs, a [V_target, V_draft] temporary.
    return xpx.isin(values, unique_values, assume_unique=True, kind="sort", xp=xp)


def _draft_token_ids(t2d: Array, size: int, *, xp: Namespace) -> Array:
    """Return the ascending positions of the first ``size`` True entries of ``t2d``.

    Where ``t2d`` has fewer, the missing positions are the last one, a valid index (the
    targets are then NaN, see :func:`_draft_vocab_size`).
    """
    device = array_api_compat.device(t2d)
    dtype = xpx.default_dtype(xp, "indexing", device=device)
    running = xp.cumulative_sum(xp.astype(t2d, dtype))
    # The k-th True entry (from 1) is the first position where the running count reaches k.
    ranks = xp.arange(1, size + 1, dtype=dtype, device=device)
    last = xp.asarray(t2d.shape[0] - 1, dtype=dtype, device=device)
    return xp.minimum(xp.astype(xp.searchsorted(running, ranks), dtype), last)


def _draft_vocab_size(
    t2d: Array, draft_vocab_size: int | None, *, xp: Namespace
) -> tuple[int, Array]:
    """Return the draft vocabulary size and whether ``t2d`` disagrees with it (0-d bool).

    Without ``draft_vocab_size``, ``sum(t2d)`` is read on the host and is the size. With it,
    the count is compared with it on the host where reading it waits for no device and stops
    no trace (:func:`_is_readable_for_free`), a disagreement being a ValueError; elsewhere
    only on the device, where the returned array holds the answer.
    """
    count_dtype = xpx.default_dtype(xp, "integral", device=array_api_compat.device(t2d))
    count = xp.sum(xp.astype(t2d, count_dtype))
    if draft_vocab_size is None:
        size = _read_count(t2d, count, xp=xp)
    else:
        size = check_size(draft_vocab_size, t2d.shape[0], name="draft_vocab_size")
        if _is_readable_for_free(count, xp=xp):
            selected = _read_count(t2d, count, xp=xp)
            if selected != size:
                msg = (
                    f"draft_vocab_size must be the number of True entries of t2d "
                    f"(d2t.shape[0]); got draft_vocab_size={size}, and t2d selects {selected} "
                    f"of its {t2d.shape[0]} tokens"
                )
                raise ValueError(msg)
    return size, count != size


def _read_count(t2d: Array, count: Array, *, xp: Namespace) -> int:
    """Read ``count = sum(t2d)`` on the host; refuse a traced JAX count with a clear message."""
    if array_api_compat.is_jax_namespace(xp):
        import jax

        if isinstance(count, jax.core.Tracer):
            msg = (
                "t2d is counted inside jax.jit or another transformation, where the size of the "
                "draft vocabulary is unknown; pass draft_vocab_size=d2t.shape[0] (a Python int)"
            )
            raise TypeError(msg)
    selected = int(count)
    if selected == 0:
        msg = f"t2d selects no token (all {t2d.shape[0]} entries are False)"
        raise ValueError(msg)
    return selected


def _is_readable_for_free(x: Array, *, xp: Namespace) -> bool:
    """Whether reading a value of ``x`` on the host waits for no device and breaks no trace.

    True for NumPy and array-api-strict arrays, for plain PyTorch CPU tensors in eager mode
    (not under ``torch.compile``, not batched by ``torch.func.vmap``), and for concrete JAX
    arrays on the CPU; False on a GPU and for traced arrays.
    """
    host_only = array_api_compat.is_numpy_namespace(xp)
    if host_only or array_api_compat.is_array_api_strict_namespace(xp):
        return True
    if array_api_compat.is_torch_namespace(xp):
        from softce_multi._adapters import torch_shared as torch_adapter

        return torch_adapter.readable_for_free(x)
    if array_api_compat.is_jax_namespace(xp):
        import jax

        return not isinstance(x, jax.core.Tracer) and all(
            device.platform == "cpu" for device in x.devices()
        )
    return False


def _top_index(x: Array, *, xp: Namespace) -> Array:
    """``argmax`` over the last axis: the first index of the maximum, NaN counting as maximal."""
    if not (array_api_compat.is_jax_namespace(xp) and _jax_runs_on_cpu()):
        return xp.argmax(x, axis=-1)
    # XLA's argmax on the CPU (a reduction over value-index pairs) is several times slower than
    # a max followed by a min over the positions of the maximum.
    top = xp.max(x, axis=-1, keepdims=True)
    is_top = xp.where(xp.isnan(top), xp.isnan(x), x == top)
    size = x.shape[-1]
    positions = xp.arange(size, dtype=xpx.default_dtype(xp, "indexing"))
    return xp.min(xp.where(is_top, positions, size), axis=-1)


def _jax_runs_on_cpu() -> bool:
    import jax

    return jax.default_backend() == "cpu"


def _zero_d(x: Array, *, xp: Namespace) -> Array:
    """Return a 0-d result as an array: NumPy reductions give NumPy scalars."""
    return xp.asarray(x) if array_api_compat.is_numpy_namespace(xp) else x


def _constant(x: Array, *, xp: Namespace) -> Array:
    """Return ``x`` cut from automatic differentiation (PyTorch, JAX); as is elsewhere."""
    if array_api_compat.is_torch_namespace(xp):
        return x.detach()
    if array_api_compat.is_jax_namespace(xp):
        import jax

        return jax.lax.stop_gradient(x)
    return x
