"""The loss straight from hidden states equals the loss of the materialised logits.

:func:`softce_multi.linear_masked_soft_cross_entropy` is held, on every backend, to the
reference formula applied to the logits ``hidden @ weight.T + bias`` computed in float64 from
the exact values the backend holds; its gradients to ``hidden``, ``weight`` and ``bias`` to the
chain rule through those logits. torch differentiates with autograd, JAX with ``jax.vjp`` under
``jax.jit``, and the other libraries return the gradients from
:func:`softce_multi.linear_masked_soft_cross_entropy_with_grad`. The last sections check what
the chunking promises: three matmuls per training step, XLA temporaries bounded by the chunk,
and the Triton routines behind the chunked driver (interpreted without a GPU).
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import numpy as np
import pytest

import softce_multi as sc
from softce_multi import _linear
from softce_multi._types import LinearLossInputs
from softce_multi.testing import (
    GRAD_RTOL,
    REDUCTIONS,
    Backend,
    assert_gradient_close,
    assert_loss_close,
    dtype_name,
    is_installed,
    known_backends,
    random_logits,
    random_mask,
    random_targets,
    reference,
    to_float64,
    to_numpy,
)

#: Positions ``[2, 9]`` (18 rows), hidden size 8 and a prime vocabulary of 37 entries.
POSITIONS, HIDDEN, VOCAB = (2, 9), 8, 37

#: Rows per chunk in most tests: 18 rows make four chunks, the last one partial.
CHUNK = 5


class LinearCase(NamedTuple):
    """Inputs on a backend, and the float64 values they hold."""

    hidden: Any
    weight: Any
    bias: Any
    target_probs: Any
    position_mask: Any
    h: np.ndarray
    W: np.ndarray
    b: np.ndarray | None
    p: np.ndarray
    w: np.ndarray


def make_linear_case(
    backend: Backend,
    rng: np.random.Generator,
    *,
    positions: tuple[int, ...] = POSITIONS,
    dtype: str = "float64",
    target_dtype: str | None = None,
    bias: bool = True,
    padding: float | None = None,
    valid: str = "random",
) -> LinearCase:
    """Random inputs; ``padding`` (NaN, inf) is written into the hidden rows of weight 0."""
    target_dtype = target_dtype or dtype
    backend.require(dtype, target_dtype)
    mask = random_mask(rng, positions, valid=valid)
    h = random_logits(rng, (*positions, HIDDEN), scale=1.0)
    if padding is not None:
        h[~mask] = padding
    weight = random_logits(rng, (VOCAB, HIDDEN), scale=0.7)
    bias_values = random_logits(rng, (VOCAB,), scale=0.5) if bias else None
    hidden = backend.asarray(h, dtype)
    weight_array = backend.asarray(weight, dtype)
    bias_array = None if bias_values is None else backend.asarray(bias_values, dtype)
    targets = backend.asarray(random_targets(rng, (*positions, VOCAB)), target_dtype)
    return LinearCase(
        hidden,
        weight_array,
        bias_array,
        targets,
        backend.asarray(mask),
        to_float64(hidden),
        to_float64(weight_array),
        None if bias_array is None else to_float64(bias_array),
        to_float64(targets),
        mask.astype(np.float64),
    )


class LinearExpected(NamedTuple):
    loss: np.ndarray
    hidden: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    target_probs: np.ndarray


def linear_reference(
    case: LinearCase,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> LinearExpected:
    """The reference on the float64 logits, and the gradients by the chain rule through them.

    Padding rows of ``hidden`` enter as zeros (the reference multiplies by the mask, so they
    must be finite there); their gradient is 0 either way.
    """
    valid = case.w[..., None] != 0
    h = np.where(valid, case.h, 0.0)
    z = h @ case.W.T + (0.0 if case.b is None else case.b)
    expected = reference(
        z, case.p, case.w, reduction=reduction, num_valid=num_valid, upstream=upstream
    )
    g = expected.grad_logits.reshape(-1, VOCAB)
    return LinearExpected(
        expected.loss,
        (g @ case.W).reshape(case.h.shape),
        g.T @ h.reshape(-1, HIDDEN),
        None if case.b is None else g.sum(axis=0),
        expected.grad_targets,
    )


class LinearResult(NamedTuple):
    loss: Any
    grads: sc.LinearGradients
    target_probs: Any


def run(
    backend: Backend,
    case: LinearCase,
    *,
    reduction: str = "mean",
    num_valid: Any = None,
    upstream: np.ndarray | None = None,
    chunk_rows: int | None = CHUNK,
    targets_grad: bool = False,
) -> LinearResult:
    """The loss and its gradients for the cotangent ``upstream`` (1 by default), by backend.

    torch: autograd; JAX: ``jax.vjp`` of the jitted loss; other libraries:
    ``linear_masked_soft_cross_entropy_with_grad`` (unit upstream, no targets gradient).
    """
    options = {"reduction": reduction, "num_valid": num_valid, "chunk_rows": chunk_rows}
    if backend.library == "torch":
        hidden, weight, targets = (
            x.detach().clone().requires_grad_(True)
            for x in (case.hidden, case.weight, case.target_probs)
        )
        targets.requires_grad_(targets_grad)
        bias = None if case.bias is None else case.bias.detach().clone().requires_grad_(True)
        loss = sc.linear_masked_soft_cross_entropy(
            hidden, weight, targets, case.position_mask, bias=bias, **options
        )
        loss.backward(_upstream_like(backend, loss, upstream))
        grads = sc.LinearGradients(hidden.grad, weight.grad, None if bias is None else bias.grad)
        return LinearResult(loss, grads, targets.grad)
    if backend.library == "jax":
        is_number = num_valid is None or isinstance(num_valid, (int, float))
        shape = tuple(case.position_mask.shape) if reduction == "none" else ()
        loss_dtype = (
            "float64"
            if "float64" in {dtype_name(case.hidden), dtype_name(case.target_probs)}
            else "float32"
        )
        loss, (grad_h, grad_w, grad_b, grad_p) = _jax_loss_and_vjp()(
            case.hidden,
            case.weight,
            case.bias,
            case.target_probs,
            case.position_mask,
            None if is_number else num_valid,
            backend.asarray(np.ones(shape) if upstream is None else upstream, loss_dtype),
            reduction=reduction,
            num_valid_number=num_valid if is_number else None,
            chunk_rows=chunk_rows,
            targets_grad=targets_grad,
        )
        return LinearResult(loss, sc.LinearGradients(grad_h, grad_w, grad_b), grad_p)
    assert upstream is None and not targets_grad, "only autodiff backends take an upstream"
    loss, grads = sc.linear_masked_soft_cross_entropy_with_grad(
        case.hidden, case.weight, case.target_probs, case.position_mask, bias=case.bias, **options
    )
    return LinearResult(loss, grads, None)


def _loss_and_vjp(
    hidden,
    weight,
    bias,
    targets,
    mask,
    num_valid_array,
    upstream,
    *,
    reduction,
    num_valid_number,
    chunk_rows,
    targets_grad,
):
    """The loss and the ``jax.vjp`` of ``upstream`` to hidden, weight, bias and (if
    ``targets_grad``; else None, the targets a constant) the targets."""
    import jax

    num_valid = num_valid_number if num_valid_array is None else num_valid_array

    def loss_of(hidden, weight, bias, targets):
        return sc.linear_masked_soft_cross_entropy(
            hidden,
            weight,
            targets,
            mask,
            bias=bias,
            reduction=reduction,
            num_valid=num_valid,
            chunk_rows=chunk_rows,
        )

    if targets_grad:
        loss, vjp = jax.vjp(loss_of, hidden, weight, bias, targets)
        return loss, vjp(upstream)
    loss, vjp = jax.vjp(functools.partial(_with_targets, loss_of, targets), hidden, weight, bias)
    return loss, (*vjp(upstream), None)


def _with_targets(loss_of, targets, hidden, weight, bias):
    return loss_of(hidden, weight, bias, targets)


@functools.cache
def _jax_loss_and_vjp():
    """:func:`_loss_and_vjp` under one ``jax.jit``: tests with the same shapes, dtypes and
    options share a compilation."""
    import jax

    static = ("reduction", "num_valid_number", "chunk_rows", "targets_grad")
    return jax.jit(_loss_and_vjp, static_argnames=static)


def _upstream_like(backend: Backend, loss: Any, upstream: np.ndarray | None) -> Any:
    values = np.ones(tuple(loss.shape)) if upstream is None else upstream
    return backend.asarray(values, dtype_name(loss))


def assert_matches(result: LinearResult, expected: LinearExpected, case: LinearCase) -> None:
    """Loss and gradients within the tolerances of their dtypes, gradients in the inputs'."""
    compute = (
        "float64"
        if "float64" in {dtype_name(case.hidden), dtype_name(case.target_probs)}
        else "float32"
    )
    assert_loss_close(result.loss, expected.loss, compute)
    assert dtype_name(result.grads.hidden) == dtype_name(case.hidden)
    assert dtype_name(result.grads.weight) == dtype_name(case.weight)
    assert_gradient_close(result.grads.hidden, expected.hidden, compute)
    assert_gradient_close(result.grads.weight, expected.weight, compute)
    if case.bias is None:
        assert result.grads.bias is None
    else:
        assert dtype_name(result.grads.bias) == dtype_name(case.bias)
        assert_gradient_close(result.grads.bias, expected.bias, compute)


