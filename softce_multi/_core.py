"""Masked soft-target cross entropy and its gradients, written once against the array API.

Every function here takes the array namespace ``xp`` explicitly and creates its arrays on the
device of its inputs. The math is split in two reusable steps:

1. :func:`row_statistics` reduces a block of rows to four numbers per row (the row maximum, the
   sum of exponentials relative to it, the target mass and the target-weighted logits). The
   statistics of parts of a row's vocabulary combine into those of the row
   (:func:`merge_statistics` online, or :func:`merge_candidate`, :func:`common_shift` and
   :func:`shift_statistics` around an all-reduce across vocabulary shards).
2. :func:`row_losses`, :func:`logits_gradient_rows` and :func:`targets_gradient_rows` turn those
   statistics, and the same block, into per-row losses and gradient rows.

One driver serves every implementation. :func:`loss_pass` lays out the rows, their weights and the
denominator (:func:`as_rows`), hands them to the implementation's :class:`RowRoutine`, and reduces
the result (:func:`reduce_loss`) into a :class:`ForwardResult`; :func:`gradient_pass` does the same
for a :class:`GradientRoutine`. The generic routines (:mod:`softce_multi.kernels.blocked`) run
the two steps over blocks of rows, so that no ``[N, V]`` float32 intermediate outlives one block;
the torch CPU path and the Triton and Pallas kernels supply their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol, runtime_checkable

from softce_multi import _compat
from softce_multi._types import Array, LinearGradients, LinearLossInputs, LossInputs, Namespace

#: Elements per block on eager backends: large enough that few parallel regions are started
#: (each waits for its slowest thread), small enough that a block's few float32 temporaries
#: stay in a server CPU's last-level cache.
BLOCK_ELEMENTS = 1 << 20


class RowStatistics(NamedTuple):
    """Per-row reductions of a block of logits ``z`` and targets ``p``.

    All fields have shape ``[n]``. ``target_dot`` is taken relative to ``row_max`` so that the
    loss never subtracts two large numbers.
    """

    row_max: Array
    """``max_v z_v``, or 0 where that maximum is not finite."""
    sum_exp: Array
    """``sum_v exp(z_v - row_max)``."""
    target_sum: Array
    """``sum_v p_v``."""
    target_dot: Array
    """``sum_v p_v * (z_v - row_max)``, where a term with ``p_v == 0`` is exactly 0."""


class SavedRows(NamedTuple):
    """What a backward pass needs of the forward pass, per row: three ``[N]`` arrays."""

    row_max: Array
    """:attr:`RowStatistics.row_max`."""
    log_sum_exp: Array
    """``log(sum_exp)``; the log-normalizer is ``row_max + log_sum_exp``.

    The two are kept apart because ``exp((z - row_max) - log_sum_exp)`` is accurate where
    ``exp(z - logsumexp(z))`` with a rounded ``logsumexp`` is not (logits far from 0).
    """
    target_sum: Array
    """:attr:`RowStatistics.target_sum`."""


class ForwardResult(NamedTuple):
    """What one pass over the inputs produces."""

    loss: Array
    """The reduced loss, in the computation dtype."""
    logits_grad: Array | None
    """``d loss / d logits`` in the logits' dtype and shape, if it was asked for."""
    saved: SavedRows
    """Row statistics for a later backward pass."""
    row_scale: Array
    """``d loss / d c_row`` per row, shape ``[N]``: ``w / den`` (``w`` for ``"none"``)."""


def compute_dtype(*arrays: Array | None, xp: Namespace) -> Any:
    """The dtype the loss is computed in: float64 when any of ``arrays`` is float64, else float32.

    None entries (an absent bias) are skipped. Every module asks this function, so that the rule
    is written once.
    """
    if any(array is not None and array.dtype == xp.float64 for array in arrays):
        return xp.float64
    return xp.float32


