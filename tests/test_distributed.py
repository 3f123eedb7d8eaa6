"""The loss beyond one device, on real engines: torch.distributed over gloo, JAX over 8 CPU devices.

torch: one spawn of 2 processes and one of 4 (gloo on 127.0.0.1, a free port) run every
scenario once and save each rank's results; the tests compare them with the float64 reference
on the full data in this process. The ranks' padding holds NaN and inf, the reference's finite
values: padding must not matter. Scenarios: data and sequence parallelism with uneven padding
(:func:`global_num_valid`), the vocabulary-parallel loss over uneven shards (float32 and
float64, every reduction, ``num_valid``), a 2x2 data x tensor-parallel grid, the docs' recipes
(DDP with gradient accumulation, FSDP, a tensor-parallel ``lm_head``), a group of one, the
collectives' sizes, and inputs that disagree across ranks (an error on every rank).

JAX: one subprocess, with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before JAX
starts, runs :func:`jax_checks` on a 2x4 ("data", "vocab") mesh, under ``jit`` and ``grad``, and
prints each result's error next to its scale (every reduction in float32 and the mean in
float64: each case costs a few compilations, and the torch tests cover the rest).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed")
dist = pytest.importorskip("torch.distributed", reason="torch.distributed not available")

import softce_multi as sc  # noqa: E402
from softce_multi import distributed, eagle3  # noqa: E402
from softce_multi.reference import masked_soft_cross_entropy as reference_loss  # noqa: E402
from softce_multi.testing import REDUCTIONS  # noqa: E402

HAS_JAX = importlib.util.find_spec("jax") is not None

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo not available", allow_module_level=True)

BATCH, SEQ, VOCAB, HIDDEN = 6, 5, 37, 8
#: Uneven vocabulary shards (one of a single column), by world size.
VOCAB_BOUNDS = {2: (0, 11, 37), 4: (0, 4, 20, 21, 37)}
DTYPES = ("float32", "float64")
#: ``num_valid`` variants of ``"mean"``: None, a host number, a 0-d tensor, zero.
NUM_VALID = ("none", "number", "tensor", "zero")
WORLD_SIZES = (2, 4)
#: How long a spawn may take before its processes are killed and the tests fail.
SPAWN_TIMEOUT_SECONDS = 240
#: Loss and gradient tolerances relative to the loss and to the largest gradient entry.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


# --------------------------------------------------------------------------------------------
# The data: the same in every process
# --------------------------------------------------------------------------------------------


def make_case(dtype: str, *, dirty: bool) -> dict[str, Any]:
    """Logits, targets, mask (uneven padding), upstream weights and a linear head with a bias.

    float32 cases have a bool mask, float64 cases float weights. ``dirty`` puts NaN in the
    padding's logits and hidden states and inf in its targets; otherwise they hold finite
    random values.
    """
    generator = torch.Generator().manual_seed(1234 + len(dtype))
    real = getattr(torch, dtype)

    def normal(*shape: int) -> Any:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    logits = (4 * normal(BATCH, SEQ, VOCAB)).to(real)
    targets = torch.softmax(2 * normal(BATCH, SEQ, VOCAB), dim=-1)
    targets = torch.where(targets < 0.004, 0.0, targets).to(real)  # exact zeros too
    valid = torch.rand(BATCH, SEQ, generator=generator) < 0.65
    valid[0] = False  # a sequence of padding only
    valid[1] = True
    if dtype == "float32":
        mask: Any = valid
    else:
        weights = torch.rand(BATCH, SEQ, generator=generator, dtype=torch.float64) + 0.5
        mask = torch.where(valid, weights, 0.0)
    hidden = normal(BATCH, SEQ, HIDDEN).to(real)
    head = (normal(VOCAB, HIDDEN) / 2).to(real)
    if dirty:
        logits = logits.masked_fill(~valid[..., None], torch.nan)
        targets = targets.masked_fill(~valid[..., None], torch.inf)
    upstream = normal(BATCH, SEQ).to(torch.float64 if dtype == "float64" else torch.float32)
    bias = normal(VOCAB).to(real)
    if dirty:
        hidden = hidden.masked_fill(~valid[..., None], torch.nan)
    return {
        "bias": bias,
        "logits": logits,
        "targets": targets,
        "mask": mask,
        "hidden": hidden,
        "head": head,
        "upstream": upstream,
        "count": valid.sum().item() if dtype == "float32" else mask.sum().item(),
    }


def num_valid_of(variant: str, case: dict[str, Any]) -> Any:
    return {
        "none": None,
        "number": 7.5,
        "tensor": torch.tensor(case["count"] + 2.0),
        "zero": 0,
    }[variant]


def vocab_slice(world_size: int, rank: int) -> slice:
    bounds = VOCAB_BOUNDS[world_size]
    return slice(bounds[rank], bounds[rank + 1])


def position_slices(world_size: int, size: int) -> list[slice]:
    """Uneven contiguous slices of ``range(size)``, as ``torch.tensor_split`` makes them."""
    chunks = torch.tensor_split(torch.arange(size), world_size)
    return [slice(int(c[0]), int(c[-1]) + 1) if len(c) else slice(0, 0) for c in chunks]


# --------------------------------------------------------------------------------------------
# The torch worker: every scenario, once per spawn
# --------------------------------------------------------------------------------------------


def torch_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    results: dict[Any, Any] = {}
    try:
        for dtype in DTYPES:
            case = make_case(dtype, dirty=True)
            run_data_parallel(results, case, dtype, rank, world_size)
            run_vocab_parallel(results, case, dtype, rank, world_size)
            run_vocab_parallel_linear(results, case, dtype, rank, world_size)
        run_double_backward(results, make_case("float64", dirty=True), rank, world_size)
        case = make_case("float32", dirty=True)
        run_collective_sizes(results, case, rank, world_size)
        run_disagreements(results, case, rank, world_size)
        run_refusals_on_one_rank(results, case, rank, world_size)
        run_group_of_one(results, case, rank, world_size)
        if world_size == 4:
            run_data_times_vocab(results, case, rank)
        # The recipes' models multiply the hidden states by the head: padding must be finite.
        clean = make_case("float32", dirty=False)
        run_tensor_parallel_head(results, clean, rank, world_size)
        if world_size == 2:
            run_ddp_with_accumulation(results, clean, rank, world_size)
            run_fsdp(results, clean, rank, world_size)
    finally:
        torch.save(results, Path(out_dir) / f"{rank}.pt")
        dist.destroy_process_group()


def leaf(x: Any) -> Any:
    return x.detach().clone().requires_grad_(True)


def run_data_parallel(results: dict, case: dict, dtype: str, rank: int, world_size: int) -> None:
    """Each rank holds a slice of the batch (or the sequence) and divides by the global count."""
    for axis in (0, 1):
        rows = position_slices(world_size, (BATCH, SEQ)[axis])[rank]
        index = (rows,) if axis == 0 else (slice(None), rows)
        logits, targets = leaf(case["logits"][index]), leaf(case["targets"][index])
        mask = case["mask"][index]
        count = distributed.global_num_valid(mask)
        loss = sc.masked_soft_cross_entropy(logits, targets, mask, num_valid=count)
        loss.backward()
        results["data", dtype, axis] = {
            "loss": loss.detach(),
            "count": count,
            "grad_logits": logits.grad,
            "grad_targets": targets.grad,
        }


def vocab_parallel_step(
    case: dict, columns: slice, reduction: str, num_valid: Any, **options: Any
) -> dict[str, Any]:
    logits = leaf(case["logits"][..., columns])
    targets = leaf(case["targets"][..., columns])
    loss = distributed.vocab_parallel_masked_soft_cross_entropy(
        logits, targets, case["mask"], reduction=reduction, num_valid=num_valid, **options
    )
    (loss * case["upstream"] if reduction == "none" else loss).sum().backward()
    return {"loss": loss.detach(), "grad_logits": logits.grad, "grad_targets": targets.grad}


def run_vocab_parallel(results: dict, case: dict, dtype: str, rank: int, world_size: int) -> None:
    columns = vocab_slice(world_size, rank)
    for reduction in REDUCTIONS:
        for variant in NUM_VALID if reduction == "mean" else ("none",):
            step = vocab_parallel_step(case, columns, reduction, num_valid_of(variant, case))
            results["vocab", dtype, reduction, variant] = step
    unchecked = vocab_parallel_step(case, columns, "mean", None, check_shapes=False)
    results["vocab unchecked", dtype] = unchecked
    if dtype == "float32":
        rounded = {
            **case,
            "logits": case["logits"].bfloat16(),
            "targets": case["targets"].bfloat16(),
        }
        results["vocab bfloat16"] = vocab_parallel_step(rounded, columns, "mean", None)


def vocab_parallel_linear_step(
    case: dict, columns: slice, reduction: str, num_valid: Any = None, **options: Any
) -> dict[str, Any]:
    hidden, weight = leaf(case["hidden"]), leaf(case["head"][columns])
    bias, targets = leaf(case["bias"][columns]), leaf(case["targets"][..., columns])
    loss = distributed.vocab_parallel_linear_masked_soft_cross_entropy(
        hidden,
        weight,
        targets,
        case["mask"],
        bias_shard=bias,
        reduction=reduction,
        num_valid=num_valid,
        **options,
    )
    (loss * case["upstream"] if reduction == "none" else loss).sum().backward()
    return {
        "loss": loss.detach(),
        "grad_hidden": hidden.grad,
        "grad_weight": weight.grad,
        "grad_bias": bias.grad,
        "grad_targets": targets.grad,
    }


def run_vocab_parallel_linear(
    results: dict, case: dict, dtype: str, rank: int, world_size: int
) -> None:
    columns = vocab_slice(world_size, rank)
    for reduction in REDUCTIONS:
        step = vocab_parallel_linear_step(case, columns, reduction)
        results["linear", dtype, reduction] = step
    num_valid = num_valid_of("tensor", case)
    results["linear", dtype, "num_valid"] = vocab_parallel_linear_step(
        case, columns, "mean", num_valid
    )


#: The reductions of the double-backward scenario ("none" with the case's upstream weights).
DOUBLE_BACKWARD_REDUCTIONS = ("mean", "none")


def penalty_weights(shape: tuple[int, ...]) -> Any:
    """Fixed weights of the gradient entries in the penalty, the same in every process."""
    return torch.cos(torch.arange(math.prod(shape), dtype=torch.float64)).reshape(shape)


def double_backward(
    logits: Any, targets: Any, loss: Any, reduction: str, case: dict, weights: Any
) -> dict[str, Any]:
    """The gradients of a gradient penalty: the loss's gradients with ``create_graph``, then
    the backward pass of ``sum(weights * grad_logits**2) + sum(weights * grad_targets)``."""
    upstream = case["upstream"].to(loss.dtype) if reduction == "none" else None
    grad_logits, grad_targets = torch.autograd.grad(
        loss, (logits, targets), grad_outputs=upstream, create_graph=True
    )
    ((weights * grad_logits**2).sum() + (weights * grad_targets).sum()).backward()
    return {
        "grad_logits": grad_logits.detach(),
        "grad_targets": grad_targets.detach(),
        "penalty_logits": logits.grad,
        "penalty_targets": targets.grad,
    }


def run_double_backward(results: dict, case: dict, rank: int, world_size: int) -> None:
    """A gradient penalty through the vocabulary-parallel loss, on each rank's columns."""
    columns = vocab_slice(world_size, rank)
    weights = penalty_weights(tuple(case["logits"].shape))[..., columns]
    for reduction in DOUBLE_BACKWARD_REDUCTIONS:
        logits = leaf(case["logits"][..., columns])
        targets = leaf(case["targets"][..., columns])
        loss = distributed.vocab_parallel_masked_soft_cross_entropy(
            logits, targets, case["mask"], reduction=reduction
        )
        step = double_backward(logits, targets, loss, reduction, case, weights)
        results["double backward", reduction] = step


