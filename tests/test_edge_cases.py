"""Edge cases at the boundaries of the inputs: empty batches, narrow integer dtypes, scalars at
the limits of the computation dtype. Each holds on every installed backend where it applies.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import array_api_compat
import array_api_extra as xpx
import numpy as np
import pytest

import softce_multi as sc
from softce_multi.eagle3 import (
    build_vocab_mapping,
    draft_to_target_ids,
    multi_step_loss,
    prepare_targets,
    shift_left,
    target_to_draft_ids,
)

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class Library:
    """One array library: NumPy arrays in, NumPy arrays out."""

    name: str
    xp: Any

    def asarray(self, values: Any, dtype: str | None = None) -> Any:
        array = np.asarray(values)
        if dtype is not None:
            array = array.astype(dtype)
        return self.xp.asarray(array)

    def dtype(self, name: str) -> Any:
        return getattr(self.xp, name)

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.name == "torch":
            return x.detach().numpy()
        return np.asarray(x)


def _library(name: str) -> Library:
    if name == "numpy":
        return Library(name, np)
    module = pytest.importorskip(name, reason=f"{name} is not installed")
    if name == "jax":
        return Library(name, importlib.import_module("jax.numpy"))
    return Library(name, module)


@pytest.fixture(params=["numpy", "array_api_strict", "torch", "jax"])
def lib(request: pytest.FixtureRequest) -> Library:
    return _library(request.param)


def random_inputs(lib: Library, shape: tuple[int, ...], seed: int = 0) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(shape).astype(np.float32)
    targets = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)
    mask = rng.random(shape[:-1]) < 0.7
    return lib.asarray(logits), lib.asarray(targets), lib.asarray(mask)


# --- defect 1: an empty batch --------------------------------------------------------------

EMPTY_SHAPES = [(0, 5), (2, 0, 5)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch_reduces_to_zero(lib: Library, shape: tuple, reduction: str) -> None:
    loss = sc.masked_soft_cross_entropy(*random_inputs(lib, shape), reduction=reduction)
    assert tuple(loss.shape) == ()
    assert loss.dtype == lib.dtype("float32")
    assert lib.to_numpy(loss) == 0.0


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_batch_without_reduction_is_an_empty_array(lib: Library, shape: tuple) -> None:
    loss = sc.masked_soft_cross_entropy(*random_inputs(lib, shape), reduction="none")
    assert tuple(loss.shape) == shape[:-1]
    assert loss.dtype == lib.dtype("float32")


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch_with_grad_gives_zero_and_an_empty_gradient(
    lib: Library, shape: tuple, reduction: str
) -> None:
    logits, targets, mask = random_inputs(lib, shape)
    loss, grad = sc.masked_soft_cross_entropy_with_grad(logits, targets, mask, reduction=reduction)
    assert lib.to_numpy(loss) == 0.0
    assert tuple(grad.shape) == shape
    assert grad.dtype == logits.dtype


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch_backward_in_torch(shape: tuple, reduction: str) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    logits, targets, mask = random_inputs(_library("torch"), shape)
    logits.requires_grad_(True)
    targets.requires_grad_(True)
    loss = sc.masked_soft_cross_entropy(logits, targets, mask, reduction=reduction)
    torch.sum(loss).backward()
    assert torch.sum(loss).item() == 0.0
    assert logits.grad is not None and tuple(logits.grad.shape) == shape
    assert targets.grad is not None and tuple(targets.grad.shape) == shape


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch_gradient_in_jax(shape: tuple, reduction: str) -> None:
    jax = pytest.importorskip("jax", reason="jax is not installed")
    logits, targets, mask = random_inputs(_library("jax"), shape)

    def total(z: Any, p: Any) -> Any:
        return jax.numpy.sum(sc.masked_soft_cross_entropy(z, p, mask, reduction=reduction))

    value, (grad_logits, grad_targets) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(
        logits, targets
    )
    assert float(value) == 0.0
    assert grad_logits.shape == shape and grad_logits.dtype == logits.dtype
    assert grad_targets.shape == shape and grad_targets.dtype == targets.dtype


# --- defects 2 and 3: token ids of narrow integer dtypes ---------------------------------

NARROW_SIGNED = ["int8", "int16", "int32"]


def reference_draft_ids(t2d: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
    """The draft id of each target id, -1 where there is none, by a lookup table."""
    table = np.full(t2d.shape[0], -1)
    table[t2d] = np.arange(int(t2d.sum()))
    inside = (target_ids >= 0) & (target_ids < t2d.shape[0])
    return np.where(inside, table[np.where(inside, target_ids, 0)], -1)


@pytest.mark.parametrize("dtype", [*NARROW_SIGNED, "int64"])
def test_target_to_draft_ids_of_any_signed_dtype_keep_their_dtype(lib: Library, dtype: str) -> None:
    t2d = np.random.default_rng(1).random(300) < 0.3
    target_ids = np.array([[0, 5, 17, 99], [126, 127, -1, -100]])
    out = target_to_draft_ids(lib.asarray(target_ids, dtype), lib.asarray(t2d))
    assert out.dtype == lib.dtype(dtype)
    np.testing.assert_array_equal(lib.to_numpy(out), reference_draft_ids(t2d, target_ids))


@pytest.mark.parametrize("dtype", NARROW_SIGNED)
def test_draft_to_target_ids_of_narrow_dtypes_are_exact(lib: Library, dtype: str) -> None:
    # Target ids up to 250 do not fit in int8: the result is at least the index dtype.
    t2d = np.zeros(251, dtype=bool)
    t2d[np.arange(2, 251, 2)] = True  # 125 draft tokens, the even target ids from 2 to 250
    d2t = np.flatnonzero(t2d) - np.arange(125)
    draft_ids = np.array([[0, 1, 124], [-1, 125, 60]])
    out = draft_to_target_ids(lib.asarray(draft_ids, dtype), lib.asarray(d2t, dtype))
    np.testing.assert_array_equal(lib.to_numpy(out), [[2, 4, 250], [-1, -1, 122]])
    assert out.dtype == xpx.default_dtype(array_api_compat.array_namespace(out), "indexing")


def test_draft_to_target_ids_accept_unsigned_ids(lib: Library) -> None:
    d2t = np.array([2, 2, 3])
    out = draft_to_target_ids(lib.asarray([[0, 2], [1, 255]], "uint8"), lib.asarray(d2t))
    np.testing.assert_array_equal(lib.to_numpy(out), [[2, 5], [3, -1]])


# --- defect 4: shift_left's fill must fit the dtype --------------------------------------


@pytest.mark.parametrize(
    ("dtype", "fill"),
    [
        ("uint8", -1),
        ("uint8", 256),
        ("int8", 1000),
        ("int8", -129),
        ("int16", 2**15),
        ("int32", 10**400),
        ("int8", 1e3),
        ("int64", math.nan),
        ("int64", math.inf),
        ("float32", 1e39),
        ("float32", -(10**400)),
        ("float64", 10**400),
    ],
    ids=repr,
)
def test_shift_left_refuses_a_fill_outside_the_dtype(lib: Library, dtype: str, fill: Any) -> None:
    x = lib.asarray(np.ones((1, 3)), dtype)
    with pytest.raises(TypeError, match=f"fill.*{dtype}"):
        shift_left(x, fill=fill)


@pytest.mark.parametrize("fill", [1e5, -7e4])
def test_shift_left_refuses_a_fill_beyond_float16(lib: Library, fill: float) -> None:
    if lib.name == "array_api_strict":
        pytest.skip("array-api-strict has no float16")
    with pytest.raises(TypeError, match=r"fill.*float16"):
        shift_left(lib.asarray(np.ones((1, 3)), "float16"), fill=fill)


@pytest.mark.parametrize(
    ("dtype", "fill", "expected"),
    [
        ("uint8", 255, 255),
        ("int8", -128, -128),
        ("int8", True, 1),
        ("int16", 7.0, 7),
        ("int64", 2**63 - 1, 2**63 - 1),
        ("float32", math.inf, math.inf),
        ("float32", 10**38, 1e38),
        ("bool", 1, True),
    ],
    ids=repr,
)
def test_shift_left_writes_a_fill_that_fits(
    lib: Library, dtype: str, fill: Any, expected: Any
) -> None:
    x = lib.asarray(np.zeros((1, 3)), dtype)
    out = lib.to_numpy(shift_left(x, fill=fill))
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, np.array([[0, 0, expected]]).astype(dtype))


# --- defect 5: scalars at the limits -------------------------------------------------------


@pytest.mark.parametrize("num_valid", [10**400, 1e39, 2.0**127, Fraction(10**50)], ids=repr)
def test_num_valid_beyond_float32_is_refused(lib: Library, num_valid: Any) -> None:
    with pytest.raises(ValueError, match=r"num_valid.*float32"):
        sc.masked_soft_cross_entropy(*random_inputs(lib, (2, 3, 5)), num_valid=num_valid)


@pytest.mark.parametrize("num_valid", [1e-50, 1e-40, np.float32(1e-39)], ids=repr)
def test_tiny_num_valid_is_refused_rather_than_flushed_to_zero(
    lib: Library, num_valid: Any
) -> None:
    with pytest.raises(ValueError, match=r"num_valid.*float32"):
        sc.masked_soft_cross_entropy(*random_inputs(lib, (2, 3, 5)), num_valid=num_valid)


def test_num_valid_within_the_float32_range_is_the_denominator(lib: Library) -> None:
    logits, targets, mask = random_inputs(lib, (2, 3, 5), seed=3)
    total = sc.masked_soft_cross_entropy(logits, targets, mask, reduction="sum")
    for num_valid in (1e-30, 0.375, 10**30):
        loss = sc.masked_soft_cross_entropy(logits, targets, mask, num_valid=num_valid)
        expected = np.float64(lib.to_numpy(total)) / float(num_valid)
        np.testing.assert_allclose(lib.to_numpy(loss), expected, rtol=1e-5)


def test_tiny_num_valid_is_used_in_float64(lib: Library) -> None:
    if lib.name == "jax":
        jax = pytest.importorskip("jax")
        if not jax.config.read("jax_enable_x64"):
            pytest.skip("JAX makes float64 arrays only with jax_enable_x64")
    rng = np.random.default_rng(4)
    logits = lib.asarray(rng.standard_normal((2, 3, 5)))
    targets = lib.asarray(rng.dirichlet(np.ones(5), size=(2, 3)))
    mask = lib.asarray(np.ones((2, 3), dtype=bool))
    total = sc.masked_soft_cross_entropy(logits, targets, mask, reduction="sum")
    loss = sc.masked_soft_cross_entropy(logits, targets, mask, num_valid=1e-50)
    np.testing.assert_allclose(lib.to_numpy(loss), lib.to_numpy(total) / 1e-50, rtol=1e-12)


needs_wide_longdouble = pytest.mark.skipif(
    np.finfo(np.longdouble).bits <= 64, reason="np.longdouble is float64 on this platform"
)


@needs_wide_longdouble
@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize(
    "loss", [sc.masked_soft_cross_entropy, sc.masked_soft_cross_entropy_with_grad]
)
def test_longdouble_inputs_are_refused(position: int, loss: Any) -> None:
    args = list(random_inputs(_library("numpy"), (2, 3, 5)))
    args[position] = args[position].astype(np.longdouble)
    name = ["logits", "target_probs"][position]
    with pytest.raises(TypeError, match=f"{name}.*longdouble|{name}.*float128"):
        loss(*args)


@needs_wide_longdouble
def test_longdouble_num_valid_is_refused(lib: Library) -> None:
    with pytest.raises(TypeError, match=r"num_valid.*longdouble"):
        sc.masked_soft_cross_entropy(*random_inputs(lib, (2, 3, 5)), num_valid=np.longdouble(4))


@pytest.mark.parametrize("always_include", [1, "ab", 2.5, b"\x01"], ids=repr)
def test_always_include_that_is_not_a_collection_of_ids_is_refused(
    lib: Library, always_include: Any
) -> None:
    counts = lib.asarray(np.arange(6))
    with pytest.raises(TypeError, match="always_include"):
        build_vocab_mapping(counts, 3, always_include=always_include)


def test_many_steps_with_a_large_decay_give_the_weighted_mean(lib: Library) -> None:
    values = np.random.default_rng(5).random(400) * 4
    losses = [lib.asarray(v, "float32") for v in values]
    out = lib.to_numpy(multi_step_loss(losses, decay=10.0))
    weights = [Fraction(10) ** i for i in range(400)]
    stored = [Fraction(float(np.float32(v))) for v in values]
    expected = sum(w * v for w, v in zip(weights, stored, strict=True)) / sum(weights)
    np.testing.assert_allclose(out, float(expected), rtol=1e-5)


def test_many_steps_with_a_large_decay_unnormalized_are_refused(lib: Library) -> None:
    losses = [lib.asarray(1.0, "float32")] * 400
    with pytest.raises(ValueError, match=r"decay.*400.*float32"):
        multi_step_loss(losses, decay=10.0, normalize=False)


# --- found by the differential fuzzer ------------------------------------------------------


_PROBS = np.full((2, 3), 1 / 3, dtype=np.float32)
_MASK = np.ones(2, dtype=bool)

#: Calls with one NumPy array of the given dtype, by the name of that argument.
_CALLS_WITH_ONE_ARRAY_OF: dict[str, Any] = {
    "logits": lambda dtype: sc.masked_soft_cross_entropy(_PROBS.astype(dtype), _PROBS, _MASK),
    "target_probs": lambda dtype: sc.masked_soft_cross_entropy_with_grad(
        _PROBS, _PROBS.astype(dtype), _MASK
    ),
    "position_mask": lambda dtype: sc.masked_soft_cross_entropy(
        _PROBS, _PROBS, _MASK.astype(dtype)
    ),
    "num_valid": lambda dtype: sc.masked_soft_cross_entropy(
        _PROBS, _PROBS, _MASK, num_valid=np.asarray(2, dtype)
    ),
    "hidden": lambda dtype: sc.linear_masked_soft_cross_entropy(
        _PROBS.astype(dtype), np.ones((3, 3), np.float32), _PROBS, _MASK
    ),
    "x": lambda dtype: shift_left(_PROBS.astype(dtype)),
    "target_logits": lambda dtype: prepare_targets(_PROBS.astype(dtype), _MASK, np.ones(3, bool)),
    "step_losses": lambda dtype: multi_step_loss(np.asarray([1.0, 2.0], dtype)),
    "token_counts": lambda dtype: build_vocab_mapping(np.ones(3, dtype), 1),
}


@pytest.mark.parametrize("argument", list(_CALLS_WITH_ONE_ARRAY_OF))
def test_numpy_bfloat16_is_refused_naming_the_argument_and_the_dtype(argument: str) -> None:
    # NumPy's array API knows no bfloat16 (ml_dtypes', which JAX arrays become in NumPy): its
    # isdtype raised a TypeError naming neither the argument nor the library.
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed")
    with pytest.raises(TypeError, match=rf"^{argument} has dtype bfloat16, which numpy does not"):
        _CALLS_WITH_ONE_ARRAY_OF[argument](np.dtype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64"])
def test_draft_to_target_ids_take_offsets_of_wide_unsigned_dtypes_in_torch(dtype: str) -> None:
    # PyTorch's index_select has no uint16/32/64: the lookup raised NotImplementedError.
    torch = pytest.importorskip("torch", reason="torch is not installed")
    d2t = torch.tensor([2, 2, 3]).to(getattr(torch, dtype))
    out = draft_to_target_ids(torch.tensor([[0, 2], [1, 7]]), d2t)
    np.testing.assert_array_equal(out.numpy(), [[2, 5], [3, -1]])
    assert out.dtype == torch.int64