# --------------------------------------------------------------------------------------------
# The loss of the materialised logits, on every backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reduction", "with_bias"),
    [("mean", True), ("sum", True), ("none", True), ("mean", False)],
    ids=["mean-bias", "sum-bias", "none-bias", "mean-no-bias"],
)
def test_float64_matches_materialised_path(backend, reduction, with_bias):
    rng = np.random.default_rng(1)
    case = make_linear_case(backend, rng, bias=with_bias)
    if reduction == "none" and not backend.is_autodiff:
        # No single gradient to return: the per-position losses alone.
        loss = sc.linear_masked_soft_cross_entropy(
            case.hidden,
            case.weight,
            case.target_probs,
            case.position_mask,
            bias=case.bias,
            reduction="none",
            chunk_rows=CHUNK,
        )
        assert_loss_close(loss, linear_reference(case, reduction="none").loss, "float64")
        return
    upstream = rng.random(POSITIONS) * 2 - 0.5 if reduction == "none" else None
    result = run(backend, case, reduction=reduction, upstream=upstream)
    expected = linear_reference(
        case, reduction=reduction, upstream=1.0 if upstream is None else upstream
    )
    assert_matches(result, expected, case)


@pytest.mark.parametrize("chunk_rows", [1, None, 2**64], ids=lambda c: f"chunk={c}")
def test_any_chunk_size_gives_the_same_result(backend, chunk_rows):
    """One row per chunk, the default chunk (beyond N: a single chunk) and a chunk wider than
    any 64-bit int. The other tests use chunks of 5 rows: four chunks of the 18 rows, the last
    one partial.

    The vocabulary (37) is prime, so no chunk size divides it either.
    """
    case = make_linear_case(backend, np.random.default_rng(2))
    assert_matches(run(backend, case, chunk_rows=chunk_rows), linear_reference(case), case)