def run_collective_sizes(results: dict, case: dict, rank: int, world_size: int) -> None:
    """Every collective of a vocabulary-parallel step: its elements, and whether all are finite."""
    sizes = []
    all_reduce, all_gather = dist.all_reduce, dist.all_gather

    def recording_all_reduce(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(("all_reduce", tensor.numel(), bool(tensor.isfinite().all())))
        return all_reduce(tensor, *args, **kwargs)

    def recording_all_gather(outputs: Any, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(("all_gather", sum(out.numel() for out in outputs), True))
        return all_gather(outputs, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = recording_all_reduce, recording_all_gather
    try:
        vocab_parallel_step(case, vocab_slice(world_size, rank), "mean", None)
        results["collective sizes"] = list(sizes)
        sizes.clear()
        vocab_parallel_linear_step(case, vocab_slice(world_size, rank), "mean")
        results["linear collective sizes"] = list(sizes)
    finally:
        dist.all_reduce, dist.all_gather = all_reduce, all_gather


def outcome(call: Any) -> tuple[str, str]:
    """``(exception type name, message)`` of ``call()``, or ``("returned", "")``."""
    try:
        call()
    except Exception as error:  # the type is the result
        return type(error).__name__, str(error)
    return "returned", ""


def run_disagreements(results: dict, case: dict, rank: int, world_size: int) -> None:
    """Inputs that differ across ranks, or that one rank refuses; the group stays usable."""
    columns = vocab_slice(world_size, rank)
    logits, targets, mask = (
        case["logits"][..., columns],
        case["targets"][..., columns],
        case["mask"],
    )
    odd = rank == 0  # the rank that differs
    last = rank == world_size - 1

    def loss(z: Any = logits, p: Any = targets, w: Any = mask, **options: Any) -> Any:
        return distributed.vocab_parallel_masked_soft_cross_entropy(z, p, w, **options)

    def linear(hidden: Any = case["hidden"], weight: Any = None, **options: Any) -> Any:
        weight = case["head"][columns] if weight is None else weight
        return distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            hidden, weight, targets, mask, **options
        )

    short = (logits[:, 1:], targets[:, 1:], mask[:, 1:])
    transposed = (
        logits.transpose(0, 1).contiguous(),
        targets.transpose(0, 1).contiguous(),
        mask.T.contiguous(),
    )
    # 30 positions as (1,) * 8 + (5, 6) on rank 0, (1,) * 8 + (6, 5) on the others: the same
    # number of axes and positions, and the same first 8 axes.
    deep = [
        x.reshape(*(1,) * 8, *((5, 6) if odd else (6, 5)), *x.shape[2:])
        for x in (logits, targets, mask)
    ]
    scenarios = {
        "positions": lambda: loss(*short) if odd else loss(),
        "positions past the compared axes": lambda: loss(*deep),
        "leading shape": lambda: loss(*transposed) if odd else loss(),
        "mask trailing axis": lambda: loss(w=mask[..., None]) if last else loss(),
        "mask refused on one rank": lambda: loss(w=mask[:, 1:]) if last else loss(),
        "dtype": lambda: loss(z=logits.double(), p=targets.double()) if odd else loss(),
        "reduction": lambda: loss(reduction="sum") if odd else loss(),
        "num_valid": lambda: loss(num_valid=3.0) if odd else loss(),
        "hidden size": lambda: (
            linear(case["hidden"][..., 1:], case["head"][columns, 1:])
            if odd
            else linear(case["hidden"], case["head"][columns])
        ),
        "bias": lambda: linear(bias_shard=case["bias"][columns]) if odd else linear(),
    }
    results["disagreements"] = {name: outcome(call) for name, call in scenarios.items()}
    results["after disagreements"] = loss().detach()


#: Arguments that the last rank alone gets wrong: ``(error type, message)`` it raises.
ONE_RANK_REFUSALS = {
    "reduction": ("ValueError", "reduction must be one of"),
    "check_shapes": ("TypeError", "check_shapes must be a bool, got int"),
    "position_mask None": ("TypeError", "position_mask must be an array, got builtins.NoneType"),
    "hidden None": ("TypeError", "hidden must be an array, got builtins.NoneType"),
    "axis_name": ("TypeError", "axis_name='vocab' is for JAX arrays"),
    "numpy logits": ("TypeError", "must come from the same array library"),
    "meta logits": ("ValueError", "logits_shard is a meta tensor"),
}


def run_refusals_on_one_rank(results: dict, case: dict, rank: int, world_size: int) -> None:
    """Arguments the last rank alone gets wrong, each refused before anything is computed:
    every rank must still take part in the agreement, or the others wait in it (or pair with
    the refusing rank's next call). Then ``position_mask=None`` on every rank."""
    columns = vocab_slice(world_size, rank)
    logits, targets, mask = (
        case["logits"][..., columns],
        case["targets"][..., columns],
        case["mask"],
    )
    lonely = rank == world_size - 1

    def loss(z: Any = logits, w: Any = mask, **options: Any) -> Any:
        return distributed.vocab_parallel_masked_soft_cross_entropy(z, targets, w, **options)

    def linear(hidden: Any = case["hidden"]) -> Any:
        return distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            hidden, case["head"][columns], targets, mask
        )

    wrong = {
        "reduction": lambda: loss(reduction="avg"),
        "check_shapes": lambda: loss(check_shapes=1),
        "position_mask None": lambda: loss(w=None),
        "hidden None": lambda: linear(None),
        "axis_name": lambda: loss(axis_name="vocab"),
        "numpy logits": lambda: loss(z=logits.numpy()),
        "meta logits": lambda: loss(z=logits.to("meta")),
    }
    right = {"hidden None": linear}
    results["one rank refuses"] = {
        name: outcome(call if lonely else right.get(name, loss)) for name, call in wrong.items()
    }
    results["position_mask None everywhere"] = outcome(lambda: loss(w=None))
    results["after refusals"] = loss().detach()


def run_group_of_one(results: dict, case: dict, rank: int, world_size: int) -> None:
    """Every rank alone in its group, holding the whole vocabulary."""
    groups = [dist.new_group([member]) for member in range(world_size)]
    results["group of one"] = {
        "global_num_valid": distributed.global_num_valid(case["mask"], group=groups[rank]),
        **vocab_parallel_step(case, slice(None), "mean", None, group=groups[rank]),
    }


def run_data_times_vocab(results: dict, case: dict, rank: int) -> None:
    """Four ranks as a 2 x 2 grid: the batch over data groups, the vocabulary over model groups."""
    data_groups = [dist.new_group(members) for members in ([0, 2], [1, 3])]
    model_groups = [dist.new_group(members) for members in ([0, 1], [2, 3])]
    data_index, model_index = divmod(rank, 2)
    rows = position_slices(2, BATCH)[data_index]
    columns = vocab_slice(2, model_index)
    logits = leaf(case["logits"][rows, :, columns])
    targets = leaf(case["targets"][rows, :, columns])
    mask = case["mask"][rows]
    count = distributed.global_num_valid(mask, group=data_groups[model_index])
    loss = distributed.vocab_parallel_masked_soft_cross_entropy(
        logits, targets, mask, group=model_groups[data_index], num_valid=count
    )
    loss.backward()
    results["data x vocab"] = {
        "loss": loss.detach(),
        "grad_logits": logits.grad,
        "grad_targets": targets.grad,
    }


# The recipes of docs/distributed.rst ----------------------------------------------------------


def run_tensor_parallel_head(results: dict, case: dict, rank: int, world_size: int) -> None:
    """Recipe: a vocabulary-parallel ``lm_head``; the hidden states' gradient is all-reduced."""
    columns = vocab_slice(world_size, rank)
    hidden = leaf(case["hidden"])
    head_shard = leaf(case["head"][columns])

    def sum_over_ranks(grad: Any) -> Any:
        dist.all_reduce(grad)
        return grad

    hidden.register_hook(sum_over_ranks)
    logits_shard = hidden @ head_shard.T
    targets_shard = case["targets"][..., columns]
    loss = distributed.vocab_parallel_masked_soft_cross_entropy(
        logits_shard, targets_shard, case["mask"]
    )
    loss.backward()
    results["tensor parallel head"] = {
        "loss": loss.detach(),
        "grad_head": head_shard.grad,
        "grad_hidden": hidden.grad,
    }


def linear_head(case: dict) -> Any:
    torch.manual_seed(0)  # the same module on every rank
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False, dtype=case["head"].dtype)
    with torch.no_grad():
        head.weight.copy_(case["head"])
    return head


