"""The JAX losses exported with ``jax.export``, on concrete and on symbolic shapes.

A program exported with symbolic batch and sequence sizes serves every size: the loops over
chunks of rows cannot be planned on a size that is an expression, so its rows go in one chunk.
The exported program, called on inputs of two sizes, gives the float64 reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import softce_multi as sc
from softce_multi.testing import (
    assert_gradient_close,
    assert_loss_close,
    dense_targets,
    known_backends,
    make_case,
    reference,
)

jax = pytest.importorskip("jax", reason="jax not installed")
jnp = jax.numpy
export = pytest.importorskip("jax.export", reason="this jax has no jax.export")

VOCAB, HIDDEN = 13, 6


def symbolic_shapes(*shapes: tuple[Any, ...], dtypes: tuple[Any, ...]) -> list[Any]:
    return [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in zip(shapes, dtypes, strict=True)]


def positions() -> tuple[Any, Any]:
    return export.symbolic_shape("b, s")


def jax_case(seed: int, batch: int, seq: int) -> Any:
    backend = next(b for b in known_backends() if b.library == "jax" and b.device == "cpu")
    return make_case(backend, np.random.default_rng(seed), (batch, seq, VOCAB))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_exported_on_symbolic_positions_equals_the_reference_at_two_sizes(reduction):
    b, s = positions()
    specs = symbolic_shapes(
        (b, s, VOCAB), (b, s, VOCAB), (b, s), dtypes=(jnp.float32, jnp.float32, jnp.bool_)
    )
    exported = export.export(
        jax.jit(lambda z, p, w: sc.masked_soft_cross_entropy(z, p, w, reduction=reduction))
    )(*specs)

    for seed, (batch, seq) in enumerate([(2, 5), (3, 7)]):
        case = jax_case(seed, batch, seq)
        mask = case.position_mask != 0

        loss = exported.call(case.logits, case.target_probs, mask)

        assert_loss_close(loss, reference(case.z, case.p, case.w != 0, reduction=reduction).loss)


def test_gradient_exported_on_symbolic_positions_equals_the_reference():
    b, s = positions()
    specs = symbolic_shapes(
        (b, s, VOCAB), (b, s, VOCAB), (b, s), dtypes=(jnp.float32, jnp.float32, jnp.bool_)
    )
    exported = export.export(jax.jit(jax.grad(sc.masked_soft_cross_entropy)))(*specs)
    case = jax_case(10, 3, 4)
    mask = case.position_mask != 0

    grad = exported.call(case.logits, case.target_probs, mask)

    assert_gradient_close(grad, reference(case.z, case.p, case.w != 0).grad_logits)


def test_sparse_loss_exported_on_symbolic_positions_equals_the_dense_reference():
    b, s = positions()
    k = 3
    specs = symbolic_shapes(
        (b, s, VOCAB),
        (b, s, k),
        (b, s),
        (b, s, k),
        dtypes=(jnp.float32, jnp.float32, jnp.bool_, jnp.int32),
    )
    exported = export.export(
        jax.jit(lambda z, p, w, i: sc.masked_soft_cross_entropy(z, p, w, target_ids=i))
    )(*specs)
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((2, 6, VOCAB))
    probs = rng.dirichlet(np.ones(k), (2, 6)) * rng.uniform(0.5, 1.0, (2, 6, 1))
    ids = rng.integers(0, VOCAB, (2, 6, k))
    mask = rng.random((2, 6)) < 0.7
    as_jax = [jnp.asarray(x, jnp.float32) for x in (logits, probs)]

    loss = exported.call(*as_jax, jnp.asarray(mask), jnp.asarray(ids, jnp.int32))

    targets = dense_targets(ids, np.asarray(as_jax[1], np.float64), VOCAB)
    assert_loss_close(loss, reference(np.asarray(as_jax[0], np.float64), targets, mask).loss)


def test_linear_loss_and_gradients_exported_on_symbolic_positions_equal_the_unexported():
    b, s = positions()
    specs = symbolic_shapes(
        (b, s, HIDDEN),
        (VOCAB, HIDDEN),
        (b, s, VOCAB),
        (b, s),
        dtypes=(jnp.float32, jnp.float32, jnp.float32, jnp.bool_),
    )
    value_and_grad = jax.value_and_grad(sc.linear_masked_soft_cross_entropy, argnums=(0, 1))
    exported = export.export(jax.jit(value_and_grad))(*specs)
    rng = np.random.default_rng(12)
    hidden = jnp.asarray(rng.standard_normal((3, 5, HIDDEN)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((VOCAB, HIDDEN)), jnp.float32)
    targets = jnp.asarray(rng.dirichlet(np.ones(VOCAB), (3, 5)), jnp.float32)
    mask = jnp.asarray(rng.random((3, 5)) < 0.7)

    loss, grads = exported.call(hidden, weight, targets, mask)

    expected_loss, expected_grads = value_and_grad(hidden, weight, targets, mask)
    assert_loss_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert_gradient_close(grad, expected)


def test_linear_loss_exported_on_a_symbolic_hidden_size_equals_the_unexported():
    # The default chunk takes H rows where H is a number; a symbolic H leaves the byte budget.
    b, s, hidden_size = export.symbolic_shape("b, s, h")
    specs = symbolic_shapes(
        (b, s, hidden_size),
        (VOCAB, hidden_size),
        (b, s, VOCAB),
        (b, s),
        dtypes=(jnp.float32, jnp.float32, jnp.float32, jnp.bool_),
    )
    value_and_grad = jax.value_and_grad(sc.linear_masked_soft_cross_entropy, argnums=(0, 1))
    exported = export.export(jax.jit(value_and_grad))(*specs)
    rng = np.random.default_rng(13)
    hidden = jnp.asarray(rng.standard_normal((2, 3, HIDDEN)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((VOCAB, HIDDEN)), jnp.float32)
    targets = jnp.asarray(rng.dirichlet(np.ones(VOCAB), (2, 3)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 3)) < 0.7)

    loss, grads = exported.call(hidden, weight, targets, mask)

    expected_loss, expected_grads = value_and_grad(hidden, weight, targets, mask)
    assert_loss_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert_gradient_close(grad, expected)
