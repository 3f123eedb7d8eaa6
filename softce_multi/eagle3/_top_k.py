"""Sparse draft targets: the ``k`` most probable draft tokens of each position and their mass.

:func:`top_k_targets` keeps the ``k`` largest probabilities of dense targets;
:func:`prepare_top_k_targets_from_hidden` gives the same straight from the target model's
hidden states, one chunk of rows and one block of draft columns at a time, with the chunk loops,
logits and argmax of :mod:`softce_multi.eagle3._from_hidden`.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable
from typing import Any

import array_api_extra as xpx

from softce_multi import _chunks, _compat
from softce_multi._core import compute_dtype
from softce_multi._types import Array, Namespace
from softce_multi._validate import check_floating, namespace_of
from softce_multi.eagle3._arrays import constant, nan_where
from softce_multi.eagle3._from_hidden import (
    ChunkSizes,
    chunk_logits,
    from_hidden_inputs,
    full_vocabulary_top,
)
from softce_multi.eagle3._t2d import draft_position_mask

__all__ = ["MERGE_BLOCKS", "prepare_top_k_targets_from_hidden", "top_k_targets"]

#: Blocks of ``chunk_vocab`` draft columns whose logits :func:`prepare_top_k_targets_from_hidden`
#: gathers before each selection of the running top ``k``: a selection costs the more per
#: column the fewer columns it selects from.
MERGE_BLOCKS = 16


def top_k_targets(target_probs: Array, k: int, /) -> tuple[Array, Array]:
    """Return the ``k`` largest target probabilities of each position and their ids.

    The sparse form of dense targets, such as those of :func:`prepare_targets`: per position,
    the ids of the ``k`` largest entries of the last axis, in descending order of probability,
    and those entries. Equal probabilities come in ascending order of id, so of several equal
    entries at the ``k``-th place the lowest ids are kept. A NaN counts as ``+inf`` (rows of
    NaN, such as the targets of a wrong ``draft_vocab_size``, keep ids ``0`` to ``k - 1``).

    Parameters
    ----------
    target_probs : array, shape ``[..., V]``
        Real floating values, usually probabilities: float16, bfloat16, float32 or float64.
    k : int
        How many entries to keep, from 1 to ``V``; a Python int (static under ``jax.jit``).

    Returns
    -------
    target_ids : array, shape ``[..., k]``
        The ids (positions along the last axis) of the kept entries, of the namespace's
        default integer dtype.
    target_probs : array, shape ``[..., k]``
        The kept entries, of the dtype of ``target_probs``, in descending order.

    Raises
    ------
    TypeError
        If ``target_probs`` is not an array of a real floating dtype, or ``k`` is not an int.
    ValueError
        If ``target_probs`` is 0-d, or ``k`` is out of ``[1, V]``.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import top_k_targets
    >>> probs = np.array([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.2, 0.0]], dtype=np.float32)
    >>> ids, top = top_k_targets(probs, 3)
    >>> ids
    array([[1, 3, 0],
           [0, 2, 1]])
    >>> top
    array([[0.4, 0.4, 0.1],
           [0.7, 0.2, 0.1]], dtype=float32)
    """
    xp = namespace_of(target_probs=target_probs)
    check_floating(xp, target_probs=target_probs)
    if target_probs.ndim == 0:
        msg = "target_probs must have at least one axis (the vocabulary), got a 0-d array"
        raise ValueError(msg)
    k = _checked_k(k, target_probs.shape[-1], of="the last axis of target_probs")
    # NaN ranks as +inf, and -0.0 with 0.0: every backend then orders the same keys.
    keys = xp.where(target_probs == 0, xp.zeros_like(target_probs), target_probs)
    keys = xp.where(xp.isnan(keys), xp.full_like(keys, math.inf), keys)
    positions = _first_largest(keys, k, xp=xp)
    ids_dtype = xpx.default_dtype(xp, "integral", device=_compat.device(target_probs))
    return (
        xp.astype(positions, ids_dtype),
        xp.take_along_axis(target_probs, positions, axis=-1),
    )


def prepare_top_k_targets_from_hidden(
    target_hidden: Array,
    target_head_weight: Array,
    loss_mask: Array,
    t2d: Array,
    k: int,
    /,
    *,
    draft_vocab_size: int | None = None,
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
) -> tuple[Array, Array, Array]:
    """The ``k`` most probable draft tokens of each position, straight from hidden states.

    ``top_k_targets`` of the targets of :func:`prepare_targets_from_hidden` with the same
    arguments, and its position mask, but the dense ``[..., V_draft]`` targets never exist,
    nor the ``[..., V_target]`` logits: per chunk of ``chunk_rows`` rows, one sweep over the
    draft columns in blocks of ``chunk_vocab`` keeps the running maximum and sum of the
    softmax, and the running ``k`` largest logits, selected again after every 16 blocks; the
    argmax of the position mask comes from a sweep over the target vocabulary. The largest
    temporary is the ``[chunk_rows, k + 16 * chunk_vocab]`` logits of a selection. See
    :ref:`eagle3-top-k-cache`.

    Parameters
    ----------
    target_hidden, target_head_weight, loss_mask, t2d
        As :func:`prepare_targets_from_hidden` takes them.
    k : int
        How many draft tokens to keep per position, from 1 to ``V_draft``; a Python int.
    draft_vocab_size, chunk_rows, chunk_vocab : int, optional
        As :func:`prepare_targets_from_hidden` takes them; ``draft_vocab_size`` is needed
        under ``jax.jit``.

    Returns
    -------
    target_ids : array, shape ``[..., k]``
        Draft ids (positions in the draft vocabulary), in descending order of probability, of
        the namespace's default integer dtype; ``0`` to ``k - 1`` where the probabilities are
        NaN.
    target_probs : array, shape ``[..., k]``
        Their probabilities under the softmax of the draft columns' logits, the entries of
        :func:`prepare_targets_from_hidden`'s targets to float rounding (the normaliser is
        summed in another order): float32 (float64 when the matmul dtype is float64).
    position_mask : array, shape ``[..., 1]``
        Exactly that of :func:`prepare_targets_from_hidden`.

    Raises
    ------
    TypeError
        As :func:`prepare_targets_from_hidden`, and if ``k`` is not an int.
    ValueError
        As :func:`prepare_targets_from_hidden`, and if ``k`` is out of ``[1, V_draft]``.

    Notes
    -----
    The ids are ordered by the logits, so they equal those of ``top_k_targets`` of the dense
    targets wherever the probabilities differ; among equal probabilities (equal logits, or
    logits so close or so low that their probabilities round alike) another of the equal
    entries may come first or be kept. The outputs are constants: detached on PyTorch, behind
    ``jax.lax.stop_gradient`` on JAX.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import (
    ...     prepare_targets_from_hidden,
    ...     prepare_top_k_targets_from_hidden,
    ...     top_k_targets,
    ... )
    >>> rng = np.random.default_rng(0)
    >>> hidden, weight = rng.normal(size=(2, 3, 8)), rng.normal(size=(10, 8))
    >>> loss_mask = np.ones((2, 3), dtype=bool)
    >>> t2d = np.arange(10) % 3 != 0
    >>> ids, probs, mask = prepare_top_k_targets_from_hidden(
    ...     hidden, weight, loss_mask, t2d, 2, chunk_vocab=4
    ... )
    >>> dense, dense_mask = prepare_targets_from_hidden(hidden, weight, loss_mask, t2d)
    >>> expected_ids, expected_probs = top_k_targets(dense, 2)
    >>> ids.shape, bool((ids == expected_ids).all()), bool(np.allclose(probs, expected_probs))
    ((2, 3, 2), True, True)
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
    k = _checked_k(k, inputs.size, of="the draft vocabulary size")
    by_chunks = _jax_top_k_by_chunks() if _compat.is_jax_namespace(xp) else _top_k_by_chunks
    ids, probs, top = by_chunks(
        inputs.rows,
        inputs.weight,
        inputs.draft_ids,
        inputs.wrong_size,
        k,
        inputs.chunk,
        inputs.matmul_dtype,
        xp=xp,
    )
    shape = (*inputs.batch_shape, k)
    position_mask = draft_position_mask(loss_mask, xp.reshape(top, inputs.batch_shape), t2d, xp=xp)
    return xp.reshape(ids, shape), constant(xp.reshape(probs, shape), xp=xp), position_mask