def run_ddp_with_accumulation(results: dict, case: dict, rank: int, world_size: int) -> None:
    """Recipe: DDP averages gradients over ranks; the loss is scaled by the world size."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(linear_head(case))
    rows = position_slices(world_size, BATCH)[rank]
    hidden, targets, mask = case["hidden"][rows], case["targets"][rows], case["mask"][rows]
    micro_batches = position_slices(2, hidden.shape[0])
    count = distributed.global_num_valid(mask)  # over every micro-batch of every rank
    for index, micro in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with model.no_sync() if not last else contextlib.nullcontext():
            loss = sc.masked_soft_cross_entropy(
                model(hidden[micro]), targets[micro], mask[micro], num_valid=count
            )
            (loss * world_size).backward()
    results["ddp"] = {"grad_head": model.module.weight.grad}


def run_fsdp(results: dict, case: dict, rank: int, world_size: int) -> None:
    """Recipe: FSDP2 averages the gradients too; its full gradient is the global one."""
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(linear_head(case))
    rows = position_slices(world_size, BATCH)[rank]
    hidden, targets, mask = case["hidden"][rows], case["targets"][rows], case["mask"][rows]
    count = distributed.global_num_valid(mask)
    loss = sc.masked_soft_cross_entropy(model(hidden), targets, mask, num_valid=count)
    (loss * world_size).backward()
    results["fsdp"] = {"grad_head": model.weight.grad.full_tensor()}


# --------------------------------------------------------------------------------------------
# Spawning
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_SPAWNED: dict[int, list[dict]] = {}


def spawned(world_size: int) -> list[dict]:
    """Every rank's results of one spawn of ``world_size`` processes (spawned once)."""
    if world_size not in _SPAWNED:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as out_dir:
            context = mp.spawn(
                torch_worker,
                args=(world_size, free_port(), out_dir),
                nprocs=world_size,
                join=False,
            )
            deadline = time.monotonic() + SPAWN_TIMEOUT_SECONDS
            while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    pytest.fail(f"the {world_size} processes did not finish in time")
            _SPAWNED[world_size] = [
                torch.load(Path(out_dir) / f"{rank}.pt", weights_only=False)
                for rank in range(world_size)
            ]
    return _SPAWNED[world_size]


# --------------------------------------------------------------------------------------------
# The single-process answers
# --------------------------------------------------------------------------------------------


def reference(case: dict, reduction: str = "mean", num_valid: Any = None) -> dict[str, Any]:
    """The float64 reference loss and gradients on the full (clean) data."""
    logits = leaf(case["logits"].double())
    targets = leaf(case["targets"].double())
    if isinstance(num_valid, torch.Tensor):
        num_valid = num_valid.double()
    loss = reference_loss(logits, targets, case["mask"], reduction=reduction, num_valid=num_valid)
    (loss * case["upstream"].double() if reduction == "none" else loss).sum().backward()
    return {"loss": loss.detach(), "grad_logits": logits.grad, "grad_targets": targets.grad}


def linear_reference(case: dict, reduction: str = "mean", num_valid: Any = None) -> dict:
    """The float64 reference of the loss of ``hidden @ head.T + bias``, and its gradients."""
    hidden, weight = leaf(case["hidden"].double()), leaf(case["head"].double())
    bias, targets = leaf(case["bias"].double()), leaf(case["targets"].double())
    if isinstance(num_valid, torch.Tensor):
        num_valid = num_valid.double()
    logits = hidden @ weight.T + bias
    loss = reference_loss(logits, targets, case["mask"], reduction=reduction, num_valid=num_valid)
    (loss * case["upstream"].double() if reduction == "none" else loss).sum().backward()
    return {
        "loss": loss.detach(),
        "grad_hidden": hidden.grad,
        "grad_weight": weight.grad,
        "grad_bias": bias.grad,
        "grad_targets": targets.grad,
    }


def head_reference(case: dict) -> dict[str, Any]:
    hidden, head = leaf(case["hidden"].double()), leaf(case["head"].double())
    loss = reference_loss(hidden @ head.T, case["targets"].double(), case["mask"])
    loss.backward()
    return {"loss": loss.detach(), "grad_head": head.grad, "grad_hidden": hidden.grad}


def assert_close(actual: Any, expected: Any, dtype: str, *, scale: Any = None) -> None:
    """Within the tolerance of ``dtype``, relative to ``scale`` (default: largest ``expected``)."""
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    assert actual.shape == expected.shape
    bound = expected.abs().max() if scale is None else torch.as_tensor(scale).abs().max()
    error = (actual - expected).abs().max() if actual.numel() else torch.tensor(0.0)
    assert error <= TOLERANCE[dtype] * max(float(bound), 1e-30), (float(error), float(bound))


