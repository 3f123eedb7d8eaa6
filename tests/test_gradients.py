"""Gradients: finite-difference checks and the torch autograd adapter's behaviour."""

from __future__ import annotations

import numpy as np
import pytest

import softce_multi as sc
from softce_multi.testing import (
    REDUCTIONS,
    assert_gradient_close,
    assert_loss_close,
    is_installed,
    random_inputs,
    random_targets,
    reference,
    to_numpy,
)

needs_torch = pytest.mark.skipif(not is_installed("torch"), reason="torch not installed")
needs_jax = pytest.mark.skipif(not is_installed("jax"), reason="jax not installed")


def float64_inputs(seed, shape=(2, 3, 5)):
    """Normal logits, unnormalised targets and a fractional weight mask, float64 NumPy."""
    return random_inputs(seed, shape, scale=2.0, normalised=False, mask_kind="float")


def torch_inputs(seed, shape=(2, 3, 5), dtype="float32", requires_grad=True):
    torch = pytest.importorskip("torch")
    logits, targets, mask = float64_inputs(seed, shape)
    torch_dtype = getattr(torch, dtype)
    return (
        torch.tensor(logits, dtype=torch_dtype, requires_grad=requires_grad),
        torch.tensor(targets, dtype=torch_dtype, requires_grad=requires_grad),
        torch.tensor(mask > 0),
    )


