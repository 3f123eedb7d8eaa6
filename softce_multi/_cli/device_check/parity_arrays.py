"""Parity on the device of the other array libraries: JAX (XLA and the Pallas kernels) and CuPy
(the generic path), against the same float64 torch reference.

The inputs are made with torch on the device and handed over through DLPack, so both sides
see the same values on the same GPU; the results come back to torch the same way.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from softce_multi._cli.device_check.inputs import (
    CASES,
    REDUCTIONS,
    UPSTREAM,
    Inputs,
    make_inputs,
    reference,
)
from softce_multi._cli.device_check.parity import compare, failed_row
from softce_multi._cli.device_check.plan import (
    LOW_PRECISION,
    Plan,
    free_device_memory,
    kernels_as_on_a_gpu,
    xla_only,
)


def _weighted_loss(
    logits: Any, targets: Any, mask: Any, num_valid: Any, upstream: Any, *, reduction: str
) -> tuple[Any, Any]:
    """``sum(loss * upstream)`` and the loss, for ``jax.value_and_grad``."""
    import jax.numpy as jnp

    import softce_multi

    loss = softce_multi.masked_soft_cross_entropy(
        logits,
        targets,
        mask,
        reduction=reduction,  # type: ignore[arg-type]
        num_valid=num_valid,
    )
    return jnp.sum(loss * upstream), loss


@functools.cache
def _jitted_value_and_grad(engine: str, reduction: str) -> Any:
    """The jitted loss and gradients of ``reduction``, one function per engine: jit's cache
    then keeps each engine's compilations apart (the engine changes what is traced, not the
    arguments), and the cases of a dtype and reduction share one compilation."""
    import jax

    loss = functools.partial(_weighted_loss, reduction=reduction)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _jax_value_and_grad(engine: str, inputs: Inputs) -> tuple[Any, Any, Any]:
    """The jitted loss and its gradients to the logits and the targets, for the case's
    upstream; arrays handed to JAX through DLPack."""
    import jax.numpy as jnp

    logits, targets, mask = (
        jnp.from_dlpack(x) for x in (inputs.logits, inputs.targets, inputs.mask)
    )
    num_valid = None if inputs.num_valid is None else jnp.from_dlpack(inputs.num_valid)
    upstream = inputs.upstream
    if not isinstance(upstream, float):
        upstream = jnp.from_dlpack(upstream)
    value_and_grad = _jitted_value_and_grad(engine, inputs.reduction)
    (_, loss), (grad_logits, grad_targets) = value_and_grad(
        logits, targets, mask, num_valid, upstream
    )
    return loss, grad_logits, grad_targets


def _jax_with_grad(inputs: Inputs) -> tuple[Any, Any, Any]:
    """``masked_soft_cross_entropy_with_grad`` on JAX arrays: the loss and gradient of
    upstream 1."""
    import jax.numpy as jnp

    import softce_multi

    arrays = (jnp.from_dlpack(x) for x in (inputs.logits, inputs.targets, inputs.mask))
    num_valid = None if inputs.num_valid is None else jnp.from_dlpack(inputs.num_valid)
    loss, grad = softce_multi.masked_soft_cross_entropy_with_grad(
        *arrays,
        reduction=inputs.reduction,  # type: ignore[arg-type]
        num_valid=num_valid,
    )
    return loss, grad, None


def jax_parity(plan: Plan, device: str, dry_run: bool) -> Iterator[dict[str, Any]]:
    """Rows of JAX on the device, through XLA alone and through the Pallas kernels."""
    engines: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
        "jax XLA": xla_only,
        "jax Pallas": lambda: kernels_as_on_a_gpu(dry_run),
    }
    for index, (shape, dtype, case, reduction) in enumerate(_jax_cases(plan)):
        label = {"shape": list(shape), "dtype": dtype, "case": case, "reduction": reduction}
        inputs = make_inputs(shape, dtype, case, reduction, device=device, seed=500 + index)
        expected = reference(inputs)
        for engine, context in engines.items():
            try:
                with context():
                    result = _jax_value_and_grad(engine, inputs)
                    yield compare(f"{engine} grad", label, inputs, expected, *result)
                    if inputs.reduction != "none":
                        result = _jax_with_grad(inputs)
                        name = f"{engine} with_grad"
                        yield compare(name, label, inputs, expected, *result, scale=UPSTREAM)
            except Exception as error:  # reported as a failing row
                yield failed_row(engine, label, error)
        del inputs, expected
        free_device_memory(device)


def _jax_cases(plan: Plan) -> itertools.chain[tuple[tuple[int, ...], str, str, str]]:
    """The first shape in every dtype with every case (the mean) and every reduction (the
    random case); the others in every dtype with the random case and the mean."""
    first, *rest = plan.jax_parity_shapes
    return itertools.chain(
        itertools.product([first], LOW_PRECISION, CASES, ["mean"]),
        itertools.product([first], LOW_PRECISION, ["random"], REDUCTIONS[1:]),
        itertools.product(rest, LOW_PRECISION, ["random"], ["mean"]),
    )


def cupy_parity(plan: Plan, device: str, dry_run: bool) -> Iterator[dict[str, Any]]:
    """Rows of CuPy (the generic path, ``masked_soft_cross_entropy_with_grad``)."""
    import cupy

    import softce_multi

    cases = itertools.product(
        plan.cupy_parity_shapes, ("float16", "float32"), CASES, ("mean", "sum")
    )
    for index, (shape, dtype, case, reduction) in enumerate(cases):
        label = {"shape": list(shape), "dtype": dtype, "case": case, "reduction": reduction}
        try:
            inputs = make_inputs(shape, dtype, case, reduction, device=device, seed=600 + index)
            expected = reference(inputs, targets_grad=False)
            arrays = (cupy.from_dlpack(x) for x in (inputs.logits, inputs.targets, inputs.mask))
            loss, grad = softce_multi.masked_soft_cross_entropy_with_grad(
                *arrays,
                reduction=inputs.reduction,  # type: ignore[arg-type]
            )
            yield compare("cupy with_grad", label, inputs, expected, loss, grad, scale=UPSTREAM)
        except Exception as error:  # reported as a failing row
            yield failed_row("cupy", label, error)
        free_device_memory(device)


def _vocab_parallel_objective(
    logits: Any, targets: Any, mask: Any, num_valid: Any, upstream: Any, *, reduction: str
) -> tuple[Any, Any]:
    """``vocab_parallel_masked_soft_cross_entropy`` under ``jax.shard_map`` over a mesh of this
    one device, the vocabulary along its axis: ``sum(loss * upstream)`` and the loss."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from softce_multi.distributed import vocab_parallel_masked_soft_cross_entropy

    mesh = Mesh(np.array(jax.devices()[:1]), ("vocab",))

    def shard(z: Any, p: Any, w: Any, count: Any) -> Any:
        return vocab_parallel_masked_soft_cross_entropy(
            z,
            p,
            w,
            axis_name="vocab",
            reduction=reduction,  # type: ignore[arg-type]
            num_valid=count,
        )

    vocabulary = P(None, None, "vocab")
    loss = jax.shard_map(
        shard, mesh=mesh, in_specs=(vocabulary, vocabulary, P(), P()), out_specs=P()
    )(logits, targets, mask, num_valid)
    return jnp.sum(loss * upstream), loss


