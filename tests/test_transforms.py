"""Under jax.jit, jax.vmap and torch.compile the loss and its gradients equal eager results."""

from __future__ import annotations

import numpy as np
import pytest

import softce_multi as sc
from softce_multi.testing import (
    REDUCTIONS,
    is_installed,
    random_inputs,
    to_numpy,
)

needs_torch = pytest.mark.skipif(not is_installed("torch"), reason="torch not installed")
needs_jax = pytest.mark.skipif(not is_installed("jax"), reason="jax not installed")

#: Compiled and eager float32 programs may round differently; they agree to this tolerance.
RTOL = 1e-6


def numpy_inputs(seed, shape=(3, 4, 9)):
    return random_inputs(seed, shape).astype("float32")


def jax_inputs(seed, shape=(3, 4, 9)):
    jnp = pytest.importorskip("jax.numpy")
    return tuple(jnp.asarray(array) for array in numpy_inputs(seed, shape))


def assert_all_close(actual, expected):
    actual, expected = to_numpy(actual), to_numpy(expected)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


# --------------------------------------------------------------------------------------------
# jax.jit
# --------------------------------------------------------------------------------------------


EAGER_JAX_CALLS = {
    "loss": lambda z, p, w, h, W: sc.masked_soft_cross_entropy(z, p, w),
    "loss_with_grad": lambda z, p, w, h, W: sc.masked_soft_cross_entropy_with_grad(z, p, w),
    "grad": lambda z, p, w, h, W: _jax_grad_of_loss()(z, p, w),
    "linear": lambda z, p, w, h, W: sc.linear_masked_soft_cross_entropy(h, W, p, w),
    "linear_with_grad": (
        lambda z, p, w, h, W: sc.linear_masked_soft_cross_entropy_with_grad(h, W, p, w)
    ),
}


def _jax_grad_of_loss():
    import jax

    return jax.grad(sc.masked_soft_cross_entropy)


@needs_jax
@pytest.mark.parametrize("call", EAGER_JAX_CALLS.values(), ids=EAGER_JAX_CALLS.keys())
def test_jax_eager_calls_compile_once_per_shape(call, caplog):
    """A second eager call on new values of the same shapes runs the cached compilation."""
    import logging

    import jax

    def arrays(seed):
        logits, targets, mask = jax_inputs(seed)
        rng = np.random.default_rng(seed)
        hidden = jax.numpy.asarray(rng.standard_normal((*mask.shape, 5)), dtype="float32")
        weight = jax.numpy.asarray(rng.standard_normal((logits.shape[-1], 5)), dtype="float32")
        return logits, targets, mask, hidden, weight

    jax.block_until_ready(call(*arrays(0)))
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        caplog.clear()
        jax.block_until_ready(call(*arrays(1)))

    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == []


@needs_jax
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_jit_loss_equals_eager(reduction):
    jax = pytest.importorskip("jax")
    logits, targets, mask = jax_inputs(0)

    def loss(z, p, w):
        return sc.masked_soft_cross_entropy(z, p, w, reduction=reduction)

    assert_all_close(jax.jit(loss)(logits, targets, mask), loss(logits, targets, mask))


@needs_jax
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_jit_grad_equals_eager_grad(reduction):
    jax = pytest.importorskip("jax")
    logits, targets, mask = jax_inputs(1)

    def summed(z, p, w):
        return sc.masked_soft_cross_entropy(z, p, w, reduction=reduction).sum()

    grad = jax.grad(summed, argnums=(0, 1))
    for compiled, eager in zip(
        jax.jit(grad)(logits, targets, mask), grad(logits, targets, mask), strict=True
    ):
        assert_all_close(compiled, eager)


@needs_jax
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_jax_jit_with_grad_equals_eager(reduction):
    jax = pytest.importorskip("jax")
    logits, targets, mask = jax_inputs(2)

    def loss_and_grad(z, p, w):
        return sc.masked_soft_cross_entropy_with_grad(z, p, w, reduction=reduction)

    for compiled, eager in zip(
        jax.jit(loss_and_grad)(logits, targets, mask),
        loss_and_grad(logits, targets, mask),
        strict=True,
    ):
        assert_all_close(compiled, eager)


@needs_jax
def test_jax_jit_with_a_traced_num_valid_equals_eager_with_a_number():
    jax = pytest.importorskip("jax")
    logits, targets, mask = jax_inputs(3)

    def loss(z, p, w, n):
        return sc.masked_soft_cross_entropy_with_grad(z, p, w, num_valid=n)

    compiled = jax.jit(loss)(logits, targets, mask, jax.numpy.asarray(7))
    eager = loss(logits, targets, mask, 7)

    for compiled_part, eager_part in zip(compiled, eager, strict=True):
        assert_all_close(compiled_part, eager_part)


