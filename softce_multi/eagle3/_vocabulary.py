"""The draft vocabulary: choosing it, and translating token ids between the two vocabularies.

:func:`build_vocab_mapping` chooses the draft vocabulary from token counts and returns its two
mappings, ``d2t`` and ``t2d``; :func:`draft_to_target_ids` and :func:`target_to_draft_ids`
apply them to token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import array_api_extra as xpx

from softce_multi import _compat
from softce_multi._types import Array, Namespace
from softce_multi._validate import (
    check_1d,
    check_always_include,
    check_integer,
    check_mapping,
    check_same_device,
    check_signed,
    check_size,
    check_token_counts,
    namespace_of,
)

__all__ = ["build_vocab_mapping", "draft_to_target_ids", "target_to_draft_ids"]


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

    device = _compat.device(token_counts)
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
    dtype = xpx.default_dtype(xp, "indexing", device=_compat.device(d2t))

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
    index_dtype = xpx.default_dtype(xp, "indexing", device=_compat.device(t2d))
    dtype = xp.result_type(target_ids.dtype, index_dtype)
    positions = _compat.cumulative_sum(xp.astype(t2d, dtype), xp=xp) - 1

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

    Parameters
    ----------
    ids : array, any shape, integer
        The token ids to translate.
    table_size : int
        The number of entries of the table: ids outside ``[0, table_size)`` have none.
    dtype : dtype
        The integer dtype the ids are converted to before the lookup.
    translate : callable
        ``translate(ids)``, given 1-D ids of ``dtype`` in ``[0, table_size)`` only, returns
        whether each has a translation (an array, or True for all) and the translation.
    xp : namespace
        The array namespace of ``ids``.

    Returns
    -------
    array, shape of ``ids``
        The translations, of their dtype; -1 where an id has none.
    """
    if table_size == 0:  # nothing to take from: no id has an entry
        return xp.full(ids.shape, -1, dtype=dtype, device=_compat.device(ids))
    flat = xp.astype(xp.reshape(ids, (-1,)), dtype)
    in_table = (flat >= 0) & (flat < table_size)
    found, translated = translate(xp.where(in_table, flat, 0))
    return xp.reshape(xp.where(in_table & found, translated, -1), ids.shape)


def _is_member(values: Array, unique_values: Array, *, xp: Namespace) -> Array:
    """Return ``values[i] in unique_values`` elementwise.

    Parameters
    ----------
    values, unique_values : array, 1-D, integer
        Both without repeats.
    xp : namespace
        The array namespace of both.

    Returns
    -------
    array, shape of ``values``, bool
        Computed by sorting: JAX's default compares every pair, a ``[V_target, V_draft]``
        temporary.
    """
    return xpx.isin(values, unique_values, assume_unique=True, kind="sort", xp=xp)