def assert_result(actual: dict, expected: dict, dtype: str, *, index: Any = ...) -> None:
    """The loss, and the gradients as :func:`assert_gradients` checks them."""
    assert actual["loss"].dtype == getattr(torch, dtype)
    assert_close(actual["loss"], expected["loss"], dtype)
    assert_gradients(actual, expected, dtype, index=index)


def assert_gradients(actual: dict, expected: dict, dtype: str, *, index: Any = ...) -> None:
    """The gradients are the ``index`` slices of the full ones, scaled by the full gradient."""
    for name in ("grad_logits", "grad_targets"):
        assert actual[name].dtype == getattr(torch, dtype)
        assert torch.isfinite(actual[name]).all()
        assert_close(actual[name], expected[name][index], dtype, scale=expected[name])


# --------------------------------------------------------------------------------------------
# torch tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1], ids=["data", "sequence"])
def test_ranks_dividing_by_the_global_count_add_up_to_the_global_mean(world_size, dtype, axis):
    ranks = spawned(world_size)
    case = make_case(dtype, dirty=False)
    expected = reference(case)
    results = [ranks[rank]["data", dtype, axis] for rank in range(world_size)]

    assert_close(sum(result["loss"] for result in results), expected["loss"], dtype)
    for rank, result in enumerate(results):
        rows = position_slices(world_size, (BATCH, SEQ)[axis])[rank]
        index = (rows,) if axis == 0 else (slice(None), rows)
        assert float(result["count"]) == pytest.approx(case["count"], rel=1e-12)
        assert_gradients(result, expected, dtype, index=index)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("reduction", "variant"),
    [("mean", variant) for variant in NUM_VALID] + [("sum", "none"), ("none", "none")],
)
def test_vocab_parallel_loss_equals_the_loss_on_the_whole_vocabulary(
    world_size, dtype, reduction, variant
):
    ranks = spawned(world_size)
    case = make_case(dtype, dirty=False)
    expected = reference(case, reduction, num_valid_of(variant, case))

    for rank in range(world_size):
        actual = ranks[rank]["vocab", dtype, reduction, variant]
        assert_result(actual, expected, dtype, index=(..., vocab_slice(world_size, rank)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", [*REDUCTIONS, "num_valid"])
def test_vocab_parallel_linear_loss_equals_the_loss_of_the_whole_head(world_size, dtype, variant):
    ranks = spawned(world_size)
    case = make_case(dtype, dirty=False)
    num_valid = num_valid_of("tensor", case) if variant == "num_valid" else None
    expected = linear_reference(case, "mean" if variant == "num_valid" else variant, num_valid)

    for rank in range(world_size):
        actual = ranks[rank]["linear", dtype, variant]
        columns = vocab_slice(world_size, rank)
        assert actual["loss"].dtype == getattr(torch, dtype)
        assert_close(actual["loss"], expected["loss"], dtype)
        slices = {
            "grad_hidden": ...,  # all-reduced: the full gradient on every rank
            "grad_weight": columns,
            "grad_bias": columns,
            "grad_targets": (..., columns),
        }
        for name, index in slices.items():
            assert actual[name].dtype == getattr(torch, dtype)
            assert torch.isfinite(actual[name]).all()
            assert_close(actual[name], expected[name][index], dtype, scale=expected[name])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_vocab_parallel_loss_of_bfloat16_shards_equals_the_loss_of_the_rounded_values(world_size):
    ranks = spawned(world_size)
    case = make_case("float32", dirty=False)
    rounded = {**case, "logits": case["logits"].bfloat16(), "targets": case["targets"].bfloat16()}
    expected = reference(rounded)

    for rank in range(world_size):
        actual = ranks[rank]["vocab bfloat16"]
        columns = vocab_slice(world_size, rank)
        assert actual["loss"].dtype == torch.float32  # computed in float32
        assert_close(actual["loss"], expected["loss"], "float32")
        for name in ("grad_logits", "grad_targets"):
            assert actual[name].dtype == torch.bfloat16  # returned in the inputs' dtype
            # Within the rounding of bfloat16 (8 bits), relative to the largest entry.
            expected_slice = expected[name][..., columns]
            error = (actual[name].double() - expected_slice).abs().max()
            assert error <= 2**-8 * expected[name].abs().max()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_parallel_loss_without_the_shape_check_is_the_same(world_size, dtype):
    ranks = spawned(world_size)
    expected = reference(make_case(dtype, dirty=False))

    for rank in range(world_size):
        actual = ranks[rank]["vocab unchecked", dtype]
        assert_result(actual, expected, dtype, index=(..., vocab_slice(world_size, rank)))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_only_finite_row_sized_vectors_cross_the_network(world_size):
    n_positions = BATCH * SEQ
    for rank in spawned(world_size):
        sizes = rank["collective sizes"]
        # The shape agreement, the maximum, and the three sums; nothing in the backward pass.
        # The padding's NaN and inf never reach them.
        assert sizes == [
            ("all_gather", world_size * 18, True),
            ("all_reduce", n_positions, True),
            ("all_reduce", 3 * n_positions, True),
        ]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_the_linear_loss_also_all_reduces_the_hidden_gradient_and_nothing_else(world_size):
    n_positions = BATCH * SEQ
    for rank in spawned(world_size):
        assert rank["linear collective sizes"] == [
            ("all_gather", world_size * 18, True),
            ("all_reduce", n_positions, True),
            ("all_reduce", 3 * n_positions, True),
            ("all_reduce", n_positions * HIDDEN, True),
        ]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("positions", "number of positions: 24 on rank [0], 30 on rank"),
        ("leading shape", "shape of the positions: (5, 6) on rank [0]"),
        ("mask trailing axis", "position_mask trailing axis of size 1"),
        ("dtype", "computation dtype: float64 on rank [0], float32 on rank"),
        ("reduction", "reduction: 'sum' on rank [0], 'mean' on rank"),
        ("num_valid", "num_valid: a number on rank [0], None on rank"),
        ("hidden size", "hidden size: 7 on rank [0], 8 on rank"),
        ("bias", "bias: given on rank [0], None on rank"),
    ],
)
def test_inputs_that_disagree_across_ranks_raise_on_every_rank(world_size, scenario, message):
    for rank in spawned(world_size):
        error, text = rank["disagreements"][scenario]
        assert error == "ValueError"
        assert "disagree" in text
        assert message in text


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_inputs_one_rank_refuses_raise_there_and_name_it_on_the_others(world_size):
    ranks = spawned(world_size)
    last = world_size - 1

    error, text = ranks[last]["disagreements"]["mask refused on one rank"]
    assert error == "ValueError"
    assert "position_mask must have shape" in text
    for rank in ranks[:last]:
        error, text = rank["disagreements"]["mask refused on one rank"]
        assert error == "ValueError"
        assert f"rank(s) [{last}] of the group refused their inputs" in text


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_positions_that_differ_past_the_compared_axes_raise_on_every_rank(world_size):
    for rank in spawned(world_size):
        error, text = rank["disagreements"]["positions past the compared axes"]
        assert error == "ValueError"
        assert "disagree" in text
        others = "rank [1]" if world_size == 2 else "ranks [1, 2, 3]"
        assert f"positions past their first 8 axes: shape 1 on rank [0], shape 2 on {others}" in (
            text
        )


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("scenario", ONE_RANK_REFUSALS)
def test_arguments_one_rank_alone_gets_wrong_raise_there_and_name_it_on_the_others(
    world_size, scenario
):
    ranks = spawned(world_size)
    last = world_size - 1

    assert ranks[last]["one rank refuses"][scenario][0] == ONE_RANK_REFUSALS[scenario][0]
    assert ONE_RANK_REFUSALS[scenario][1] in ranks[last]["one rank refuses"][scenario][1]
    for rank in ranks[:last]:
        error, text = rank["one rank refuses"][scenario]
        assert error == "ValueError"
        assert f"rank(s) [{last}] of the group refused their inputs" in text


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_no_mask_on_every_rank_is_a_type_error_naming_it_on_every_rank(world_size):
    for rank in spawned(world_size):
        error, text = rank["position_mask None everywhere"]
        assert error == "TypeError"
        assert "position_mask must be an array, got builtins.NoneType" in text


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("after", ["disagreements", "refusals"])
def test_the_group_works_after_the_errors(world_size, after):
    expected = reference(make_case("float32", dirty=False))
    for rank in spawned(world_size):
        assert_close(rank[f"after {after}"], expected["loss"], "float32")