def upstream_per_row(grad_output: Array, reduction: str, *, xp: Namespace) -> Array:
    """The upstream gradient of the loss as a factor of the row scale.

    ``[N]`` (the upstream of each position, flattened) for ``"none"``; the 0-d upstream of the
    reduced loss otherwise. A backward pass multiplies the saved ``row_scale`` by it.
    """
    return xp.reshape(grad_output, (-1,)) if reduction == "none" else grad_output


def upstream_row_scale(row_scale: Array, upstream: Array, *, xp: Namespace) -> Array:
    """``row_scale * upstream`` (the upstream of :func:`upstream_per_row`), exactly 0 where
    ``row_scale`` is: a padding row's gradient is 0 whatever its upstream gradient holds, NaN or
    inf included (as ``where`` patterns downstream of a per-position loss often leave there)."""
    return xp.where(row_scale == 0, 0.0, row_scale * upstream)


def row_statistics(z: Array, p: Array, *, xp: Namespace) -> RowStatistics:
    """Reduce a ``[n, V]`` block of logits and targets to its :class:`RowStatistics`."""
    row_max = xp.max(z, axis=-1, keepdims=True)
    # A row with no finite maximum (all -inf, or padding holding inf/NaN) is shifted by 0, so
    # that z - row_max does not turn every entry of the row into NaN.
    row_max = xp.where(xp.isfinite(row_max), row_max, 0.0)
    shifted = z - row_max
    sum_exp = xp.sum(xp.exp(shifted), axis=-1)
    target_sum = xp.sum(p, axis=-1)
    # 0 * -inf is NaN; a target of exactly 0 must contribute exactly 0.
    target_dot = xp.sum(xp.where(p == 0, 0.0, p * shifted), axis=-1)
    return RowStatistics(row_max[..., 0], sum_exp, target_sum, target_dot)


def row_losses(stats: RowStatistics, *, xp: Namespace) -> Array:
    """Return ``c = -sum_v p_v log_softmax(z)_v`` per row.

    A row whose targets are all 0 costs exactly 0, even when its logits are all -inf (where
    ``log(sum_exp)`` is -inf).
    """
    normalizer = xp.where(stats.target_sum == 0, 0.0, stats.target_sum * xp.log(stats.sum_exp))
    return normalizer - stats.target_dot


def merge_candidate(stats: RowStatistics, *, xp: Namespace) -> Array:
    """The row maximum of a part of the vocabulary, to max-reduce over the parts of a row.

    A part whose exponentials sum to 0 (all its logits -inf) offers -inf rather than its shift
    of 0, so that it cannot raise the common shift above the true maximum.
    """
    return xp.where(stats.sum_exp > 0, stats.row_max, -math.inf)


def common_shift(maximum: Array, *, xp: Namespace) -> Array:
    """The shift shared by the parts of a row, from the maximum of their :func:`merge_candidate`.

    0 where that maximum is not finite, the convention of :func:`row_statistics`.
    """
    return xp.where(xp.isfinite(maximum), maximum, 0.0)


def shift_statistics(stats: RowStatistics, shift: Array, *, xp: Namespace) -> RowStatistics:
    """Express the statistics of a part of the vocabulary relative to the common ``shift``.

    ``shift`` comes from :func:`common_shift` over every part of the row. Shifted this way, the
    statistics of the parts of a row add up, field by field (but ``row_max``, which becomes
    ``shift``), to those of the whole row: that is how vocabulary chunks (online) and
    vocabulary shards (all-reduce) combine.
    """
    moved = stats.row_max - shift
    # A part with no exponential mass stays at 0, whatever its (conventional) shift was.
    sum_exp = stats.sum_exp * xp.exp(xp.where(stats.sum_exp == 0, 0.0, moved))
    # sum p * (z - shift) = sum p * (z - row_max) + (row_max - shift) * sum p.
    target_dot = xp.where(
        stats.target_sum == 0, stats.target_dot, stats.target_dot + moved * stats.target_sum
    )
    return RowStatistics(shift, sum_exp, stats.target_sum, target_dot)


