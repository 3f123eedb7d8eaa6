"""The torch vocabulary-parallel losses: autograd functions over a process group.

:func:`vocab_parallel_loss` and :func:`vocab_parallel_linear_loss` take validated inputs and a
process group. Both functions are ``autograd.Function``s in the style of
:mod:`softce_multi._adapters.torch` (``forward`` without ``ctx``, a separate ``setup_context``):
``forward`` returns the loss, then the per-row scale ``d loss / d c_row`` and the global
:class:`~softce_multi._core.SavedRows`, which autograd does not differentiate.

:class:`_VocabParallelFunction`, the loss of logit shards, has the two backward modes of the
single-device loss:

* Grad mode off (a plain ``backward()``): each rank's gradients come from the global
  statistics through the gradient routine of its device, with no communication.
* Grad mode on (``create_graph=True``, gradient penalties): the gradients are recomputed with
  differentiable torch operations (:func:`_differentiable_shard_gradients`), the global sums of
  the exponentials and of the targets through a differentiable all-reduce
  (:class:`_SumOverRanks`, one ``[2, N]`` all-reduce, and one more in the backward pass of the
  gradients), so that derivatives of the gradients are those of the loss on the whole
  vocabulary.

:class:`_VocabParallelLinearFunction`, the linear loss of weight shards, is differentiable once
(:func:`~softce_multi._adapters.torch_shared.differentiable_once`); its backward pass recomputes
the logits chunk by chunk and all-reduces the hidden gradient. Imported on the first call with
torch tensors, so importing :mod:`softce_multi.distributed` needs no torch.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.torch as torch_namespace
import torch
from torch import Tensor

from softce_multi import _core, _linear
from softce_multi._adapters import torch_shared
from softce_multi._types import LinearLossInputs, LossInputs
from softce_multi.distributed._communicators import torch_all_reduce
from softce_multi.distributed._statistics import (
    global_forward,
    local_statistics,
    vocab_parallel_forward,
)


def vocab_parallel_loss(inputs: LossInputs, group: Any) -> Tensor:
    """The loss of validated logit shards over ``group``, differentiable twice."""
    outputs = _VocabParallelFunction.apply(
        inputs.logits,
        inputs.target_probs,
        inputs.position_mask,
        inputs.reduction,
        inputs.num_valid,
        group,
    )
    return outputs[0]


def vocab_parallel_linear_loss(inputs: LinearLossInputs, group: Any) -> Tensor:
    """The linear loss of validated inputs over ``group``, differentiable once.

    ``inputs.chunk_rows`` is not used (the default chunk). Under ``torch.autocast`` the chunks'
    matmuls run in its dtype, as ``F.linear``'s would
    (:func:`~softce_multi._adapters.torch_shared.autocast_dtype`).
    """
    linear_inputs = [x for x in (inputs.hidden, inputs.weight, inputs.bias) if x is not None]
    matmul_dtype = torch_shared.autocast_dtype(*linear_inputs)
    outputs = _VocabParallelLinearFunction.apply(
        inputs.hidden,
        inputs.weight,
        inputs.bias,
        inputs.target_probs,
        inputs.position_mask,
        inputs.reduction,
        inputs.num_valid,
        group,
        matmul_dtype,
    )
    return outputs[0]


class _VocabParallelFunction(torch.autograd.Function):
    """Forward: the loss from all-reduced statistics. Backward: local, or differentiable."""

    @staticmethod
    def forward(
        logits_shard: Tensor,
        target_probs_shard: Tensor,
        position_mask: Tensor,
        reduction: str,
        num_valid: Tensor | float | None,
        group: Any,
    ) -> tuple[Tensor, ...]:
        result = vocab_parallel_forward(
            logits_shard,
            target_probs_shard,
            position_mask,
            reduction=reduction,
            num_valid=num_valid,
            max_over_shards=torch_all_reduce("MAX", group),
            sum_over_shards=torch_all_reduce("SUM", group),
            block_rows=_core.default_block_rows(logits_shard.shape[-1]),
            xp=torch_namespace,
        )
        return (result.loss, result.row_scale, *result.saved)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        logits_shard, target_probs_shard, _, reduction, _, group = inputs
        _, row_scale, *saved = output
        ctx.mark_non_differentiable(row_scale, *saved)
        ctx.set_materialize_grads(False)
        ctx.reduction = reduction
        ctx.group = group
        ctx.save_for_backward(logits_shard, target_probs_shard, row_scale, *saved)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        nothing = (None,) * 6
        if grad_loss is None:
            return nothing
        logits_shard, target_probs_shard, row_scale, *saved = ctx.saved_tensors
        upstream = _core.upstream_per_row(grad_loss, ctx.reduction, xp=torch)
        wants_logits, wants_targets = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            grad_logits, grad_targets = _differentiable_shard_gradients(
                logits_shard,
                target_probs_shard,
                _core.SavedRows(*saved),
                row_scale,
                upstream,
                group=ctx.group,
                logits_grad=wants_logits,
                targets_grad=wants_targets,
            )
        else:
            grad_logits, grad_targets = _core.gradient_pass(
                logits_shard,
                target_probs_shard,
                _core.SavedRows(*saved),
                _core.upstream_row_scale(row_scale, upstream, xp=torch_namespace),
                logits_grad=wants_logits,
                targets_grad=wants_targets,
                gradient_routine=torch_shared.gradient_routine,
                xp=torch_namespace,
            )
        return grad_logits, grad_targets, *nothing[2:]


def _differentiable_shard_gradients(
    logits_shard: Tensor,
    target_probs_shard: Tensor,
    saved: _core.SavedRows,
    row_scale: Tensor,
    upstream: Tensor,
    *,
    group: Any,
    logits_grad: bool,
    targets_grad: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """This rank's gradients as differentiable torch operations of every rank's shards.

    ``r * (sum(p) * softmax(z) - p)`` and ``-r * log_softmax(z)`` over this rank's columns,
    with ``r = row_scale * upstream`` (differentiable in ``upstream`` too) and the softmax
    over the whole vocabulary: ``exp(z - row_max) / sum_exp``, where ``row_max`` is the saved
    global maximum (a constant: the softmax does not depend on it) and ``sum_exp`` and
    ``sum(p)`` are sums over the ranks through :class:`_SumOverRanks`, so that their
    derivatives reach every rank's shards. The values equal those of the saved statistics.
    Every rank must call it alike: the all-reduce runs whichever gradients are asked for.

    Rows whose ``row_scale`` is 0 are replaced by zeros before any arithmetic, so that whatever
    they hold, their gradients and every derivative of them are exactly 0. A row whose softmax
    is undefined (logits all -inf, or holding +inf or NaN, on any rank: its saved
    ``log_sum_exp`` is not finite) gets NaN, as in the core, except for a zero logits gradient
    where it has no target mass.
    """
    vocab_size = logits_shard.shape[-1]
    dtype = row_scale.dtype
    live = (row_scale != 0)[:, None]
    defined = saved.log_sum_exp.isfinite()[:, None]
    z = torch.where(live & defined, logits_shard.reshape(-1, vocab_size).to(dtype), 0.0)
    p = torch.where(live, target_probs_shard.reshape(-1, vocab_size).to(dtype), 0.0)
    shifted = z - saved.row_max[:, None]
    exponentials = torch.exp(shifted)
    local_sums = torch.stack([exponentials.sum(dim=-1), p.sum(dim=-1)])
    sum_exp, target_sum = _SumOverRanks.apply(local_sums, group)
    scale = _core.upstream_row_scale(row_scale, upstream, xp=torch_namespace)[:, None]
    grad_z = grad_p = None
    if logits_grad:
        # One rounded exponential per entry, as in the core's logits gradient.
        coefficient = (target_sum / sum_exp)[:, None]
        rows = scale * (coefficient * exponentials - p)
        massless = (saved.target_sum == 0)[:, None]
        rows = torch.where(defined | massless, rows, torch.nan)
        grad_z = rows.to(logits_shard.dtype).reshape(logits_shard.shape)
    if targets_grad:
        log_softmax = shifted - torch.log(sum_exp)[:, None]
        rows = torch.where(defined, -scale * log_softmax, torch.nan)
        grad_p = rows.to(target_probs_shard.dtype).reshape(target_probs_shard.shape)
    return grad_z, grad_p


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks of a group, differentiable to every order.

    Every rank gets the sum of every rank's tensor, so the gradient of a rank's tensor is the
    sum of every rank's upstream gradient: the backward pass is the same all-reduce.
    """

    @staticmethod
    def forward(tensor: Tensor, group: Any) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        return torch_all_reduce("SUM", group)(total)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor, None]:
        return _SumOverRanks.apply(grad_total, ctx.group), None