def double_backward_reference(case: dict, reduction: str) -> dict[str, Any]:
    """The gradient penalty of :func:`run_double_backward` on the whole (clean) vocabulary."""
    logits, targets = leaf(case["logits"]), leaf(case["targets"])
    loss = reference_loss(logits, targets, case["mask"], reduction=reduction)
    weights = penalty_weights(tuple(case["logits"].shape))
    return double_backward(logits, targets, loss, reduction, case, weights)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("reduction", DOUBLE_BACKWARD_REDUCTIONS)
def test_vocab_parallel_gradient_penalty_equals_that_of_the_whole_vocabulary(world_size, reduction):
    """Differentiable twice: the derivatives of each rank's gradients reach every rank's shards
    through the differentiable all-reduce, and padding (NaN, inf) gets exact zeros."""
    case = make_case("float64", dirty=False)
    expected = double_backward_reference(case, reduction)
    padding = ~torch.as_tensor(case["mask"]).bool()

    for rank, result in enumerate(spawned(world_size)):
        actual = result["double backward", reduction]
        index = (..., vocab_slice(world_size, rank))
        for name in ("grad_logits", "grad_targets", "penalty_logits", "penalty_targets"):
            assert actual[name].dtype == torch.float64
            assert torch.isfinite(actual[name]).all()
            assert (actual[name][padding] == 0).all()
            assert_close(actual[name], expected[name][index], "float64", scale=expected[name])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_group_of_one_gives_the_plain_loss(world_size):
    case = make_case("float32", dirty=False)
    expected = reference(case)
    for rank in spawned(world_size):
        result = rank["group of one"]
        assert int(result["global_num_valid"]) == case["count"]
        assert_result(result, expected, "float32")


def test_vocab_parallel_over_model_groups_with_the_count_over_data_groups():
    ranks = spawned(4)
    case = make_case("float32", dirty=False)
    expected = reference(case)
    data_shares = [ranks[rank]["data x vocab"]["loss"] for rank in (0, 2)]

    assert_close(sum(data_shares), expected["loss"], "float32")
    for rank, result in enumerate(ranks):
        data_index, model_index = divmod(rank, 2)
        index = (position_slices(2, BATCH)[data_index], ..., vocab_slice(2, model_index))
        assert_gradients(result["data x vocab"], expected, "float32", index=index)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_recipe_tensor_parallel_head(world_size):
    expected = head_reference(make_case("float32", dirty=False))
    for rank, result in enumerate(spawned(world_size)):
        result = result["tensor parallel head"]
        assert_close(result["loss"], expected["loss"], "float32")
        rows = vocab_slice(world_size, rank)
        assert_close(
            result["grad_head"], expected["grad_head"][rows], "float32", scale=expected["grad_head"]
        )
        assert_close(result["grad_hidden"], expected["grad_hidden"], "float32")


@pytest.mark.parametrize("recipe", ["ddp", "fsdp"])
def test_recipe_data_parallel_wrappers_with_the_world_size_undone(recipe):
    torch_release = tuple(int(part) for part in torch.__version__.split(".")[:2])
    if recipe == "fsdp" and torch_release < (2, 9):
        pytest.skip("FSDP2 over gloo sums, not averages, on torch 2.8 (documented)")
    expected = head_reference(make_case("float32", dirty=False))
    for rank in spawned(2):
        assert_close(rank[recipe]["grad_head"], expected["grad_head"], "float32")


# --------------------------------------------------------------------------------------------
# Arguments refused before any communication (this process has no process group)
# --------------------------------------------------------------------------------------------


def small_case(library: Any) -> tuple[Any, Any, Any]:
    logits = library.ones((2, 3, 5))
    return logits, library.ones((2, 3, 5)) / 5, library.ones((2, 3)) > 0


def test_axis_name_with_torch_tensors_is_a_type_error():
    with pytest.raises(TypeError, match="axis_name='vocab' is for JAX arrays"):
        distributed.vocab_parallel_masked_soft_cross_entropy(*small_case(torch), axis_name="vocab")
    with pytest.raises(TypeError, match="axis_name='data' is for JAX arrays"):
        distributed.global_num_valid(small_case(torch)[2], axis_name="data")


def test_errors_of_the_arrays_name_the_shard_arguments():
    logits, targets, mask = small_case(torch)
    expected = r"target_probs_shard must have the shape of logits_shard, got target_probs_shard"
    with pytest.raises(ValueError, match=expected):
        distributed.vocab_parallel_masked_soft_cross_entropy(logits, targets[..., :4], mask)
    with pytest.raises(TypeError, match="logits_shard must have a real floating dtype"):
        distributed.vocab_parallel_masked_soft_cross_entropy(logits.int(), targets, mask)


def test_errors_show_the_callers_own_values_as_given():
    with pytest.raises(ValueError, match="got 'logits'"):
        distributed.vocab_parallel_masked_soft_cross_entropy(*small_case(torch), reduction="logits")


def test_errors_of_the_linear_arrays_name_the_shard_arguments():
    _, targets, mask = small_case(torch)
    hidden, weight = torch.ones(2, 3, 4), torch.ones(5, 4)
    expected = r"bias_shard must have shape \(5,\), one entry per row of weight_shard \(5, 4\)"
    with pytest.raises(ValueError, match=expected):
        distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            hidden, weight, targets, mask, bias_shard=torch.ones(3)
        )
    with pytest.raises(ValueError, match=r"weight_shard must have shape \[V, H\] with H = 4"):
        distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            hidden, weight[:, :3], targets, mask
        )


def test_group_with_jax_arrays_is_a_type_error():
    jnp = pytest.importorskip("jax.numpy", reason="jax not installed")
    with pytest.raises(TypeError, match=r"group \(a str\) is a torch.distributed process group"):
        distributed.vocab_parallel_masked_soft_cross_entropy(*small_case(jnp), group="world")
    with pytest.raises(TypeError, match="axis_name is required for JAX arrays"):
        distributed.global_num_valid(small_case(jnp)[2])


def test_arrays_of_other_libraries_are_a_type_error():
    with pytest.raises(TypeError, match=r"must be torch tensors .* or JAX arrays"):
        distributed.vocab_parallel_masked_soft_cross_entropy(*small_case(np))


def test_a_mask_of_another_kind_is_a_type_error_naming_it():
    mask = torch.ones((2, 3), dtype=torch.complex64)
    with pytest.raises(TypeError, match="position_mask must be bool, integer or real floating"):
        distributed.global_num_valid(mask)


def test_the_default_group_must_exist():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="not initialized"):
        distributed.global_num_valid(small_case(torch)[2])


def test_a_group_that_is_no_process_group_is_a_type_error():
    with pytest.raises(TypeError, match=r"group must be a torch\.distributed\.ProcessGroup"):
        distributed.vocab_parallel_masked_soft_cross_entropy(*small_case(torch), group=2)


NO_MASK = re.escape("position_mask must be an array, got builtins.NoneType")
NO_HIDDEN = re.escape("hidden must be an array, got builtins.NoneType")


@pytest.mark.parametrize("check_shapes", [True, False])
def test_meta_tensors_are_a_value_error_naming_the_argument(group_of_one, check_shapes):
    """A meta tensor holds no values to reduce across the ranks: refused by name, where the
    agreement on the meta device exchanged nothing (and the collectives raised inside)."""
    logits, targets, mask = small_case(torch)
    with pytest.raises(ValueError, match="logits_shard is a meta tensor"):
        distributed.vocab_parallel_masked_soft_cross_entropy(
            logits.to("meta"),
            targets.to("meta"),
            mask,
            group=group_of_one,
            check_shapes=check_shapes,
        )
    with pytest.raises(ValueError, match="weight_shard is a meta tensor"):
        distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            torch.ones((2, 3, 4)),
            torch.ones((5, 4), device="meta"),
            targets,
            mask,
            group=group_of_one,
            check_shapes=check_shapes,
        )


