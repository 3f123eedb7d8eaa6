"""The loss of hidden states and an output projection against the float64 oracle on every
backend: its value, ``with_grad``, autodiff gradients, and derivatives of gradients (JAX's; the
torch linear loss refuses them)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import softce_multi as sc
from softce_multi.testing import (
    LOSS_RTOL,
    REDUCTIONS,
    Backend,
    dtype_name,
    random_targets,
    to_float64,
    to_numpy,
)

from .strategies import (
    BACKENDS,
    FLOATS,
    LARGEST,
    LAYOUTS,
    LINEAR_ARRAYS,
    SMALLEST_SPACING,
    assert_gradient_agrees,
    assert_loss_agrees,
    assert_within,
    assert_zero_at_padding,
    call,
    draw_mask,
    each_backend,
    few,
    fuzz,
    largest_term,
    needs_torch,
    on_backend,
    on_each,
    pass_arrays,
    place,
    poison_padding,
    seed_st,
    squared_norm,
    structures,
    target_mass,
    unpadded,
)

# NumPy warns of the NaN and infinities in padding; they are the point.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

#: ``(positions, H, V)``: empty axes, H = 1, V = 1, odd and large V.
LINEAR_SHAPES = (
    ((3,), 4, 7),
    ((2, 3), 8, 33),
    ((0,), 4, 5),
    ((2, 0), 3, 2),
    ((1,), 1, 1),
    ((4,), 2, 1),
    ((5,), 16, 255),
    ((2, 2), 8, 1000),
)


class LinearInputs(NamedTuple):
    hidden: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    targets: np.ndarray
    mask: np.ndarray
    dtypes: dict[str, str]  # hidden, weight, bias, targets, mask
    layouts: tuple[str, str, str]  # hidden, weight, targets

    @property
    def padding(self) -> np.ndarray:
        return np.reshape(self.mask == 0, self.hidden.shape[:-1])

    def build(self, backend: Backend) -> tuple[Any, ...]:
        bias = None if self.bias is None else on_backend(backend, self.bias, self.dtypes["bias"])
        return (
            place(backend, self.hidden, self.dtypes["hidden"], self.layouts[0]),
            place(backend, self.weight, self.dtypes["weight"], self.layouts[1]),
            place(backend, self.targets, self.dtypes["targets"], self.layouts[2]),
            on_backend(backend, self.mask, self.dtypes["mask"]),
            bias,
        )

    @property
    def used_dtypes(self) -> tuple[str, ...]:
        return tuple(
            dtype for name, dtype in self.dtypes.items() if name != "bias" or self.bias is not None
        )

    def tolerance_dtypes(self) -> tuple[str, str]:
        """The computation dtype, and the coarser of it and the matmul dtype: the logits are
        rounded to the matmul dtype before the loss sees them."""
        floats = [self.dtypes["hidden"], self.dtypes["weight"]]
        if self.bias is not None:
            floats.append(self.dtypes["bias"])
        compute = "float64" if "float64" in (*floats, self.dtypes["targets"]) else "float32"
        matmul = floats[0] if len(set(floats)) == 1 else "float32"
        matmul = "float64" if "float64" in floats else matmul
        coarser = max((compute, matmul), key=lambda name: LOSS_RTOL[name])
        return compute, coarser


@st.composite
def linear_inputs(draw: st.DrawFn, structure: dict[str, Any]) -> LinearInputs:
    positions, hidden_size, vocab = structure["shape"]
    rng = np.random.default_rng(draw(seed_st))
    hidden = rng.standard_normal((*positions, hidden_size))
    weight = rng.standard_normal((vocab, hidden_size)) / math.sqrt(hidden_size)
    bias = rng.standard_normal(vocab) * 0.5 if structure["bias"] is not None else None
    targets = random_targets(rng, (*positions, vocab), normalised=draw(st.booleans()))
    mask = draw_mask(rng, positions, structure["mask"])
    if draw(st.booleans()):
        poison_padding(rng, hidden, mask == 0)
        poison_padding(rng, targets, mask == 0)
    if structure["trailing_one"]:
        mask = mask[..., None]
    dtypes = {name: structure[name] for name in ("hidden", "weight", "targets", "mask")}
    dtypes["bias"] = structure["bias"] or "float32"
    layouts = tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3))
    return LinearInputs(hidden, weight, bias, targets, mask, dtypes, layouts)  # type: ignore[arg-type]


LINEAR_DIMENSIONS = {
    "shape": LINEAR_SHAPES,
    "hidden": FLOATS,
    "weight": FLOATS,
    "bias": (None, *FLOATS),
    "targets": FLOATS,
    "mask": ("bool", "int8", "uint8", "int64", "float16", "float32"),
    "trailing_one": (False, True),
    "chunk_rows": (None, 1, 3),
}

#: How many of the linear loss's four arrays a call passes by position (the rest by keyword).
LINEAR_POSITIONAL = (0, 1, 2, 3, 4)


def expected_linear(inputs: LinearInputs, args: tuple[Any, ...], **options: Any) -> Any:
    """The float64 oracle of the loss of ``hidden @ weight.T + bias`` and its gradients to the
    hidden states, the weight, the bias and the targets, from the values the backend holds."""
    import torch

    from softce_multi.reference import masked_soft_cross_entropy

    hidden, weight, targets, mask, bias = args
    padding = torch.tensor(inputs.padding)[..., None]
    h = torch.tensor(to_float64(hidden), requires_grad=True)
    w = torch.tensor(to_float64(weight), requires_grad=True)
    b = None if bias is None else torch.tensor(to_float64(bias), requires_grad=True)
    p = torch.tensor(to_float64(targets), requires_grad=True)
    logits = torch.where(padding, 0.0, h) @ w.T + (0.0 if b is None else b)
    upstream = options.pop("upstream", 1.0)
    loss = masked_soft_cross_entropy(
        logits, torch.where(padding, 0.0, p), torch.tensor(to_float64(mask)), **options
    )
    loss.backward(torch.as_tensor(np.asarray(upstream)).expand_as(loss))
    grads = [None if x is None else x.grad.numpy() for x in (h, w, b, p)]
    # The sizes of the terms of each gradient, which set the rounding of a vanishing one.
    logit_terms = largest_term(
        logits.detach().numpy(),
        np.where(inputs.padding[..., None], 0.0, p.detach().numpy()),
        to_float64(mask),
        upstream=upstream,
        **options,
    )
    rows = np.reshape(logit_terms, (-1, logit_terms.shape[-1]))
    h_rows = np.abs(np.reshape(h.detach().numpy(), (-1, h.shape[-1])))
    h_rows[np.reshape(inputs.padding, -1)] = 0.0
    terms = [
        float(np.max(rows @ np.abs(w.detach().numpy()), initial=0.0)),
        float(np.max(rows.T @ h_rows, initial=0.0)),
        float(np.max(rows.sum(axis=0), initial=0.0)),
    ]
    return loss.detach().numpy(), grads, terms


def linear_loss(*args: Any, positional: int = 4, **options: Any) -> Any:
    """:func:`~softce_multi.linear_masked_soft_cross_entropy` with ``bias`` the last array
    argument (not static under ``jax.jit``); ``positional`` of the other four by position, the
    rest by keyword."""
    *arrays, bias = args
    function = sc.linear_masked_soft_cross_entropy
    return pass_arrays(function, LINEAR_ARRAYS, arrays, positional, bias=bias, **options)


@pytest.mark.skipif(not any(b.library == "torch" for b in BACKENDS), reason="oracle needs torch")
@fuzz
@given(
    data=st.data(),
    structure=structures(
        "linear",
        **LINEAR_DIMENSIONS,
        reduction=REDUCTIONS,
        positional=LINEAR_POSITIONAL,
    ),
)
def test_linear_loss_agrees_with_the_oracle_on_every_backend(data: Any, structure: dict) -> None:
    inputs = data.draw(linear_inputs(structure))
    reduction, chunk_rows = structure["reduction"], structure["chunk_rows"]
    compute, tolerance = inputs.tolerance_dtypes()
    options = {"positional": structure["positional"], "chunk_rows": chunk_rows}

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        loss = call(backend, linear_loss, *args, reduction=reduction, **options)
        expected, _, _ = expected_linear(inputs, args, reduction=reduction)
        mass = target_mass(args[2], args[3], inputs.padding, reduction=reduction)
        assert_loss_agrees(loss, expected, compute, mass=mass, backend=backend, tolerance=tolerance)

    on_each(each_backend(*inputs.used_dtypes), check)


def linear_with_grad(*args: Any, positional: int = 4, **options: Any) -> Any:
    """:func:`~softce_multi.linear_masked_soft_cross_entropy_with_grad` as :func:`linear_loss`
    calls the loss."""
    *arrays, bias = args
    function = sc.linear_masked_soft_cross_entropy_with_grad
    return pass_arrays(function, LINEAR_ARRAYS, arrays, positional, bias=bias, **options)


@pytest.mark.skipif(not any(b.library == "torch" for b in BACKENDS), reason="oracle needs torch")
@fuzz
@given(
    data=st.data(),
    structure=structures(
        "linear_with_grad",
        **LINEAR_DIMENSIONS,
        reduction=("mean", "sum"),
        positional=LINEAR_POSITIONAL,
    ),
)
def test_linear_loss_with_grad_agrees_with_the_oracle_on_every_backend(
    data: Any, structure: dict
) -> None:
    inputs = data.draw(linear_inputs(structure))
    reduction, chunk_rows = structure["reduction"], structure["chunk_rows"]
    compute, tolerance = inputs.tolerance_dtypes()
    options = {"positional": structure["positional"], "chunk_rows": chunk_rows}

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        loss, grads = call(backend, linear_with_grad, *args, reduction=reduction, **options)
        expected, wanted, terms = expected_linear(inputs, args, reduction=reduction)
        mass = target_mass(args[2], args[3], inputs.padding, reduction=reduction)
        assert_loss_agrees(loss, expected, compute, mass=mass, backend=backend, tolerance=tolerance)
        for grad, want, size, name in zip(
            grads, wanted, terms, ("hidden", "weight", "bias"), strict=False
        ):
            if want is None:
                assert grad is None, "a gradient to a missing bias"
                continue
            assert_gradient_agrees(
                grad,
                want,
                tolerance,
                terms=size,
                backend=backend,
                dtype=inputs.dtypes[name],
            )
        assert_zero_at_padding(grads.hidden, inputs.padding)

    on_each(each_backend(*inputs.used_dtypes), check)


def torch_linear_gradients(args: tuple[Any, ...], upstream: np.ndarray, **options: Any) -> Any:
    """The linear loss and its gradients to the hidden states, the weight, the bias and the
    targets by torch autograd (None for a missing bias)."""
    import torch

    hidden, weight, targets, _, bias = args
    leaves = [x for x in (hidden, weight, bias, targets) if x is not None]
    for leaf in leaves:
        leaf.requires_grad_(True)
    loss = linear_loss(*args, **options)
    loss.backward(torch.as_tensor(upstream, dtype=loss.dtype, device=loss.device))
    return loss, [None if x is None else x.grad for x in (hidden, weight, bias, targets)]


def jax_linear_gradients(
    hidden: Any, weight: Any, targets: Any, mask: Any, bias: Any, upstream: Any, **options: Any
) -> Any:
    """As :func:`torch_linear_gradients`, by ``jax.vjp``."""
    import jax

    def loss_at(h: Any, w: Any, b: Any, p: Any) -> Any:
        return linear_loss(h, w, p, mask, b, **options)

    loss, pullback = jax.vjp(loss_at, hidden, weight, bias, targets)
    return loss, list(pullback(upstream.astype(loss.dtype)))


@pytest.mark.skipif(not any(b.library == "torch" for b in BACKENDS), reason="oracle needs torch")
@fuzz
@given(
    data=st.data(),
    structure=structures(
        "linear_autodiff",
        **LINEAR_DIMENSIONS,
        reduction=REDUCTIONS,
        positional=LINEAR_POSITIONAL,
    ),
    seed=seed_st,
)
def test_linear_autodiff_gradients_agree_with_the_oracle(
    data: Any, structure: dict, seed: int
) -> None:
    """torch autograd and ``jax.vjp`` of the linear loss, with a random upstream gradient, to
    all four of its differentiable inputs."""
    inputs = data.draw(linear_inputs(structure))
    reduction, chunk_rows = structure["reduction"], structure["chunk_rows"]
    compute, tolerance = inputs.tolerance_dtypes()
    shape = inputs.hidden.shape[:-1] if reduction == "none" else ()
    upstream = np.random.default_rng(seed).uniform(-2, 2, shape)
    options = {"reduction": reduction, "chunk_rows": chunk_rows}
    options["positional"] = structure["positional"]

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        if backend.library == "torch":
            loss, grads = torch_linear_gradients(args, upstream, **options)
        else:
            cotangent = on_backend(backend, upstream, "float64")
            loss, grads = call(backend, jax_linear_gradients, *args, cotangent, **options)
        expected, wanted, terms = expected_linear(
            inputs, args, upstream=upstream, reduction=reduction
        )
        mass = target_mass(args[2], args[3], inputs.padding, reduction=reduction)
        assert_loss_agrees(loss, expected, compute, mass=mass, backend=backend, tolerance=tolerance)
        sizes = (*terms, float(np.max(np.abs(wanted[3]), initial=0.0)))
        names = ("hidden", "weight", "bias", "targets")
        for grad, want, size, name in zip(grads, wanted, sizes, names, strict=True):
            if want is None:
                assert grad is None, "a gradient to a missing bias"
                continue
            assert_gradient_agrees(
                grad, want, tolerance, terms=size, backend=backend, dtype=inputs.dtypes[name]
            )
        assert_zero_at_padding(grads[0], inputs.padding)
        assert_zero_at_padding(grads[3], inputs.padding)

    on_each(each_backend(*inputs.used_dtypes, autodiff=True), check)


#: The bound of the float64 oracle's derivative of a gradient penalty of the linear loss,
#: relative to the largest entry of each derivative, by the coarser of the computation's and
#: the product's dtype: the logits are rounded to the product's dtype, which moves each entry
#: of the softmax by as much relatively times the logits' size.
LINEAR_SECOND_ORDER_RTOL = {"float64": 1e-9, "float32": 1e-3, "float16": 3e-2, "bfloat16": 1e-1}


def jax_linear_penalty_gradients(
    hidden: Any, weight: Any, targets: Any, mask: Any, bias: Any, upstream: Any, **options: Any
) -> Any:
    """The derivatives to ``hidden`` and ``weight`` of the penalty ``sum(g_h ** 2) +
    sum(g_w ** 2)`` of their gradients for the upstream gradient ``upstream``, by ``jax.grad``
    of a function of ``jax.vjp``."""
    import jax

    def penalty(h: Any, w: Any) -> Any:
        loss, pullback = jax.vjp(
            lambda h, w: linear_loss(h, w, targets, mask, bias, **options), h, w
        )
        grad_h, grad_w = pullback(upstream.astype(loss.dtype))
        return squared_norm(grad_h) + squared_norm(grad_w)

    return jax.grad(penalty, argnums=(0, 1))(hidden, weight)


def linear_penalty_oracle(
    inputs: LinearInputs, args: tuple[Any, ...], upstream: np.ndarray, *, reduction: str
) -> tuple[tuple[np.ndarray, np.ndarray], float]:
    """:func:`jax_linear_penalty_gradients` of the reference formula in float64 (torch
    autograd), for the values the backend holds, padding replaced by zeros; and the largest
    product that the matmuls of the logits' derivative with the hidden states and the weight
    sum (the derivative's largest entry times theirs)."""
    import torch

    from softce_multi.reference import masked_soft_cross_entropy

    hidden, weight, targets, mask, bias = args
    padding = inputs.padding[..., None]
    h = torch.tensor(np.where(padding, 0.0, to_float64(hidden)), requires_grad=True)
    w = torch.tensor(to_float64(weight), requires_grad=True)
    logits = h @ w.T + (0.0 if bias is None else torch.tensor(to_float64(bias)))
    p = torch.tensor(np.where(padding, 0.0, to_float64(targets)))
    loss = masked_soft_cross_entropy(logits, p, torch.tensor(to_float64(mask)), reduction=reduction)
    cotangent = torch.as_tensor(upstream).expand_as(loss)
    grads = torch.autograd.grad(loss, (h, w), cotangent, create_graph=True)
    penalty = sum((grad**2).sum() for grad in grads)
    if not penalty.requires_grad:  # no positions: the gradients are constant zeros
        return (np.zeros(h.shape), np.zeros(w.shape)), 0.0
    second = torch.autograd.grad(penalty, (h, w, logits), allow_unused=True, materialize_grads=True)

    def largest(x: Any) -> float:
        return float(np.max(np.abs(x.detach().numpy()), initial=0.0))

    product = largest(second[2]) * max(largest(h), largest(w))
    return (second[0].numpy(), second[1].numpy()), product


@needs_torch
@pytest.mark.skipif(not any(b.library == "jax" for b in BACKENDS), reason="JAX is not installed")
@few
@given(
    data=st.data(),
    structure=structures(
        "linear_penalty",
        shape=LINEAR_SHAPES,
        dtype=FLOATS,
        with_bias=(False, True),
        targets=FLOATS,
        mask=LINEAR_DIMENSIONS["mask"],
        trailing_one=(False, True),
        chunk_rows=(None, 1, 3),
        reduction=REDUCTIONS,
        positional=LINEAR_POSITIONAL,
    ),
    seed=seed_st,
)
def test_jax_linear_gradient_penalty_derivatives_are_zero_at_padding(
    data: Any, structure: dict, seed: int
) -> None:
    """The derivatives of a gradient penalty of the JAX linear loss to the hidden states and the
    weight are finite, exactly 0 at every padding row of the hidden states whatever NaN or inf
    they hold, the same as for zeros there, and the float64 ones."""
    dtype = structure["dtype"]  # of the hidden states, the weight and the bias
    bias = dtype if structure["with_bias"] else None
    inputs = data.draw(linear_inputs({**structure, "hidden": dtype, "weight": dtype, "bias": bias}))
    reduction = structure["reduction"]
    _, tolerance = inputs.tolerance_dtypes()
    shape = inputs.padding.shape if reduction == "none" else ()
    upstream = np.random.default_rng(seed).uniform(-2, 2, shape).astype(np.float32)
    options = {
        "positional": structure["positional"],
        "reduction": reduction,
        "chunk_rows": structure["chunk_rows"],
    }
    chosen = [b for b in each_backend(*inputs.used_dtypes, autodiff=True) if b.library == "jax"]
    assume(chosen)

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        cotangent = on_backend(backend, upstream, "float64")
        seconds = call(backend, jax_linear_penalty_gradients, *args, cotangent, **options)
        clean = (
            unpadded(backend, inputs.padding, args[0], dtype),
            args[1],
            unpadded(backend, inputs.padding, args[2], inputs.dtypes["targets"]),
            *args[3:],
        )
        desired, product = linear_penalty_oracle(inputs, args, upstream, reduction=reduction)
        # float16 holds no derivative near its largest number, nor the products of the
        # logits' derivative with the hidden states and the weight, which the matmuls of
        # JAX's derivative form in float16: their sum may be in range when they are not.
        largest = max(product, *(float(np.max(np.abs(x), initial=0.0)) for x in desired))
        assume(largest <= LARGEST[dtype] / 2)
        from_zeros = call(backend, jax_linear_penalty_gradients, *clean, cotangent, **options)
        for second, zeros, want, name in zip(
            seconds, from_zeros, desired, ("hidden", "weight"), strict=True
        ):
            assert dtype_name(second) == dtype, f"{name}: dtype {dtype_name(second)}"
            assert np.isfinite(to_float64(second)).all(), f"{name}: not finite"
            np.testing.assert_array_equal(to_numpy(second), to_numpy(zeros), err_msg=name)
            largest = float(np.max(np.abs(want), initial=0.0))
            bound = LINEAR_SECOND_ORDER_RTOL[tolerance] * largest + SMALLEST_SPACING[dtype]
            assert_within(second, want, np.full(want.shape, bound), backend=backend)
        assert_zero_at_padding(seconds[0], inputs.padding)

    on_each(chosen, check)


@pytest.mark.skipif(not any(b.library == "torch" for b in BACKENDS), reason="needs torch")
@pytest.mark.parametrize("objective", ("penalty", "penalty and weight decay"))
@few
@given(
    data=st.data(),
    structure=structures(
        "torch_linear_once",
        **LINEAR_DIMENSIONS,
        reduction=REDUCTIONS,
        positional=LINEAR_POSITIONAL,
    ),
    upstream_requires_grad=st.booleans(),
)
def test_torch_linear_loss_refuses_a_second_derivative(
    objective: str, data: Any, structure: dict, upstream_requires_grad: bool
) -> None:
    """The torch linear loss is differentiable once: the backward pass of a penalty of its
    gradients to the hidden states and the weight (taken with ``create_graph=True``), alone or
    beside another term of the weight, raises a RuntimeError rather than come back wrong."""
    import torch

    inputs = data.draw(linear_inputs(structure))
    reduction = structure["reduction"]
    shape = inputs.padding.shape if reduction == "none" else ()
    upstream = np.full(shape, 0.75)
    options = {
        "positional": structure["positional"],
        "reduction": reduction,
        "chunk_rows": structure["chunk_rows"],
    }
    chosen = [b for b in each_backend(*inputs.used_dtypes, autodiff=True) if b.library == "torch"]
    assume(chosen)

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        hidden, weight = args[0].requires_grad_(True), args[1].requires_grad_(True)
        loss = linear_loss(*args, **options)
        cotangent = torch.as_tensor(upstream, dtype=loss.dtype, device=loss.device)
        cotangent.requires_grad_(upstream_requires_grad)
        grads = torch.autograd.grad(loss, (hidden, weight), cotangent, create_graph=True)
        total = squared_norm(grads[0]) + squared_norm(grads[1])
        if objective == "penalty and weight decay":
            total = total + squared_norm(weight)
        with pytest.raises(RuntimeError):
            total.backward()

    on_each(chosen, check)
