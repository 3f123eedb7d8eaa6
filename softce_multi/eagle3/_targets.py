"""The draft model's targets from the target model's logits, and the shift that aligns them.

:func:`shift_left` aligns the target logits, the input ids and the loss mask with the draft's
predictions; :func:`prepare_targets` turns the aligned logits into the target probabilities
over the draft vocabulary and the position mask.
"""

from __future__ import annotations

from softce_multi import _compat
from softce_multi._core import compute_dtype
from softce_multi._types import Array, Namespace
from softce_multi._validate import (
    check_axis,
    check_fill,
    check_prepare_inputs,
    check_same_device,
    namespace_of,
)
from softce_multi.eagle3._arrays import constant, nan_where, top_index
from softce_multi.eagle3._t2d import checked_draft_size, draft_position_mask, draft_token_ids

__all__ = ["prepare_targets", "shift_left"]


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

    Notes
    -----
    Both outputs are constants: detached on PyTorch, behind ``jax.lax.stop_gradient`` on JAX.

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
    size, wrong_size = checked_draft_size(t2d, draft_vocab_size, xp=xp)

    logits = constant(target_logits, xp=xp)
    dtype = compute_dtype(logits, xp=xp)
    draft_logits = xp.astype(xp.take(logits, draft_token_ids(t2d, size, xp=xp), axis=-1), dtype)
    target_probs = _softmax(draft_logits, wrong_size, xp=xp)

    top = top_index(logits, xp=xp)
    return target_probs, draft_position_mask(loss_mask, top, t2d, xp=xp)


def _softmax(x: Array, wrong_size: Array, *, xp: Namespace) -> Array:
    """Return ``softmax(x)`` over the last axis, or NaN everywhere where ``wrong_size`` holds.

    Parameters
    ----------
    x : array, shape ``[..., V_draft]``
        Real floating logits.
    wrong_size : array, shape ``()``, bool
        Whether the draft vocabulary size disagrees with ``t2d``.
    xp : namespace
        The array namespace of both.

    Returns
    -------
    array
        Shape and dtype of ``x``.
    """
    shifted = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    return shifted / nan_where(wrong_size, xp.sum(shifted, axis=-1, keepdims=True), xp=xp)


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
    pad = xp.full(tuple(pad_shape), value, dtype=x.dtype, device=_compat.device(x))
    return xp.concat([x[tuple(rest)], pad], axis=axis)