@pytest.mark.parametrize("check_shapes", [True, False])
def test_no_mask_or_no_hidden_states_is_a_type_error_naming_the_argument(check_shapes):
    logits, targets, mask = small_case(torch)
    with pytest.raises(TypeError, match=NO_MASK):
        distributed.vocab_parallel_masked_soft_cross_entropy(
            logits, targets, None, check_shapes=check_shapes
        )
    weight = torch.ones((5, 4))
    with pytest.raises(TypeError, match=NO_HIDDEN):
        distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            None, weight, targets, mask, check_shapes=check_shapes
        )
    with pytest.raises(TypeError, match=NO_MASK):
        distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            torch.ones((2, 3, 4)), weight, targets, None, check_shapes=check_shapes
        )


#: ``axis_name`` values that name no bound axis inside ``jax.vmap(..., axis_name="v")``, with
#: the error and the start of its message.
UNBOUND_AXIS_NAMES = [
    ("nope", ValueError, "axis_name='nope' names an axis that is not bound here: 'nope'"),
    (("v", "nope"), ValueError, "axis_name=('v', 'nope') names an axis that is not bound"),
    ((), ValueError, "axis_name=() names no axis"),
    (3, TypeError, "axis_name must be a mesh axis name"),
    (["v"], TypeError, "axis_name must be a mesh axis name"),
    (("v", ["v"]), TypeError, "axis_name must be a mesh axis name"),
    (("v", ("v",)), TypeError, "axis_name must be a mesh axis name"),
]


@pytest.mark.parametrize(
    ("axis_name", "error", "message"),
    UNBOUND_AXIS_NAMES,
    ids=[repr(c[0]) for c in UNBOUND_AXIS_NAMES],
)
def test_jax_axis_name_that_names_no_bound_axis_is_refused_naming_it(axis_name, error, message):
    jax = pytest.importorskip("jax", reason="jax not installed")
    jnp = jax.numpy
    logits, targets, mask = (jnp.stack([x, x]) for x in small_case(jnp))
    hidden, weight = jnp.ones((2, 2, 3, 4)), jnp.ones((2, 5, 4))
    calls = {
        "loss": lambda z, p, w, h, v: distributed.vocab_parallel_masked_soft_cross_entropy(
            z, p, w, axis_name=axis_name
        ),
        "linear": lambda z, p, w, h, v: distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            h, v, p, w, axis_name=axis_name
        ),
        "count": lambda z, p, w, h, v: distributed.global_num_valid(w, axis_name=axis_name),
    }
    for call in calls.values():
        with pytest.raises(error, match=re.escape(message)):
            jax.vmap(call, axis_name="v")(logits, targets, mask, hidden, weight)


def test_jax_axis_name_outside_any_mapped_function_is_refused_naming_it():
    jnp = pytest.importorskip("jax.numpy", reason="jax not installed")
    with pytest.raises(ValueError, match="axis_name='vocab' names an axis that is not bound"):
        distributed.vocab_parallel_masked_soft_cross_entropy(*small_case(jnp), axis_name="vocab")
    with pytest.raises(ValueError, match="axis_name='data' names an axis that is not bound"):
        distributed.global_num_valid(small_case(jnp)[2], axis_name="data")


def test_jax_vocab_parallel_loss_over_a_vmap_axis_is_the_plain_loss():
    """A bound axis that is no mesh axis (``jax.vmap``'s) passes the check."""
    jax = pytest.importorskip("jax", reason="jax not installed")
    jnp = jax.numpy
    logits, targets, mask = small_case(jnp)
    logits = logits * jnp.arange(5.0)  # distinct logits, then two shards of two columns each
    split = [jnp.stack([x[..., :2], x[..., 2:4]]) for x in (logits, targets)]
    loss = jax.vmap(
        lambda z, p: distributed.vocab_parallel_masked_soft_cross_entropy(
            z, p, mask, axis_name="v"
        ),
        axis_name="v",
    )(*split)
    expected = sc.masked_soft_cross_entropy(logits[..., :4], targets[..., :4], mask)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(expected), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int8", "uint32", "int64"])
def test_jax_global_num_valid_of_an_integer_mask_is_of_the_default_integer_dtype(dtype):
    jax = pytest.importorskip("jax", reason="jax not installed")
    jnp = jax.numpy
    mask = jnp.ones((2, 3, 4), dtype=dtype)
    total = jax.vmap(lambda w: distributed.global_num_valid(w, axis_name="v"), axis_name="v")(mask)
    assert total.dtype == jnp.asarray(0).dtype
    assert total.tolist() == [24, 24]


# --------------------------------------------------------------------------------------------
# JAX: 8 CPU devices in a subprocess
# --------------------------------------------------------------------------------------------


#: The JAX cases (each a few compilations): every reduction in float32, the mean in float64.
JAX_REDUCTIONS = {"float32": REDUCTIONS, "float64": ("mean",)}
JAX_CASES = [(dtype, reduction) for dtype in DTYPES for reduction in JAX_REDUCTIONS[dtype]]


