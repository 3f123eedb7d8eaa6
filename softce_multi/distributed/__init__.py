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

The package's private modules, which this one imports; each imports only modules listed
before it, never this one:

:mod:`~softce_multi.distributed._communicators`
    Which library the arrays belong to, the checks of ``group`` and ``axis_name``, torch's
    process group and all-reduce.
:mod:`~softce_multi.distributed._statistics`
    The vocabulary-parallel forward pass shared by torch and JAX: local row statistics,
    all-reduced into those of the whole vocabulary.
:mod:`~softce_multi.distributed._agreement`
    The agreement of the torch ranks on their inputs (``check_shapes``), with its messages.
:mod:`~softce_multi.distributed._torch`
    The torch autograd functions (imported with the first torch call).
:mod:`~softce_multi.distributed._jax`
    The JAX functions with a ``jax.custom_vjp`` (imported with the first JAX call).

torch and JAX are imported only for arrays of their own, so importing this package needs
neither. The recipes (DDP, FSDP, gradient accumulation, sequence and tensor parallelism,
``jax.jit`` over a mesh) are in ``docs/distributed.rst``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, cast

from softce_multi import _compat
from softce_multi._types import Array, LinearLossInputs, LossInputs, Namespace, Reduction
from softce_multi._validate import check_mask_dtype, validate_inputs, validate_linear_inputs
from softce_multi.distributed._agreement import InputDescription, agree_on_inputs
from softce_multi.distributed._communicators import (
    agreement_device,
    check_communicator,
    check_not_meta,
    engine_of,
    library_of,
    mask_total,
    torch_group,
)