def jax_distributed_rows(plan: Plan, device: str, dry_run: bool) -> Iterator[dict[str, Any]]:
    """``vocab_parallel_masked_soft_cross_entropy`` on a one-device mesh (``jax.shard_map``),
    jitted with its gradients, against the reference, per dtype and reduction."""
    import jax
    import jax.numpy as jnp

    shape = plan.jax_parity_shapes[0]
    name = "jax vocab-parallel (shard_map, one device)"
    for index, (dtype, reduction) in enumerate(
        itertools.product(LOW_PRECISION, ("mean", "none", "mean with num_valid"))
    ):
        label = {"shape": list(shape), "dtype": dtype, "case": "random", "reduction": reduction}
        try:
            inputs = make_inputs(shape, dtype, "random", reduction, device=device, seed=650 + index)
            arrays = [jnp.from_dlpack(x) for x in (inputs.logits, inputs.targets, inputs.mask)]
            count = None if inputs.num_valid is None else jnp.from_dlpack(inputs.num_valid)
            upstream = inputs.upstream
            if not isinstance(upstream, float):
                upstream = jnp.from_dlpack(upstream)
            objective = functools.partial(_vocab_parallel_objective, reduction=inputs.reduction)
            step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))
            (_, loss), (grad_logits, grad_targets) = step(*arrays, count, upstream)
            yield compare(name, label, inputs, reference(inputs), loss, grad_logits, grad_targets)
        except Exception as error:  # reported as a failing row
            yield failed_row(name, label, error)