def jax_checks() -> dict[str, Any]:
    """Sharded results against unsharded ones on a 2 x 4 mesh: ``{name: [error, scale]}``.

    Also ``collectives ...``: the collectives XLA compiles for the vocabulary-parallel step and
    for the plain loss on sharded inputs, as ``[operation, shape]``.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    mesh = jax.make_mesh((2, 4), ("data", "vocab"))
    checks: dict[str, Any] = {}

    def placed(x: Any, *spec: Any) -> Any:
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    vocab = 4 * 9  # shard_map shards evenly
    for dtype in DTYPES:
        case = make_case(dtype, dirty=True)
        z, p = (jax.numpy.asarray(case[k][..., :vocab].numpy()) for k in ("logits", "targets"))
        w, upstream = (jax.numpy.asarray(case[k].numpy()) for k in ("mask", "upstream"))
        sharded = (placed(z, "data", None, "vocab"), placed(p, "data", None, "vocab"))
        for reduction in JAX_REDUCTIONS[dtype]:
            plain = jax.jit(
                jax.value_and_grad(jax_plain_objective, argnums=(0, 1)), static_argnums=(4,)
            )
            expected = plain(z, p, w, upstream, reduction)
            step = jax.jit(
                jax.value_and_grad(jax_vocab_parallel_objective, argnums=(0, 1)),
                static_argnums=(4, 5),
            )
            args = (*sharded, placed(w, "data"), placed(upstream, "data"), reduction, mesh)
            compare_jax(checks, f"vocab parallel {dtype} {reduction}", step(*args), expected)
            if (dtype, reduction) == ("float32", "mean"):
                checks["collectives vocab parallel"] = compiled_collectives(step, *args)

        h, head, bias = (jax.numpy.asarray(case[k].numpy()) for k in ("hidden", "head", "bias"))
        head, bias = head[:vocab], bias[:vocab]
        linear_args = (placed(h, "data"), placed(head, "vocab"), placed(bias, "vocab"), sharded[1])
        for reduction in JAX_REDUCTIONS[dtype]:
            plain = jax.jit(
                jax.value_and_grad(jax_linear_objective, argnums=(0, 1, 2, 3)), static_argnums=(6,)
            )
            expected = plain(h, head, bias, p, w, upstream, reduction)
            step = jax.jit(
                jax.value_and_grad(jax_vocab_parallel_linear_objective, argnums=(0, 1, 2, 3)),
                static_argnums=(6, 7),
            )
            args = (*linear_args, placed(w, "data"), placed(upstream, "data"), reduction, mesh)
            prefix = f"vocab parallel linear {dtype} {reduction}"
            compare_jax(checks, prefix, step(*args), expected, names=LINEAR_RESULTS)

        if dtype != "float32":
            continue
        shards = [jax.numpy.stack(jax.numpy.split(x, 4, axis=-1)) for x in (z, p)]
        pmapped = jax.pmap(
            jax.value_and_grad(jax_pmap_objective, argnums=(0, 1)),
            axis_name="vocab",
            in_axes=(0, 0, None),
        )
        loss, (grad_z, grad_p) = pmapped(*shards, w)
        grads = [jax.numpy.concatenate(list(grad), axis=-1) for grad in (grad_z, grad_p)]
        unsharded = jax.value_and_grad(sc.masked_soft_cross_entropy, argnums=(0, 1))(z, p, w)
        compare_jax(checks, "pmap", (loss[0], grads), unsharded)
        checks["pmap count"] = [
            float(np.max(np.abs(np.asarray(jax_pmap_count(w)) - float(w.sum())))),
            float(w.sum()),
        ]
        plain_step = jax.jit(jax.value_and_grad(sc.masked_soft_cross_entropy, argnums=(0, 1)))
        expected = plain_step(z, p, w)
        for layout, spec in (("batch", ("data",)), ("vocab", ("data", None, "vocab"))):
            args = (placed(z, *spec), placed(p, *spec), placed(w, "data"))
            name = f"plain jit {layout} sharded"
            compare_jax(checks, f"{name} {dtype}", plain_step(*args), expected)
            checks[f"collectives {name}"] = compiled_collectives(plain_step, *args)
            # Without jit, with the count replicated over the mesh as the mask's sum comes.
            eager = sc.masked_soft_cross_entropy(*args, num_valid=args[2].sum())
            compare_jax(
                checks,
                f"plain eager {layout} sharded",
                (eager, ()),
                (expected[0], ()),
                names=("loss",),
            )
        on_one_device = jax.device_put(w, jax.devices()[1])
        try:
            sc.masked_soft_cross_entropy(placed(z, "data"), placed(p, "data"), on_one_device)
            checks["eager other devices refused"] = ""
        except ValueError as error:
            checks["eager other devices refused"] = str(error)

    # Large enough that the XLA routine runs over chunks of rows unsharded (N * V > 2**20).
    keys = jax.random.split(jax.random.key(0), 3)
    z = jax.random.normal(keys[0], (4, 64, 8192))
    p = jax.nn.softmax(jax.random.normal(keys[1], z.shape))
    w = jax.random.uniform(keys[2], z.shape[:-1]) < 0.8
    plain_step = jax.jit(jax.value_and_grad(sc.masked_soft_cross_entropy, argnums=(0, 1)))
    expected = plain_step(z, p, w)
    for layout, spec in (("batch", ("data",)), ("vocab", ("data", None, "vocab"))):
        args = (placed(z, *spec), placed(p, *spec), placed(w, "data"))
        name = f"plain jit {layout} sharded chunked"
        loss, grads = plain_step(*args)
        compare_jax(checks, f"{name} float32", (loss, grads), expected)
        checks[f"collectives {name}"] = compiled_collectives(plain_step, *args)
        checks[f"{name} gradient layout"] = [axes_of(grad) for grad in grads]
        checks[f"{name} input layout"] = axes_of(args[0])

    checks.update(jax_chunk_loops_inside_shard_map(jax, mesh, placed))
    return checks


def jax_chunk_loops_inside_shard_map(jax: Any, mesh: Any, placed: Any) -> dict[str, Any]:
    """The linear loss and the targets from hidden states, whose loops over chunks need whole
    rows: inside ``shard_map`` over a batch split on "data" (the weight whole on every
    device) against the unsharded results; on explicitly split arrays, the error."""
    from jax.sharding import PartitionSpec as P

    checks: dict[str, Any] = {}
    keys = jax.random.split(jax.random.key(1), 4)
    hidden = jax.random.normal(keys[0], (8, 16, 32))
    weight = 0.1 * jax.random.normal(keys[1], (3000, 32))
    target_probs = jax.nn.softmax(jax.random.normal(keys[2], (8, 16, 3000)))
    mask = jax.random.uniform(keys[3], (8, 16)) < 0.8
    t2d = jax.numpy.arange(3000) % 3 != 0
    data = ("data", "vocab")  # the batch split over all 8 devices

    def linear(hidden: Any, weight: Any, target_probs: Any, mask: Any) -> Any:
        return sc.linear_masked_soft_cross_entropy(hidden, weight, target_probs, mask)

    def block_linear(hidden: Any, weight: Any, target_probs: Any, mask: Any) -> Any:
        num_valid = distributed.global_num_valid(mask, axis_name=data)
        loss = sc.linear_masked_soft_cross_entropy(
            hidden, weight, target_probs, mask, num_valid=num_valid, chunk_rows=8
        )
        return jax.lax.psum(loss, data)

    expected = jax.jit(jax.value_and_grad(linear, argnums=(0, 1)))(
        hidden, weight, target_probs, mask
    )
    split = jax.shard_map(
        block_linear, mesh=mesh, in_specs=(P(data), P(), P(data), P(data)), out_specs=P()
    )
    arrays = (placed(hidden, data), placed(weight), placed(target_probs, data), placed(mask, data))
    actual = jax.jit(jax.value_and_grad(split, argnums=(0, 1)))(*arrays)
    names = ("loss", "grad_hidden", "grad_weight")
    compare_jax(checks, "linear inside shard_map", actual, expected, names=names)

    def targets(hidden: Any, weight: Any, mask: Any, t2d: Any) -> Any:
        return eagle3.prepare_targets_from_hidden(
            hidden, weight, mask, t2d, draft_vocab_size=2000, chunk_rows=8, chunk_vocab=512
        )

    expected = jax.jit(targets)(hidden, weight, mask, t2d)
    split = jax.shard_map(
        targets, mesh=mesh, in_specs=(P(data), P(), P(data), P()), out_specs=(P(data), P(data))
    )
    actual = jax.jit(split)(placed(hidden, data), placed(weight), placed(mask, data), placed(t2d))
    checks["targets inside shard_map"] = [
        float(np.max(np.abs(np.asarray(actual[0]) - np.asarray(expected[0])))),
        bool(np.array_equal(np.asarray(actual[1]), np.asarray(expected[1]))),
    ]

    for name, call in (
        ("linear", lambda: jax.jit(linear)(*arrays)),
        ("targets", lambda: jax.jit(targets)(arrays[0], arrays[1], arrays[3], placed(t2d))),
    ):
        try:
            call()
            checks[f"{name} on split arrays"] = None
        except ValueError as error:
            checks[f"{name} on split arrays"] = str(error)
    return checks


def jax_plain_objective(z: Any, p: Any, w: Any, upstream: Any, reduction: str) -> Any:
    """The loss (for ``"none"``, weighted by ``upstream`` and summed) on unsharded inputs."""
    loss = sc.masked_soft_cross_entropy(z, p, w, reduction=reduction)
    return (loss * upstream).sum() if reduction == "none" else loss


def jax_vocab_parallel_objective(
    z: Any, p: Any, w: Any, upstream: Any, reduction: str, mesh: Any
) -> Any:
    """:func:`jax_plain_objective` with the batch over "data" and the vocabulary over "vocab".

    Each block's ``"mean"`` divides by the count over the "data" axis; the blocks' losses are
    summed over "data".
    """
    import jax
    from jax.sharding import PartitionSpec as P

    def block(z: Any, p: Any, w: Any) -> Any:
        count = distributed.global_num_valid(w, axis_name="data") if reduction == "mean" else None
        loss = distributed.vocab_parallel_masked_soft_cross_entropy(
            z, p, w, axis_name="vocab", reduction=reduction, num_valid=count
        )
        return loss if reduction == "none" else jax.lax.psum(loss, "data")

    loss = jax.shard_map(
        block,
        mesh=mesh,
        in_specs=(P("data", None, "vocab"), P("data", None, "vocab"), P("data")),
        out_specs=P("data") if reduction == "none" else P(),
    )(z, p, w)
    return (loss * upstream).sum() if reduction == "none" else loss


def jax_pmap_objective(z: Any, p: Any, w: Any) -> Any:
    """The vocabulary-parallel loss of one device's shard, inside ``jax.pmap``."""
    return distributed.vocab_parallel_masked_soft_cross_entropy(z, p, w, axis_name="vocab")


def jax_pmap_count(w: Any) -> Any:
    """:func:`global_num_valid` of two row blocks of ``w``, inside ``jax.pmap``."""
    import jax

    blocks = w.reshape(2, -1, *w.shape[1:])
    return jax.pmap(
        lambda block: distributed.global_num_valid(block, axis_name="rows"), axis_name="rows"
    )(blocks)


def jax_linear_objective(
    h: Any, head: Any, bias: Any, p: Any, w: Any, upstream: Any, reduction: str
) -> Any:
    """:func:`jax_plain_objective` of the logits ``h @ head.T + bias``, never formed."""
    loss = sc.linear_masked_soft_cross_entropy(h, head, p, w, bias=bias, reduction=reduction)
    return (loss * upstream).sum() if reduction == "none" else loss