def test_float32_matches_materialised_path(backend):
    case = make_linear_case(backend, np.random.default_rng(3), dtype="float32")
    result = run(backend, case)
    assert dtype_name(result.loss) == "float32"
    assert_matches(result, linear_reference(case), case)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_inputs_keep_their_dtype(backend, dtype):
    """The matmuls run in the 16-bit dtype, the loss is float32, the gradients 16-bit.

    The reference sees the exact float64 logits of the rounded inputs; the backend rounds its
    logits to the 16-bit dtype, which the gradient tolerance of that dtype covers, and the
    loss is held to the same tolerance.
    """
    case = make_linear_case(backend, np.random.default_rng(4), dtype=dtype, target_dtype="float32")
    result = run(backend, case)
    expected = linear_reference(case)
    assert dtype_name(result.loss) == "float32"
    np.testing.assert_allclose(
        to_float64(result.loss), expected.loss, rtol=GRAD_RTOL[dtype], atol=0.0
    )
    for grad, want in zip(result.grads, expected[1:4], strict=True):
        assert dtype_name(grad) == dtype
        assert_gradient_close(grad, want, "float32")


def test_hidden_and_weight_of_different_dtypes_are_promoted(autodiff_backend):
    """bfloat16 hidden states with a float32 weight multiply in float32, as ``@`` promotes;
    each gradient comes back in the dtype of its input."""
    backend = autodiff_backend
    case = make_linear_case(backend, np.random.default_rng(20), dtype="float32")
    hidden = backend.asarray(case.h, "bfloat16")
    case = case._replace(hidden=hidden, h=to_float64(hidden))
    result = run(backend, case)
    assert dtype_name(result.grads.hidden) == "bfloat16"
    assert dtype_name(result.grads.weight) == "float32"
    expected = linear_reference(case)
    assert_loss_close(result.loss, expected.loss, "float32")
    assert_gradient_close(result.grads.weight, expected.weight, "float32")
    assert_gradient_close(result.grads.hidden, expected.hidden, "float32")


@pytest.mark.parametrize("num_valid", [7.5, 0], ids=["7.5", "0"])
def test_num_valid_replaces_the_denominator(backend, num_valid):
    case = make_linear_case(backend, np.random.default_rng(5))
    result = run(backend, case, num_valid=num_valid)
    assert_matches(result, linear_reference(case, num_valid=num_valid), case)


def test_num_valid_as_a_0d_array(backend):
    case = make_linear_case(backend, np.random.default_rng(6))
    count = backend.asarray(np.asarray(11.0))
    result = run(backend, case, num_valid=count)
    assert_matches(result, linear_reference(case, num_valid=11.0), case)


@pytest.mark.parametrize("padding", [np.nan, -np.inf], ids=["nan", "-inf"])
def test_padded_hidden_rows_reach_no_gradient(backend, padding):
    """NaN or inf in the hidden rows of padding changes nothing, weight and bias included."""
    case = make_linear_case(backend, np.random.default_rng(7), padding=padding)
    result = run(backend, case)
    assert_matches(result, linear_reference(case), case)
    padded = case.w == 0
    assert padded.any()
    assert np.all(to_numpy(result.grads.hidden)[padded] == 0)


def test_with_grad_returns_named_gradients(backend):
    case = make_linear_case(backend, np.random.default_rng(8), dtype="float32", bias=False)
    loss, grads = sc.linear_masked_soft_cross_entropy_with_grad(
        case.hidden, case.weight, case.target_probs, case.position_mask, chunk_rows=CHUNK
    )
    assert isinstance(grads, sc.LinearGradients)
    assert grads.bias is None
    assert tuple(grads.hidden.shape) == tuple(case.hidden.shape)
    assert tuple(grads.weight.shape) == (VOCAB, HIDDEN)
    expected = linear_reference(case)
    assert_loss_close(loss, expected.loss, "float32")
    assert_gradient_close(grads.weight, expected.weight, "float32")


def test_with_grad_refuses_reduction_none(backend):
    case = make_linear_case(backend, np.random.default_rng(9))
    with pytest.raises(ValueError, match="reduction='none'"):
        sc.linear_masked_soft_cross_entropy_with_grad(
            case.hidden, case.weight, case.target_probs, case.position_mask, reduction="none"
        )


def test_empty_batch_gives_zero_loss_and_gradients(backend):
    case = make_linear_case(backend, np.random.default_rng(10), positions=(0, 3), valid="all")
    loss, grads = sc.linear_masked_soft_cross_entropy_with_grad(
        case.hidden, case.weight, case.target_probs, case.position_mask, bias=case.bias
    )
    assert float(to_float64(loss)) == 0.0
    assert tuple(grads.hidden.shape) == (0, 3, HIDDEN)
    assert np.all(to_numpy(grads.weight) == 0) and np.all(to_numpy(grads.bias) == 0)


def test_inputs_are_unchanged(backend):
    case = make_linear_case(backend, np.random.default_rng(11), padding=np.nan)
    before = [to_numpy(x).copy() for x in (case.hidden, case.weight, case.bias, case.target_probs)]
    run(backend, case)
    after = [to_numpy(x) for x in (case.hidden, case.weight, case.bias, case.target_probs)]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _call(backend: Backend, **changes: Any) -> None:
    case = make_linear_case(backend, np.random.default_rng(12))
    arguments = {
        "hidden": case.hidden,
        "weight": case.weight,
        "target_probs": case.target_probs,
        "position_mask": case.position_mask,
        "bias": case.bias,
    }
    arguments.update({name: backend.asarray(np.ones(shape)) for name, shape in changes.items()})
    sc.linear_masked_soft_cross_entropy(
        arguments["hidden"],
        arguments["weight"],
        arguments["target_probs"],
        arguments["position_mask"],
        bias=arguments["bias"],
    )


def test_weight_of_another_hidden_size_is_refused(backend):
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\] with H = 8.*hidden"):
        _call(backend, weight=(VOCAB, HIDDEN + 1))


