"""The steps around the loss that every EAGLE-3 trainer needs, for every array-API backend.

An EAGLE-3 draft model predicts over a *draft vocabulary*, a subset of the target model's
vocabulary made of its most frequent tokens. One training step, per test-time step ``i``:

1. :func:`build_vocab_mapping` (once, before training) chooses the draft vocabulary from token
   counts and returns the two mappings ``d2t`` and ``t2d`` that EAGLE-3 checkpoints store;
   :func:`draft_to_target_ids` and :func:`target_to_draft_ids` translate token ids with them.
2. :func:`shift_left` aligns the target model's logits, the input ids and the loss mask with what
   the draft predicts, all three together, once before the first step and once after each step.
3. :func:`prepare_targets` turns the target logits over the full vocabulary into target
   probabilities over the draft vocabulary and the mask of the positions to train on.
4. :func:`softce_multi.masked_soft_cross_entropy` gives the loss of the step, and
   :func:`draft_accuracy` its top-1 agreement with the target.
5. :func:`multi_step_loss` combines the losses of the test-time steps into the loss to minimise.

Every function takes NumPy, PyTorch, JAX, CuPy or array-api-strict arrays and returns arrays of
the same library on the same device. Nothing reads a device array back to the host, except
:func:`build_vocab_mapping` when ``always_include`` is an array and :func:`prepare_targets` when
``draft_vocab_size`` is not given (see there). The targets are constants: on PyTorch they come
back detached, on JAX behind ``jax.lax.stop_gradient``.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import array_api_compat

from softce_multi._core import compute_dtype
from softce_multi._validate import (
    check_floating,
    check_mask,
    check_same_device,
    namespace_of,
    validate_inputs,
)

__all__ = [
    "build_vocab_mapping",
    "draft_accuracy",
    "draft_to_target_ids",
    "multi_step_loss",
    "prepare_targets",
    "shift_left",
    "target_to_draft_ids",
]

Array = Any
Namespace = Any


def build_vocab_mapping(
    token_counts: Array,
    draft_vocab_size: int,
    /,
    *,
    always_include: Iterable[int] | Array | None = None,
) -> tuple[Array, Array]:
    """Choose the draft vocabulary: the ``draft_vocab_size`` most frequent target tokens.

    Tokens are ranked by count, from most to least frequent; equal counts are ranked by lower
    id first, so tokens that never occur fill the vocabulary in id order when too few tokens
    occur. The ids of ``always_include`` are chosen before all others. The chosen ids are sorted
    ascending: draft id ``k`` is the ``k``-th smallest chosen target id.

    Parameters
    ----------
    token_counts : array, shape ``[V_target]``
        How often each target token occurs in the training data; integer or real floating.
    draft_vocab_size : int
        ``V_draft``, the number of tokens to choose, from 1 to ``V_target``.
    always_include : sequence of int or 1-D integer array, optional
        Target ids to choose whatever their counts, for example special tokens such as the end
        of sequence. At most ``draft_vocab_size`` distinct ids; repeats are allowed. An array is
        read on the host (this function runs once, before training).

    Returns
    -------
    d2t : array, shape ``[V_draft]``
        Offsets such that ``target_id = draft_id + d2t[draft_id]``, the convention of EAGLE-3
        checkpoints. Integer, of the namespace's default index dtype (int64; int32 on JAX
        without x64). Non-negative and non-decreasing.
    t2d : array, shape ``[V_target]``, bool
        ``t2d[v]`` is True exactly when target token ``v`` is in the draft vocabulary; it has
        ``V_draft`` True entries.

    Raises
    ------
    TypeError
        If ``token_counts`` is not an integer or real floating array, ``draft_vocab_size`` is not
        an int, or ``always_include`` holds something other than integers.
    ValueError
        If ``token_counts`` is not 1-D, ``draft_vocab_size`` is below 1 or above ``V_target``
        (fewer tokens exist than asked), or ``always_include`` holds ids outside
        ``[0, V_target)`` or more distinct ids than ``draft_vocab_size``.

    Notes
    -----
    Without ``always_include`` as an array, nothing is read on the host and the function runs
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
    if not xp.isdtype(token_counts.dtype, ("integral", "real floating")):
        msg = f"token_counts must have an integer or real floating dtype, got {token_counts.dtype}"
        raise TypeError(msg)
    _check_1d(token_counts, name="token_counts", meaning="one count per target token")
    target_vocab_size = token_counts.shape[0]
    size = _check_size(draft_vocab_size, target_vocab_size, name="draft_vocab_size")
    forced = _forced_ids(always_include, target_vocab_size, size)

    device = array_api_compat.device(token_counts)
    index_dtype = _index_dtype(xp, device)
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