def jax_vocab_parallel_linear_objective(
    h: Any, head: Any, bias: Any, p: Any, w: Any, upstream: Any, reduction: str, mesh: Any
) -> Any:
    """:func:`jax_linear_objective` with the batch over "data" and the head's rows over "vocab"."""
    import jax
    from jax.sharding import PartitionSpec as P

    def block(h: Any, head: Any, bias: Any, p: Any, w: Any) -> Any:
        count = distributed.global_num_valid(w, axis_name="data") if reduction == "mean" else None
        loss = distributed.vocab_parallel_linear_masked_soft_cross_entropy(
            h, head, p, w, bias_shard=bias, axis_name="vocab", reduction=reduction, num_valid=count
        )
        return loss if reduction == "none" else jax.lax.psum(loss, "data")

    loss = jax.shard_map(
        block,
        mesh=mesh,
        in_specs=(P("data"), P("vocab"), P("vocab"), P("data", None, "vocab"), P("data")),
        out_specs=P("data") if reduction == "none" else P(),
    )(h, head, bias, p, w)
    return (loss * upstream).sum() if reduction == "none" else loss


#: What the linear JAX checks compare: the loss, then the gradients in argument order.
LINEAR_RESULTS = ("loss", "grad_hidden", "grad_weight", "grad_bias", "grad_targets")


def compare_jax(
    checks: dict[str, Any],
    prefix: str,
    actual: Any,
    expected: Any,
    *,
    names: tuple[str, ...] = ("loss", "grad_logits", "grad_targets"),
) -> None:
    """Record ``[max error, max |expected|]`` of the loss and the gradients, by name."""
    pairs = zip((actual[0], *actual[1]), (expected[0], *expected[1]), strict=True)
    for name, (a, e) in zip(names, pairs, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype, (prefix, name, a.dtype, e.dtype)
        error = float(np.max(np.abs(a.astype(np.float64) - e)))
        checks[f"{prefix} {name}"] = [error, float(np.max(np.abs(e)))]


def axes_of(x: Any) -> list[str | None]:
    """The mesh axis each axis of the JAX array ``x`` is split over (None where it is whole)."""
    spec = tuple(x.sharding.spec)
    return [None if axis is None else str(axis) for axis in spec + (None,) * (x.ndim - len(spec))]


def compiled_collectives(step: Any, *args: Any) -> list[list[str]]:
    """``[operation, result shape]`` of every collective in the compiled HLO of ``step``."""
    text = step.lower(*args).compile().as_text()
    pattern = r"= (.+?) (all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\("
    return [[operation, shape] for shape, operation in re.findall(pattern, text)]


def start_jax_checks() -> subprocess.Popen:
    """Run :func:`jax_checks` in a subprocess with 8 host devices; its last line is the JSON."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.Popen(
        [sys.executable, __file__, "jax-checks"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


_JAX_CHECKS: list[subprocess.Popen] = []


@pytest.fixture(scope="module", autouse=True)
def jax_checks_in_the_background(request: pytest.FixtureRequest) -> Any:
    """Start the JAX subprocess first if a selected test needs it: it runs during the torch ones."""
    selected = [item for item in request.session.items if item.module is request.module]
    if HAS_JAX and any("jax_results" in item.fixturenames for item in selected):
        _JAX_CHECKS.append(start_jax_checks())
    yield
    for process in _JAX_CHECKS:
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def jax_results() -> dict[str, Any]:
    pytest.importorskip("jax", reason="jax not installed")
    process = _JAX_CHECKS[0] if _JAX_CHECKS else start_jax_checks()
    try:
        stdout, stderr = process.communicate(timeout=SPAWN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the JAX checks did not finish in time")
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("dtype", "reduction"), JAX_CASES)
def test_jax_vocab_parallel_on_a_2x4_mesh_equals_the_unsharded_loss(jax_results, dtype, reduction):
    for name in ("loss", "grad_logits", "grad_targets"):
        error, scale = jax_results[f"vocab parallel {dtype} {reduction} {name}"]
        assert error <= TOLERANCE[dtype] * scale, name


@pytest.mark.parametrize(("dtype", "reduction"), JAX_CASES)
def test_jax_vocab_parallel_linear_on_a_2x4_mesh_equals_the_unsharded_loss(
    jax_results, dtype, reduction
):
    for name in LINEAR_RESULTS:
        error, scale = jax_results[f"vocab parallel linear {dtype} {reduction} {name}"]
        assert error <= TOLERANCE[dtype] * scale, name


@pytest.mark.parametrize("layout", ["batch", "vocab"])
def test_jax_plain_loss_under_jit_on_sharded_inputs_equals_the_unsharded(jax_results, layout):
    for name in ("loss", "grad_logits", "grad_targets"):
        error, scale = jax_results[f"plain jit {layout} sharded float32 {name}"]
        assert error <= TOLERANCE["float32"] * scale, name


@pytest.mark.parametrize("layout", ["batch", "vocab"])
def test_jax_plain_loss_without_jit_on_sharded_inputs_equals_the_unsharded(jax_results, layout):
    error, scale = jax_results[f"plain eager {layout} sharded loss"]
    assert error <= TOLERANCE["float32"] * scale


def test_jax_arrays_committed_to_other_devices_are_refused_naming_them(jax_results):
    message = jax_results["eager other devices refused"]
    assert "all arrays must be on the same device" in message
    assert "position_mask on cpu:1" in message


@pytest.mark.parametrize("layout", ["batch", "vocab"])
def test_jax_plain_loss_under_jit_on_sharded_inputs_large_enough_to_chunk(jax_results, layout):
    """Above the size where the XLA routine loops over chunks of rows, sharded inputs (a mesh's
    explicit axes, ``jax.make_mesh``'s default) run unchunked on each device's shard: the
    unsharded result, no all-gather, and gradients laid out as the inputs."""
    name = f"plain jit {layout} sharded chunked"
    for result in ("loss", "grad_logits", "grad_targets"):
        error, scale = jax_results[f"{name} float32 {result}"]
        assert error <= TOLERANCE["float32"] * scale, result
    assert [op for op, _ in jax_results[f"collectives {name}"]] == ["all-reduce"] * len(
        jax_results[f"collectives {name}"]
    )
    layout_of_input = jax_results[f"{name} input layout"]
    assert jax_results[f"{name} gradient layout"] == [layout_of_input, layout_of_input]


def test_jax_linear_loss_inside_shard_map_equals_the_unsharded(jax_results):
    """Hidden states split over "data", the weight whole on every device: the chunk loop's carry
    varies over the axis, and the weight's gradient is summed over it."""
    for name in ("loss", "grad_hidden", "grad_weight"):
        error, scale = jax_results[f"linear inside shard_map {name}"]
        assert error <= TOLERANCE["float32"] * scale, name


def test_jax_targets_from_hidden_inside_shard_map_equal_the_unsharded(jax_results):
    error, same_mask = jax_results["targets inside shard_map"]
    assert error <= 1e-6
    assert same_mask


@pytest.mark.parametrize("name", ["linear", "targets"])
def test_jax_chunk_loops_refuse_arrays_split_by_explicit_axes(jax_results, name):
    message = jax_results[f"{name} on split arrays"]
    assert message is not None, "no error"
    assert "hidden P(('data', 'vocab')" in message  # the argument and its layout
    assert "jax.shard_map" in message


def test_jax_vocab_parallel_loss_and_count_inside_pmap(jax_results):
    for name in ("loss", "grad_logits", "grad_targets"):
        error, scale = jax_results[f"pmap {name}"]
        assert error <= TOLERANCE["float32"] * scale, name
    error, count = jax_results["pmap count"]
    assert error == 0
    assert count > 0


def test_jax_vocab_parallel_step_only_reduces_row_sized_vectors(jax_results):
    rows_per_block = (BATCH // 2) * SEQ
    found = jax_results["collectives vocab parallel"]
    assert found
    for operation, shape in found:
        assert operation == "all-reduce"
        sizes = [
            math.prod(int(size) for size in dims.split(",") if size)
            for dims in re.findall(r"\[([\d,]*)\]", shape)
        ]
        assert max(sizes) <= 3 * rows_per_block, shape


if __name__ == "__main__" and sys.argv[1:] == ["jax-checks"]:
    print(json.dumps(jax_checks()))