def reference_of(logits, targets, mask, **kwargs):
    """The float64 reference for torch tensors."""
    return reference(
        logits.detach().double().numpy(),
        targets.detach().double().numpy(),
        mask.double().numpy(),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------
# Finite differences
# --------------------------------------------------------------------------------------------

# num_valid only exists for "mean".
REDUCTION_CASES = [(reduction, None) for reduction in REDUCTIONS] + [("mean", 4.0)]


def torch_float64_loss(seed, reduction, num_valid):
    """Our loss of two float64 leaves, as a function for gradcheck, and the leaves."""
    torch = pytest.importorskip("torch")
    logits, targets, mask = (torch.from_numpy(a) for a in float64_inputs(seed))

    def loss(z, p):
        return sc.masked_soft_cross_entropy(z, p, mask, reduction=reduction, num_valid=num_valid)

    return loss, (logits.requires_grad_(True), targets.requires_grad_(True))


@needs_torch
@pytest.mark.parametrize(("reduction", "num_valid"), REDUCTION_CASES)
def test_torch_gradcheck_in_float64(reduction, num_valid):
    # At the default settings, which include running backward twice and finding the results
    # identical (the gradient made in forward is never written).
    torch = pytest.importorskip("torch")
    loss, inputs = torch_float64_loss(0, reduction, num_valid)

    assert torch.autograd.gradcheck(loss, inputs)


@needs_torch
@pytest.mark.parametrize(("reduction", "num_valid"), REDUCTION_CASES)
def test_torch_gradgradcheck_in_float64(reduction, num_valid):
    torch = pytest.importorskip("torch")
    loss, inputs = torch_float64_loss(17, reduction, num_valid)

    assert torch.autograd.gradgradcheck(loss, inputs)


@needs_jax
@pytest.mark.parametrize(("reduction", "num_valid"), REDUCTION_CASES)
def test_jax_check_grads_in_float64(reduction, num_valid):
    jax = pytest.importorskip("jax")
    from jax.test_util import check_grads

    logits, targets, mask = (jax.numpy.asarray(a) for a in float64_inputs(1))

    def loss(z, p):
        # check_grads evaluates the finite differences on NumPy arrays; the loss wants JAX ones.
        z, p = jax.numpy.asarray(z), jax.numpy.asarray(p)
        return sc.masked_soft_cross_entropy(z, p, mask, reduction=reduction, num_valid=num_valid)

    check_grads(loss, (logits, targets), order=1, modes=["rev"], eps=1e-6)


@needs_jax
def test_jax_grad_of_the_mask_is_zero():
    jax = pytest.importorskip("jax")
    logits, targets, mask = (jax.numpy.asarray(a) for a in float64_inputs(2))

    grad = jax.grad(sc.masked_soft_cross_entropy, argnums=2)(logits, targets, mask)

    assert grad.shape == mask.shape
    assert (grad == 0).all()


# --------------------------------------------------------------------------------------------
# torch autograd adapter
# --------------------------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_with_grad_equals_autograd_of_the_reference(reduction):
    logits, targets, mask = torch_inputs(3)
    expected = reference_of(logits, targets, mask, reduction=reduction)

    loss, grad = sc.masked_soft_cross_entropy_with_grad(
        logits.detach(), targets.detach(), mask, reduction=reduction
    )

    assert_loss_close(loss, expected.loss, "float32")
    assert_gradient_close(grad, expected.grad_logits, "float32")


@needs_torch
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_with_grad_equals_autograd_of_the_loss(reduction):
    logits, targets, mask = torch_inputs(4)
    sc.masked_soft_cross_entropy(logits, targets, mask, reduction=reduction).backward()

    _, grad = sc.masked_soft_cross_entropy_with_grad(
        logits.detach(), targets.detach(), mask, reduction=reduction
    )

    assert_gradient_close(grad, logits.grad.double().numpy(), "float32")


@needs_torch
@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 4, 32000)], ids=["one block", "several blocks"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_with_grad_accepts_tensors_that_require_grad(reduction, shape):
    # A model's output requires grad; with_grad must still return the loss and its gradient.
    logits, targets, mask = torch_inputs(5, shape=shape)
    expected = reference_of(logits, targets, mask, reduction=reduction)

    loss, grad = sc.masked_soft_cross_entropy_with_grad(logits, targets, mask, reduction=reduction)

    assert_loss_close(loss, expected.loss, "float32")
    assert_gradient_close(grad, expected.grad_logits, "float32")


@needs_torch
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_backward_twice_with_retain_graph_gives_the_same_gradient(reduction):
    # The gradient buffer made in forward is saved and scaled out of place: the second backward
    # finds it unchanged, and for "none" both recompute from the same statistics.
    torch = pytest.importorskip("torch")
    logits, targets, mask = torch_inputs(6)
    loss = sc.masked_soft_cross_entropy(logits, targets, mask, reduction=reduction).sum()
    upstream = torch.tensor(1.5)
    expected = reference_of(logits, targets, mask, reduction=reduction, upstream=1.5)

    first = torch.autograd.grad(loss, (logits, targets), upstream, retain_graph=True)
    second = torch.autograd.grad(loss, (logits, targets), upstream)

    for first_grad, second_grad in zip(first, second, strict=True):
        assert torch.equal(first_grad, second_grad)
    assert_gradient_close(first[0], expected.grad_logits, "float32")
    assert_gradient_close(first[1], expected.grad_targets, "float32")


@needs_torch
@pytest.mark.parametrize("upstream", [None, 1.0], ids=["implicit", "unit"])
def test_torch_autograd_grad_twice_returns_gradients_the_caller_owns(upstream):
    """Two ``torch.autograd.grad`` calls through a retained graph return two tensors: changing
    the first in place leaves the second, and a third, equal to the reference."""
    torch = pytest.importorskip("torch")
    logits, targets, mask = torch_inputs(21)
    loss = sc.masked_soft_cross_entropy(logits, targets, mask)
    grad_outputs = None if upstream is None else torch.tensor(upstream)
    expected = reference_of(logits, targets, mask)

    (first,) = torch.autograd.grad(loss, logits, grad_outputs, retain_graph=True)
    first.mul_(0.5)
    (second,) = torch.autograd.grad(loss, logits, grad_outputs, retain_graph=True)
    second.zero_()
    (third,) = torch.autograd.grad(loss, logits, grad_outputs)

    assert_gradient_close(2 * first, expected.grad_logits, "float32")
    assert_gradient_close(third, expected.grad_logits, "float32")


@needs_torch
def test_torch_gradients_accumulate_over_two_backward_passes():
    logits, targets, mask = torch_inputs(7)
    loss = sc.masked_soft_cross_entropy(logits, targets, mask)
    expected = reference_of(logits, targets, mask)

    loss.backward(retain_graph=True)
    loss.backward()

    assert_gradient_close(logits.grad, 2 * expected.grad_logits, "float32")
    assert_gradient_close(targets.grad, 2 * expected.grad_targets, "float32")


@needs_torch
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_backward_scales_by_a_non_unit_upstream_gradient(reduction):
    logits, targets, mask = torch_inputs(8)
    expected = reference_of(logits, targets, mask, reduction=reduction, upstream=3.5)

    (
        sc.masked_soft_cross_entropy(logits, targets, mask, reduction=reduction) * 3.5
    ).sum().backward()

    assert_gradient_close(logits.grad, expected.grad_logits, "float32")
    assert_gradient_close(targets.grad, expected.grad_targets, "float32")


@needs_torch
def test_torch_backward_of_per_position_losses_uses_each_upstream_value():
    torch = pytest.importorskip("torch")
    logits, targets, mask = torch_inputs(9)
    upstream = torch.linspace(-2.0, 3.0, 6).reshape(2, 3)
    expected = reference_of(logits, targets, mask, reduction="none", upstream=upstream.numpy())

    sc.masked_soft_cross_entropy(logits, targets, mask, reduction="none").backward(upstream)

    assert_gradient_close(logits.grad, expected.grad_logits, "float32")
    assert_gradient_close(targets.grad, expected.grad_targets, "float32")


@needs_torch
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_gradient_to_targets_alone(reduction):
    logits, targets, mask = torch_inputs(10)
    logits.requires_grad_(False)
    expected = reference_of(logits, targets, mask, reduction=reduction)

    sc.masked_soft_cross_entropy(logits, targets, mask, reduction=reduction).sum().backward()

    assert logits.grad is None
    assert_gradient_close(targets.grad, expected.grad_targets, "float32")


@needs_torch
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_gradient_to_logits_alone(reduction):
    logits, targets, mask = torch_inputs(11)
    targets.requires_grad_(False)
    expected = reference_of(logits, targets, mask, reduction=reduction)

    sc.masked_soft_cross_entropy(logits, targets, mask, reduction=reduction).sum().backward()

    assert targets.grad is None
    assert_gradient_close(logits.grad, expected.grad_logits, "float32")


@needs_torch
def test_torch_mask_gets_no_gradient():
    torch = pytest.importorskip("torch")
    logits, targets, mask = torch_inputs(12)
    weights = mask.to(torch.float32).requires_grad_(True)

    sc.masked_soft_cross_entropy(logits, targets, weights).backward()

    assert weights.grad is None
    assert logits.grad is not None


@needs_torch
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_module_matches_the_function_and_trains(reduction):
    from softce_multi.torch import MaskedSoftCrossEntropy

    logits, targets, mask = torch_inputs(13)
    criterion = MaskedSoftCrossEntropy(reduction=reduction)
    expected = reference_of(logits, targets, mask, reduction=reduction)

    loss = criterion(logits, targets, mask)
    loss.sum().backward()

    assert_loss_close(loss, expected.loss, "float32")
    assert_gradient_close(logits.grad, expected.grad_logits, "float32")
    assert repr(criterion) == f"MaskedSoftCrossEntropy(reduction={reduction!r})"


@needs_torch
def test_torch_module_passes_num_valid():
    from softce_multi.torch import MaskedSoftCrossEntropy

    logits, targets, mask = torch_inputs(14)
    expected = reference_of(logits, targets, mask, num_valid=9)

    loss = MaskedSoftCrossEntropy()(logits, targets, mask, num_valid=9)
    loss.backward()

    assert_loss_close(loss, expected.loss, "float32")
    assert_gradient_close(logits.grad, expected.grad_logits, "float32")


@needs_torch
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_no_grad_gives_the_same_value_without_a_graph(reduction):
    torch = pytest.importorskip("torch")
    logits, targets, mask = torch_inputs(15)
    with_graph = sc.masked_soft_cross_entropy(logits, targets, mask, reduction=reduction)

    with torch.no_grad():
        without_graph = sc.masked_soft_cross_entropy(logits, targets, mask, reduction=reduction)

    assert without_graph.grad_fn is None
    assert not without_graph.requires_grad
    torch.testing.assert_close(without_graph, with_graph.detach(), rtol=1e-6, atol=0)


@needs_torch
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_low_precision_gradients_match_the_reference_on_rounded_values(dtype):
    logits, targets, mask = torch_inputs(16, shape=(4, 6, 33), dtype=dtype)
    expected = reference_of(logits, targets, mask)

    loss = sc.masked_soft_cross_entropy(logits, targets, mask)
    loss.backward()

    assert_loss_close(loss, expected.loss, "float32")
    assert_gradient_close(logits.grad, expected.grad_logits, "float32")
    assert_gradient_close(targets.grad, expected.grad_targets, "float32")


# --------------------------------------------------------------------------------------------
# Second derivatives at padding
# --------------------------------------------------------------------------------------------


def padded_inputs(seed):
    """Float64 inputs whose two padding positions hold NaN and inf, and the same inputs with
    zeros there (finite, for the reference)."""
    logits, targets, _ = float64_inputs(seed, (2, 4, 7))
    mask = np.ones((2, 4), dtype=bool)
    mask[0, 1] = mask[1, 2] = False
    finite = (np.where(mask[..., None], logits, 0.0), np.where(mask[..., None], targets, 0.0))
    logits, targets = logits.copy(), targets.copy()
    logits[0, 1], targets[0, 1] = np.nan, np.nan
    logits[1, 2, 3] = np.inf
    return (logits, targets, mask), finite


def jax_penalty_gradient(loss, logits):
    """The gradient of the gradient penalty ``sum(grad(loss)(z) ** 2)``."""
    import jax
    import jax.numpy as jnp

    return jax.grad(lambda z: jnp.sum(jax.grad(loss)(z) ** 2))(logits)


@needs_jax
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_gradient_penalty_is_exactly_zero_at_padding(reduction):
    """NaN and inf at padding reach no derivative of any order: the gradient of a gradient
    penalty is exactly 0 there and, elsewhere, that of the same inputs with zeros at padding."""
    import jax.numpy as jnp

    (logits, targets, mask), (finite_logits, _) = padded_inputs(1)
    targets = jnp.asarray(np.where(mask[..., None], targets, 0.0), jnp.float32)

    def loss(z):
        return sc.masked_soft_cross_entropy(
            logits=z, target_probs=targets, position_mask=jnp.asarray(mask), reduction=reduction
        ).sum()

    padded = jax_penalty_gradient(loss, jnp.asarray(logits, jnp.float32))
    finite = jax_penalty_gradient(loss, jnp.asarray(finite_logits, jnp.float32))

    assert np.all(np.asarray(padded)[~mask] == 0)
    np.testing.assert_array_equal(np.asarray(padded), np.asarray(finite))


@needs_jax
def test_jax_hessian_is_finite_with_nan_at_padding():
    import jax
    import jax.numpy as jnp

    (logits, targets, mask), (finite_logits, finite_targets) = padded_inputs(2)

    def hessian(z, p):
        return jax.hessian(lambda z: sc.masked_soft_cross_entropy(z, p, jnp.asarray(mask)))(
            jnp.asarray(z, jnp.float32)
        )

    padded = np.asarray(hessian(logits, jnp.asarray(targets, jnp.float32)))
    finite = np.asarray(hessian(finite_logits, jnp.asarray(finite_targets, jnp.float32)))

    np.testing.assert_array_equal(padded, finite)
    assert np.all(padded[~mask] == 0)


@needs_jax
def test_jax_linear_loss_gradient_penalty_is_finite_with_nan_hidden_at_padding():
    """The second derivatives to the weight stay finite, and the hidden rows of padding get
    exactly 0, when those rows hold NaN."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    mask = np.ones((2, 4), dtype=bool)
    mask[0, 1] = False
    hidden = rng.standard_normal((2, 4, 5))
    weight = jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)
    targets = jnp.asarray(random_targets(rng, (2, 4, 7)), jnp.float32)

    def penalty(h, w):
        grads = jax.grad(
            lambda h, w: sc.linear_masked_soft_cross_entropy(
                h, w, targets, jnp.asarray(mask), bias=jnp.zeros(7)
            ),
            argnums=(0, 1),
        )(h, w)
        return sum(jnp.sum(g**2) for g in grads)

    def penalty_gradients(h):
        return jax.grad(penalty, argnums=(0, 1))(jnp.asarray(h, jnp.float32), weight)

    with_nan = np.where(mask[..., None], hidden, np.nan)
    padded = penalty_gradients(with_nan)
    finite = penalty_gradients(np.where(mask[..., None], hidden, 0.0))

    assert np.all(np.asarray(padded[0])[~mask] == 0)
    for got, want in zip(padded, finite, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@needs_torch
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_gradient_penalty_is_exactly_zero_at_padding(reduction):
    import torch

    (logits, targets, mask), (finite_logits, _) = padded_inputs(4)
    targets_tensor = torch.tensor(np.where(mask[..., None], targets, 0.0))

    def penalty_gradient(z):
        leaf = torch.tensor(z, requires_grad=True)
        loss = sc.masked_soft_cross_entropy(
            logits=leaf,
            target_probs=targets_tensor,
            position_mask=torch.tensor(mask),
            reduction=reduction,
        ).sum()
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
        (second,) = torch.autograd.grad(grad.pow(2).sum(), leaf)
        return second.numpy()

    padded, finite = penalty_gradient(logits), penalty_gradient(finite_logits)

    assert np.all(padded[~mask] == 0)
    np.testing.assert_array_equal(padded, finite)


@needs_jax
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_jax_second_derivatives_of_16_bit_logits_are_those_of_their_values(dtype):
    """The XLA routines move 16-bit arrays as their bits, which JAX cannot differentiate; the
    derivative of a gradient penalty must still be that of the same values in float32, not 0."""
    import jax
    import jax.numpy as jnp

    logits, targets, mask = float64_inputs(5, (2, 6, 11))
    half = jnp.asarray(logits, getattr(jnp, dtype))
    targets, mask = jnp.asarray(targets, jnp.float32), jnp.asarray(mask)

    def penalty_gradient(z):
        def gradient_norm(z):
            grad = jax.grad(lambda z: sc.masked_soft_cross_entropy(z, targets, mask))(z)
            return jnp.sum(jnp.astype(grad, jnp.float32) ** 2)

        return np.asarray(jnp.astype(jax.grad(gradient_norm)(z), jnp.float32))

    got, want = penalty_gradient(half), penalty_gradient(jnp.astype(half, jnp.float32))

    assert np.any(got != 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())


@needs_torch
def test_torch_vocab_parallel_linear_second_derivative_beside_another_term_is_refused(
    group_of_one,
):
    """The vocabulary-parallel linear loss is differentiable once: a gradient penalty plus
    another term raises rather than drop the penalty's term."""
    import torch

    from softce_multi import distributed

    _, targets, mask = torch_inputs(6, shape=(2, 3, 7), dtype="float64")
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    loss = distributed.vocab_parallel_linear_masked_soft_cross_entropy(
        hidden, weight, targets.detach(), mask
    )
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)

    with pytest.raises(RuntimeError, match="differentiable once"):
        (grad.pow(2).sum() + weight.pow(2).sum()).backward()