def draft_to_target_ids(draft_ids: Array, d2t: Array, /) -> Array:
    """Translate draft token ids to target token ids: ``draft_id + d2t[draft_id]``.

    Parameters
    ----------
    draft_ids : array, any shape, integer
        Draft token ids, for example the argmax of draft logits.
    d2t : array, shape ``[V_draft]``, integer
        The offsets of :func:`build_vocab_mapping`.

    Returns
    -------
    array, shape of ``draft_ids``
        The target ids, of the dtype ``draft_ids`` and ``d2t`` promote to (a signed integer).
        Ids outside ``[0, V_draft)`` map to -1.

    Raises
    ------
    TypeError
        If an argument is not an integer array, the two come from different libraries, or their
        promoted dtype cannot hold -1.
    ValueError
        If ``d2t`` is not 1-D or the arrays are on different devices.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import draft_to_target_ids
    >>> d2t = np.array([2, 2, 3])
    >>> draft_to_target_ids(np.array([[0, 2], [1, 7]]), d2t)
    array([[ 2,  5],
           [ 3, -1]])
    """
    xp = namespace_of(draft_ids=draft_ids, d2t=d2t)
    check_same_device(draft_ids=draft_ids, d2t=d2t)
    _check_integer(xp, draft_ids=draft_ids, d2t=d2t)
    _check_1d(d2t, name="d2t", meaning="one offset per draft token")
    dtype = xp.result_type(draft_ids.dtype, d2t.dtype)
    _check_signed(xp, dtype, name="draft_ids and d2t promote to")
    ids = xp.astype(xp.reshape(draft_ids, (-1,)), dtype)
    known = (ids >= 0) & (ids < d2t.shape[0])
    safe = xp.where(known, ids, 0)
    target = xp.where(known, safe + xp.astype(xp.take(d2t, safe), dtype), -1)
    return xp.reshape(target, draft_ids.shape)


def target_to_draft_ids(target_ids: Array, t2d: Array, /) -> Array:
    """Translate target token ids to draft token ids, -1 where a token has no draft id.

    Parameters
    ----------
    target_ids : array, any shape, signed integer
        Target token ids, for example labels.
    t2d : array, shape ``[V_target]``, bool
        The draft-vocabulary mask of :func:`build_vocab_mapping`.

    Returns
    -------
    array, shape and dtype of ``target_ids``
        The draft id of each target id: the number of True entries of ``t2d`` before it. -1 for
        ids outside the draft vocabulary, and for ids outside ``[0, V_target)`` such as the
        -100 of ignored labels.

    Raises
    ------
    TypeError
        If ``target_ids`` is not a signed integer array, ``t2d`` is not a bool array, or they
        come from different libraries.
    ValueError
        If ``t2d`` is not 1-D or the arrays are on different devices.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import target_to_draft_ids
    >>> t2d = np.array([False, False, True, True, False, True])
    >>> target_to_draft_ids(np.array([5, 4, 2, -100]), t2d)
    array([ 2, -1,  0, -1])
    """
    xp = namespace_of(target_ids=target_ids, t2d=t2d)
    check_same_device(target_ids=target_ids, t2d=t2d)
    _check_integer(xp, target_ids=target_ids)
    _check_signed(xp, target_ids.dtype, name="target_ids")
    _check_mapping(xp, t2d)
    positions = xp.cumulative_sum(xp.astype(t2d, target_ids.dtype)) - 1
    ids = xp.reshape(target_ids, (-1,))
    known = (ids >= 0) & (ids < t2d.shape[0])
    safe = xp.where(known, ids, 0)
    draft = xp.where(known & xp.take(t2d, safe), xp.take(positions, safe), -1)
    return xp.reshape(draft, target_ids.shape)