@needs_jax
def test_jax_module_entry_point_works_under_jit_and_grad():
    jax = pytest.importorskip("jax")
    from softce_multi.jax import masked_soft_cross_entropy

    logits, targets, mask = jax_inputs(4)

    compiled = jax.jit(jax.value_and_grad(masked_soft_cross_entropy))(logits, targets, mask)
    eager = jax.value_and_grad(sc.masked_soft_cross_entropy)(logits, targets, mask)

    for compiled_part, eager_part in zip(compiled, eager, strict=True):
        assert_all_close(compiled_part, eager_part)


# --------------------------------------------------------------------------------------------
# jax.vmap
# --------------------------------------------------------------------------------------------


@needs_jax
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_vmap_equals_a_loop_over_the_batch(reduction):
    jax = pytest.importorskip("jax")
    logits, targets, mask = jax_inputs(5)

    def loss(z, p, w):
        return sc.masked_soft_cross_entropy(z, p, w, reduction=reduction)

    batched = jax.vmap(loss)(logits, targets, mask)
    looped = [loss(logits[i], targets[i], mask[i]) for i in range(logits.shape[0])]

    assert_all_close(batched, np.stack(looped))


@needs_jax
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_vmap_of_grad_equals_a_loop_over_the_batch(reduction):
    jax = pytest.importorskip("jax")
    logits, targets, mask = jax_inputs(6)

    def summed(z, p, w):
        return sc.masked_soft_cross_entropy(z, p, w, reduction=reduction).sum()

    grad = jax.grad(summed, argnums=(0, 1))
    batched = jax.vmap(grad)(logits, targets, mask)
    looped = [grad(logits[i], targets[i], mask[i]) for i in range(logits.shape[0])]

    for part in range(2):
        assert_all_close(batched[part], np.stack([grads[part] for grads in looped]))


@needs_jax
def test_jax_vmap_of_with_grad_equals_a_loop_over_the_batch():
    jax = pytest.importorskip("jax")
    logits, targets, mask = jax_inputs(7)

    batched = jax.vmap(sc.masked_soft_cross_entropy_with_grad)(logits, targets, mask)
    looped = [
        sc.masked_soft_cross_entropy_with_grad(logits[i], targets[i], mask[i])
        for i in range(logits.shape[0])
    ]

    for part in range(2):
        assert_all_close(batched[part], np.stack([result[part] for result in looped]))


@needs_jax
def test_jax_vmap_with_a_num_valid_per_example():
    jax = pytest.importorskip("jax")
    logits, targets, mask = jax_inputs(8)
    counts = [5, 0, 2]

    def loss(z, p, w, n):
        return sc.masked_soft_cross_entropy(z, p, w, num_valid=n)

    batched = jax.vmap(loss)(logits, targets, mask, jax.numpy.asarray(counts))
    looped = [loss(logits[i], targets[i], mask[i], count) for i, count in enumerate(counts)]

    assert_all_close(batched, np.stack(looped))
    assert batched[1] == 0


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


@needs_torch
@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_loss_and_gradients_equal_eager():
    # The public entry point of the package, through its dispatch to the torch adapter. The
    # "aot_eager" backend runs Dynamo's tracing and AOTAutograd, where graph breaks and
    # autograd.Function handling happen; tests/test_torch_operators.py compiles the torch adapter
    # with fullgraph=True on aot_eager and Inductor.
    torch = pytest.importorskip("torch")
    logits, targets, mask = (torch.from_numpy(array) for array in numpy_inputs(9))
    compiled_loss = torch.compile(sc.masked_soft_cross_entropy, backend="aot_eager")

    eager_logits = logits.clone().requires_grad_(True)
    eager_targets = targets.clone().requires_grad_(True)
    eager = sc.masked_soft_cross_entropy(eager_logits, eager_targets, mask)
    eager.backward()
    compiled_logits = logits.clone().requires_grad_(True)
    compiled_targets = targets.clone().requires_grad_(True)
    compiled = compiled_loss(compiled_logits, compiled_targets, mask)
    compiled.backward()

    assert_all_close(compiled.detach(), eager.detach())
    assert_all_close(compiled_logits.grad, eager_logits.grad)
    assert_all_close(compiled_targets.grad, eager_targets.grad)
