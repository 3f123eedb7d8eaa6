"""The draft vocabulary that ``t2d`` marks, as both target paths use it.

Its size, checked against the ``draft_vocab_size`` a caller gives (:func:`checked_draft_size`),
its target ids (:func:`draft_token_ids`), and the positions whose top token is one of them
(:func:`draft_position_mask`).
"""

from __future__ import annotations

import array_api_extra as xpx

from softce_multi import _compat
from softce_multi._types import Array, Namespace
from softce_multi._validate import check_size
from softce_multi.eagle3._arrays import constant

__all__ = ["checked_draft_size", "draft_position_mask", "draft_token_ids"]


def checked_draft_size(
    t2d: Array, draft_vocab_size: int | None, *, xp: Namespace
) -> tuple[int, Array]:
    """Return the draft vocabulary size and whether ``t2d`` disagrees with it.

    Without ``draft_vocab_size``, ``sum(t2d)`` is read on the host and is the size. With it,
    the count is compared with it on the host where reading it waits for no device and stops
    no trace (:func:`_is_readable_for_free`); elsewhere only on the device, where the returned
    array holds the answer.

    Parameters
    ----------
    t2d : array, shape ``[V_target]``, bool
        The draft-vocabulary mask.
    draft_vocab_size : int or None
        The size the caller gives, or None to read it.
    xp : namespace
        The array namespace of ``t2d``.

    Returns
    -------
    size : int
        ``draft_vocab_size``, or ``sum(t2d)`` without it.
    wrong_size : array, shape ``()``, bool
        True where ``sum(t2d)`` is not ``size``, on the device of ``t2d``.

    Raises
    ------
    TypeError
        If ``draft_vocab_size`` is neither None nor an int, or it is None and ``t2d`` is
        traced by JAX.
    ValueError
        If ``draft_vocab_size`` is out of ``[1, V_target]``, or is not ``sum(t2d)`` where that
        is read, or ``t2d`` selects no token where its count is read.
    """
    count_dtype = xpx.default_dtype(xp, "integral", device=_compat.device(t2d))
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


def draft_token_ids(t2d: Array, size: int, *, xp: Namespace) -> Array:
    """Return the ascending positions of the first ``size`` True entries of ``t2d``.

    Parameters
    ----------
    t2d : array, shape ``[V_target]``, bool
        The draft-vocabulary mask.
    size : int
        The number of positions to return, from 1 to ``V_target``.
    xp : namespace
        The array namespace of ``t2d``.

    Returns
    -------
    array, shape ``[size]``
        Of the default index dtype. Where ``t2d`` has fewer than ``size`` True entries, the
        missing positions are the last one, a valid index (the targets are then NaN, see
        :func:`checked_draft_size`).
    """
    device = _compat.device(t2d)
    dtype = xpx.default_dtype(xp, "indexing", device=device)
    running = _compat.cumulative_sum(xp.astype(t2d, dtype), xp=xp)
    # The k-th True entry (from 1) is the first position where the running count reaches k.
    ranks = xp.arange(1, size + 1, dtype=dtype, device=device)
    last = xp.full((), t2d.shape[0] - 1, dtype=dtype, device=device)
    return xp.minimum(xp.astype(xp.searchsorted(running, ranks), dtype), last)


def draft_position_mask(loss_mask: Array, top: Array, t2d: Array, *, xp: Namespace) -> Array:
    """Return ``loss_mask`` where the top token of a position is a draft token, 0 elsewhere.

    Parameters
    ----------
    loss_mask : array, shape ``[...]`` or ``[..., 1]``
        Bool, integer or floating.
    top : array, shape ``[...]``, integer
        The target id of each position's top token, in ``[0, V_target)``.
    t2d : array, shape ``[V_target]``, bool
        The draft-vocabulary mask.
    xp : namespace
        The array namespace of the three.

    Returns
    -------
    array, shape ``[..., 1]``
        Of the dtype of ``loss_mask``; a constant (cut from automatic differentiation).
    """
    in_draft = xp.reshape(xp.take(t2d, xp.reshape(top, (-1,))), top.shape)
    mask = xp.reshape(loss_mask, top.shape)
    if mask.dtype == xp.bool:
        position_mask = mask & in_draft
    elif xp.isdtype(mask.dtype, "integral"):
        # Exact, and torch (before 2.13) has no `where` for uint16, uint32 and uint64.
        position_mask = mask * xp.astype(in_draft, mask.dtype)
    else:
        position_mask = xp.where(in_draft, mask, xp.zeros_like(mask))
    return constant(position_mask[..., None], xp=xp)


def _read_count(t2d: Array, count: Array, *, xp: Namespace) -> int:
    """Read ``count = sum(t2d)`` on the host.

    Parameters
    ----------
    t2d : array, shape ``[V_target]``, bool
        The draft-vocabulary mask, for the messages.
    count : array, shape ``()``, integer
        ``sum(t2d)``.
    xp : namespace
        The array namespace of both.

    Returns
    -------
    int
        The count, at least 1.

    Raises
    ------
    TypeError
        If ``count`` is traced by JAX, with a message that names ``draft_vocab_size``.
    ValueError
        If the count is 0.
    """
    if _compat.is_jax_namespace(xp):
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
    """Return whether reading a value of ``x`` on the host waits for no device and breaks no trace.

    Parameters
    ----------
    x : array
        The array to read.
    xp : namespace
        The array namespace of ``x``.

    Returns
    -------
    bool
        True for NumPy and array-api-strict arrays, for plain PyTorch CPU tensors in eager mode
        (not under ``torch.compile``, not batched by ``torch.func.vmap``), and for concrete JAX
        arrays on the CPU; False on a GPU and for traced arrays.
    """
    host_only = _compat.is_numpy_namespace(xp)
    if host_only or _compat.is_array_api_strict_namespace(xp):
        return True
    if _compat.is_torch_namespace(xp):
        from softce_multi._adapters import torch_shared

        return torch_shared.readable_for_free(x)
    if _compat.is_jax_namespace(xp):
        import jax

        return not isinstance(x, jax.core.Tracer) and all(
            device.platform == "cpu" for device in x.devices()
        )
    return False