@needs_torch
def test_torch_vocab_parallel_linear_second_derivative_through_autograd_grad_is_refused(
    group_of_one,
):
    """``torch.autograd.grad`` of a gradient penalty plus weight decay, to ``hidden`` alone,
    meets the refusal as ``backward()`` does: the penalty's term is never dropped."""
    import torch

    from softce_multi import distributed

    _, targets, mask = torch_inputs(22, shape=(2, 3, 7), dtype="float64")
    weight = torch.randn(7, 4, dtype=torch.float64)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    loss = distributed.vocab_parallel_linear_masked_soft_cross_entropy(
        hidden, weight, targets.detach(), mask
    )
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)

    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(grad.pow(2).sum() + hidden.pow(2).sum(), hidden)


@needs_torch
def test_torch_vocab_parallel_gradient_penalty_beside_another_term_matches_one_device(
    group_of_one,
):
    """The vocabulary-parallel loss of logits is differentiable twice: on a group of one, a
    gradient penalty plus another term has the derivatives of the single-device loss's."""
    import torch

    from softce_multi import distributed

    logits, targets, mask = torch_inputs(6, shape=(2, 3, 7), dtype="float64")
    targets = targets.detach()
    scale = torch.randn(7, dtype=torch.float64, requires_grad=True)

    def penalty_gradients(loss_function):
        z = logits.detach().clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss_function(z * scale, targets, mask), z, create_graph=True)
        return torch.autograd.grad(grad.pow(2).sum() + scale.pow(2).sum(), (z, scale))

    got = penalty_gradients(distributed.vocab_parallel_masked_soft_cross_entropy)
    want = penalty_gradients(sc.masked_soft_cross_entropy)

    assert torch.any(got[0] != 0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# An empty batch: a zero loss and an empty gradient
# --------------------------------------------------------------------------------------------

EMPTY_SHAPES = [(0, 5), (2, 0, 5)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_an_empty_batch_with_grad_gives_zero_and_an_empty_gradient(backend, shape, reduction):
    logits, targets, mask = random_inputs(0, shape, valid="all").on(backend)
    loss, grad = sc.masked_soft_cross_entropy_with_grad(logits, targets, mask, reduction=reduction)
    assert to_numpy(loss) == 0.0
    assert tuple(grad.shape) == shape
    assert grad.dtype == logits.dtype


@needs_torch
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_an_empty_batch_backward_in_torch_gives_empty_gradients(shape, reduction):
    import torch

    logits, targets, mask = (
        torch.from_numpy(array) for array in random_inputs(0, shape, valid="all").astype("float32")
    )
    logits.requires_grad_(True)
    targets.requires_grad_(True)
    loss = sc.masked_soft_cross_entropy(logits, targets, mask, reduction=reduction)
    torch.sum(loss).backward()
    assert torch.sum(loss).item() == 0.0
    assert logits.grad is not None and tuple(logits.grad.shape) == shape
    assert targets.grad is not None and tuple(targets.grad.shape) == shape


@needs_jax
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_an_empty_batch_under_jax_grad_gives_empty_gradients(shape, reduction):
    import jax

    logits, targets, mask = (
        jax.numpy.asarray(array) for array in random_inputs(0, shape, valid="all").astype("float32")
    )

    def total(z, p):
        return jax.numpy.sum(sc.masked_soft_cross_entropy(z, p, mask, reduction=reduction))

    value, (grad_logits, grad_targets) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(
        logits, targets
    )
    assert float(value) == 0.0
    assert grad_logits.shape == shape and grad_logits.dtype == logits.dtype
    assert grad_targets.shape == shape and grad_targets.dtype == targets.dtype


# --------------------------------------------------------------------------------------------
# A NaN or inf upstream gradient at padding positions ("none")
# --------------------------------------------------------------------------------------------


#: Per-position upstream gradients of :func:`padded_inputs`' positions: 1.5 where valid, NaN
#: and inf at the two padding positions, as ``where(mask, loss / count, 0)`` patterns leave.
def padding_upstream(mask: np.ndarray) -> np.ndarray:
    upstream = np.where(mask, 1.5, np.nan)
    upstream[1, 2] = np.inf
    return upstream


def assert_zero_at_padding_and_reference_elsewhere(grad, expected, mask, dtype="float64"):
    grad = to_numpy(grad)
    assert np.all(grad[~mask] == 0)
    assert_gradient_close(np.where(mask[..., None], grad, 0.0), expected, dtype)


@needs_torch
@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
def test_torch_gradients_at_padding_are_zero_whatever_the_upstream(create_graph):
    torch = pytest.importorskip("torch")
    (logits, targets, mask), (finite_logits, finite_targets) = padded_inputs(23)
    z = torch.tensor(logits, requires_grad=True)
    p = torch.tensor(targets, requires_grad=True)
    upstream = padding_upstream(mask)
    expected = reference(
        finite_logits, finite_targets, mask, reduction="none", upstream=np.where(mask, 1.5, 0.0)
    )

    loss = sc.masked_soft_cross_entropy(z, p, torch.tensor(mask), reduction="none")
    grads = torch.autograd.grad(loss, (z, p), torch.tensor(upstream), create_graph=create_graph)

    assert_zero_at_padding_and_reference_elsewhere(grads[0].detach(), expected.grad_logits, mask)
    assert_zero_at_padding_and_reference_elsewhere(grads[1].detach(), expected.grad_targets, mask)


@needs_jax
def test_jax_gradients_at_padding_are_zero_whatever_the_upstream():
    import jax
    import jax.numpy as jnp

    (logits, targets, mask), (finite_logits, finite_targets) = padded_inputs(24)
    upstream = padding_upstream(mask)
    expected = reference(
        finite_logits, finite_targets, mask, reduction="none", upstream=np.where(mask, 1.5, 0.0)
    )

    def loss(z, p):
        return sc.masked_soft_cross_entropy(z, p, jnp.asarray(mask), reduction="none")

    _, pullback = jax.vjp(loss, jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32))
    grad_z, grad_p = pullback(jnp.asarray(upstream, jnp.float32))

    assert_zero_at_padding_and_reference_elsewhere(grad_z, expected.grad_logits, mask, "float32")
    assert_zero_at_padding_and_reference_elsewhere(grad_p, expected.grad_targets, mask, "float32")


@needs_torch
def test_torch_linear_loss_gradients_at_padding_are_zero_whatever_the_upstream():
    torch = pytest.importorskip("torch")
    (_, _, mask), (_, finite_targets) = padded_inputs(25)
    rng = np.random.default_rng(25)
    hidden = torch.tensor(rng.standard_normal((2, 4, 3)), requires_grad=True)
    weight = torch.tensor(rng.standard_normal((7, 3)), requires_grad=True)
    p = torch.tensor(finite_targets, requires_grad=True)
    upstream = torch.tensor(padding_upstream(mask))

    loss = sc.linear_masked_soft_cross_entropy(
        hidden, weight, p, torch.tensor(mask), reduction="none", chunk_rows=3
    )
    grads = torch.autograd.grad(loss, (hidden, weight, p), upstream)

    assert all(bool(torch.isfinite(grad).all()) for grad in grads)
    assert bool((grads[0][torch.tensor(~mask)] == 0).all())
    assert bool((grads[2][torch.tensor(~mask)] == 0).all())


@needs_jax
@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
def test_jax_vocab_parallel_gradients_at_padding_are_zero_whatever_the_upstream(linear):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec

    from softce_multi import distributed

    (logits, _, mask), (_, finite_targets) = padded_inputs(26)
    hidden = np.random.default_rng(26).standard_normal((2, 4, 3))
    weight = np.random.default_rng(27).standard_normal((7, 3))
    first = jnp.asarray(hidden if linear else logits, jnp.float32)
    weights, targets = jnp.asarray(weight, jnp.float32), jnp.asarray(finite_targets, jnp.float32)

    def loss(x, p):
        if linear:
            return distributed.vocab_parallel_linear_masked_soft_cross_entropy(
                x, weights, p, jnp.asarray(mask), reduction="none", axis_name="vocab"
            )
        return distributed.vocab_parallel_masked_soft_cross_entropy(
            x, p, jnp.asarray(mask), reduction="none", axis_name="vocab"
        )

    mesh = Mesh(np.array(jax.devices()[:1]), ("vocab",))
    on_the_mesh = jax.shard_map(
        lambda x, p, u: jax.vjp(loss, x, p)[1](u),
        mesh=mesh,
        in_specs=(PartitionSpec(),) * 3,
        out_specs=PartitionSpec(),
    )
    grads = on_the_mesh(first, targets, jnp.asarray(padding_upstream(mask), jnp.float32))

    for grad in grads:
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad))
        assert np.all(grad[~mask] == 0)
