"""The loss beyond one device: global normalisation, and a vocabulary-parallel loss.

Two functions, for the two engines users train with: ``torch.distributed`` (torch tensors,
a process ``group``) and JAX's sharding (JAX arrays inside ``jax.shard_map`` or ``jax.pmap``,
an ``axis_name``). Neither brings a communication layer of its own: they call the engine's
collectives, on ``[N]``-sized vectors only.

:func:`global_num_valid`
    The count of valid positions over every rank, to pass as ``num_valid`` when each rank holds
    part of the positions (data parallelism, sequence parallelism). Each rank's loss is then its
    share of the global mean, and the sum of the ranks' gradients is the gradient of the global
    mean, however unevenly the padding is spread.
:func:`vocab_parallel_masked_soft_cross_entropy`
    The loss when each rank holds a contiguous slice of the vocabulary (a tensor-parallel
    ``lm_head``). Each rank reduces its slice to the core's row statistics
    (:func:`softce_multi._core.row_statistics`: the maximum, the sum of exponentials, ``sum p``
    and ``sum p * (z - max)``); the ranks max-reduce the maxima, move their statistics to the
    common shift (:func:`softce_multi._core.shift_statistics`) and sum-reduce them. Every rank
    then holds the statistics of the whole vocabulary, hence the loss, and its gradients to its
    own slice come from them through the backward routine of its adapter (the torch operator or
    Triton kernel, the core or the Pallas kernel on JAX), with no further communication.

torch and JAX are imported only for arrays of their own, so importing this module needs
neither. The recipes (DDP, FSDP, gradient accumulation, sequence and tensor parallelism,
``jax.jit`` over a mesh) are in ``docs/distributed.rst``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import array_api_compat

from softce_multi import _core
from softce_multi._types import REDUCTIONS, Array, Namespace, Reduction
from softce_multi._validate import check_reduction, is_array, namespace_of, validate_inputs

__all__ = ["global_num_valid", "vocab_parallel_masked_soft_cross_entropy"]

#: Leading dimensions of the inputs that the shape agreement of torch compares one by one
#: (beyond them, their number and product are compared).
_AGREED_DIMS = 8


def global_num_valid(position_mask: Array, /, *, group: Any = None, axis_name: Any = None) -> Array:
    """The sum of the mask weights over every rank: the global count of valid positions.

    Pass it as ``num_valid`` when each rank holds part of the positions (data or sequence
    parallelism, or a micro-batch of gradient accumulation after a sum over the micro-batches).
    Each rank's ``"mean"`` is then its share of the global mean: the ranks' losses add up to it,
    and so do their gradients, whatever padding each rank holds.

    Parameters
    ----------
    position_mask : torch.Tensor or jax.Array
        This rank's mask, any shape, bool, integer or real floating.
    group : torch.distributed.ProcessGroup, optional
        For torch tensors: the ranks to sum over; None is the default process group.
    axis_name : hashable or tuple of hashables
        For JAX arrays, required: the mesh axis (or axes) of ``jax.shard_map`` or ``jax.pmap``
        to sum over.

    Returns
    -------
    torch.Tensor or jax.Array, shape ``()``
        On the device of the mask: the default integer dtype for bool and integer masks,
        float32 for floating ones (float64 for a float64 mask). On torch it comes from one
        ``all_reduce`` of a 0-d tensor and is never read on the host; on JAX from one ``psum``.

    Raises
    ------
    TypeError
        If the mask is neither a torch tensor nor a JAX array, or is not bool, integer or
        floating; if ``axis_name`` is given with torch or ``group`` with JAX; if ``axis_name``
        is missing with JAX.

    Examples
    --------
    In every process of a torch group (here a group of one):

    >>> import os, torch, torch.distributed as dist
    >>> os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    >>> dist.init_process_group("gloo", rank=0, world_size=1)
    >>> mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    >>> global_num_valid(mask)
    tensor(3)
    >>> dist.destroy_process_group()
    """
    library, xp = _library(position_mask=position_mask)
    if not xp.isdtype(position_mask.dtype, ("bool", "integral", "real floating")):
        msg = f"position_mask must be bool, integer or real floating, got {position_mask.dtype}"
        raise TypeError(msg)
    _check_communicator(library, group=group, axis_name=axis_name)
    total = _mask_total(position_mask, xp=xp)
    if library == "torch":
        import torch.distributed as dist

        total = total.detach()
        dist.all_reduce(total, group=_torch_group(group))
        return total
    import jax

    return jax.lax.psum(total, axis_name)


def vocab_parallel_masked_soft_cross_entropy(
    logits_shard: Array,
    target_probs_shard: Array,
    position_mask: Array,
    /,
    *,
    group: Any = None,
    axis_name: Any = None,
    reduction: Reduction = "mean",
    num_valid: Array | float | None = None,
    check_shapes: bool = True,
) -> Array:
    """Masked soft-target cross entropy over a vocabulary split across ranks.

    Rank ``r`` of the group (or index ``r`` along ``axis_name``) holds the ``r``-th contiguous
    slice of the vocabulary of the logits and targets; the slices may have different sizes
    (on torch). Every rank gets the loss of
    :func:`softce_multi.masked_soft_cross_entropy` on the concatenated vocabulary, and its
    gradients to its own slices of the logits and targets are the matching slices of that
    loss's gradients. Only ``[N]``-sized vectors cross the network: one max-reduction and one
    sum-reduction of ``[3, N]`` in the forward pass, nothing in the backward pass.

    Parameters
    ----------
    logits_shard : torch.Tensor or jax.Array, shape ``[..., V_r]``
        This rank's slice of the logits.
    target_probs_shard : torch.Tensor or jax.Array, shape ``[..., V_r]``
        This rank's slice of the targets (together they need not sum to 1).
    position_mask : torch.Tensor or jax.Array, shape ``[...]`` or ``[..., 1]``
        The weights of the positions, the same on every rank. Padding (weight 0) may hold
        anything in the logits and targets, NaN included: it never reaches the collectives.
    group : torch.distributed.ProcessGroup, optional
        For torch tensors: the ranks that share the vocabulary, in the order of their slices;
        None is the default process group. Autograd differentiates the result.
    axis_name : hashable or tuple of hashables
        For JAX arrays, required: the mesh axis the vocabulary is sharded over, inside
        ``jax.shard_map`` (or ``jax.pmap``). The function has a ``jax.custom_vjp``.
    reduction : {"mean", "sum", "none"}, default "mean"
        As in :func:`softce_multi.masked_soft_cross_entropy`. ``"mean"`` divides by the sum
        of this rank's mask, which is every rank's.
    num_valid : number or 0-d array, optional
        Replaces the denominator of ``"mean"``, for example :func:`global_num_valid` over the
        data-parallel group when the positions are split too.
    check_shapes : bool, default True
        On torch, agree on the inputs before computing: one ``all_gather`` of 15 int64 per rank
        and one host synchronisation per call, so that inputs that disagree across ranks (the
        positions' shape, the mask's shape, the computation dtype, the reduction, whether
        ``num_valid`` is given) or that a rank refuses raise ValueError on every rank instead
        of hanging or giving a wrong answer. False skips it; the collectives then assume that
        every rank holds ``N`` positions. JAX needs no check: ``shard_map`` gives every device
        blocks of one shape.

    Returns
    -------
    torch.Tensor or jax.Array
        The loss, the same on every rank: shape ``()``, or ``logits_shard.shape[:-1]`` for
        ``"none"``; float32, or float64 when an input is float64.

    Raises
    ------
    TypeError
        For arguments of the wrong type, ``group`` given with JAX arrays, ``axis_name`` with
        torch tensors, or no ``axis_name`` with JAX arrays.
    ValueError
        For inputs :func:`softce_multi.masked_soft_cross_entropy` refuses, and, with
        ``check_shapes``, for inputs that disagree across the ranks (on every rank).

    Examples
    --------
    In every process of a torch group (here a group of one, which holds the whole vocabulary):

    >>> import os, torch, torch.distributed as dist
    >>> import softce_multi as sc
    >>> os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29532")
    >>> dist.init_process_group("gloo", rank=0, world_size=1)
    >>> logits = torch.randn(2, 5, 11, requires_grad=True)
    >>> target = torch.softmax(torch.randn(2, 5, 11), dim=-1)
    >>> mask = torch.rand(2, 5) < 0.8
    >>> loss = vocab_parallel_masked_soft_cross_entropy(logits, target, mask)
    >>> bool(torch.isclose(loss, sc.masked_soft_cross_entropy(logits, target, mask)))
    True
    >>> loss.backward()
    >>> dist.destroy_process_group()
    """
    library, _ = _library(
        logits_shard=logits_shard,
        target_probs_shard=target_probs_shard,
        position_mask=position_mask,
    )
    _check_communicator(library, group=group, axis_name=axis_name)
    if not isinstance(check_shapes, bool):
        msg = f"check_shapes must be a bool, got {type(check_shapes).__name__}"
        raise TypeError(msg)
    check_reduction(reduction, with_grad=False)
    arguments = (logits_shard, target_probs_shard, position_mask)
    if library == "torch":
        torch_group = _torch_group(group)
        if check_shapes:
            _agree_on_inputs(*arguments, reduction, num_valid, group=torch_group)
        else:
            validate_inputs(*arguments, reduction, num_valid)
        function = _torch_vocab_parallel_function()
        return function.apply(*arguments, reduction, num_valid, torch_group)
    validate_inputs(*arguments, reduction, num_valid)
    return _jax_vocab_parallel_loss(*arguments, reduction, num_valid, axis_name)


# --------------------------------------------------------------------------------------------
# Which library, which communicator
# --------------------------------------------------------------------------------------------


def _library(**arrays: Array) -> tuple[str, Namespace]:
    """``("torch" or "jax", namespace)`` of the arrays (by argument name), or TypeError."""
    xp = namespace_of(**arrays)
    if array_api_compat.is_torch_namespace(xp):
        return "torch", xp
    if array_api_compat.is_jax_namespace(xp):
        return "jax", xp
    names = ", ".join(arrays)
    msg = (
        f"{names} must be torch tensors (with torch.distributed) or JAX arrays (inside "
        f"jax.shard_map or jax.pmap), got arrays of {xp.__name__}"
    )
    raise TypeError(msg)


def _check_communicator(library: str, *, group: Any, axis_name: Any) -> None:
    """Refuse a communicator of the other library, or JAX arrays without an axis name."""
    if library == "torch" and axis_name is not None:
        msg = (
            f"axis_name={axis_name!r} is for JAX arrays inside jax.shard_map or jax.pmap; torch "
            "tensors are reduced over a torch.distributed process group: pass group= (None is "
            "the default group)"
        )
        raise TypeError(msg)
    if library == "jax" and group is not None:
        msg = (
            f"group (a {type(group).__name__}) is a torch.distributed process group, for torch "
            "tensors; JAX arrays are reduced over a mesh axis: pass axis_name= inside "
            "jax.shard_map or jax.pmap"
        )
        raise TypeError(msg)
    if library == "jax" and axis_name is None:
        msg = (
            "axis_name is required for JAX arrays: the mesh axis (or tuple of axes) of "
            "jax.shard_map or jax.pmap to reduce over"
        )
        raise TypeError(msg)


def _torch_group(group: Any) -> Any:
    """The process group to use: ``group``, or the default one, which must exist."""
    import torch.distributed as dist

    if group is not None:
        if not isinstance(group, dist.ProcessGroup):
            msg = f"group must be a torch.distributed.ProcessGroup or None, got {type(group)}"
            raise TypeError(msg)
        return group
    if not (dist.is_available() and dist.is_initialized()):
        msg = (
            "group=None means the default process group, which is not initialized: call "
            "torch.distributed.init_process_group first, or pass group="
        )
        raise ValueError(msg)
    return dist.group.WORLD


def _mask_total(position_mask: Array, *, xp: Namespace) -> Array:
    """The sum of a mask, exactly for bool and integer masks, in float32 or wider otherwise."""
    if not xp.isdtype(position_mask.dtype, "real floating"):
        return xp.sum(position_mask)
    dtype = xp.float64 if position_mask.dtype == xp.float64 else xp.float32
    return xp.sum(position_mask, dtype=dtype)


# --------------------------------------------------------------------------------------------
# The vocabulary-parallel forward pass, shared by torch and JAX
# --------------------------------------------------------------------------------------------


def _vocab_parallel_forward(
    logits_shard: Array,
    target_probs_shard: Array,
    position_mask: Array,
    *,
    reduction: str,
    num_valid: Array | float | None,
    max_over_shards: Callable[[Array], Array],
    sum_over_shards: Callable[[Array], Array],
    block_rows: int | None,
    xp: Namespace,
) -> _core.ForwardResult:
    """The loss over every shard, and what the local backward pass needs.

    ``max_over_shards`` and ``sum_over_shards`` all-reduce an array over the ranks that share
    the vocabulary; ``block_rows`` is the row block of the local statistics (None: all rows).
    Rows of weight 0 enter the collectives as the statistics of nothing, whatever they hold.
    """
    rows = _core.as_rows(
        logits_shard,
        target_probs_shard,
        position_mask,
        reduction=reduction,
        num_valid=num_valid,
        xp=xp,
    )
    valid = rows.weights != 0
    local = _local_statistics(rows, block_rows, xp=xp)
    # Padding enters the collectives as the statistics of a row with nothing in it: its NaN
    # and inf stay out of every reduction (and out of NaN checks such as TORCH_NCCL_NAN_CHECK).
    empty = (0.0, 1.0, 0.0, 0.0)
    local = _core.RowStatistics(
        *(xp.where(valid, field, value) for field, value in zip(local, empty, strict=True))
    )
    shift = _core.common_shift(max_over_shards(_core.merge_candidate(local, xp=xp)), xp=xp)
    shifted = _core.shift_statistics(local, shift, xp=xp)
    sums = sum_over_shards(xp.stack([shifted.sum_exp, shifted.target_sum, shifted.target_dot]))
    total = _core.RowStatistics(shift, sums[0, ...], sums[1, ...], sums[2, ...])
    weighted = xp.where(valid, rows.weights * _core.row_losses(total, xp=xp), 0.0)
    loss = _core.reduce_loss(
        weighted, rows, reduction=reduction, batch_shape=logits_shard.shape[:-1], xp=xp
    )
    saved = _core.SavedRows(
        xp.where(valid, total.row_max, 0.0),
        xp.where(valid, xp.log(total.sum_exp), 0.0),
        xp.where(valid, total.target_sum, 0.0),
    )
    return _core.ForwardResult(loss, None, saved, rows.row_scale)


def _local_statistics(
    rows: _core.Rows, block_rows: int | None, *, xp: Namespace
) -> _core.RowStatistics:
    """:func:`softce_multi._core.row_statistics` of every row, a block of rows at a time."""
    blocks = [
        _core.row_statistics(
            xp.astype(rows.z[block, ...], rows.dtype, copy=False),
            xp.astype(rows.p[block, ...], rows.dtype, copy=False),
            xp=xp,
        )
        # No rows still make one (empty) block, for the shapes of the statistics.
        for block in list(_core.row_blocks(rows.z.shape[0], block_rows)) or [slice(0, 0)]
    ]
    if len(blocks) == 1:
        return blocks[0]
    return _core.RowStatistics(*(xp.concat(field, axis=0) for field in zip(*blocks, strict=True)))


# --------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------


@functools.cache
def _torch_vocab_parallel_function() -> Any:
    """The autograd function of the torch vocabulary-parallel loss (made once, on first use)."""
    import torch
    import torch.distributed as dist
    from torch.autograd.function import once_differentiable

    from softce_multi import torch as torch_adapter

    def all_reduce(op: Any, group: Any) -> Callable[[Any], Any]:
        def reduce(tensor: Any) -> Any:
            tensor = tensor.contiguous()
            dist.all_reduce(tensor, op=op, group=group)
            return tensor

        return reduce

    class VocabParallelFunction(torch.autograd.Function):
        """Forward: the loss from all-reduced statistics. Backward: local, no communication."""

        @staticmethod
        def forward(
            ctx: Any,
            logits_shard: torch.Tensor,
            target_probs_shard: torch.Tensor,
            position_mask: torch.Tensor,
            reduction: str,
            num_valid: Any,
            group: Any,
        ) -> torch.Tensor:
            result = _vocab_parallel_forward(
                logits_shard,
                target_probs_shard,
                position_mask,
                reduction=reduction,
                num_valid=num_valid,
                max_over_shards=all_reduce(dist.ReduceOp.MAX, group),
                sum_over_shards=all_reduce(dist.ReduceOp.SUM, group),
                block_rows=_core.default_block_rows(logits_shard.shape[-1]),
                xp=array_api_compat.array_namespace(logits_shard),
            )
            ctx.reduction = reduction
            ctx.save_for_backward(logits_shard, target_probs_shard, result.row_scale, *result.saved)
            return result.loss

        @staticmethod
        @once_differentiable
        def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
            logits_shard, target_probs_shard, row_scale, *saved = ctx.saved_tensors
            upstream = grad_loss.reshape(-1) if ctx.reduction == "none" else grad_loss
            grad_logits, grad_targets = _core.backward(
                logits_shard,
                target_probs_shard,
                _core.SavedRows(*saved),
                row_scale * upstream,
                logits_grad=ctx.needs_input_grad[0],
                targets_grad=ctx.needs_input_grad[1],
                gradient_routine=torch_adapter.gradient_routine,
                xp=array_api_compat.array_namespace(logits_shard),
            )
            return grad_logits, grad_targets, None, None, None, None

    return VocabParallelFunction


def _agree_on_inputs(
    logits_shard: Any,
    target_probs_shard: Any,
    position_mask: Any,
    reduction: str,
    num_valid: Any,
    *,
    group: Any,
) -> None:
    """Validate the inputs on every rank and check that the ranks agree on them.

    One ``all_gather`` of a fixed-size int64 description per rank, read on the host. Every rank
    raises: the rank whose inputs are invalid its own error, the others a ValueError naming it;
    if the descriptions differ, the same ValueError on every rank, showing each rank's values.
    """
    import torch
    import torch.distributed as dist

    try:
        validate_inputs(logits_shard, target_probs_shard, position_mask, reduction, num_valid)
        local_error = None
    except (TypeError, ValueError) as error:
        local_error = error
    description = _describe(
        logits_shard, target_probs_shard, position_mask, reduction, num_valid, local_error
    )
    local = torch.tensor(description, dtype=torch.int64, device=logits_shard.device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    descriptions = [tuple(row) for row in torch.stack(gathered).tolist()]
    if local_error is not None:
        raise local_error
    refused = [rank for rank, row in enumerate(descriptions) if row[0] == 0]
    if refused:
        msg = (
            f"rank(s) {refused} of the group refused their inputs (the error is raised there), "
            "so no rank computes the vocabulary-parallel loss"
        )
        raise ValueError(msg)
    if len(set(descriptions)) > 1:
        raise ValueError(_disagreement_message(descriptions))


def _describe(
    logits_shard: Any,
    target_probs_shard: Any,
    position_mask: Any,
    reduction: str,
    num_valid: Any,
    error: Exception | None,
) -> list[int]:
    """What the ranks must agree on, as ints: see :data:`_DESCRIPTION_FIELDS`."""
    if error is not None:
        return [0] * (len(_DESCRIPTION_FIELDS) + _AGREED_DIMS)
    positions = tuple(logits_shard.shape[:-1])
    dims = [*positions[:_AGREED_DIMS], *[-1] * (_AGREED_DIMS - len(positions))]
    dtype = _core.compute_dtype(
        logits_shard, target_probs_shard, xp=array_api_compat.array_namespace(logits_shard)
    )
    num_valid_kind = 0 if num_valid is None else 2 if is_array(num_valid) else 1
    return [
        1,
        len(positions),
        math.prod(positions),
        position_mask.ndim - len(positions),
        dtype.itemsize * 8,
        REDUCTIONS.index(reduction),
        num_valid_kind,
        *dims,
    ]


#: The fields of :func:`_describe` after the validity flag, with how to show them; the
#: leading dimensions follow.
_DESCRIPTION_FIELDS: tuple[tuple[str, Callable[[int], str]], ...] = (
    ("valid", str),
    ("number of position axes (logits_shard.ndim - 1)", str),
    ("number of positions", str),
    ("position_mask trailing axis of size 1", lambda extra: "yes" if extra else "no"),
    ("computation dtype", lambda bits: f"float{bits}"),
    ("reduction", lambda index: repr(REDUCTIONS[index])),
    ("num_valid", lambda kind: ("None", "a number", "an array")[kind]),
)


def _disagreement_message(descriptions: list[tuple[int, ...]]) -> str:
    """Which inputs differ across the ranks, and each rank's value."""
    n_fields = len(_DESCRIPTION_FIELDS)
    differences = []
    for index, (name, show) in enumerate(_DESCRIPTION_FIELDS):
        values = [row[index] for row in descriptions]
        if len(set(values)) > 1:
            differences.append(f"{name}: " + _per_rank(values, show))
    shapes = [row[n_fields:] for row in descriptions]
    if not differences and len(set(shapes)) > 1:
        shown = [tuple(dim for dim in dims if dim >= 0) for dims in shapes]
        differences.append("leading shape (logits_shard.shape[:-1]): " + _per_rank(shown, str))
    return (
        f"the ranks of the group disagree on the inputs of the vocabulary-parallel loss "
        f"({'; '.join(differences)}); every rank must hold the same positions, with the "
        "same mask shape, dtypes, reduction and num_valid"
    )