def merge_statistics(
    first: RowStatistics, second: RowStatistics, *, xp: Namespace
) -> RowStatistics:
    """The statistics of a row made of two parts of its vocabulary (an online update)."""
    maximum = xp.maximum(merge_candidate(first, xp=xp), merge_candidate(second, xp=xp))
    shift = common_shift(maximum, xp=xp)
    a, b = shift_statistics(first, shift, xp=xp), shift_statistics(second, shift, xp=xp)
    return RowStatistics(
        shift, a.sum_exp + b.sum_exp, a.target_sum + b.target_sum, a.target_dot + b.target_dot
    )


def log_softmax_rows(z: Array, row_max: Array, log_sum_exp: Array) -> Array:
    """Return ``log_softmax(z)`` of a ``[n, V]`` block from its row statistics."""
    return (z - row_max[:, None]) - log_sum_exp[:, None]


def logits_gradient_rows(
    z: Array,
    p: Array,
    row_max: Array,
    log_sum_exp: Array,
    target_sum: Array,
    row_scale: Array,
    *,
    xp: Namespace,
) -> Array:
    """Return ``row_scale * (sum(p) * softmax(z) - p)`` for a ``[n, V]`` block.

    Rows whose ``row_scale`` is 0 are exactly 0, whatever ``z`` and ``p`` hold there, and so
    are rows whose targets are all 0, even where their softmax is undefined (logits all -inf).

    The softmax is ``exp(z - row_max) * exp(-log_sum_exp)``, the second factor folded into
    the row's coefficient (:func:`softmax_coefficient`): ``z - row_max`` is exact, so each
    entry carries the rounding of one exponential, where ``exp((z - row_max) - log_sum_exp)``
    would carry that of a subtraction of size ``|log_softmax(z)|`` too.
    """
    coefficient = softmax_coefficient(row_scale, target_sum, log_sum_exp, xp=xp)[:, None]
    grad = coefficient * xp.exp(z - row_max[:, None]) - row_scale[:, None] * p
    return xp.where(rows_with_gradient(row_scale, target_sum)[:, None], grad, 0.0)


def softmax_coefficient(
    row_scale: Array, target_sum: Array, log_sum_exp: Array, *, xp: Namespace
) -> Array:
    """``row_scale * sum(p) / sum_exp`` per row: what multiplies ``exp(z - row_max)`` in the
    logits gradient (see :func:`logits_gradient_rows`); the Triton and Pallas kernels compute
    the same factor per row."""
    return row_scale * target_sum * xp.exp(-log_sum_exp)


def rows_with_gradient(row_scale: Array, target_sum: Array) -> Array:
    """Whether a row's logits gradient can be nonzero: a nonzero scale and some target mass."""
    return (row_scale != 0) & (target_sum != 0)


def targets_gradient_rows(
    z: Array, row_max: Array, log_sum_exp: Array, row_scale: Array, *, xp: Namespace
) -> Array:
    """Return ``-row_scale * log_softmax(z)`` for a ``[n, V]`` block; 0 where ``row_scale`` is."""
    scale = row_scale[:, None]
    return xp.where(scale != 0, -scale * log_softmax_rows(z, row_max, log_sum_exp), 0.0)


def row_blocks(n_rows: int, block_rows: int | None) -> Iterator[slice]:
    """Yield slices covering ``range(n_rows)`` in blocks of ``block_rows`` (all at once if None,
    ``n_rows`` a number or, under ``jax.export``, a symbolic size)."""
    if block_rows is None:
        if not (isinstance(n_rows, int) and n_rows == 0):
            yield slice(0, n_rows)
        return
    for start in range(0, n_rows, max(block_rows, 1)):
        yield slice(start, min(start + block_rows, n_rows))