__all__ = [
    "global_num_valid",
    "vocab_parallel_linear_masked_soft_cross_entropy",
    "vocab_parallel_masked_soft_cross_entropy",
]


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
        to sum over, bound where the call runs (a ``jax.vmap`` axis too); not an int, which JAX
        reads as an axis of the array.

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
        is missing with JAX, or is neither a name nor a tuple of names; if ``group`` is not a
        process group.
    ValueError
        If ``group`` is None and torch's default process group is not initialized; if
        ``axis_name`` is an empty tuple or names an axis that is not bound where the call runs.
        On torch these errors come before the all-reduce: every rank must pass a valid mask, or
        the others wait in theirs.

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
    library, xp = library_of(position_mask=position_mask)
    check_mask_dtype(xp, position_mask, name="position_mask")
    check_communicator(library, group=group, axis_name=axis_name)
    total = mask_total(position_mask, xp=xp)
    if library == "torch":
        import torch.distributed as dist

        total = total.detach()
        dist.all_reduce(total, group=torch_group(group))
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
    sum-reduction of ``[3, N]`` in the forward pass, nothing in a backward pass that is not
    itself differentiated.

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
        None is the default process group. Autograd differentiates the result, twice too
        (gradient penalties: ``create_graph=True`` makes the gradients differentiable, with
        one ``[2, N]`` all-reduce in that backward pass and one in its own backward pass,
        which every rank must then run alike).
    axis_name : hashable or tuple of hashables
        For JAX arrays, required: the mesh axis the vocabulary is sharded over, inside
        ``jax.shard_map`` (or ``jax.pmap``, or over a ``jax.vmap`` axis), as
        :func:`global_num_valid` takes it. The function has a ``jax.custom_vjp``.
    reduction : {"mean", "sum", "none"}, default "mean"
        As in :func:`softce_multi.masked_soft_cross_entropy`. ``"mean"`` divides by the sum
        of this rank's mask, which is every rank's.
    num_valid : number or 0-d array, optional
        Replaces the denominator of ``"mean"``, for example :func:`global_num_valid` over the
        data-parallel group when the positions are split too.
    check_shapes : bool, default True
        On torch, agree on the inputs before computing: one ``all_gather`` of 18 int64 per rank
        and one host synchronisation per call, so that inputs that disagree across ranks (the
        positions' shape, the mask's shape, the computation dtype, the reduction, whether
        ``num_valid`` is given) or that a rank refuses raise ValueError on every rank instead
        of hanging or giving a wrong answer: the refusing rank its own error, the others one
        naming it. Every check runs inside the agreement, but for the three that finding the
        group needs (no torch tensor among the arrays, a ``group`` that is no process group, no
        default group), which the rank raises alone. It must be the same on every rank (a value
        that is not a bool takes part in the agreement, and is refused there). False skips it;
        the collectives then assume that every rank holds ``N`` positions. JAX needs no check:
        ``shard_map`` gives every device blocks of one shape.

    Returns
    -------
    torch.Tensor or jax.Array
        The loss, the same on every rank: shape ``()``, or ``logits_shard.shape[:-1]`` for
        ``"none"``; float32, or float64 when an input is float64.

    Raises
    ------
    TypeError
        For arguments of the wrong type, ``group`` given with JAX arrays, ``axis_name`` with
        torch tensors, or no ``axis_name`` (or one that is neither a name nor a tuple of names)
        with JAX arrays.
    ValueError
        For inputs :func:`softce_multi.masked_soft_cross_entropy` refuses; with
        ``check_shapes``, for inputs that disagree across the ranks (on every rank); for
        ``group=None`` without an initialized default process group; for an ``axis_name`` that
        is an empty tuple or names an axis that is not bound where the call runs.

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
    None). It finds the engine from the arrays (:func:`engine_of`), checks the communicator, the
    options and the inputs, and runs the library's loss: :mod:`softce_multi.distributed._torch`
    or :mod:`softce_multi.distributed._jax`, imported on first use.

    On torch with ``check_shapes`` (or a ``check_shapes`` that is not a bool, refused there),
    every check runs inside the agreement of the ranks (:func:`agree_on_inputs`), so that a rank
    that refuses its arguments still takes part in it. Only what the agreement needs comes
    before it: arrays that hold no torch tensor, and a ``group`` that is not a process group
    (or no default group); without a group the rank's other errors come first.
    """
    linear = isinstance(inputs, LinearLossInputs)
    arrays = dict(zip(names, inputs, strict=False))
    library = engine_of(
        **{name: x for name, x in arrays.items() if not (name == "bias_shard" and x is None)}
    )
    validator: Callable[[Any], Namespace] = validate_linear_inputs if linear else validate_inputs

    def describe() -> InputDescription:
        """Check every argument; describe them for the agreement of the torch ranks."""
        check_communicator(library, group=group, axis_name=axis_name)
        if not isinstance(check_shapes, bool):
            msg = f"check_shapes must be a bool, got {type(check_shapes).__name__}"
            raise TypeError(msg)
        if library == "torch":
            check_not_meta(**arrays)
        try:
            validator(inputs)
        except (TypeError, ValueError) as error:
            raise type(error)(_named_as_shards(str(error))) from error
        leading = cast(Any, inputs[0])  # the logits or the hidden states
        return InputDescription(
            positions=tuple(leading.shape[:-1]),
            mask_ndim=inputs.position_mask.ndim,
            arrays=tuple(arrays.values())[:-1],
            reduction=inputs.reduction,
            num_valid=inputs.num_valid,
            hidden_size=leading.shape[-1] if linear and leading.ndim else 0,
            has_bias=linear and arrays["bias_shard"] is not None,
        )

    if library == "jax":
        describe()
        from softce_multi.distributed import _jax

        jax_loss: Callable[..., Array] = (
            _jax.vocab_parallel_linear_loss if linear else _jax.vocab_parallel_loss
        )
        return jax_loss(inputs, axis_name)
    try:
        process_group = torch_group(group)
    except (TypeError, ValueError):
        describe()  # with no group to agree with, this rank's own errors come first
        raise
    if check_shapes is False:
        describe()
    else:
        tensors = [x for x in arrays.values() if _compat.is_torch_array(x)]
        device = agreement_device(tensors, process_group)
        agree_on_inputs(describe, device=device, group=process_group)
    from softce_multi.distributed import _torch

    torch_loss: Callable[..., Array] = (
        _torch.vocab_parallel_linear_loss if linear else _torch.vocab_parallel_loss
    )
    return torch_loss(inputs, process_group)


#: The single-device loss's names of the arrays that these functions take as shards.
_SHARD_NAMES = {name: f"{name}_shard" for name in ("logits", "target_probs", "weight", "bias")}


def _named_as_shards(message: str) -> str:
    """An error message of the single-device checks, naming the arguments as these functions
    do (``logits_shard`` for ``logits``...); quoted values, the caller's own, stay as given."""
    pattern = re.compile(r"\b(logits|target_probs|weight|bias)\b")
    parts = re.split(r"('[^']*')", message)
    return "".join(
        part if part.startswith("'") else pattern.sub(lambda m: _SHARD_NAMES[m[1]], part)
        for part in parts
    )