def _per_rank(values: list[Any], show: Callable[[Any], str]) -> str:
    """``"a on ranks [0, 2], b on rank [1]"``."""
    ranks: dict[Any, list[int]] = {}
    for rank, value in enumerate(values):
        ranks.setdefault(value, []).append(rank)
    return ", ".join(
        f"{show(value)} on rank{'s' if len(members) > 1 else ''} {members}"
        for value, members in ranks.items()
    )


# --------------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------------


def _jax_vocab_parallel_loss(
    logits_shard: Any,
    target_probs_shard: Any,
    position_mask: Any,
    reduction: str,
    num_valid: Any,
    axis_name: Any,
) -> Any:
    """The JAX loss of validated inputs: constants for the mask and count, then the VJP."""
    import jax
    import jax.numpy as jnp

    dtype = _core.compute_dtype(logits_shard, target_probs_shard, xp=jnp)
    weights = jax.lax.stop_gradient(jnp.astype(position_mask, dtype))
    count = None if num_valid is None else jax.lax.stop_gradient(jnp.asarray(num_valid, dtype))
    loss = _jax_vocab_parallel_vjp()
    return loss(logits_shard, target_probs_shard, weights, count, reduction, axis_name)


@functools.cache
def _jax_vocab_parallel_vjp() -> Any:
    """The ``jax.custom_vjp`` of the JAX vocabulary-parallel loss (made once, on first use)."""
    import jax
    import jax.numpy as jnp

    from softce_multi import jax as jax_adapter

    def forward(
        logits: Any, targets: Any, weights: Any, count: Any, reduction: str, axis_name: Any
    ) -> _core.ForwardResult:
        return _vocab_parallel_forward(
            logits,
            targets,
            weights,
            reduction=reduction,
            num_valid=count,
            max_over_shards=functools.partial(jax.lax.pmax, axis_name=axis_name),
            sum_over_shards=functools.partial(jax.lax.psum, axis_name=axis_name),
            block_rows=None,
            xp=jnp,
        )

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
    def loss(
        logits: Any, targets: Any, weights: Any, count: Any, reduction: str, axis_name: Any
    ) -> Any:
        return forward(logits, targets, weights, count, reduction, axis_name).loss

    def loss_fwd(
        logits: Any, targets: Any, weights: Any, count: Any, reduction: str, axis_name: Any
    ) -> tuple[Any, Any]:
        result = forward(logits, targets, weights, count, reduction, axis_name)
        return result.loss, (logits, targets, result.saved, result.row_scale, weights, count)

    def loss_bwd(reduction: str, axis_name: Any, residuals: Any, grad_loss: Any) -> Any:
        logits, targets, saved, row_scale, weights, count = residuals
        upstream = jnp.reshape(grad_loss, (-1,)) if reduction == "none" else grad_loss
        grads = [
            _core.backward(
                logits,
                targets,
                saved,
                row_scale * upstream,
                logits_grad=want_logits,
                targets_grad=not want_logits,
                gradient_routine=jax_adapter.gradient_routine,
                xp=jnp,
            )
            # One computation per gradient, so that jit drops the one that is not used.
            for want_logits in (True, False)
        ]
        zero_count = None if count is None else jnp.zeros_like(count)
        return grads[0][0], grads[1][1], jnp.zeros_like(weights), zero_count

    loss.defvjp(loss_fwd, loss_bwd)
    return loss