def _checked_k(k: Any, limit: int, *, of: str) -> int:
    """Return ``k`` after checking that it is an int in ``[1, limit]``; ``of`` names ``limit``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        msg = f"k must be an int, got {type(k).__name__}"
        raise TypeError(msg)
    value = operator.index(k)
    if not 1 <= value <= limit:
        msg = f"k must be between 1 and {of}, {limit}, got {value}"
        raise ValueError(msg)
    return value


def _first_largest(keys: Array, k: int, *, xp: Namespace) -> Array:
    """Return the positions of the ``k`` largest ``keys`` of each row, equal keys lowest first.

    Parameters
    ----------
    keys : array, shape ``[..., V]``
        Real floating keys without NaN.
    k : int
        From 1 to ``V``.
    xp : namespace
        The array namespace of ``keys``.

    Returns
    -------
    array, shape ``[..., k]``
        Positions in descending order of key, ascending among equal keys.
    """
    if _compat.is_jax_namespace(xp):
        import jax

        # Documented to put the lower index first among equal values.
        return jax.lax.top_k(keys, k)[1]
    if _compat.is_torch_namespace(xp):
        import torch

        return torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :k]
    return xp.argsort(keys, axis=-1, descending=True, stable=True)[..., :k]


def _largest(values: Array, k: int, *, xp: Namespace) -> tuple[Array, Array]:
    """Return the ``k`` largest ``values`` of each row and their positions, in descending order.

    The fastest selection of each backend: among equal values, which come first (and which are
    kept at the ``k``-th place) is left to it. NaN rows give some ``k`` of their positions.

    Parameters
    ----------
    values : array, shape ``[n, v]``
        Real floating values.
    k : int
        From 1 to ``v``.
    xp : namespace
        The array namespace of ``values``.

    Returns
    -------
    values : array, shape ``[n, k]``
    positions : array, shape ``[n, k]``, integer
    """
    if _compat.is_jax_namespace(xp):
        import jax

        return jax.lax.top_k(values, k)
    if _compat.is_torch_namespace(xp):
        import torch

        return torch.topk(values, k, dim=-1)
    positions = xp.argsort(values, axis=-1, descending=True, stable=True)[:, :k]
    return xp.take_along_axis(values, positions, axis=-1), positions


def _top_k_by_chunks(
    rows: Array,
    weight: Array,
    draft_ids: Array,
    wrong_size: Array,
    k: int,
    chunk: ChunkSizes,
    matmul_dtype: Any,
    *,
    xp: Namespace,
) -> tuple[Array, Array, Array]:
    """Return the top ``k`` of the draft softmax and the full-vocabulary argmax of ``rows``.

    Per chunk of rows: the logits of the first ``k`` draft columns start the running top
    ``k`` (sorted), maximum and sum of ``exp(z - max)``. The following draft columns come in
    groups of :data:`MERGE_BLOCKS` blocks of ``chunk.vocab``: each block rescales the sum to
    the new maximum and adds its own, and its logits are written after the running top ``k``
    in a ``[chunk.rows, k + MERGE_BLOCKS * chunk.vocab]`` buffer, of which the ``k`` largest
    become the running top ``k`` once the group is written (the running entries first, so
    equal logits keep the lower id where the backend's selection keeps the first). The
    probabilities are ``exp(z - max) / sum`` of the kept logits. That buffer is the largest
    temporary.

    Parameters
    ----------
    rows, weight, draft_ids, wrong_size
        As :func:`softce_multi.eagle3._from_hidden._targets_by_chunks` takes them.
    k : int
        From 1 to ``V_draft``.
    chunk : ChunkSizes
        Rows per chunk and columns per block.
    matmul_dtype : dtype
        The dtype the logits are computed and rounded in.
    xp : namespace
        The array namespace of the arrays.

    Returns
    -------
    ids : array, shape ``[N, k]``
        Draft ids in descending order of probability, of the default integer dtype; ``0``
        to ``k - 1`` in rows whose probabilities are NaN.
    probs : array, shape ``[N, k]``
        Their probabilities, in the compute dtype of ``rows`` and ``weight``.
    top : array, shape ``[N]``
        The first index of the maximum logit over the target vocabulary, NaN counting as
        maximal, of the default index dtype.
    """
    loops = _chunks.loop_for(xp)
    device = _compat.device(rows)
    ids_dtype = xpx.default_dtype(xp, "integral", device=device)
    index_dtype = xpx.default_dtype(xp, "indexing", device=device)
    dtype = compute_dtype(rows, weight, xp=xp)
    hidden_size, draft_size = rows.shape[1], draft_ids.shape[0]
    first_ids = xp.arange(k, dtype=ids_dtype, device=device)

    def draft_logits(h: Array, start: Any, size: int) -> Array:
        """The logits of the rows ``h`` for the ``size`` draft ids from ``start``."""
        w = xp.take(weight, loops.get(draft_ids, (start,), (size,)), axis=0)
        return chunk_logits(h, w, matmul_dtype, dtype, xp=xp)

    def shift_of(maximum: Array) -> Array:
        """The maximum, or 0 where it is -inf: a row of -inf logits so far shifts by 0."""
        return xp.where(maximum == -math.inf, xp.zeros_like(maximum), maximum)

    def row_step(row: Any, n: int, out: tuple[Array, Array, Array]) -> Any:
        h = loops.get(rows, (row, 0), (n, hidden_size))

        def merge(column: Any, width: int, state: tuple[Array, ...]) -> tuple[Array, ...]:
            values, ids, maximum, total = state
            start = column + k

            def write(offset: Any, size: int, inner: tuple[Array, ...]) -> tuple[Array, ...]:
                candidates, maximum, total = inner
                z = draft_logits(h, start + offset, size)
                new_maximum = xp.maximum(maximum, xp.max(z, axis=-1))
                shift = shift_of(new_maximum)
                # exp(maximum - shift) is 0 for a running maximum of -inf, whatever the shift.
                block_total = xp.sum(xp.exp(z - shift[:, None]), axis=-1)
                total = total * xp.exp(maximum - shift) + block_total
                return loops.put(candidates, (0, k + offset), z), new_maximum, total

            # The running top k first, so that equal logits keep the lower id where the
            # backend's selection keeps the first.
            candidates = xp.empty((n, k + width), dtype=dtype, device=device)
            candidates = loops.put(candidates, (0, 0), values)
            candidates, maximum, total = _chunks.over_chunks(
                width, chunk.vocab, write, (candidates, maximum, total), loops
            )
            values, positions = _largest(candidates, k, xp=xp)
            positions = xp.astype(positions, ids_dtype)
            last = xp.full((), k - 1, dtype=ids_dtype, device=device)
            kept = xp.take_along_axis(
                ids, xp.astype(xp.minimum(positions, last), index_dtype), axis=-1
            )
            return values, xp.where(positions < k, kept, positions - k + start), maximum, total

        first = draft_logits(h, 0, k)
        first_values, first_positions = _largest(first, k, xp=xp)
        maximum = xp.max(first, axis=-1)
        total = xp.sum(xp.exp(first - shift_of(maximum)[:, None]), axis=-1)
        state = (first_values, xp.astype(first_positions, ids_dtype), maximum, total)
        values, ids, maximum, total = _chunks.over_chunks(
            draft_size - k, MERGE_BLOCKS * chunk.vocab, merge, state, loops
        )
        total = nan_where(wrong_size, total, xp=xp)
        probs = xp.exp(values - shift_of(maximum)[:, None]) / total[:, None]
        # NaN probabilities (a NaN or inf logit, a row of -inf, a wrong size): the ids of
        # top_k_targets of a NaN row.
        ids = xp.where((total > 0)[:, None], ids, first_ids)
        top = full_vocabulary_top(h, weight, chunk.vocab, matmul_dtype, xp=xp)
        return (
            loops.put(out[0], (row, 0), ids),
            loops.put(out[1], (row, 0), probs),
            loops.put(out[2], (row,), top),
        )

    n_rows = rows.shape[0]
    ids = xp.empty((n_rows, k), dtype=ids_dtype, device=device)
    probs = xp.empty((n_rows, k), dtype=dtype, device=device)
    top = xp.empty((n_rows,), dtype=index_dtype, device=device)
    return _chunks.over_chunks(n_rows, chunk.rows, row_step, (ids, probs, top), loops)


@functools.cache
def _jax_top_k_by_chunks() -> Callable[..., tuple[Array, Array, Array]]:
    """Return :func:`_top_k_by_chunks` under ``jax.jit``, compiled once per shapes and sizes.

    Returns
    -------
    callable
        The jitted function, with ``k``, ``chunk``, ``matmul_dtype`` and ``xp`` static.
    """
    import jax

    return jax.jit(_top_k_by_chunks, static_argnums=(4, 5, 6), static_argnames=("xp",))