def test_weight_of_another_vocabulary_than_the_targets_is_refused(backend):
    with pytest.raises(ValueError, match=r"target_probs must have shape \(2, 9, 36\).*weight"):
        _call(backend, weight=(VOCAB - 1, HIDDEN))


def test_bias_of_another_vocabulary_is_refused(backend):
    with pytest.raises(ValueError, match=r"bias must have shape \(37,\).*weight"):
        _call(backend, bias=(VOCAB + 1,))


def test_targets_over_other_positions_are_refused(backend):
    with pytest.raises(ValueError, match=r"target_probs must have shape \(2, 9, 37\).*hidden"):
        _call(backend, target_probs=(2, 8, VOCAB))


@pytest.mark.parametrize(("chunk_rows", "error"), [(0, ValueError), (2.5, TypeError)])
def test_bad_chunk_rows_are_refused(chunk_rows, error):
    case = make_linear_case(Backend("numpy", "numpy", "cpu"), np.random.default_rng(13))
    with pytest.raises(error, match="chunk_rows"):
        sc.linear_masked_soft_cross_entropy(
            case.hidden, case.weight, case.target_probs, case.position_mask, chunk_rows=chunk_rows
        )


# --------------------------------------------------------------------------------------------
# Autodiff: the targets' gradient, the module, three matmuls
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_target_probs_get_their_gradient_when_asked(autodiff_backend, reduction):
    rng = np.random.default_rng(14)
    case = make_linear_case(autodiff_backend, rng)
    upstream = rng.random(POSITIONS) if reduction == "none" else np.asarray(0.75)
    result = run(autodiff_backend, case, reduction=reduction, upstream=upstream, targets_grad=True)
    expected = linear_reference(case, reduction=reduction, upstream=upstream)
    assert_gradient_close(result.target_probs, expected.target_probs, "float64")
    assert_matches(result, expected, case)


def test_a_scalar_upstream_scales_the_gradients_made_in_forward(autodiff_backend):
    case = make_linear_case(autodiff_backend, np.random.default_rng(21))
    upstream = np.asarray(-2.5)
    result = run(autodiff_backend, case, reduction="sum", upstream=upstream)
    assert_matches(result, linear_reference(case, reduction="sum", upstream=upstream), case)


def test_torch_target_probs_without_requires_grad_get_none():
    backend = Backend("torch-cpu", "torch", "cpu")
    pytest.importorskip("torch")
    result = run(backend, make_linear_case(backend, np.random.default_rng(15)))
    assert result.target_probs is None


def test_torch_module_equals_the_function():
    torch = pytest.importorskip("torch")
    from softce_multi.torch import LinearMaskedSoftCrossEntropy

    backend = Backend("torch-cpu", "torch", "cpu")
    case = make_linear_case(backend, np.random.default_rng(16))
    criterion = LinearMaskedSoftCrossEntropy(reduction="sum", chunk_rows=CHUNK)
    loss = criterion(
        case.hidden, case.weight, case.target_probs, case.position_mask, bias=case.bias
    )
    expected = linear_reference(case, reduction="sum")
    assert_loss_close(loss, expected.loss, "float64")
    assert "chunk_rows=5" in repr(criterion)
    assert isinstance(loss, torch.Tensor)