def prepare_targets(
    target_logits: Array,
    loss_mask: Array,
    t2d: Array,
    /,
    *,
    draft_vocab_size: int | None = None,
) -> tuple[Array, Array]:
    """Turn the target model's logits into the draft model's targets and position mask.

    ``target_probs = softmax(target_logits[..., t2d])`` in float32, and a position is trained
    on when its loss mask is set *and* the target model's top token is in the draft vocabulary
    (a draft model cannot predict any other token). Only the draft columns are converted to
    float32: no float32 copy of the full-vocabulary logits is made. The argmax is taken over the
    full vocabulary in the logits' own dtype.

    The inputs must already be aligned with the draft's predictions; see :func:`shift_left`.

    Parameters
    ----------
    target_logits : array, shape ``[..., V_target]``, usually ``[B, T, V_target]``
        The target model's logits over its full vocabulary, floating (bfloat16 is typical).
    loss_mask : array, shape ``[...]`` or ``[..., 1]``
        Which positions to train on: bool, integer or floating weights.
    t2d : array, shape ``[V_target]``, bool
        The draft-vocabulary mask of :func:`build_vocab_mapping`.
    draft_vocab_size : int, optional
        The number of True entries of ``t2d`` (``d2t.shape[0]``). Give it to keep the function
        free of host reads: without it, ``sum(t2d)`` is read on the host at every call (a device
        synchronisation on a GPU), which is impossible under ``jax.jit``. It is trusted, not
        checked against ``t2d`` (that check would read the device).

    Returns
    -------
    target_probs : array, shape ``[..., V_draft]``
        The target distribution over the draft vocabulary, in float32 (float64 when
        ``target_logits`` is float64). Each row sums to 1.
    position_mask : array, shape ``[..., 1]``
        ``loss_mask`` where ``argmax(target_logits)`` is in the draft vocabulary, 0 (False)
        elsewhere; of the dtype of ``loss_mask``.

    Both outputs are constants: detached on PyTorch, behind ``jax.lax.stop_gradient`` on JAX.

    Raises
    ------
    TypeError
        If ``target_logits`` is not floating, ``loss_mask`` not bool/integer/floating, ``t2d``
        not bool, the arrays come from different libraries, or ``t2d`` is traced under
        ``jax.jit`` and ``draft_vocab_size`` is not given.
    ValueError
        If the shapes disagree, ``draft_vocab_size`` is out of ``[1, V_target]``, ``t2d``
        selects no token, or the arrays are on different devices.

    Notes
    -----
    The draft columns are located from ``t2d`` with a cumulative sum and a binary search
    (``searchsorted``), whose output size is ``draft_vocab_size``: a static size, which is why
    the function works under ``jax.jit`` once ``draft_vocab_size`` is given.

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
    _check_prepare_inputs(xp, target_logits, loss_mask, t2d)
    if draft_vocab_size is None:
        draft_vocab_size = _count_draft_tokens(t2d, xp=xp)
    size = _check_size(draft_vocab_size, t2d.shape[0], name="draft_vocab_size")

    logits = _constant(target_logits, xp=xp)
    dtype = xp.float64 if logits.dtype == xp.float64 else xp.float32
    draft_logits = xp.astype(xp.take(logits, _draft_token_ids(t2d, size, xp=xp), axis=-1), dtype)
    shifted = xp.exp(draft_logits - xp.max(draft_logits, axis=-1, keepdims=True))
    target_probs = shifted / xp.sum(shifted, axis=-1, keepdims=True)

    top = _top_index(logits, xp=xp)
    in_draft = xp.reshape(xp.take(t2d, xp.reshape(top, (-1,))), top.shape)
    mask = xp.reshape(loss_mask, top.shape)
    if mask.dtype == xp.bool:
        position_mask = mask & in_draft
    else:
        position_mask = xp.where(in_draft, mask, xp.zeros_like(mask))
    return target_probs, _constant(position_mask[..., None], xp=xp)


def shift_left(x: Array, /, *, axis: int = 1, fill: bool | float = 0) -> Array:
    """Shift ``x`` one position to the left along ``axis``, filling the last position.

    ``out[..., t, ...] = x[..., t + 1, ...]`` and ``out[..., -1, ...] = fill``. This is how an
    EAGLE-3 trainer aligns tensors with the draft's predictions.

    Which tensors to shift: the draft at position ``t`` is given the target model's hidden
    state at ``t`` and the embedding of token ``t + 1``, and predicts token ``t + 2``, whose
    distribution is the target model's output at position ``t + 1``. So, before the first
    test-time step, shift **the target logits, the input ids and the loss mask together**, and
    shift the same three again after every test-time step: step ``i`` reads token ``t + 1 + i``,
    is compared with the target output at ``t + 1 + i``, and is trained only where the loss
    mask of ``t + 1 + i`` is set. The hidden states are not shifted (the draft's own hidden
    states replace them after the first step). Shifting the logits but not the loss mask is a
    known off-by-one bug: the mask then selects the wrong positions, and the last position
    keeps a mask of 1 while its target logits are ``fill``.

    :func:`prepare_targets` works position by position, so after the first shift a trainer may
    shift its outputs (``target_probs`` and ``position_mask``) instead of the target logits and
    the loss mask: the results agree wherever the position mask is set (the shifted-in last
    position is masked either way), and the full-vocabulary logits are read only once.

    Parameters
    ----------
    x : array, at least 1-D
        Any dtype; gradients flow through the shifted values.
    axis : int, default 1
        The sequence axis (``[B, T, ...]`` layouts); negative values count from the end.
    fill : bool or number, default 0
        The value of the last position: 0 (False for a bool mask) marks it as padding.

    Returns
    -------
    array
        Same shape, dtype, namespace and device as ``x``.

    Raises
    ------
    TypeError
        If ``x`` is not an array, ``axis`` not an int, or ``fill`` does not fit the dtype of
        ``x`` (a fraction for integers, a number other than 0 and 1 for bool).
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
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        msg = f"axis must be an int, got {type(axis).__name__}"
        raise TypeError(msg)
    if not -x.ndim <= axis < x.ndim:
        msg = f"axis {axis} is out of range for x of shape {tuple(x.shape)}"
        raise ValueError(msg)
    axis = operator.index(axis) % x.ndim
    value = _fill_value(fill, x.dtype, xp=xp)
    step = min(x.shape[axis], 1)  # 0 for an empty axis, which stays empty
    rest = [slice(None)] * x.ndim
    rest[axis] = slice(step, None)
    pad_shape = list(x.shape)
    pad_shape[axis] = step
    pad = xp.full(tuple(pad_shape), value, dtype=x.dtype, device=array_api_compat.device(x))
    return xp.concat([x[tuple(rest)], pad], axis=axis)