def default_block_rows(vocab_size: int) -> int:
    """Rows per block on eager backends, for a vocabulary of ``vocab_size``."""
    return max(1, BLOCK_ELEMENTS // vocab_size)


def inverse_denominator(
    weights: Array, reduction: str, num_valid: Array | float | None, *, xp: Namespace
) -> Array:
    """Return ``1 / den`` for the reduction, as a 0-d array; 0 when ``num_valid`` is 0.

    ``weights`` are the per-row mask values, already in the computation dtype.
    """
    dtype = weights.dtype
    device = _device(weights)
    if reduction != "mean":
        return xp.ones((), dtype=dtype, device=device)
    if num_valid is None:
        total = xp.sum(weights)
        # maximum, not clip: array-api-compat's CuPy clip indexes with a mask (a host sync).
        return 1.0 / xp.maximum(total, xp.ones_like(total))
    if isinstance(num_valid, (int, float)):  # filled on the device: no copy from the host
        count = xp.full((), float(num_valid), dtype=dtype, device=device)
    else:
        count = xp.asarray(num_valid, dtype=dtype, device=device)
    safe = xp.where(count == 0, 1.0, count)
    return xp.where(count == 0, 0.0, 1.0 / safe)


class WeightedRows:
    """The base of the rows records (:class:`Rows`, :class:`softce_multi._linear.LinearRows`):
    what every record of rows derives from its ``weights`` and ``inv_den`` fields."""

    __slots__ = ()

    weights: Array
    """The mask as ``[N]`` weights, in the computation dtype."""
    inv_den: Array
    """``1 / den`` as a 0-d array (see :func:`inverse_denominator`)."""

    @property
    def dtype(self) -> Any:
        """The computation dtype (see :func:`compute_dtype`), that of the weights."""
        return self.weights.dtype


def row_scale(rows: WeightedRows) -> Array:
    """``d loss / d c_row`` of each row for a unit upstream gradient: ``w / den``.

    A function rather than a property of the rows: Dynamo before torch 2.11 cannot trace a
    property of a ``NamedTuple`` subclass.
    """
    return rows.weights * rows.inv_den


class _RowsFields(NamedTuple):
    z: Array
    """The logits as ``[N, V]``, in their own dtype."""
    p: Array
    """The targets as ``[N, V]`` (``[N, K]`` with :attr:`ids`), in their own dtype."""
    weights: Array
    """The mask as ``[N]`` weights, in the computation dtype."""
    inv_den: Array
    """``1 / den`` as a 0-d array (see :func:`inverse_denominator`)."""
    ids: Array | None = None
    """The ids of sparse targets as ``[N, K]`` integers: ``p[n, k]`` is the target of the entry
    ``ids[n, k]`` of row ``n``. None for dense targets."""


class Rows(_RowsFields, WeightedRows):
    """The inputs as rows, with what every implementation derives from them before the pass:
    ``Rows(z, p, weights, inv_den)``, and ``ids`` for sparse targets."""

    __slots__ = ()


def as_rows(
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    *,
    reduction: str,
    num_valid: Array | float | None,
    xp: Namespace,
    target_ids: Array | None = None,
) -> Rows:
    """Reshape validated inputs to rows and compute their weights and denominator."""
    dtype = compute_dtype(logits, target_probs, xp=xp)
    n_rows = math.prod(logits.shape[:-1])
    weights = xp.astype(xp.reshape(position_mask, (n_rows,)), dtype)
    return Rows(
        _as_rows(logits, xp=xp),
        _as_rows(target_probs, xp=xp),
        weights,
        inverse_denominator(weights, reduction, num_valid, xp=xp),
        None if target_ids is None else _as_rows(target_ids, xp=xp),
    )


def reduce_loss(
    weighted: Array,
    inv_den: Array,
    *,
    reduction: str,
    batch_shape: tuple[int, ...],
    xp: Namespace,
) -> Array:
    """Reduce the weighted per-row losses ``w * c`` (``[N]``) to the loss, with the inverse
    denominator ``inv_den`` of :func:`inverse_denominator` for ``"mean"``."""
    if reduction == "none":
        return xp.reshape(weighted, batch_shape)
    total = xp.asarray(xp.sum(weighted))  # NumPy reductions return scalars
    if reduction == "sum":
        return total
    return xp.where(inv_den == 0, 0.0, total * inv_den)


class RowResults(NamedTuple):
    """What a :class:`RowRoutine` computes for every row at once."""

    weighted: Array
    """``w * c`` per row, shape ``[N]``, in the computation dtype; 0 where ``w`` is 0."""
    saved: SavedRows
    """The row statistics a backward pass needs (0 in rows of weight 0)."""
    logits_grad: Array | None
    """``row_scale * (sum(p) * softmax(z) - p)``, ``[N, V]`` in the logits' dtype, if asked for."""


class RowRoutine(Protocol):
    """The per-row work of one implementation (generic core, torch CPU path, Triton, Pallas).

    It receives the inputs as :class:`Rows`, with ``N > 0``, and returns their
    :class:`RowResults`: the statistics of every row of nonzero weight, its weighted loss and,
    with ``with_logits_grad``, its gradient row (exactly 0 in rows of weight 0, whatever they
    hold). :func:`loss_pass` does everything before and after it.
    """

    def __call__(self, rows: Rows, /, *, with_logits_grad: bool) -> RowResults: ...


class BackwardRows(NamedTuple):
    """What a :class:`GradientRoutine` receives: the rows and what :func:`loss_pass` saved."""

    z: Array
    """The logits as ``[N, V]``, ``N > 0``, in their own dtype."""
    p: Array
    """The targets as ``[N, V]``, in their own dtype."""
    saved: SavedRows
    """The row statistics of the forward pass."""
    row_scale: Array
    """``[N]`` ``d loss / d c_row``, already multiplied by the upstream gradient."""
    ids: Array | None = None
    """The ids of sparse targets, ``[N, K]``, as in :class:`Rows`; None for dense targets."""


class GradientRoutine(Protocol):
    """The per-row work of a backward pass, from the row statistics of the forward pass.

    It receives :class:`BackwardRows` and returns ``row_scale * (sum(p) * softmax(z) - p)`` in
    the logits' dtype and/or ``-row_scale * log_softmax(z)`` in the targets' dtype; None for a
    gradient not asked for. Rows whose scale is 0 get exactly 0.
    """

    def __call__(
        self, rows: BackwardRows, /, *, logits_grad: bool, targets_grad: bool
    ) -> tuple[Array | None, Array | None]: ...


@runtime_checkable
class Adapter(Protocol):
    """What every engine adapter module provides: the four losses of validated inputs.

    :mod:`softce_multi._api` validates the arguments of a public function into a record and
    hands it to the adapter of the arrays' namespace (the modules of
    :mod:`softce_multi._adapters`). The adapter returns the loss (differentiable in its
    framework where it has autodiff) or the loss with its gradients, in the inputs' library and
    on their device.
    """

    def loss(self, inputs: LossInputs, /) -> Array: ...

    def loss_with_grad(self, inputs: LossInputs, /) -> tuple[Array, Array]: ...

    def linear_loss(self, inputs: LinearLossInputs, /) -> Array: ...

    def linear_loss_with_grad(
        self, inputs: LinearLossInputs, /
    ) -> tuple[Array, LinearGradients]: ...


def loss_pass(
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    *,
    reduction: str,
    num_valid: Array | float | None,
    with_logits_grad: bool,
    row_routine: RowRoutine,
    xp: Namespace,
    target_ids: Array | None = None,
) -> ForwardResult:
    """Compute the loss, and optionally ``d loss / d logits``, with one implementation's rows.

    The driver of every implementation: it lays out the rows, their weights and the
    denominator (:func:`as_rows`), lets ``row_routine`` do the per-row work, and reduces the
    weighted row losses (:func:`reduce_loss`). An empty batch never reaches the routine.

    Parameters
    ----------
    logits, target_probs, position_mask
        Validated inputs: ``[..., V]``, ``[..., V]`` and ``[...]`` or ``[..., 1]``.
    reduction
        ``"mean"``, ``"sum"`` or ``"none"``.
    num_valid
        Replacement denominator of ``"mean"``, or None.
    with_logits_grad
        Whether to compute the logits gradient (scaled for a unit upstream gradient).
    row_routine
        The implementation's per-row work, for example
        :func:`softce_multi.kernels.blocked.blocked_row_routine`.
    xp
        The array namespace of the inputs.
    target_ids
        The ids of sparse targets (``target_probs`` and ``target_ids`` are then ``[..., K]``),
        for a ``row_routine`` that takes them; None for dense targets.
    """
    rows = as_rows(
        logits,
        target_probs,
        position_mask,
        reduction=reduction,
        num_valid=num_valid,
        xp=xp,
        target_ids=target_ids,
    )
    if rows.z.shape[0] == 0:
        results = _empty_row_results(rows, with_logits_grad=with_logits_grad, xp=xp)
    else:
        results = row_routine(rows, with_logits_grad=with_logits_grad)
    loss = reduce_loss(
        results.weighted,
        rows.inv_den,
        reduction=reduction,
        batch_shape=logits.shape[:-1],
        xp=xp,
    )
    logits_grad = None
    if with_logits_grad:
        logits_grad = xp.reshape(results.logits_grad, logits.shape)
    return ForwardResult(loss, logits_grad, results.saved, row_scale(rows))


def gradient_pass(
    logits: Array,
    target_probs: Array,
    saved: SavedRows,
    row_scale: Array,
    *,
    logits_grad: bool,
    targets_grad: bool,
    gradient_routine: GradientRoutine,
    xp: Namespace,
    target_ids: Array | None = None,
) -> tuple[Array | None, Array | None]:
    """Return the gradients asked for, from the row statistics ``saved`` by :func:`loss_pass`.

    ``row_scale`` is ``d loss / d c_row``: the forward's, times the upstream gradient. The
    gradient to the logits has their dtype and shape, that to the targets theirs. None stands for
    a gradient not asked for. With ``target_ids`` (sparse targets), ``gradient_routine`` must
    take them.
    """
    if not (logits_grad or targets_grad):
        return None, None
    z, p = _as_rows(logits, xp=xp), _as_rows(target_probs, xp=xp)
    ids = None if target_ids is None else _as_rows(target_ids, xp=xp)
    if z.shape[0] == 0:
        grads: tuple[Array | None, Array | None] = (
            xp.empty(z.shape, dtype=z.dtype, device=_device(z)) if logits_grad else None,
            xp.empty(p.shape, dtype=p.dtype, device=_device(p)) if targets_grad else None,
        )
    else:
        grads = gradient_routine(
            BackwardRows(z, p, saved, row_scale, ids),
            logits_grad=logits_grad,
            targets_grad=targets_grad,
        )
    grad_z, grad_p = grads
    return (
        None if grad_z is None else xp.reshape(grad_z, logits.shape),
        None if grad_p is None else xp.reshape(grad_p, target_probs.shape),
    )


def _empty_row_results(rows: Rows, *, with_logits_grad: bool, xp: Namespace) -> RowResults:
    """The :class:`RowResults` of zero rows: four distinct empty arrays, since ``torch.compile``
    cannot save outputs of an autograd function that are one tensor."""
    device = _device(rows.z)
    losses, *saved = (xp.zeros((0,), dtype=rows.dtype, device=device) for _ in range(4))
    grad = xp.empty(rows.z.shape, dtype=rows.z.dtype, device=device) if with_logits_grad else None
    return RowResults(losses, SavedRows(*saved), grad)


def _as_rows(x: Array, *, xp: Namespace) -> Array:
    return xp.reshape(x, (math.prod(x.shape[:-1]), x.shape[-1]))


def _device(x: Array) -> Any:
    # None under a JAX trace, where arrays carry no concrete device.
    return _compat.device(x)