def test_torch_training_step_does_three_matmuls_per_chunk():
    """The gradients are made in the forward pass: no logits are recomputed in backward."""
    torch = pytest.importorskip("torch")

    backend = Backend("torch-cpu", "torch", "cpu")
    case = make_linear_case(backend, np.random.default_rng(17), dtype="float32")
    hidden = case.hidden.clone().requires_grad_(True)
    weight = case.weight.clone().requires_grad_(True)
    # The profiler sees the products inside the library's operators too.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss = sc.linear_masked_soft_cross_entropy(
            hidden, weight, case.target_probs, case.position_mask, bias=case.bias, chunk_rows=CHUNK
        )
        loss.backward()
    products = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"}
    count = sum(event.name in products for event in profile.events())
    n_chunks = -(-int(np.prod(POSITIONS)) // CHUNK)
    assert count == 3 * n_chunks
    assert_gradient_close(weight.grad, linear_reference(case).weight, "float32")


def test_torch_second_derivative_is_refused():
    torch = pytest.importorskip("torch")
    backend = Backend("torch-cpu", "torch", "cpu")
    case = make_linear_case(backend, np.random.default_rng(18))
    hidden = case.hidden.clone().requires_grad_(True)
    loss = sc.linear_masked_soft_cross_entropy(
        hidden, case.weight, case.target_probs, case.position_mask
    )
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad.sum().backward()


def test_torch_second_derivative_beside_another_term_is_refused():
    """A gradient penalty plus weight decay has a graph of its own: the penalty's term must
    still raise, not drop out of the derivative."""
    torch = pytest.importorskip("torch")
    backend = Backend("torch-cpu", "torch", "cpu")
    case = make_linear_case(backend, np.random.default_rng(19))
    hidden, weight = (x.clone().requires_grad_(True) for x in case[:2])
    loss = sc.linear_masked_soft_cross_entropy(
        hidden, weight, case.target_probs, case.position_mask
    )
    grad_hidden, _ = torch.autograd.grad(loss, (hidden, weight), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        (grad_hidden.pow(2).sum() + 0.1 * weight.pow(2).sum()).backward()


@pytest.mark.parametrize("allow_unused", [False, True])
def test_torch_second_derivative_through_autograd_grad_is_refused(allow_unused):
    """``torch.autograd.grad(penalty + decay, hidden)`` raises: the refusal lies on the path
    from the gradient to ``hidden``, not only on that from the upstream gradient."""
    torch = pytest.importorskip("torch")
    backend = Backend("torch-cpu", "torch", "cpu")
    case = make_linear_case(backend, np.random.default_rng(20))
    hidden = case.hidden.clone().requires_grad_(True)
    loss = sc.linear_masked_soft_cross_entropy(
        hidden, case.weight, case.target_probs, case.position_mask
    )
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    objective = grad.pow(2).sum() + 0.01 * hidden.pow(2).sum()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(objective, hidden, allow_unused=allow_unused)


def test_torch_gradients_made_with_create_graph_may_be_changed_in_place():
    """The gradients of ``create_graph=True`` are the caller's: an in-place update (a meta-
    learning step, a scaling) works, and the derivative of the result is still refused."""
    torch = pytest.importorskip("torch")
    backend = Backend("torch-cpu", "torch", "cpu")
    case = make_linear_case(backend, np.random.default_rng(24))
    hidden = case.hidden.clone().requires_grad_(True)
    loss = sc.linear_masked_soft_cross_entropy(
        hidden, case.weight, case.target_probs, case.position_mask
    )
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    expected = grad.detach().clone()

    grad.mul_(2.0)

    torch.testing.assert_close(grad.detach(), 2 * expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(grad.pow(2).sum(), hidden)


def test_torch_func_grad_of_the_linear_loss_matches_the_materialised_loss():
    torch = pytest.importorskip("torch")
    from softce_multi import reference as torch_reference

    backend = Backend("torch-cpu", "torch", "cpu")
    case = make_linear_case(backend, np.random.default_rng(21))
    hidden = case.hidden.double()
    weight, targets = case.weight.double(), case.target_probs.double()

    def ours(w):
        return sc.linear_masked_soft_cross_entropy(hidden, w, targets, case.position_mask)

    def materialised(w):
        return torch_reference.masked_soft_cross_entropy(hidden @ w.T, targets, case.position_mask)

    got, want = torch.func.grad(ours)(weight), torch.func.grad(materialised)(weight)
    assert_gradient_close(got, want.numpy(), "float64")


def test_torch_func_vmap_of_the_linear_loss_is_refused_by_name():
    torch = pytest.importorskip("torch")
    backend = Backend("torch-cpu", "torch", "cpu")
    case = make_linear_case(backend, np.random.default_rng(22))

    def loss(hidden, targets, mask):
        return sc.linear_masked_soft_cross_entropy(hidden, case.weight, targets, mask)

    with pytest.raises(NotImplementedError, match=r"linear_masked_soft_cross_entropy.*vmap"):
        torch.func.vmap(loss)(case.hidden, case.target_probs, case.position_mask)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_linear_loss_of_meta_tensors_has_the_shapes_of_the_loss(reduction):
    torch = pytest.importorskip("torch")
    backend = Backend("torch-cpu", "torch", "cpu")
    case = make_linear_case(backend, np.random.default_rng(23))
    hidden, weight, targets, mask = (
        x.to("meta") for x in (case.hidden, case.weight, case.target_probs, case.position_mask)
    )
    hidden.requires_grad_(True)

    loss = sc.linear_masked_soft_cross_entropy(hidden, weight, targets, mask, reduction=reduction)
    (grad,) = torch.autograd.grad(loss.sum(), hidden)

    assert loss.device.type == "meta"
    assert tuple(loss.shape) == (tuple(mask.shape) if reduction == "none" else ())
    assert grad.shape == hidden.shape


# --------------------------------------------------------------------------------------------
# JAX: temporaries bounded by the chunk
# --------------------------------------------------------------------------------------------


def test_jax_temporaries_are_bounded_by_the_chunk(xla_on_the_cpu):
    """XLA's temporaries of a jitted training step do not grow with the number of rows.

    With 128-row chunks of a 2048-entry vocabulary (1 MiB of float32 logits each), the step's
    temporaries stay within a few chunks when N grows from 2048 to 8192 rows, while one
    ``[N, V]`` float32 buffer grows from 16 MiB to 64 MiB.
    """
    jax = xla_on_the_cpu
    jnp = jax.numpy
    vocab, hidden_size, chunk = 2048, 64, 128
    chunk_bytes = chunk * vocab * 4

    def loss(hidden, weight, bias, targets, mask):
        return sc.linear_masked_soft_cross_entropy(
            hidden, weight, targets, mask, bias=bias, chunk_rows=chunk
        )

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    temporaries = {}
    for n_rows in (2048, 8192):
        shapes = (
            jax.ShapeDtypeStruct((n_rows, hidden_size), jnp.float32),
            jax.ShapeDtypeStruct((vocab, hidden_size), jnp.float32),
            jax.ShapeDtypeStruct((vocab,), jnp.float32),
            jax.ShapeDtypeStruct((n_rows, vocab), jnp.float32),
            jax.ShapeDtypeStruct((n_rows,), jnp.bool_),
        )
        analysis = step.lower(*shapes).compile().memory_analysis()
        temporaries[n_rows] = analysis.temp_size_in_bytes
        assert temporaries[n_rows] < 4 * chunk_bytes, temporaries
    assert temporaries[8192] - temporaries[2048] < chunk_bytes, temporaries


# --------------------------------------------------------------------------------------------
# The Triton routines behind the chunked driver
# --------------------------------------------------------------------------------------------


def _triton_or_skip() -> Any:
    if not is_installed("torch") or not is_installed("triton"):
        pytest.skip("needs torch and triton")
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 to run Triton kernels on the CPU")
    from softce_multi.kernels import triton

    return triton


@pytest.mark.parametrize("over_logits", [False, True], ids=["gradient apart", "over the logits"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_routines_in_the_chunked_driver(reduction, over_logits):
    """Forward with gradients through a Triton row routine (the gradient in its own tensor, or
    written over the chunk's logits); backward through its gradients."""
    triton = _triton_or_skip()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = Backend(f"torch-{device}", "torch", "gpu" if device == "cuda" else "cpu")
    rng = np.random.default_rng(19)
    case = make_linear_case(backend, rng, dtype="float32", padding=np.nan)
    with_grads = reduction != "none"
    inputs = LinearLossInputs(
        case.hidden,
        case.weight,
        case.bias,
        case.target_probs,
        case.position_mask,
        reduction,
        None,
        CHUNK,
    )
    result = _linear.chunked_loss_pass(
        inputs,
        hidden_grad=with_grads,
        weight_grad=with_grads,
        bias_grad=with_grads,
        row_routine=triton.row_routine_over_logits if over_logits else triton.row_routine,
        xp=_namespace(case.hidden),
    )
    upstream = rng.random(POSITIONS) if reduction == "none" else 1.0
    expected = linear_reference(case, reduction=reduction, upstream=upstream)
    plain = reference(_logits64(case), case.p, case.w, reduction=reduction)
    assert_loss_close(result.loss, plain.loss, "float32")
    grads, grad_targets = _linear.chunked_gradient_pass(
        case.hidden,
        case.weight,
        case.bias,
        case.target_probs,
        result.saved,
        result.row_scale
        * torch.as_tensor(upstream, dtype=torch.float32, device=device).reshape(-1),
        hidden_grad=True,
        weight_grad=True,
        bias_grad=True,
        targets_grad=True,
        chunk_rows=CHUNK,
        gradient_routine=triton.gradient_routine,
        xp=_namespace(case.hidden),
    )
    made = result.grads if with_grads else grads
    for grad, want in zip(made, expected[1:4], strict=True):
        assert_gradient_close(grad, want, "float32")
    for grad, want in zip(grads, expected[1:4], strict=True):
        assert_gradient_close(grad, want, "float32")
    assert_gradient_close(grad_targets, expected.target_probs, "float32")


def _namespace(x: Any) -> Any:
    import array_api_compat

    return array_api_compat.array_namespace(x)


def _logits64(case: LinearCase) -> np.ndarray:
    h = np.where(case.w[..., None] != 0, case.h, 0.0)
    return h @ case.W.T + (0.0 if case.b is None else case.b)


def test_default_chunk_follows_the_memory_budget():
    """A chunk's float32 logits and gradient fill the budget; float64 halves the rows."""
    import numpy

    rows32 = _linear.default_chunk_rows(32000, numpy.float32, xp=numpy)
    rows64 = _linear.default_chunk_rows(32000, numpy.float64, xp=numpy)
    assert 2 * rows32 * 32000 * 4 <= _linear.CHUNK_BYTES < 2 * (rows32 + 1) * 32000 * 4
    assert rows64 == rows32 // 2
    assert _linear.default_chunk_rows(10**9, numpy.float32, xp=numpy) == 1
    one_copy = _linear.default_chunk_rows(32000, numpy.float32, xp=numpy, copies=1)
    assert rows32 * 32000 * 4 * 2 <= one_copy * 32000 * 4 <= _linear.CHUNK_BYTES
    assert _linear.default_chunk_rows(32000, numpy.float32, xp=numpy, hidden_size=256) == rows32


def test_default_chunk_of_a_large_hidden_size_holds_one_weight_gradient():
    """Where ``H / copies`` rows are more than the byte budget gives, the chunk takes them: its
    ``[chunk, V]`` arrays then take the bytes of one ``[V, H]`` array, as the weight gradient."""
    import numpy

    for copies in (1, 2):
        rows = _linear.default_chunk_rows(
            128256, numpy.float32, xp=numpy, copies=copies, hidden_size=4096
        )
        assert rows == 4096 // copies
        assert copies * rows * 128256 == 128256 * 4096


def test_torch_chunks_share_one_logits_buffer_that_takes_their_gradient(monkeypatch):
    """The torch path writes every chunk's logits into one buffer, the row operator writes the
    gradient over them, and the default chunk is sized for that one ``[chunk, V]`` tensor."""
    pytest.importorskip("torch")
    from softce_multi.kernels import torch_cpu

    monkeypatch.setattr(_linear, "CHUNK_BYTES", CHUNK * VOCAB * 8)  # float64
    monkeypatch.setattr(_linear, "CHUNK_WEIGHTS", 0)
    seen: list[tuple[int, int]] = []
    in_place = torch_cpu.torch_row_routine_

    def spy(z: Any, *arguments: Any) -> Any:
        seen.append((z.shape[0], z.untyped_storage().data_ptr()))
        return in_place(z, *arguments)

    monkeypatch.setattr(torch_cpu, "torch_row_routine_", spy)
    case = make_linear_case(Backend("torch-cpu", "torch", "cpu"), np.random.default_rng(23))
    hidden, weight, bias = (x.clone().requires_grad_() for x in case[:3])

    sc.linear_masked_soft_cross_entropy(
        hidden, weight, case.target_probs, case.position_mask, bias=bias
    ).backward()

    assert [rows for rows, _ in seen] == [5, 5, 5, 3]
    assert len({storage for _, storage in seen}) == 1
    expected = linear_reference(case)
    for grad, want in zip((hidden.grad, weight.grad, bias.grad), expected[1:4], strict=True):
        assert_gradient_close(grad, want, "float64")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_frees_the_logits_buffer_before_the_gradients_take_their_dtypes(
    monkeypatch, reduction
):
    """The chunks' logits buffer is gone when the summed gradients are cast (bfloat16 weights:
    the forward pass of ``"mean"`` is not where they are made, the backward pass is), so that
    the cast copy of the weight gradient takes its place, not memory beside it."""
    pytest.importorskip("torch")
    import torch

    from softce_multi._adapters import torch_linear

    buffers: list[Any] = []
    released_at_cast: list[bool] = []

    class RecordedBuffer(torch_linear.LogitsBuffer):
        def __init__(self) -> None:
            super().__init__()
            buffers.append(self)

    finish = _linear.finish_gradients

    def spy(*arguments: Any, **options: Any) -> Any:
        released_at_cast.append(all(buffer._buffer is None for buffer in buffers))
        return finish(*arguments, **options)

    monkeypatch.setattr(torch_linear, "LogitsBuffer", RecordedBuffer)
    monkeypatch.setattr(_linear, "finish_gradients", spy)
    case = make_linear_case(Backend("torch-cpu", "torch", "cpu"), np.random.default_rng(25))
    hidden, weight = (x.to(torch.bfloat16).requires_grad_() for x in case[:2])

    loss = sc.linear_masked_soft_cross_entropy(
        hidden, weight, case.target_probs, case.position_mask, reduction=reduction
    )
    loss.sum().backward()

    assert buffers and released_at_cast == [True]
    assert weight.grad is not None and weight.grad.dtype == torch.bfloat16


def test_torch_default_chunk_takes_a_row_per_hidden_unit_beyond_the_byte_budget(monkeypatch):
    """With a byte budget of one row, the torch path's one-buffer chunk still takes ``H``
    rows: 18 rows of hidden size 8 make chunks of 8, 8 and 2."""
    pytest.importorskip("torch")
    from softce_multi.kernels import torch_cpu

    monkeypatch.setattr(_linear, "CHUNK_BYTES", VOCAB * 8)  # one float64 row
    seen: list[int] = []
    in_place = torch_cpu.torch_row_routine_

    def spy(z: Any, *arguments: Any) -> Any:
        seen.append(z.shape[0])
        return in_place(z, *arguments)

    monkeypatch.setattr(torch_cpu, "torch_row_routine_", spy)
    case = make_linear_case(Backend("torch-cpu", "torch", "cpu"), np.random.default_rng(24))
    hidden = case.hidden.clone().requires_grad_()

    loss = sc.linear_masked_soft_cross_entropy(
        hidden, case.weight, case.target_probs, case.position_mask, bias=case.bias
    )
    loss.backward()

    assert seen == [HIDDEN, HIDDEN, 2]
    expected = linear_reference(case)
    assert_loss_close(loss, expected.loss, "float64")
    assert_gradient_close(hidden.grad, expected.hidden, "float64")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_torch_backward_chunks_take_their_gradient_over_the_logits_buffer(monkeypatch, reduction):
    """Where the backward pass recomputes the logits (``"none"``; 16-bit inputs for every
    reduction), the gradient operator writes each chunk's logits gradient over the one logits
    buffer: a chunk holds one ``[chunk, V]`` tensor in the backward pass too."""
    pytest.importorskip("torch")
    from softce_multi.kernels import torch_cpu

    seen: list[tuple[int, int]] = []
    in_place = torch_cpu.torch_gradient_routine_

    def spy(z: Any, *arguments: Any) -> Any:
        seen.append((z.shape[0], z.untyped_storage().data_ptr()))
        return in_place(z, *arguments)

    monkeypatch.setattr(torch_cpu, "torch_gradient_routine_", spy)
    dtype = "float64" if reduction == "none" else "bfloat16"
    backend = next(backend for backend in known_backends() if backend.name == "torch-cpu")
    case = make_linear_case(backend, np.random.default_rng(24), dtype=dtype)
    hidden, weight, bias = (x.clone().requires_grad_() for x in case[:3])

    loss = sc.linear_masked_soft_cross_entropy(
        hidden,
        weight,
        case.target_probs,
        case.position_mask,
        bias=bias,
        reduction=reduction,
        chunk_rows=CHUNK,
    )
    loss.sum().backward()

    assert [rows for rows, _ in seen] == [5, 5, 5, 3]
    assert len({storage for _, storage in seen}) == 1
    expected = linear_reference(case, reduction=reduction, upstream=1.0)
    for grad, want in zip((hidden.grad, weight.grad, bias.grad), expected[1:4], strict=True):
        assert_gradient_close(grad, want, "float64" if dtype == "float64" else "float32")


@pytest.mark.skipif(
    not (is_installed("torch") or is_installed("jax")),
    reason="bench --linear runs on torch or jax, and neither is installed",
)
@pytest.mark.parametrize(("options", "bias"), [([], True), (["--no-bias"], False)])
def test_bench_compares_the_linear_loss_with_the_materialised_path(
    tmp_path, monkeypatch, capsys, options, bias
):
    """``python -m softce_multi bench --linear`` reports both paths for each number of rows,
    with a ``[V]`` bias as ``torch.nn.Linear`` has by default, or without one (``--no-bias``);
    both paths add the bias to the logits and differentiate it.

    The torch memory is measured in this process rather than in fresh ones, to save their start.
    """
    import json

    from softce_multi._cli import bench as _bench

    monkeypatch.setattr(_bench, "_memory_from_hidden", _bench.peak_extra_memory_from_hidden)
    given_bias: list[bool] = []
    linear_loss = sc.linear_masked_soft_cross_entropy

    def spy(*arrays: Any, bias: Any = None, **keywords: Any) -> Any:
        given_bias.append(bias is not None)
        return linear_loss(*arrays, bias=bias, **keywords)

    monkeypatch.setattr(sc, "linear_masked_soft_cross_entropy", spy)

    argv = ["--linear", "--rows", "16", "--hidden", "4", "--vocab", "10", "--repeats", "1"]
    report = tmp_path / "linear.json"
    assert _bench.main([*argv, *options, "--json", str(report)]) == 0
    rows = json.loads(report.read_text())
    frameworks = {name for name in ("torch", "jax") if is_installed(name)}
    assert {(row["framework"], row["implementation"]) for row in rows} == {
        (framework, kind) for framework in frameworks for kind in ("linear", "materialised")
    }
    for row in rows:
        assert row["rows"] == 16 and row["median_s"] > 0 and row["bias"] is bias
        assert row["extra_peak_mib"] is not None and row["extra_peak_mib"] >= 0
    assert given_bias and set(given_bias) == {bias}
    title = capsys.readouterr().out.splitlines()[0]
    assert ("hidden @ weight.T + bias" in title) is bias

    comparison = _bench.FROM_HIDDEN["linear"]
    sizes = _bench.Sizes(16, 4, 10, 10, bias)
    for framework in frameworks:
        arrays = comparison.inputs(sizes, 0)
        inputs = _bench._framework_arrays(framework, arrays, "float32", sizes.arrays_in_dtype)
        own, materialised = (
            _bench._from_hidden_jax_step(comparison, path, sizes, inputs)[0](*inputs)[1]
            if framework == "jax"
            else _bench._from_hidden_torch_step(comparison, path, sizes)(*inputs)
            for path in ("linear", "materialised")
        )
        assert len(own) == len(materialised) == (3 if bias else 2), framework
        for grad, want in zip(own, materialised, strict=True):
            np.testing.assert_allclose(to_numpy(grad), to_numpy(want), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not is_installed("torch"), reason="torch not installed")
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_bench_compares_both_linear_paths_at_a_reduction(tmp_path, monkeypatch, capsys, reduction):
    """``bench --linear --reduction`` runs both paths at that reduction (``"none"``'s losses
    summed), on torch and JAX, and says so in its title; both paths' gradients agree."""
    import json

    from softce_multi._cli import bench as _bench

    monkeypatch.setattr(_bench, "_memory_from_hidden", _bench.peak_extra_memory_from_hidden)
    reductions: list[str] = []
    linear_loss = sc.linear_masked_soft_cross_entropy

    def spy(*arrays: Any, reduction: str = "mean", **keywords: Any) -> Any:
        reductions.append(reduction)
        return linear_loss(*arrays, reduction=reduction, **keywords)

    monkeypatch.setattr(sc, "linear_masked_soft_cross_entropy", spy)
    argv = ["--linear", "--rows", "16", "--hidden", "4", "--vocab", "10", "--repeats", "1"]
    report = tmp_path / "linear.json"

    assert _bench.main([*argv, "--reduction", reduction, "--json", str(report)]) == 0

    assert reductions and set(reductions) == {reduction}
    assert json.loads(report.read_text())
    assert f"reduction {reduction!r}" in capsys.readouterr().out.splitlines()[0]
    sizes = _bench.Sizes(16, 4, 10, 10, True, None, reduction)
    comparison = _bench.FROM_HIDDEN["linear"]
    inputs = _bench._framework_arrays("torch", comparison.inputs(sizes, 0), "float32", 3)
    own, materialised = (
        _bench._from_hidden_torch_step(comparison, path, sizes)(*inputs)
        for path in ("linear", "materialised")
    )
    for grad, want in zip(own, materialised, strict=True):
        np.testing.assert_allclose(to_numpy(grad), to_numpy(want), rtol=1e-5, atol=1e-7)


def test_torch_backward_recomputes_the_chunks_of_the_forward_pass(monkeypatch):
    """The backward pass of ``"none"`` recomputes the logits in the chunks of the forward pass
    (the one-buffer budget), so that they are the logits its saved statistics belong to."""
    pytest.importorskip("torch")
    from softce_multi.kernels import torch_cpu

    monkeypatch.setattr(_linear, "CHUNK_BYTES", CHUNK * VOCAB * 8)  # float64
    monkeypatch.setattr(_linear, "CHUNK_WEIGHTS", 0)
    rows: dict[str, list[int]] = {"forward": [], "backward": []}
    for name, operator in (
        ("forward", "torch_row_routine"),
        ("backward", "torch_gradient_routine_"),
    ):
        original = getattr(torch_cpu, operator)

        def spy(z: Any, *arguments: Any, _seen=rows[name], _original=original) -> Any:
            _seen.append(z.shape[0])
            return _original(z, *arguments)

        monkeypatch.setattr(torch_cpu, operator, spy)
    case = make_linear_case(Backend("torch-cpu", "torch", "cpu"), np.random.default_rng(29))
    hidden, weight, bias, targets = (x.clone().requires_grad_() for x in case[:4])

    losses = sc.linear_masked_soft_cross_entropy(
        hidden, weight, targets, case.position_mask, bias=bias, reduction="none"
    )
    losses.sum().backward()

    assert rows == {"forward": [5, 5, 5, 3], "backward": [5, 5, 5, 3]}


def test_torch_backward_recomputes_the_logits_of_the_forward_pass_bit_for_bit():
    """With one token the targets gradient, ``-r * log_softmax(z)``, is exactly 0, but only if
    the backward pass recomputes every logit exactly as the forward pass saved its statistics."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    hidden = torch.tensor(rng.standard_normal((64, 2)))
    weight = torch.tensor(rng.standard_normal((1, 2)), dtype=torch.float32)
    bias = torch.tensor(rng.standard_normal(1))
    targets = torch.tensor(rng.random((64, 1)), requires_grad=True)
    mask = torch.ones(64, dtype=torch.bool)

    losses = sc.linear_masked_soft_cross_entropy(
        hidden, weight, targets, mask, bias=bias, reduction="none", chunk_rows=1
    )
    losses.backward(torch.tensor(rng.uniform(-2, 2, 64)))

    assert torch.equal(targets.grad, torch.zeros_like(targets))