def draft_accuracy(logits: Array, target_probs: Array, position_mask: Array, /) -> Array:
    """Fraction of the valid positions where the draft's top token is the target's.

    ``sum(valid & (argmax(logits) == argmax(target_probs))) / sum(valid)`` with
    ``valid = position_mask != 0``: every valid position counts once, whatever its weight. The
    result is 0 when no position is valid. It stays on the device: nothing is read on the host.

    Parameters
    ----------
    logits : array, shape ``[..., V_draft]``
        Draft logits, floating.
    target_probs : array, shape ``[..., V_draft]``
        Target probabilities, floating, as :func:`prepare_targets` returns them.
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
    xp = validate_inputs(logits, target_probs, position_mask, "mean", None)
    hit = _top_index(logits, xp=xp) == _top_index(target_probs, xp=xp)
    valid = xp.reshape(position_mask, hit.shape)
    if valid.dtype != xp.bool:
        valid = valid != 0
    dtype = compute_dtype(logits, target_probs, xp=xp)
    device = array_api_compat.device(logits)
    index_dtype = _index_dtype(xp, device)
    hits = xp.astype(xp.sum(xp.astype(hit & valid, index_dtype)), dtype)
    count = xp.astype(xp.sum(xp.astype(valid, index_dtype)), dtype)
    return _constant(_zero_d(hits / xp.maximum(count, xp.ones_like(count)), xp=xp), xp=xp)


def multi_step_loss(
    step_losses: Sequence[Array] | Array,
    /,
    *,
    decay: float = 0.8,
    normalize: bool = True,
) -> Array:
    """Combine the losses of the test-time steps: ``sum_i decay**i * loss_i``.

    EAGLE-3 trains the draft on several test-time steps, step ``i`` predicting ``i`` tokens
    further ahead than step 0; later steps are harder and weigh less. With ``normalize=True``
    the sum is divided by ``sum_i decay**i``, so the result is a weighted mean that stays on the
    scale of one step's loss whatever the number of steps (as NeMo AutoModel does). With
    ``normalize=False`` it is the plain weighted sum (as SpecForge and the original EAGLE-3 code
    do): the same direction of descent, with a learning-rate scale of ``sum_i decay**i`` that
    grows with the number of steps.

    Parameters
    ----------
    step_losses : sequence of 0-d arrays, or a 1-D array
        ``loss_i`` for ``i = 0, 1, ...``, floating, at least one. Gradients flow to each.
    decay : float, default 0.8
        The weight ratio between consecutive steps, finite and non-negative.
    normalize : bool, default True
        Whether to divide by the sum of the weights.

    Returns
    -------
    array, shape ``()``
        In the dtype of the stacked losses, of their namespace and device.

    Raises
    ------
    TypeError
        If ``step_losses`` holds something other than floating arrays of one library, or
        ``decay`` or ``normalize`` has the wrong type.
    ValueError
        If ``step_losses`` is empty, its arrays are not 0-d (or it is not 1-D), they are on
        different devices, or ``decay`` is negative or not finite.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.eagle3 import multi_step_loss
    >>> losses = [np.asarray(2.0), np.asarray(3.0)]
    >>> float(multi_step_loss(losses, decay=0.5))  # (2 + 0.5 * 3) / 1.5
    2.3333333333333335
    >>> float(multi_step_loss(losses, decay=0.5, normalize=False))
    3.5
    """
    losses, xp = _stack_losses(step_losses)
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        msg = f"decay must be a real number, got {type(decay).__name__}"
        raise TypeError(msg)
    if not math.isfinite(decay) or decay < 0:
        msg = f"decay must be finite and non-negative, got {decay}"
        raise ValueError(msg)
    if not isinstance(normalize, bool):
        msg = f"normalize must be a bool, got {type(normalize).__name__}"
        raise TypeError(msg)
    weights = [float(decay) ** i for i in range(losses.shape[0])]
    device = array_api_compat.device(losses)
    total = xp.sum(xp.asarray(weights, dtype=losses.dtype, device=device) * losses)
    return _zero_d(total / math.fsum(weights) if normalize else total, xp=xp)


def _stack_losses(step_losses: Any) -> tuple[Array, Namespace]:
    """Return ``step_losses`` as one 1-D floating array, and its namespace."""
    if array_api_compat.is_array_api_obj(step_losses):
        xp = namespace_of(step_losses=step_losses)
        if step_losses.ndim != 1 or step_losses.shape[0] == 0:
            msg = (
                "step_losses must be a non-empty 1-D array or a sequence of 0-d arrays, got "
                f"an array of shape {tuple(step_losses.shape)}"
            )
            raise ValueError(msg)
        losses = step_losses
    else:
        if isinstance(step_losses, (str, bytes)) or not isinstance(step_losses, Sequence):
            msg = (
                "step_losses must be a sequence of 0-d arrays or a 1-D array, got "
                f"{type(step_losses).__name__}"
            )
            raise TypeError(msg)
        if len(step_losses) == 0:
            msg = "step_losses must hold at least one loss, got an empty sequence"
            raise ValueError(msg)
        named = {f"step_losses[{i}]": loss for i, loss in enumerate(step_losses)}
        xp = namespace_of(**named)
        check_same_device(**named)
        shapes = {name: tuple(loss.shape) for name, loss in named.items() if loss.ndim != 0}
        if shapes:
            msg = f"step_losses must hold 0-d arrays, got shapes {shapes}"
            raise ValueError(msg)
        losses = xp.stack(list(step_losses))
    if not xp.isdtype(losses.dtype, "real floating"):
        msg = f"step_losses must have a real floating dtype, got {losses.dtype}"
        raise TypeError(msg)
    return losses, xp


def _check_prepare_inputs(
    xp: Namespace, target_logits: Array, loss_mask: Array, t2d: Array
) -> None:
    """Check the dtypes and shapes of the arguments of :func:`prepare_targets`."""
    check_floating(xp, target_logits=target_logits)
    _check_mapping(xp, t2d)
    shape = tuple(target_logits.shape)
    if len(shape) == 0 or shape[-1] != t2d.shape[0]:
        msg = (
            "target_logits must have the target vocabulary as its last axis, of the length of "
            f"t2d; got target_logits {shape} and t2d {tuple(t2d.shape)}"
        )
        raise ValueError(msg)
    check_mask(xp, loss_mask=loss_mask, target_logits=target_logits)


def _check_mapping(xp: Namespace, t2d: Array) -> None:
    """Check that ``t2d`` is a 1-D bool array."""
    if t2d.dtype != xp.bool:
        msg = f"t2d must be a bool array (True for draft tokens), got dtype {t2d.dtype}"
        raise TypeError(msg)
    _check_1d(t2d, name="t2d", meaning="one entry per target token")


def _check_1d(x: Array, *, name: str, meaning: str) -> None:
    if x.ndim != 1:
        msg = f"{name} must be 1-D ({meaning}), got shape {tuple(x.shape)}"
        raise ValueError(msg)


def _check_integer(xp: Namespace, **arrays: Array) -> None:
    for name, x in arrays.items():
        if not xp.isdtype(x.dtype, "integral"):
            msg = f"{name} must have an integer dtype, got {x.dtype}"
            raise TypeError(msg)


def _check_signed(xp: Namespace, dtype: Any, *, name: str) -> None:
    if not xp.isdtype(dtype, "signed integer"):
        msg = f"{name} must be a signed integer dtype to hold the id -1, got {dtype}"
        raise TypeError(msg)


def _check_size(size: Any, limit: int, *, name: str) -> int:
    """Check that ``size`` is an int in ``[1, limit]`` and return it."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        msg = f"{name} must be an int, got {type(size).__name__}"
        raise TypeError(msg)
    value = operator.index(size)
    if not 1 <= value <= limit:
        msg = f"{name} must be between 1 and the target vocabulary size {limit}, got {value}"
        raise ValueError(msg)
    return value


