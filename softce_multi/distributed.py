"""The loss beyond one device: global normalisation, and a vocabulary-parallel loss.

Three functions, for the two engines users train with: ``torch.distributed`` (torch tensors,
a process ``group``) and JAX's sharding (JAX arrays inside ``jax.shard_map`` or ``jax.pmap``,
an ``axis_name``). None brings a communication layer of its own: they call the engine's
collectives, on ``[N]``-sized vectors (and, in the linear loss's backward pass, the ``[N, H]``
gradient to the hidden states), never on anything of the vocabulary's size.

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
:func:`vocab_parallel_linear_masked_soft_cross_entropy`
    The same from the hidden states and each rank's rows of the ``lm_head`` weight, with the
    logits formed one chunk of rows at a time, and the gradient to the hidden states
    all-reduced in the backward pass.

torch and JAX are imported only for arrays of their own, so importing this module needs
neither. The recipes (DDP, FSDP, gradient accumulation, sequence and tensor parallelism,
``jax.jit`` over a mesh) are in ``docs/distributed.rst``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import array_api_compat

from softce_multi import _core, _linear
from softce_multi._types import (
    REDUCTIONS,
    Array,
    LinearLossInputs,
    LossInputs,
    Namespace,
    Reduction,
)
from softce_multi._validate import (
    check_mask_dtype,
    check_reduction,
    is_array,
    namespace_of,
    validate_inputs,
    validate_linear_inputs,
)

__all__ = [
    "global_num_valid",
    "vocab_parallel_linear_masked_soft_cross_entropy",
    "vocab_parallel_masked_soft_cross_entropy",
]

#: Leading dimensions of the inputs that the shape agreement of torch compares one by one
#: (beyond them, their number and product are compared).
_AGREED_DIMS = 8


def global_num_valid(position_mask: Array, *, group: Any = None, axis_name: Any = None) -> Array:
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
        is missing with JAX; if ``group`` is not a process group.
    ValueError
        If ``group`` is None and torch's default process group is not initialized.

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
    check_mask_dtype(xp, position_mask, name="position_mask")
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
        On torch, agree on the inputs before computing: one ``all_gather`` of 17 int64 per rank
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
        For inputs :func:`softce_multi.masked_soft_cross_entropy` refuses; with
        ``check_shapes``, for inputs that disagree across the ranks (on every rank); for
        ``group=None`` without an initialized default process group.

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
    inputs = LossInputs(logits_shard, target_probs_shard, position_mask, reduction, num_valid)
    names = ("logits_shard", "target_probs_shard", "position_mask")
    return _vocab_parallel_call(
        inputs, names, group=group, axis_name=axis_name, check_shapes=check_shapes
    )


def vocab_parallel_linear_masked_soft_cross_entropy(
    hidden: Array,
    weight_shard: Array,
    target_probs_shard: Array,
    position_mask: Array,
    *,
    bias_shard: Array | None = None,
    group: Any = None,
    axis_name: Any = None,
    reduction: Reduction = "mean",
    num_valid: Array | float | None = None,
    check_shapes: bool = True,
) -> Array:
    """The loss of a vocabulary-parallel ``lm_head``, straight from the hidden states.

    Rank ``r`` holds rows ``weight[start_r:stop_r]`` of the output projection (the
    tensor-parallel ``lm_head`` layout, ``[V_r, H]``), the matching slice of the bias and of
    the targets, and the full (replicated) hidden states. Every rank gets the loss of
    :func:`softce_multi.linear_masked_soft_cross_entropy` over the whole vocabulary; the
    gradients to its weight, bias and target slices are the matching slices of that loss's, and
    the gradient to ``hidden`` is all-reduced over the ranks in the backward pass, as a
    tensor-parallel linear layer's is, so that every rank holds the full one.

    The logits exist one chunk of rows at a time, as in the single-device linear loss, and only
    ``[N]``-sized vectors cross the network in the forward pass (as in
    :func:`vocab_parallel_masked_soft_cross_entropy`). Since each rank's gradients need the
    statistics of every rank, they are not made in the forward pass: the backward pass
    recomputes the chunks' logits (one more matmul per chunk than the single-device loss).

    Parameters
    ----------
    hidden : torch.Tensor or jax.Array, shape ``[..., H]``
        The hidden states of the positions, the same on every rank. Padding rows may hold
        anything, NaN included.
    weight_shard : torch.Tensor or jax.Array, shape ``[V_r, H]``
        This rank's rows of the output projection (``torch.nn.Linear.weight`` layout).
    target_probs_shard : torch.Tensor or jax.Array, shape ``[..., V_r]``
        This rank's slice of the targets.
    position_mask : torch.Tensor or jax.Array, shape ``[...]`` or ``[..., 1]``
        The weights of the positions, the same on every rank.
    bias_shard : torch.Tensor or jax.Array, shape ``[V_r]``, optional
        This rank's slice of the bias.
    group, axis_name, reduction, num_valid, check_shapes
        As in :func:`vocab_parallel_masked_soft_cross_entropy`; the shape check also compares
        the hidden size and whether a bias is given.

    Returns
    -------
    torch.Tensor or jax.Array
        The loss, the same on every rank, as
        :func:`softce_multi.linear_masked_soft_cross_entropy` returns it. On torch it is
        differentiable once with respect to ``hidden``, ``weight_shard``, ``bias_shard`` and
        ``target_probs_shard``; on JAX it has a ``jax.custom_vjp``, inside ``jax.shard_map``.

    Raises
    ------
    TypeError, ValueError
        As :func:`vocab_parallel_masked_soft_cross_entropy`, for the linear loss's inputs.

    Examples
    --------
    In every process of a tensor-parallel group, each holding its rows of ``lm_head.weight``
    (here one process, which holds them all):

    >>> import torch, torch.distributed as dist
    >>> from softce_multi import masked_soft_cross_entropy
    >>> dist.init_process_group("gloo", "tcp://127.0.0.1:29533", rank=0, world_size=1)
    >>> hidden = torch.randn(2, 5, 8, requires_grad=True)
    >>> weight = torch.randn(11, 8, requires_grad=True)
    >>> target = torch.softmax(torch.randn(2, 5, 11), dim=-1)
    >>> mask = torch.rand(2, 5) < 0.8
    >>> loss = vocab_parallel_linear_masked_soft_cross_entropy(hidden, weight, target, mask)
    >>> expected = masked_soft_cross_entropy(hidden @ weight.T, target, mask)
    >>> bool(torch.isclose(loss, expected))
    True
    >>> loss.backward()
    >>> dist.destroy_process_group()
    """
    inputs = LinearLossInputs(
        hidden,
        weight_shard,
        bias_shard,
        target_probs_shard,
        position_mask,
        reduction,
        num_valid,
        None,
    )
    names = ("hidden", "weight_shard", "bias_shard", "target_probs_shard", "position_mask")
    return _vocab_parallel_call(
        inputs, names, group=group, axis_name=axis_name, check_shapes=check_shapes
    )


def _vocab_parallel_call(
    inputs: LossInputs | LinearLossInputs,
    names: tuple[str, ...],
    *,
    group: Any,
    axis_name: Any,
    check_shapes: Any,
) -> Array:
    """The body of both vocabulary-parallel losses, for their arguments as a record.

    ``names`` are the names of the arrays, which come first in the record (an absent bias is
    None). It finds their library, checks the communicator and the options, validates the
    inputs (on torch with ``check_shapes``, agreeing across the ranks first) and runs the
    library's loss.
    """
    linear = isinstance(inputs, LinearLossInputs)
    arrays = dict(zip(names, inputs, strict=False))
    library, _ = _library(**{name: x for name, x in arrays.items() if x is not None})
    _check_communicator(library, group=group, axis_name=axis_name)
    if not isinstance(check_shapes, bool):
        msg = f"check_shapes must be a bool, got {type(check_shapes).__name__}"
        raise TypeError(msg)
    check_reduction(inputs.reduction, with_grad=False)
    arguments = (*arrays.values(), inputs.reduction, inputs.num_valid)
    validator: Callable[[Any], Namespace] = validate_linear_inputs if linear else validate_inputs
    validate = functools.partial(validator, inputs)
    if library == "jax":
        validate()
        jax_loss: Callable[..., Array] = (
            _jax_vocab_parallel_linear_loss if linear else _jax_vocab_parallel_loss
        )
        return jax_loss(*arguments, axis_name)
    torch_group = _torch_group(group)
    if check_shapes:
        leading = cast(Any, arguments[0])  # the logits or the hidden states
        description = _InputDescription(
            positions=tuple(leading.shape[:-1]),
            mask_ndim=inputs.position_mask.ndim,
            arrays=arguments[: len(names) - 1],
            reduction=inputs.reduction,
            num_valid=inputs.num_valid,
            hidden_size=leading.shape[-1] if linear and leading.ndim else 0,
            has_bias=linear and arguments[2] is not None,
        )
        _agree_on_inputs(validate, description, device=leading.device, group=torch_group)
    else:
        validate()
    if linear:
        return _torch_vocab_parallel_linear_function().apply(*arguments, torch_group)
    return _torch_vocab_parallel_function().apply(*arguments, torch_group)


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
    return xp.sum(position_mask, dtype=_core.compute_dtype(position_mask, xp=xp))


# --------------------------------------------------------------------------------------------
# The vocabulary-parallel forward pass, shared by torch and JAX
# --------------------------------------------------------------------------------------------


def _global_forward(
    local: _core.RowStatistics,
    weights: Array,
    inv_den: Array,
    *,
    reduction: str,
    batch_shape: tuple[int, ...],
    max_over_shards: Callable[[Array], Array],
    sum_over_shards: Callable[[Array], Array],
    xp: Namespace,
) -> _core.ForwardResult:
    """The loss over every shard from this shard's row statistics, and what a backward needs.

    ``local`` holds the :class:`~softce_multi._core.RowStatistics` of this rank's slice of the
    vocabulary; ``weights`` (``[N]``) and ``inv_den`` are those of
    :class:`softce_multi._core.Rows`. ``max_over_shards`` and ``sum_over_shards`` all-reduce an
    array over the ranks that share the vocabulary.
    """
    results = _global_rows(
        local, weights, max_over_shards=max_over_shards, sum_over_shards=sum_over_shards, xp=xp
    )
    loss = _core.reduce_loss(
        results.weighted, inv_den, reduction=reduction, batch_shape=batch_shape, xp=xp
    )
    return _core.ForwardResult(loss, None, results.saved, weights * inv_den)


def _global_rows(
    local: _core.RowStatistics,
    weights: Array,
    *,
    max_over_shards: Callable[[Array], Array],
    sum_over_shards: Callable[[Array], Array],
    xp: Namespace,
) -> _core.RowResults:
    """The weighted losses and saved statistics of rows whose vocabulary is split over shards.

    ``local`` holds the row statistics of this rank's slice of the vocabulary; the result is
    the same on every rank, without a logits gradient.
    """
    valid = weights != 0
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
    weighted = xp.where(valid, weights * _core.row_losses(total, xp=xp), 0.0)
    saved = _core.SavedRows(
        xp.where(valid, total.row_max, 0.0),
        xp.where(valid, xp.log(total.sum_exp), 0.0),
        xp.where(valid, total.target_sum, 0.0),
    )
    return _core.RowResults(weighted, saved, None)


def _local_statistics(
    logits_of: Callable[[slice], Array],
    p: Array,
    dtype: Any,
    block_rows: int | None,
    *,
    xp: Namespace,
) -> _core.RowStatistics:
    """:func:`softce_multi._core.row_statistics` of every row, a block of rows at a time.

    ``logits_of(rows)`` returns the logits of a slice of rows (a slice of the logits, or the
    chunk's matmul of the linear loss); ``p`` is ``[N, V_r]``.
    """
    blocks = [
        _core.row_statistics(
            xp.astype(logits_of(block), dtype, copy=False),
            xp.astype(p[block, ...], dtype, copy=False),
            xp=xp,
        )
        # No rows still make one (empty) block, for the shapes of the statistics.
        for block in list(_core.row_blocks(p.shape[0], block_rows)) or [slice(0, 0)]
    ]
    if len(blocks) == 1:
        return blocks[0]
    return _core.RowStatistics(*(xp.concat(field, axis=0) for field in zip(*blocks, strict=True)))


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
    """:func:`_global_forward` of the logits' local statistics, ``block_rows`` rows at a time."""
    rows = _core.as_rows(
        logits_shard,
        target_probs_shard,
        position_mask,
        reduction=reduction,
        num_valid=num_valid,
        xp=xp,
    )

    def logits_of(block: slice) -> Array:
        return rows.z[block, ...]

    return _global_forward(
        _local_statistics(logits_of, rows.p, rows.dtype, block_rows, xp=xp),
        rows.weights,
        rows.inv_den,
        reduction=reduction,
        batch_shape=tuple(logits_shard.shape[:-1]),
        max_over_shards=max_over_shards,
        sum_over_shards=sum_over_shards,
        xp=xp,
    )


# --------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------


def _torch_all_reduce(op_name: str, group: Any) -> Callable[[Any], Any]:
    """A function that all-reduces a tensor over ``group`` with the ``ReduceOp`` named."""
    import torch.distributed as dist

    def reduce(tensor: Any) -> Any:
        tensor = tensor.contiguous()
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op_name), group=group)
        return tensor

    return reduce