class _VocabParallelLinearFunction(torch.autograd.Function):
    """Forward: chunked local statistics, all-reduced. Backward: chunked, then the hidden
    gradient all-reduced; differentiable once."""

    vmap = torch_shared.refused_vmap("vocab_parallel_linear_masked_soft_cross_entropy")

    @staticmethod
    def forward(
        hidden: Tensor,
        weight_shard: Tensor,
        bias_shard: Tensor | None,
        target_probs_shard: Tensor,
        position_mask: Tensor,
        reduction: str,
        num_valid: Tensor | float | None,
        group: Any,
        matmul_dtype: torch.dtype | None,
    ) -> tuple[Tensor, ...]:
        xp = torch_namespace
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
        chunk_logits = torch_shared.LogitsBuffer()

        def logits_of(block: slice) -> Tensor:
            return chunk_logits(rows.hidden[block], rows.weight, rows.bias)

        dtype = rows.weights.dtype
        chunk = _linear.default_chunk_rows(
            weight_shard.shape[0], dtype, xp=xp, hidden_size=weight_shard.shape[1]
        )
        result = global_forward(
            local_statistics(logits_of, rows.p, dtype, chunk, xp=xp),
            rows.weights,
            rows.inv_den,
            reduction=reduction,
            batch_shape=tuple(hidden.shape[:-1]),
            max_over_shards=torch_all_reduce("MAX", group),
            sum_over_shards=torch_all_reduce("SUM", group),
            xp=xp,
        )
        return (result.loss, result.row_scale, *result.saved)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        hidden, weight_shard, bias_shard, target_probs_shard = inputs[:4]
        reduction, _, group, matmul_dtype = inputs[5:]
        _, row_scale, *saved = output
        ctx.mark_non_differentiable(row_scale, *saved)
        ctx.set_materialize_grads(False)
        ctx.reduction = reduction
        ctx.group = group
        ctx.matmul_dtype = matmul_dtype
        ctx.save_for_backward(
            hidden, weight_shard, bias_shard, target_probs_shard, row_scale, *saved
        )

    @staticmethod
    @torch_shared.differentiable_once
    def backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        nothing = (None,) * 9
        if grad_loss is None:
            return nothing
        hidden, weight_shard, bias_shard, target_probs_shard, row_scale, *saved = ctx.saved_tensors
        upstream = _core.upstream_per_row(grad_loss, ctx.reduction, xp=torch)
        wants = ctx.needs_input_grad[:4]
        grads, grad_targets = _linear.chunked_gradient_pass(
            hidden,
            weight_shard,
            bias_shard,
            target_probs_shard,
            _core.SavedRows(*saved),
            _core.upstream_row_scale(row_scale, upstream, xp=torch_namespace),
            hidden_grad=wants[0],
            weight_grad=wants[1],
            bias_grad=wants[2] and bias_shard is not None,
            targets_grad=wants[3],
            chunk_rows=None,
            gradient_routine=torch_shared.gradient_routine,
            xp=torch_namespace,
            # The logits of the forward pass, to the last bit.
            logits=torch_shared.LogitsBuffer(),
            matmul_dtype=ctx.matmul_dtype,
        )
        grad_hidden = grad_weight = grad_bias = None
        if grads is not None:
            grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden is not None:
            # Each rank's part covers its slice of the vocabulary.
            grad_hidden = torch_all_reduce("SUM", ctx.group)(grad_hidden)
        return grad_hidden, grad_weight, grad_bias, grad_targets, *nothing[4:]