def _forced_ids(always_include: Any, target_vocab_size: int, size: int) -> list[int]:
    """Return the distinct ids of ``always_include``, sorted, after checking them."""
    if always_include is None:
        return []
    if array_api_compat.is_array_api_obj(always_include):
        xp = array_api_compat.array_namespace(always_include)
        if not xp.isdtype(always_include.dtype, "integral") or always_include.ndim != 1:
            msg = (
                "always_include must be a 1-D integer array or a sequence of ints, got an "
                f"array of dtype {always_include.dtype} and shape {tuple(always_include.shape)}"
            )
            raise TypeError(msg)
        values = [int(i) for i in always_include]
    else:
        values = list(always_include)
        bad = [i for i in values if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
        if bad:
            msg = f"always_include must hold ints, got {bad[:5]}"
            raise TypeError(msg)
    ids = sorted({operator.index(i) for i in values})
    outside = [i for i in ids if not 0 <= i < target_vocab_size]
    if outside:
        msg = (
            f"always_include ids must lie in [0, {target_vocab_size}) for token_counts of "
            f"length {target_vocab_size}, got {outside[:5]}"
        )
        raise ValueError(msg)
    if len(ids) > size:
        msg = f"always_include holds {len(ids)} distinct ids, more than draft_vocab_size={size}"
        raise ValueError(msg)
    return ids


def _is_member(values: Array, sorted_set: Array, *, xp: Namespace) -> Array:
    """Return ``values[i] in sorted_set`` elementwise, for a non-empty ascending ``sorted_set``."""
    slots = xp.searchsorted(sorted_set, values)
    last = xp.full_like(slots, sorted_set.shape[0] - 1)
    slots = xp.minimum(slots, last)  # not clip: CuPy's clip in array-api-compat syncs the host
    return xp.take(sorted_set, slots) == values


def _draft_token_ids(t2d: Array, size: int, *, xp: Namespace) -> Array:
    """Return the ascending positions of the first ``size`` True entries of ``t2d``."""
    dtype = _index_dtype(xp, array_api_compat.device(t2d))
    running = xp.cumulative_sum(xp.astype(t2d, dtype))
    # The k-th True entry (from 1) is the first position where the running count reaches k.
    ranks = xp.arange(1, size + 1, dtype=dtype, device=array_api_compat.device(t2d))
    return xp.astype(xp.searchsorted(running, ranks), dtype)


def _count_draft_tokens(t2d: Array, *, xp: Namespace) -> int:
    """Read ``sum(t2d)`` on the host; refuse a traced JAX array with a clear message."""
    if array_api_compat.is_jax_namespace(xp):
        import jax

        if isinstance(t2d, jax.core.Tracer):
            msg = (
                "t2d is traced (inside jax.jit or another transformation), so the size of the "
                "draft vocabulary is unknown; pass draft_vocab_size=d2t.shape[0] (a Python int)"
            )
            raise TypeError(msg)
    count = int(xp.sum(xp.astype(t2d, _index_dtype(xp, array_api_compat.device(t2d)))))
    if count == 0:
        msg = f"t2d selects no token (all {t2d.shape[0]} entries are False)"
        raise ValueError(msg)
    return count


def _fill_value(fill: Any, dtype: Any, *, xp: Namespace) -> bool | int | float:
    """Convert ``fill`` to a Python scalar of the kind of ``dtype``, or raise TypeError."""
    if not isinstance(fill, numbers.Real):
        msg = f"fill must be a bool or a real number, got {type(fill).__name__}"
        raise TypeError(msg)
    if xp.isdtype(dtype, "bool"):
        if fill not in (0, 1):
            msg = f"fill must be 0, 1, False or True for x of dtype {dtype}, got {fill!r}"
            raise TypeError(msg)
        return bool(fill)
    if xp.isdtype(dtype, "integral"):
        if isinstance(fill, numbers.Integral):
            return int(fill)
        value = float(fill)
        if not value.is_integer():
            msg = f"fill must be a whole number for x of dtype {dtype}, got {fill!r}"
            raise TypeError(msg)
        return int(value)
    return float(fill)


def _index_dtype(xp: Namespace, device: Any) -> Any:
    """The default integer dtype for indexing in ``xp`` (int64; int32 on JAX without x64)."""
    return xp.__array_namespace_info__().default_dtypes(device=device)["indexing"]


def _top_index(x: Array, *, xp: Namespace) -> Array:
    """``argmax`` over the last axis: the first index of the maximum, NaN counting as maximal."""
    if not (array_api_compat.is_jax_namespace(xp) and _jax_runs_on_cpu()):
        return xp.argmax(x, axis=-1)
    # XLA's argmax on the CPU (a reduction over value-index pairs) is several times slower than
    # a max followed by a min over the positions of the maximum.
    top = xp.max(x, axis=-1, keepdims=True)
    is_top = xp.where(xp.isnan(top), xp.isnan(x), x == top)
    size = x.shape[-1]
    positions = xp.arange(size, dtype=_index_dtype(xp, None))
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