@functools.cache
def _torch_vocab_parallel_function() -> Any:
    """The autograd function of the torch vocabulary-parallel loss (made once, on first use)."""
    import torch

    from softce_multi._adapters import torch_shared as torch_adapter

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
                max_over_shards=_torch_all_reduce("MAX", group),
                sum_over_shards=_torch_all_reduce("SUM", group),
                block_rows=_core.default_block_rows(logits_shard.shape[-1]),
                xp=array_api_compat.array_namespace(logits_shard),
            )
            ctx.reduction = reduction
            ctx.save_for_backward(logits_shard, target_probs_shard, result.row_scale, *result.saved)
            return result.loss

        @staticmethod
        @torch_adapter.differentiable_once
        def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
            logits_shard, target_probs_shard, row_scale, *saved = ctx.saved_tensors
            upstream = _core.upstream_per_row(grad_loss, ctx.reduction, xp=torch)
            grad_logits, grad_targets = _core.gradient_pass(
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


@functools.cache
def _torch_vocab_parallel_linear_function() -> Any:
    """The autograd function of the torch vocabulary-parallel linear loss (made on first use)."""
    import torch

    from softce_multi._adapters import torch_shared as torch_adapter

    class VocabParallelLinearFunction(torch.autograd.Function):
        """Forward: chunked local statistics, all-reduced. Backward: chunked, then the hidden
        gradient all-reduced."""

        @staticmethod
        def forward(
            ctx: Any,
            hidden: torch.Tensor,
            weight_shard: torch.Tensor,
            bias_shard: torch.Tensor | None,
            target_probs_shard: torch.Tensor,
            position_mask: torch.Tensor,
            reduction: str,
            num_valid: Any,
            group: Any,
        ) -> torch.Tensor:
            xp = array_api_compat.array_namespace(hidden)
            # Under torch.autocast the matmuls run in its dtype, as F.linear's would.
            linear_inputs = [x for x in (hidden, weight_shard, bias_shard) if x is not None]
            matmul_dtype = torch_adapter.autocast_dtype(*linear_inputs)
            rows = _linear.as_linear_rows(
                hidden,
                weight_shard,
                bias_shard,
                target_probs_shard,
                position_mask,
                reduction=reduction,
                num_valid=num_valid,
                xp=xp,
                matmul_dtype=matmul_dtype,
            )

            # F.linear's logits (addmm: one rounding with a bias), into one reused buffer.
            chunk_logits = torch_adapter.LogitsBuffer()

            def logits_of(block: slice) -> Any:
                return chunk_logits(rows.hidden[block], rows.weight, rows.bias)

            dtype = rows.weights.dtype
            chunk = _linear.default_chunk_rows(weight_shard.shape[0], dtype, xp=xp)
            result = _global_forward(
                _local_statistics(logits_of, rows.p, dtype, chunk, xp=xp),
                rows.weights,
                rows.inv_den,
                reduction=reduction,
                batch_shape=tuple(hidden.shape[:-1]),
                max_over_shards=_torch_all_reduce("MAX", group),
                sum_over_shards=_torch_all_reduce("SUM", group),
                xp=xp,
            )
            ctx.reduction = reduction
            ctx.group = group
            ctx.matmul_dtype = matmul_dtype
            ctx.save_for_backward(
                hidden,
                weight_shard,
                bias_shard,
                target_probs_shard,
                result.row_scale,
                *result.saved,
            )
            return result.loss

        @staticmethod
        @torch_adapter.differentiable_once
        def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
            hidden, weight_shard, bias_shard, target_probs_shard, row_scale, *saved = (
                ctx.saved_tensors
            )
            upstream = _core.upstream_per_row(grad_loss, ctx.reduction, xp=torch)
            wants = ctx.needs_input_grad[:4]
            grads, grad_targets = _linear.chunked_gradient_pass(
                hidden,
                weight_shard,
                bias_shard,
                target_probs_shard,
                _core.SavedRows(*saved),
                row_scale * upstream,
                hidden_grad=wants[0],
                weight_grad=wants[1],
                bias_grad=wants[2] and bias_shard is not None,
                targets_grad=wants[3],
                chunk_rows=None,
                gradient_routine=torch_adapter.gradient_routine,
                xp=array_api_compat.array_namespace(hidden),
                # The logits of the forward pass, to the last bit.
                logits=torch_adapter.LogitsBuffer(),
                matmul_dtype=ctx.matmul_dtype,
            )
            grad_hidden = grad_weight = grad_bias = None
            if grads is not None:
                grad_hidden, grad_weight, grad_bias = grads
            if grad_hidden is not None:
                # Each rank's part covers its slice of the vocabulary.
                grad_hidden = _torch_all_reduce("SUM", ctx.group)(grad_hidden)
            return grad_hidden, grad_weight, grad_bias, grad_targets, None, None, None, None

    return VocabParallelLinearFunction


class _InputDescription(NamedTuple):
    """What the ranks must agree on, read from one rank's (already validated) inputs."""

    positions: tuple[int, ...]
    """The shape of the positions (the inputs' leading axes)."""
    mask_ndim: int
    """``position_mask.ndim``."""
    arrays: tuple[Any, ...]
    """The floating inputs (None for an absent bias), for the computation dtype."""
    reduction: str
    num_valid: Any
    hidden_size: int = 0
    """``H`` of the linear loss (0 for the loss of logits)."""
    has_bias: bool = False
    """Whether the linear loss has a bias."""

    def as_ints(self) -> list[int]:
        """The description as :data:`_DESCRIPTION_FIELDS`, then the leading dimensions."""
        present = [array for array in self.arrays if array is not None]
        dtype = _core.compute_dtype(*present, xp=array_api_compat.array_namespace(*present))
        dims = [*self.positions[:_AGREED_DIMS], *[-1] * (_AGREED_DIMS - len(self.positions))]
        num_valid_kind = 0 if self.num_valid is None else 2 if is_array(self.num_valid) else 1
        return [
            1,
            len(self.positions),
            math.prod(self.positions),
            self.mask_ndim - len(self.positions),
            dtype.itemsize * 8,
            REDUCTIONS.index(self.reduction),
            num_valid_kind,
            self.hidden_size,
            int(self.has_bias),
            *dims,
        ]


#: The fields of :meth:`_InputDescription.as_ints` with how to show them; the leading
#: dimensions follow.
_DESCRIPTION_FIELDS: tuple[tuple[str, Callable[[int], str]], ...] = (
    ("valid", str),
    ("number of position axes", str),
    ("number of positions", str),
    ("position_mask trailing axis of size 1", lambda extra: "yes" if extra else "no"),
    ("computation dtype", lambda bits: f"float{bits}"),
    ("reduction", lambda index: repr(REDUCTIONS[index])),
    ("num_valid", lambda kind: ("None", "a number", "an array")[kind]),
    ("hidden size", str),
    ("bias", lambda given: "given" if given else "None"),
)

#: How many int64 each rank sends to the shape agreement.
_DESCRIPTION_SIZE = len(_DESCRIPTION_FIELDS) + _AGREED_DIMS


def _agree_on_inputs(
    validate: Callable[[], None], description: _InputDescription, *, device: Any, group: Any
) -> None:
    """Validate the inputs on every rank and check that the ranks agree on them.

    One ``all_gather`` of :data:`_DESCRIPTION_SIZE` int64 per rank, read on the host. Every
    rank raises: the rank whose inputs are invalid its own error, the others a ValueError naming
    it; if the descriptions differ, the same ValueError on every rank, showing each rank's
    values.
    """
    import torch
    import torch.distributed as dist

    try:
        validate()
        local_error = None
        ints = description.as_ints()
    except (TypeError, ValueError) as error:
        local_error = error
        ints = [0] * _DESCRIPTION_SIZE
    local = torch.tensor(ints, dtype=torch.int64, device=device)
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
        differences.append("shape of the positions: " + _per_rank(shown, str))
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


def _jax_constants(position_mask: Any, num_valid: Any, dtype: Any) -> tuple[Any, Any]:
    """The mask and the count as constants of the computation dtype (they get no gradient)."""
    import jax
    import jax.numpy as jnp

    weights = jax.lax.stop_gradient(jnp.astype(position_mask, dtype))
    count = None if num_valid is None else jax.lax.stop_gradient(jnp.asarray(num_valid, dtype))
    return weights, count


def _jax_vocab_parallel_loss(
    logits_shard: Any,
    target_probs_shard: Any,
    position_mask: Any,
    reduction: str,
    num_valid: Any,
    axis_name: Any,
) -> Any:
    """The JAX loss of validated inputs: constants for the mask and count, then the VJP."""
    import jax.numpy as jnp

    dtype = _core.compute_dtype(logits_shard, target_probs_shard, xp=jnp)
    weights, count = _jax_constants(position_mask, num_valid, dtype)
    loss = _jax_vocab_parallel_vjp()
    return loss(logits_shard, target_probs_shard, weights, count, reduction, axis_name)


@functools.cache
def _jax_vocab_parallel_vjp() -> Any:
    """The ``jax.custom_vjp`` of the JAX vocabulary-parallel loss (made once, on first use)."""
    import jax
    import jax.numpy as jnp

    from softce_multi._adapters import jax as jax_adapter

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
        upstream = _core.upstream_per_row(grad_loss, reduction, xp=jnp)
        grads = [
            _core.gradient_pass(
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
        grad_logits = _like_primal(grads[0][0], logits)
        grad_targets = _like_primal(grads[1][1], targets)
        return grad_logits, grad_targets, jnp.zeros_like(weights), zero_count

    loss.defvjp(loss_fwd, loss_bwd)
    return loss


def _jax_vocab_parallel_linear_loss(
    hidden: Any,
    weight_shard: Any,
    bias_shard: Any,
    target_probs_shard: Any,
    position_mask: Any,
    reduction: str,
    num_valid: Any,
    axis_name: Any,
) -> Any:
    """The JAX linear loss of validated inputs: constants, chunk size, then the VJP."""
    import jax.numpy as jnp

    from softce_multi._adapters import jax as jax_adapter

    dtype = _core.compute_dtype(hidden, weight_shard, bias_shard, target_probs_shard, xp=jnp)
    weights, count = _jax_constants(position_mask, num_valid, dtype)
    arrays = jax_adapter.LinearArrays(
        hidden, weight_shard, bias_shard, target_probs_shard, weights, count
    )
    n_rows = math.prod(hidden.shape[:-1])
    chunk = max(1, min(_linear.default_chunk_rows(weight_shard.shape[0], dtype, xp=jnp), n_rows))
    loss = _jax_vocab_parallel_linear_vjp()
    return loss(arrays, reduction, axis_name, chunk)


@functools.cache
def _jax_vocab_parallel_linear_vjp() -> Any:
    """The ``jax.custom_vjp`` of the JAX vocabulary-parallel linear loss (made on first use).

    Both passes are the driver of :mod:`softce_multi._linear` (a ``lax.scan`` over chunks of
    rows) with two hooks: the forward pass's row routine all-reduces each chunk's row
    statistics over the vocabulary axis, and the accumulators are typed as varying over the
    mesh axes the inputs vary over, as ``shard_map`` requires of a scan's carry. The backward
    pass recomputes the chunks' logits, makes the gradients from the global statistics with the
    JAX adapter's gradient routine, then ``psum``s the hidden gradient.
    """
    import jax
    import jax.numpy as jnp

    from softce_multi._adapters import jax as jax_adapter
    from softce_multi.kernels.xla import widened

    def varying_over(*arrays: Any) -> Callable[[Any], Any]:
        """The ``fresh`` hook: an accumulator made to vary over the axes ``arrays`` vary over."""
        axes = frozenset().union(*(_varying_axes(x) for x in arrays if x is not None))

        def fresh(zeros: Any) -> Any:
            missing = tuple(axes - _varying_axes(zeros))
            return jax.lax.pcast(zeros, missing, to="varying") if missing else zeros

        return fresh

    def global_row_routine(axis_name: Any) -> _core.RowRoutine:
        def routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
            dtype = rows.weights.dtype
            # The statistics of the logits as the backward pass gets them: rounded to their
            # dtype (which XLA would otherwise skip, see kernels.xla.widened).
            local = _core.row_statistics(widened(rows.z, dtype), jnp.astype(rows.p, dtype), xp=jnp)
            return _global_rows(
                local,
                rows.weights,
                max_over_shards=functools.partial(jax.lax.pmax, axis_name=axis_name),
                sum_over_shards=functools.partial(jax.lax.psum, axis_name=axis_name),
                xp=jnp,
            )

        return routine

    def forward(
        arrays: jax_adapter.LinearArrays, reduction: str, axis_name: Any, chunk: int
    ) -> _linear.LinearForwardResult:
        hidden, weight, bias, targets, weights, count = arrays
        inputs = LinearLossInputs(hidden, weight, bias, targets, weights, reduction, count, chunk)
        return _linear.chunked_loss_pass(
            inputs,
            hidden_grad=False,
            weight_grad=False,
            bias_grad=False,
            row_routine=global_row_routine(axis_name),
            xp=jnp,
            # The rows' results are the same on every shard of the vocabulary.
            fresh=varying_over(hidden, weights),
        )

    def backward(
        arrays: jax_adapter.LinearArrays,
        saved: _core.SavedRows,
        row_scale: Any,
        chunk: int,
        *,
        targets_grad: bool,
    ) -> tuple[_linear.LinearGradients | None, Any]:
        hidden, weight, bias, targets, _, _ = arrays
        return _linear.chunked_gradient_pass(
            hidden,
            weight,
            bias,
            targets,
            saved,
            row_scale,
            hidden_grad=not targets_grad,
            weight_grad=not targets_grad,
            bias_grad=not targets_grad,
            targets_grad=targets_grad,
            chunk_rows=chunk,
            gradient_routine=jax_adapter.gradient_routine,
            xp=jnp,
            fresh=varying_over(hidden, weight, bias, targets, *saved, row_scale),
        )

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
    def loss(arrays: jax_adapter.LinearArrays, reduction: str, axis_name: Any, chunk: int) -> Any:
        return forward(arrays, reduction, axis_name, chunk).loss

    def loss_fwd(
        arrays: jax_adapter.LinearArrays, reduction: str, axis_name: Any, chunk: int
    ) -> tuple[Any, Any]:
        result = forward(arrays, reduction, axis_name, chunk)
        return result.loss, (arrays, result.saved, result.row_scale)

    def loss_bwd(reduction: str, axis_name: Any, chunk: int, residuals: Any, grad_loss: Any) -> Any:
        arrays, saved, row_scale = residuals
        hidden, weight, bias, targets, weights, count = arrays
        upstream = _core.upstream_per_row(grad_loss, reduction, xp=jnp)
        row_scale = row_scale * upstream
        # One computation per result, so that jit drops the targets' gradient if unused.
        grads, _ = backward(arrays, saved, row_scale, chunk, targets_grad=False)
        _, grad_targets = backward(arrays, saved, row_scale, chunk, targets_grad=True)
        assert grads is not None  # asked for
        # Each device's part of the hidden gradient covers its slice of the vocabulary.
        grad_hidden = jax.lax.psum(grads.hidden, axis_name)
        zero_count = None if count is None else jnp.zeros_like(count)
        cotangents = jax_adapter.LinearArrays(
            _like_primal(grad_hidden, hidden),
            _like_primal(grads.weight, weight),
            None if bias is None else _like_primal(grads.bias, bias),
            _like_primal(grad_targets, targets),
            jnp.zeros_like(weights),
            zero_count,
        )
        return (cotangents,)

    loss.defvjp(loss_fwd, loss_bwd)
    return loss


def _varying_axes(x: Any) -> frozenset[Any]:
    """The mesh axes over which the JAX array ``x`` varies inside ``shard_map`` (none outside).

    JAX types record them as ``mat.varying`` (0.10) or ``vma`` (0.6 to 0.9).
    """
    import jax

    aval = jax.typeof(x)
    manual = getattr(aval, "mat", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def _like_primal(cotangent: Any, primal: Any) -> Any:
    """``cotangent`` varying over the mesh axes ``primal`` varies over, as a VJP must return it.

    Summed over the axes where only the cotangent varies (a weight replicated over a data axis
    gets the sum of the data blocks' gradients, as JAX's own transpose rules do), broadcast to
    those where only the primal does.
    """
    import jax

    have, want = _varying_axes(cotangent), _varying_axes(primal)
    if have - want:
        cotangent = jax.lax.psum(cotangent, tuple(have - want))
    if want - have:
        cotangent = jax.lax.pcast(cotangent, tuple(want - have), to="varying")
    return cotangent
