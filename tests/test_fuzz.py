"""A differential fuzzer: every public function, on every installed backend, on the same inputs.

Each test draws one input with hypothesis, builds it on every backend of
:func:`softce_multi.testing.backends` that has the dtypes it needs (NumPy, array-api-strict,
PyTorch, JAX, and CuPy and the GPUs where present), calls the function on each, and holds each
result to the float64 oracle: :func:`softce_multi.testing.reference` for the losses and their
gradients, a NumPy statement of the documented result for the EAGLE-3 helpers. A result must
agree in value (within :data:`~softce_multi.testing.LOSS_RTOL` and
:data:`~softce_multi.testing.GRAD_RTOL`), dtype, shape and library. A bad input must raise the
same exception type on every backend, with the argument named in the message.

The inputs cover empty axes, ``V = 1``, odd and large vocabularies, every dtype each function
accepts (integer ids and masks of every width, float16 to float64 values), masks of both
shapes with bool, integer and fractional weights, strided and transposed views, and NaN,
infinities and huge numbers in padding. The losses get their arrays by position, by keyword
(under their documented names) or both.

The gradients of torch autograd and ``jax.vjp`` are held to the oracle for random upstream
gradients, and 16-bit logits gradients, for upstream gradients other than 1, to the accuracy of
one rounding (:func:`softce_multi.testing.assert_gradient_rounded_once`). Derivatives of
gradients (a gradient penalty's, hessians; JAX's linear loss's) are finite, exactly 0 at
padding, and the float64 ones elsewhere; the torch linear loss, differentiable once, refuses
them.

An input is a *structure* (shapes, dtypes, reduction: what a JAX compilation depends on) and
*values* (seeds, scales, offsets, poison, memory layouts). Each test draws its structures from
a fixed list of ``max(4, max_examples // 20)`` of them, which covers every value of each
dimension evenly, and its values freely; JAX runs under ``jax.jit``, so that a structure seen
before reuses its compilation. The number of examples is the hypothesis profile's:
``pytest tests/test_fuzz.py --hypothesis-profile=thorough`` runs 2000 per test.
"""

from __future__ import annotations

import importlib
import inspect
import math
import random
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import array_api_compat
import array_api_extra as xpx
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import softce_multi as sc
from softce_multi import eagle3
from softce_multi.testing import (
    LOSS_RTOL,
    Backend,
    assert_gradient_close,
    assert_gradient_rounded_once,
    assert_loss_close,
    backends,
    compute_dtype,
    dtype_name,
    library_of,
    numpy_reference,
    random_targets,
    reference,
    to_float64,
    to_numpy,
)

# NumPy warns of the NaN and infinities in padding; they are the point.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BACKENDS = backends()
FLOATS = ("float16", "bfloat16", "float32", "float64")
SIGNED = ("int8", "int16", "int32", "int64")
UNSIGNED = ("uint8", "uint16", "uint32", "uint64")
INTEGERS = SIGNED + UNSIGNED
MASK_DTYPES = ("bool", *INTEGERS, *FLOATS)
LAYOUTS = ("contiguous", "strided", "transposed")

#: Values that padding positions may hold; none of them may reach a result.
POISON = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 6e4])

#: Machine epsilon of each floating dtype.
EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}

#: Spacing of the smallest (subnormal) numbers of each floating dtype: an entry rounded to the
#: dtype is off by up to half of it, whatever the size of the largest entry.
SMALLEST_SPACING = {
    "float16": 2.0**-24,
    "bfloat16": 2.0**-133,
    "float32": 2.0**-149,
    "float64": 2.0**-1074,
}

EXAMPLES = settings().max_examples  # the active profile's
#: Structures per test: 4 at the default profile's 30 examples, 100 at the thorough profile's
#: 2000, each met by about 20 examples of different values (a JAX compilation takes seconds on
#: the CPU; the examples of a compiled structure take milliseconds).
STRUCTURES = max(4, EXAMPLES // 20)

seed_st = st.integers(0, 2**32 - 1)

# settings() without max_examples: the count comes from the active hypothesis profile. Inputs
# of a dtype no installed backend has are discarded (all of bfloat16 without torch and JAX).
fuzz = settings(deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


def structures(test: str, **dimensions: Sequence[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A fixed list of :data:`STRUCTURES` combinations of the dimensions' values, to sample.

    Each dimension's values are shuffled and repeated, so that every value is met as evenly as
    the list's length allows; the list depends only on ``test`` and the profile.
    """
    rng = random.Random(test)
    columns = {}
    for name, values in dimensions.items():
        column: list[Any] = []
        while len(column) < STRUCTURES:
            block = list(values)
            rng.shuffle(block)
            column += block
        columns[name] = column[:STRUCTURES]
    rows = [{name: column[i] for name, column in columns.items()} for i in range(STRUCTURES)]
    return st.sampled_from(rows)


# --------------------------------------------------------------------------------------------
# Inputs on every backend, and calls
# --------------------------------------------------------------------------------------------


def on_backend(backend: Backend, values: Any, dtype: str) -> Any:
    """A copy of the NumPy ``values`` on ``backend`` in the dtype called ``dtype``."""
    values = np.asarray(values)
    if dtype in FLOATS:
        return backend.asarray(values, dtype)
    exact = np.array(values.astype(dtype), copy=True)
    if backend.library == "numpy":
        return exact
    if backend.library == "torch":
        import torch

        return torch.from_numpy(exact).to("cuda" if backend.device == "gpu" else "cpu")
    if backend.library == "jax":
        import jax

        return jax.device_put(backend.module.asarray(exact), backend.jax_device)
    return backend.module.asarray(exact)


def place(backend: Backend, values: Any, dtype: str, layout: str) -> Any:
    """``values`` on ``backend`` as a contiguous array, a strided or a transposed view.

    The strided view takes every other element of the last axis of an array whose other
    elements hold NaN (True, 1 for bool and integers), so that reading them shows.
    """
    values = np.asarray(values)
    if layout == "strided" and values.ndim >= 1:
        wide = np.ones((*values.shape[:-1], 2 * values.shape[-1]), dtype=values.dtype)
        if dtype in FLOATS:
            wide = wide.astype(np.float64) * np.nan
        wide[..., ::2] = values
        return on_backend(backend, wide, dtype)[..., ::2]
    if layout == "transposed" and values.ndim >= 2:
        swapped = on_backend(backend, np.swapaxes(values, -1, -2), dtype)
        return array_api_compat.array_namespace(swapped).matrix_transpose(swapped)
    return on_backend(backend, values, dtype)


def has_dtypes(backend: Backend, dtypes: Sequence[str]) -> bool:
    """Whether ``backend`` has every floating dtype in ``dtypes`` (every library has every
    integer dtype, PyTorch's unsigned ones beyond 8 bits included)."""
    return all(backend.supports(dtype) for dtype in dtypes if dtype in FLOATS)


def each_backend(*dtypes: str, autodiff: bool = False) -> list[Backend]:
    """The installed backends with every dtype in ``dtypes`` (and autodiff, if asked); an input
    that no backend can hold is discarded."""
    chosen = [
        backend
        for backend in BACKENDS
        if has_dtypes(backend, dtypes) and (backend.is_autodiff or not autodiff)
    ]
    assume(chosen)
    return chosen


def on_each(chosen: Sequence[Backend], check: Callable[[Backend], None]) -> None:
    """Run ``check`` on each backend; a failure says which backend it was on."""
    for backend in chosen:
        try:
            check(backend)
        except Exception as error:
            error.add_note(f"on backend {backend.name}")
            raise


_JITTED: dict[tuple[Callable[..., Any], tuple[str, ...]], Callable[..., Any]] = {}


def call(backend: Backend, function: Callable[..., Any], *arrays: Any, **static: Any) -> Any:
    """``function(*arrays, **static)``; on JAX under ``jax.jit`` with the keywords static, so
    that a structure met before reuses its compilation."""
    if backend.library != "jax":
        return function(*arrays, **static)
    import jax

    key = (function, tuple(sorted(static)))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(function, static_argnames=key[1])
    return _JITTED[key](*arrays, **static)


#: The array parameters of the loss and of the linear loss: positional-or-keyword, under exactly
#: these names (NeMo's trainer passes them by keyword). Every option after them is keyword-only.
LOSS_ARRAYS = ("logits", "target_probs", "position_mask")
LINEAR_ARRAYS = ("hidden", "weight", "target_probs", "position_mask")
LOSS_OPTIONS = ("reduction", "num_valid")
LINEAR_OPTIONS = ("bias", "reduction", "num_valid", "chunk_rows")


def pass_arrays(
    function: Callable[..., Any],
    names: Sequence[str],
    arrays: Sequence[Any],
    positional: int,
    **options: Any,
) -> Any:
    """``function(*arrays, **options)``, the first ``positional`` arrays passed by position and
    the others by keyword, under their ``names``."""
    by_keyword = dict(zip(names[positional:], arrays[positional:], strict=True))
    return function(*arrays[:positional], **by_keyword, **options)


def loss_of(*arrays: Any, positional: int = 3, **options: Any) -> Any:
    """:func:`~softce_multi.masked_soft_cross_entropy` of ``arrays`` (logits, targets, mask),
    ``positional`` of them by position, the rest by keyword."""
    return pass_arrays(sc.masked_soft_cross_entropy, LOSS_ARRAYS, arrays, positional, **options)


def index_dtype_name(array: Any) -> str:
    """The name of the default index dtype of the library of ``array``."""
    xp = array_api_compat.array_namespace(array)
    return str(xpx.default_dtype(xp, "indexing")).rsplit(".", maxsplit=1)[-1]


def assert_equal_arrays(actual: Any, desired: np.ndarray, *, library: str, dtype: str) -> None:
    """Library, dtype, shape, then every value (NaN equal to NaN)."""
    assert library_of(actual) == library, f"library {library_of(actual)}, expected {library}"
    assert dtype_name(actual) == dtype, f"dtype {dtype_name(actual)}, expected {dtype}"
    assert tuple(actual.shape) == desired.shape, f"shape {tuple(actual.shape)} != {desired.shape}"
    np.testing.assert_array_equal(to_numpy(actual), desired)


# --------------------------------------------------------------------------------------------
# The loss: drawn inputs
# --------------------------------------------------------------------------------------------

#: Logits shapes ``[..., V]``: empty axes, V = 1, odd and large V, 1-D logits.
LOSS_SHAPES = (
    (7,),
    (0, 7),
    (2, 0, 5),
    (1, 1),
    (4, 1),
    (3, 2),
    (2, 3, 7),
    (3, 1, 2, 33),
    (2, 32),
    (5, 255),
    (1, 1000),
    (2, 2, 4099),
)


class LossInputs(NamedTuple):
    """One drawn input of the loss: float64 values and the dtypes and layouts to build it in."""

    logits: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    logits_dtype: str
    target_dtype: str
    mask_dtype: str
    layouts: tuple[str, str, str]

    @property
    def dtypes(self) -> tuple[str, str, str]:
        return (self.logits_dtype, self.target_dtype, self.mask_dtype)

    @property
    def compute_dtype(self) -> str:
        return compute_dtype(self.logits_dtype, self.target_dtype)

    @property
    def padding(self) -> np.ndarray:
        """True at the positions of weight 0, over ``logits.shape[:-1]``."""
        return np.reshape(self.mask == 0, self.logits.shape[:-1])

    def build(self, backend: Backend) -> tuple[Any, Any, Any]:
        return (
            place(backend, self.logits, self.logits_dtype, self.layouts[0]),
            place(backend, self.targets, self.target_dtype, self.layouts[1]),
            place(backend, self.mask, self.mask_dtype, self.layouts[2]),
        )


def draw_mask(rng: np.random.Generator, positions: tuple[int, ...], dtype: str) -> np.ndarray:
    """Weights over ``positions``: 0/1 for bool, 0 to 3 for integers, fractions for floats."""
    keep = rng.random(positions) < 0.7
    if dtype == "bool":
        return keep
    if dtype in INTEGERS:
        return np.where(keep, rng.integers(1, 4, positions), 0)
    return np.where(keep, rng.choice(np.array([0.25, 0.5, 1.0, 2.5]), positions), 0.0)


def poison_padding(rng: np.random.Generator, values: np.ndarray, padding: np.ndarray) -> None:
    """Write NaN, infinities and huge numbers into the rows of ``values`` at ``padding``."""
    rows = np.broadcast_to(padding[..., None], values.shape)
    values[rows] = rng.choice(POISON, values.shape)[rows]


@st.composite
def loss_values(
    draw: st.DrawFn,
    structure: dict[str, Any],
    *,
    minus_inf: bool = True,
) -> LossInputs:
    """Values for a loss structure (``shape``, ``logits``, ``targets``, ``mask`` dtypes and
    ``trailing_one``): logits of any scale and offset, targets with zeros, summing to 1 or not,
    poison in padding; with ``minus_inf``, -inf logits where the target is 0."""
    shape = structure["shape"]
    positions = shape[:-1]
    rng = np.random.default_rng(draw(seed_st))
    scale = draw(st.sampled_from([1e-3, 0.5, 3.0]))
    offset = draw(st.sampled_from([0.0, -40.0, 1e3, 3e4]))
    logits = offset + scale * rng.standard_normal(shape)
    targets = random_targets(rng, shape, normalised=draw(st.booleans()))
    if minus_inf and draw(st.booleans()):
        row_max = logits == logits.max(axis=-1, keepdims=True, initial=-np.inf)
        logits[(targets == 0) & ~row_max] = -np.inf
    mask = draw_mask(rng, positions, structure["mask"])
    if draw(st.booleans()):
        poison_padding(rng, logits, mask == 0)
        poison_padding(rng, targets, mask == 0)
    if structure["trailing_one"]:
        mask = mask[..., None]
    layouts = (
        draw(st.sampled_from(LAYOUTS)),
        draw(st.sampled_from(LAYOUTS)),
        draw(st.sampled_from(LAYOUTS)),
    )
    return LossInputs(
        logits, targets, mask, structure["logits"], structure["targets"], structure["mask"], layouts
    )


LOSS_DIMENSIONS = {
    "shape": LOSS_SHAPES,
    "logits": FLOATS,
    "targets": FLOATS,
    "mask": MASK_DTYPES,
    "trailing_one": (False, True),
}


def expected_loss(inputs: LossInputs, logits: Any, targets: Any, mask: Any, **options: Any) -> Any:
    """The float64 oracle on the values the backend holds, padding replaced by zeros (it must
    not matter)."""
    z, p, w = to_float64(logits), to_float64(targets), to_float64(mask)
    padding = inputs.padding[..., None]
    z, p = np.where(padding, 0.0, z), np.where(padding, 0.0, p)
    # The plain torch formula of `reference` makes 0 * -inf = NaN of a zero target at a -inf
    # logit, where the loss has exactly 0; the NumPy formula keeps that term 0.
    oracle = reference if np.isfinite(z).all() else numpy_reference
    return oracle(z, p, w, **options)


def row_scale(
    w: np.ndarray,
    positions: tuple[int, ...],
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: Any = 1.0,
) -> np.ndarray:
    """Per position, ``|w / den * upstream|``: the size of ``d loss / d (cross entropy)``."""
    weights = np.reshape(w, positions)
    den = 1.0
    if reduction == "mean":
        den = max(weights.sum(), 1.0) if num_valid is None else float(num_valid)
    return np.abs(np.broadcast_to(upstream, weights.shape) * weights) / (den or np.inf)


def largest_term(
    z: np.ndarray,
    p: np.ndarray,
    w: np.ndarray,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: Any = 1.0,
) -> np.ndarray:
    """Per element, ``|w / den * upstream| * (sum(p) * softmax(z) + p)``: the size of the two
    terms whose difference is the logits gradient, which sets the rounding of that difference
    (with one token they cancel exactly, and the gradient is 0 up to their rounding)."""
    z, p = np.nan_to_num(z, posinf=0.0), np.nan_to_num(p)
    scale = row_scale(w, z.shape[:-1], reduction=reduction, num_valid=num_valid, upstream=upstream)
    shifted = np.exp(z - z.max(axis=-1, keepdims=True, initial=-np.inf))
    softmax = shifted / shifted.sum(axis=-1, keepdims=True)
    return scale[..., None] * (p.sum(axis=-1, keepdims=True) * softmax + np.abs(p))


def target_mass(
    targets: Any,
    mask: Any,
    padding: np.ndarray,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
) -> np.ndarray:
    """The loss's unit, reduced as the loss is: per position ``|w| * sum(|p|)`` (0 at padding).

    A float32 loss is resolved to a few roundings of it, not better: the log-sum-exp of a
    confident row is the log of 1 plus a tiny sum, rounded to 1 plus a multiple of its epsilon.
    """
    p = np.where(padding[..., None], 0.0, to_float64(targets))
    weights = np.reshape(np.abs(to_float64(mask)), padding.shape)
    per_position = weights * np.abs(p).sum(axis=-1)
    if reduction == "none":
        return per_position
    if reduction == "sum":
        return np.asarray(per_position.sum())
    den = max(weights.sum(), 1.0) if num_valid is None else float(num_valid)
    return np.asarray(per_position.sum() / den if den else 0.0)


def assert_loss_agrees(
    actual: Any,
    desired: np.ndarray,
    compute: str,
    *,
    mass: np.ndarray,
    backend: Backend,
    tolerance: str | None = None,
) -> None:
    """:func:`~softce_multi.testing.assert_loss_close` with the tolerance of ``tolerance`` (by
    default ``compute``, the dtype of the loss), and a floor at the rounding of the loss's unit:
    8 roundings of ``compute`` of the target mass ``mass`` (:func:`target_mass`)."""
    assert_loss_close(
        actual,
        np.asarray(desired),
        tolerance or compute,
        library=backend.library,
        dtype=compute,
        device=backend.device,
        atol=8 * EPS[compute] * mass,
    )


def assert_gradient_agrees(
    actual: Any, desired: np.ndarray, compute: str, *, terms: float, backend: Backend, dtype: str
) -> None:
    """:func:`~softce_multi.testing.assert_gradient_close` within the tolerance of the largest
    entry, with a floor at the rounding of the gradient's ``terms`` (their largest size;
    8 roundings in the computation dtype) and at the spacing of the subnormal numbers of the
    gradient's dtype (float16 resolves nothing below ``2**-24``)."""
    assert_gradient_close(
        actual,
        desired,
        compute,
        library=backend.library,
        dtype=dtype,
        device=backend.device,
        atol=max(8 * EPS[compute] * terms, SMALLEST_SPACING[dtype]),
    )


def oracle_terms(inputs: LossInputs, logits: Any, targets: Any, mask: Any, **options: Any) -> float:
    """The largest term of the logits gradient (:func:`largest_term`) of the values the backend
    holds, padding left out."""
    padding = inputs.padding[..., None]
    z = np.where(padding, 0.0, to_float64(logits))
    p = np.where(padding, 0.0, to_float64(targets))
    return float(np.max(largest_term(z, p, to_float64(mask), **options), initial=0.0))


def assert_zero_at_padding(gradient: Any, padding: np.ndarray) -> None:
    """Every gradient entry of a padding position is exactly 0 (NaN and inf are not)."""
    values = to_numpy(gradient)
    rows = np.broadcast_to(padding[..., None], values.shape)
    assert (values[rows] == 0).all(), "a padding position got a gradient other than exactly 0"


class NumValid(NamedTuple):
    """A ``num_valid`` to pass: None, a host number of some ``kind``, or a 0-d array."""

    value: float | None
    kind: str  # "none", "int", "float", "numpy" (a NumPy scalar) or "array"
    dtype: str = "float32"

    def build(self, backend: Backend) -> Any:
        if self.kind == "none":
            return None
        if self.kind == "int":
            return int(self.value)  # type: ignore[arg-type]
        if self.kind == "float":
            return float(self.value)  # type: ignore[arg-type]
        if self.kind == "numpy":
            return np.dtype(self.dtype).type(self.value)
        return on_backend(backend, np.asarray(self.value), self.dtype)

    @property
    def dtypes(self) -> tuple[str, ...]:
        return (self.dtype,) if self.kind == "array" else ()


NUM_VALID = (
    NumValid(None, "none"),
    NumValid(0, "int"),
    NumValid(3, "int"),
    NumValid(1000, "int"),
    NumValid(7, "numpy", "int64"),
    NumValid(2, "numpy", "uint8"),
    NumValid(0.0, "float"),
    NumValid(0.5, "float"),
    NumValid(1e-3, "float"),
    NumValid(1e20, "float"),
    NumValid(2.5, "numpy", "float32"),
    NumValid(0, "array", "int32"),
    NumValid(4, "array", "int8"),
    NumValid(17, "array", "int64"),
    NumValid(3, "array", "float32"),
    NumValid(0.75, "array", "float64"),
)


def loss_with_count(
    logits: Any, targets: Any, mask: Any, count: Any, *, positional: int = 3, **options: Any
) -> Any:
    """The loss with ``num_valid=count``, an array argument (not static under ``jax.jit``)."""
    return loss_of(logits, targets, mask, positional=positional, num_valid=count, **options)


def with_grad_of(*arrays: Any, positional: int = 3, **options: Any) -> Any:
    """:func:`~softce_multi.masked_soft_cross_entropy_with_grad`, ``positional`` of its arrays
    by position, the rest by keyword."""
    function = sc.masked_soft_cross_entropy_with_grad
    return pass_arrays(function, LOSS_ARRAYS, arrays, positional, **options)


def loss_with_grad_with_count(
    logits: Any, targets: Any, mask: Any, count: Any, *, positional: int = 3, **options: Any
) -> Any:
    """:func:`~softce_multi.masked_soft_cross_entropy_with_grad` with ``num_valid=count``."""
    return with_grad_of(logits, targets, mask, positional=positional, num_valid=count, **options)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "loss", **LOSS_DIMENSIONS, reduction=("mean", "sum", "none"), positional=(0, 1, 2, 3)
    ),
)
def test_loss_agrees_with_the_oracle_on_every_backend(data: Any, structure: dict) -> None:
    inputs = data.draw(loss_values(structure))
    reduction, dtype = structure["reduction"], inputs.compute_dtype
    positional = structure["positional"]

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        loss = call(backend, loss_of, *args, positional=positional, reduction=reduction)
        expected = expected_loss(inputs, *args, reduction=reduction)
        mass = target_mass(*args[1:], inputs.padding, reduction=reduction)
        assert_loss_agrees(loss, expected.loss, dtype, mass=mass, backend=backend)

    on_each(each_backend(*inputs.dtypes), check)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "num_valid", **LOSS_DIMENSIONS, num_valid=NUM_VALID, positional=(0, 1, 2, 3)
    ),
)
def test_num_valid_is_the_denominator_of_the_mean_on_every_backend(
    data: Any, structure: dict
) -> None:
    inputs = data.draw(loss_values(structure))
    num_valid: NumValid = structure["num_valid"]
    dtype, positional = inputs.compute_dtype, structure["positional"]

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        count = num_valid.build(backend)
        if num_valid.kind == "array":
            loss = call(backend, loss_with_count, *args, count, positional=positional)
        else:
            loss = call(backend, loss_of, *args, positional=positional, num_valid=count)
        expected = expected_loss(inputs, *args, num_valid=num_valid.value)
        mass = target_mass(*args[1:], inputs.padding, num_valid=num_valid.value)
        assert_loss_agrees(loss, expected.loss, dtype, mass=mass, backend=backend)

    on_each(each_backend(*inputs.dtypes, *num_valid.dtypes), check)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "with_grad",
        **LOSS_DIMENSIONS,
        reduction=("mean", "sum"),
        num_valid=NUM_VALID,
        positional=(0, 1, 2, 3),
    ),
)
def test_loss_with_grad_agrees_with_the_oracle_on_every_backend(data: Any, structure: dict) -> None:
    inputs = data.draw(loss_values(structure))
    reduction, dtype = structure["reduction"], inputs.compute_dtype
    num_valid = structure["num_valid"] if reduction == "mean" else NumValid(None, "none")
    options = {"positional": structure["positional"], "reduction": reduction}

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        count = num_valid.build(backend)
        if num_valid.kind == "array":
            result = call(backend, loss_with_grad_with_count, *args, count, **options)
        else:
            result = call(backend, with_grad_of, *args, num_valid=count, **options)
        loss, grad = result
        expected = expected_loss(inputs, *args, reduction=reduction, num_valid=num_valid.value)
        mass = target_mass(
            *args[1:], inputs.padding, reduction=reduction, num_valid=num_valid.value
        )
        assert_loss_agrees(loss, expected.loss, dtype, mass=mass, backend=backend)
        terms = oracle_terms(inputs, *args, reduction=reduction, num_valid=num_valid.value)
        assert_gradient_agrees(
            grad,
            expected.grad_logits,
            dtype,
            terms=terms,
            backend=backend,
            dtype=inputs.logits_dtype,
        )
        assert_zero_at_padding(grad, inputs.padding)

    on_each(each_backend(*inputs.dtypes, *num_valid.dtypes), check)


def torch_gradients(
    args: tuple[Any, Any, Any], upstream: np.ndarray, *, positional: int = 3, **options: Any
) -> tuple[Any, Any, Any]:
    """The loss and its gradients to the logits and the targets by torch autograd."""
    import torch

    logits, targets, _ = args
    logits.requires_grad_(True)
    targets.requires_grad_(True)
    loss = loss_of(*args, positional=positional, **options)
    loss.backward(torch.as_tensor(upstream, dtype=loss.dtype, device=loss.device))
    return loss, logits.grad, targets.grad


def jax_gradients(
    logits: Any, targets: Any, mask: Any, upstream: Any, *, positional: int = 3, **options: Any
) -> tuple[Any, Any, Any]:
    """The loss and its gradients to the logits and the targets by ``jax.vjp``."""
    import jax

    def loss_at(z: Any, p: Any) -> Any:
        return loss_of(z, p, mask, positional=positional, **options)

    loss, pullback = jax.vjp(loss_at, logits, targets)
    return (loss, *pullback(upstream.astype(loss.dtype)))


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "autodiff", **LOSS_DIMENSIONS, reduction=("mean", "sum", "none"), positional=(0, 1, 2, 3)
    ),
    seed=seed_st,
)
def test_autodiff_gradients_agree_with_the_oracle(data: Any, structure: dict, seed: int) -> None:
    # -inf logits would give +inf target gradients: finite logits at valid positions only.
    inputs = data.draw(loss_values(structure, minus_inf=False))
    reduction, dtype = structure["reduction"], inputs.compute_dtype
    shape = inputs.logits.shape[:-1] if reduction == "none" else ()
    upstream = np.random.default_rng(seed).uniform(-2, 2, shape)
    options = {"positional": structure["positional"], "reduction": reduction}

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        if backend.library == "torch":
            loss, *grads = torch_gradients(args, upstream, **options)
        else:
            cotangent = on_backend(backend, upstream, "float64")
            loss, *grads = call(backend, jax_gradients, *args, cotangent, **options)
        expected = expected_loss(inputs, *args, reduction=reduction, upstream=upstream)
        mass = target_mass(*args[1:], inputs.padding, reduction=reduction)
        assert_loss_agrees(loss, expected.loss, dtype, mass=mass, backend=backend)
        terms = oracle_terms(inputs, *args, reduction=reduction, upstream=upstream)
        desired = (expected.grad_logits, expected.grad_targets)
        for grad, want, grad_dtype in zip(grads, desired, inputs.dtypes[:2], strict=True):
            assert_gradient_agrees(
                grad, want, dtype, terms=terms, backend=backend, dtype=grad_dtype
            )
            assert_zero_at_padding(grad, inputs.padding)

    on_each(each_backend(*inputs.dtypes, autodiff=True), check)


# --------------------------------------------------------------------------------------------
# The loss: 16-bit gradients of any upstream gradient, and derivatives of gradients
# --------------------------------------------------------------------------------------------

#: Examples of the costlier tests below (float64 oracles of second derivatives, hessians, a
#: JAX compilation of a gradient of a gradient per structure): a few at the default profile's
#: 30, every one of a longer profile's.
FEW = EXAMPLES if EXAMPLES > 100 else max(4, EXAMPLES // 5)
few = settings(fuzz, max_examples=FEW)

#: The weights of three EAGLE-3 steps at decay 0.8, normalised (1 + 0.8 + 0.64 = 2.44): the
#: upstream gradients of the steps' losses, as float32 numbers.
STEP_WEIGHTS = tuple(float(np.float32(0.8**i / 2.44)) for i in range(3))

#: The largest finite number of each floating dtype.
LARGEST = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38, "float64": 1.797e308}

needs_torch = pytest.mark.skipif(
    not any(b.library == "torch" for b in BACKENDS), reason="the oracle needs torch"
)

#: The libraries that differentiate gradients, each a case of the tests of second derivatives.
SECOND_ORDER_LIBRARIES = ("torch", "jax")


@st.composite
def upstreams(draw: st.DrawFn, shape: tuple[int, ...]) -> np.ndarray:
    """Upstream gradients other than 1, float32 numbers (as the loss's dtype holds them): step
    weights, or anything from 1e-3 to 10, of either sign; per position for ``shape != ()``."""
    if shape == ():
        anything = st.floats(float(np.float32(1e-3)), 10.0, width=32)
        size = draw(st.one_of(st.sampled_from(STEP_WEIGHTS), anything))
        assume(size != 1.0)
        return np.asarray(size * draw(st.sampled_from([1.0, -1.0])))
    rng = np.random.default_rng(draw(seed_st))
    size = np.where(
        rng.random(shape) < 0.5, rng.choice(STEP_WEIGHTS, shape), 10 ** rng.uniform(-3, 1, shape)
    )
    signed = np.where(rng.random(shape) < 0.2, -size, size).astype(np.float32)
    return np.where(signed == 1, 0.5, signed).astype(np.float64)


def unpadded(backend: Backend, padding: np.ndarray, values: Any, dtype: str) -> Any:
    """A copy of ``values`` (an array of ``backend``, of the dtype called ``dtype``) with zeros
    in the rows of ``padding``: the same input for the loss, finite, as the oracles need it."""
    return on_backend(backend, np.where(padding[..., None], 0.0, to_float64(values)), dtype)


@needs_torch
@few
@given(
    data=st.data(),
    structure=structures(
        "rounded_once",
        **{**LOSS_DIMENSIONS, "logits": ("bfloat16", "float16")},
        reduction=("mean", "sum", "none"),
        num_valid=(None, 3, 0.5, 1000),
        positional=(0, 1, 2, 3),
    ),
)
def test_16_bit_logits_gradients_are_rounded_once_for_any_upstream(
    data: Any, structure: dict
) -> None:
    """Whatever the upstream gradient, the bfloat16 or float16 logits gradient of torch autograd
    and of ``jax.vjp`` is rounded to its dtype once, from float32: no further from the float64
    gradient than the plain float32 formula's (:func:`~softce_multi.testing.
    assert_gradient_rounded_once`). A gradient made for an upstream of 1 and multiplied by the
    upstream in 16 bits is rounded twice, about half a unit further."""
    # Finite logits at valid positions: a -inf logit has a NaN float64 gradient in the oracle.
    inputs = data.draw(loss_values(structure, minus_inf=False))
    reduction = structure["reduction"]
    options = {
        "reduction": reduction,
        "num_valid": structure["num_valid"] if reduction == "mean" else None,
    }
    upstream = data.draw(upstreams(inputs.padding.shape if reduction == "none" else ()))

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        positional = structure["positional"]
        if backend.library == "torch":
            _, grad, _ = torch_gradients(args, upstream, positional=positional, **options)
        else:
            cotangent = on_backend(backend, upstream, "float64")
            _, grad, _ = call(
                backend, jax_gradients, *args, cotangent, positional=positional, **options
            )
        assert_zero_at_padding(grad, inputs.padding)
        logits, targets = (
            unpadded(backend, inputs.padding, array, dtype)
            for array, dtype in zip(args[:2], inputs.dtypes[:2], strict=True)
        )
        assert_gradient_rounded_once(grad, logits, targets, args[2], upstream=upstream, **options)

    on_each(each_backend(*inputs.dtypes, autodiff=True), check)


class SecondOrderOracle(NamedTuple):
    """Float64 values of the loss's rows, from which the rounding of a second derivative is
    bounded: rows ``[N, V]`` of the inputs the backend holds, padding replaced by zeros."""

    softmax: np.ndarray  # [N, V]
    reach: np.ndarray  # [N, V]: the softmax, and 1 at a row's largest logits
    curvature: np.ndarray  # [N, 1]: |w / den * upstream * sum(p)|, the size of the hessian
    gradient: np.ndarray  # [N, 1]: the largest entry of the logits gradient g
    terms: np.ndarray  # [N, 1]: the largest term of g (:func:`largest_term`)


def second_order_oracle(
    inputs: LossInputs, args: tuple[Any, Any, Any], upstream: np.ndarray, *, reduction: str
) -> SecondOrderOracle:
    padding = inputs.padding[..., None]
    vocab = inputs.logits.shape[-1]
    z = np.where(padding, 0.0, to_float64(args[0]))
    p = np.where(padding, 0.0, to_float64(args[1]))
    w = to_float64(args[2])
    options = {"reduction": reduction, "upstream": upstream}
    terms = np.reshape(largest_term(z, p, w, **options), (-1, vocab))
    scale = np.reshape(row_scale(w, inputs.padding.shape, **options), (-1, 1))
    z, p = np.reshape(z, (-1, vocab)), np.reshape(p, (-1, vocab))
    row_max = z.max(axis=-1, keepdims=True, initial=-np.inf)
    shifted = np.exp(z - row_max)
    softmax = shifted / shifted.sum(axis=-1, keepdims=True)
    target_sum = p.sum(axis=-1, keepdims=True)
    gradient = scale * np.abs(target_sum * softmax - p)
    return SecondOrderOracle(
        softmax,
        np.maximum(softmax, z == row_max),
        scale * np.abs(target_sum),
        np.max(gradient, axis=-1, keepdims=True, initial=0.0),
        np.max(terms, axis=-1, keepdims=True, initial=0.0),
    )


def assert_within(actual: Any, desired: np.ndarray, bound: np.ndarray, *, backend: Backend) -> None:
    """Library, shape, then ``|actual - desired| <= bound`` entry by entry."""
    assert library_of(actual) == backend.library, f"library {library_of(actual)}"
    assert tuple(actual.shape) == desired.shape, f"shape {tuple(actual.shape)} != {desired.shape}"
    error = np.abs(to_float64(actual) - desired)
    if not (error <= bound).all():
        worst = np.unravel_index(np.argmax(error - bound), desired.shape)
        msg = (
            f"{int(np.sum(~(error <= bound)))} of {desired.size} entries outside the bound; at "
            f"{tuple(map(int, worst))}: {to_float64(actual)[worst]!r}, desired "
            f"{desired[worst]!r}, bound {bound[worst]!r}"
        )
        raise AssertionError(msg)


def squared_norm(grad: Any) -> Any:
    """``sum(grad ** 2)`` in float64 (its derivative to ``grad``, ``2 * grad``, is exact in every
    dtype): a gradient penalty."""
    xp = array_api_compat.array_namespace(grad)
    wide = xp.astype(grad, xp.float64)
    return xp.sum(wide * wide)


def torch_penalty_gradient(args: tuple[Any, Any, Any], upstream: np.ndarray, **options: Any) -> Any:
    """The derivative to the logits of the gradient penalty ``sum(g ** 2)``, ``g`` the logits
    gradient for the upstream gradient ``upstream``, by torch autograd (``create_graph``)."""
    import torch

    logits = args[0].requires_grad_(True)
    loss = loss_of(*args, **options)
    cotangent = torch.as_tensor(upstream, dtype=loss.dtype, device=loss.device)
    (grad,) = torch.autograd.grad(loss, logits, cotangent, create_graph=True)
    (second,) = torch.autograd.grad(squared_norm(grad), logits)
    return second


def jax_penalty_gradient(
    logits: Any, targets: Any, mask: Any, upstream: Any, **options: Any
) -> Any:
    """As :func:`torch_penalty_gradient`, by ``jax.grad`` of a function of ``jax.vjp``."""
    import jax

    def gradient(z: Any) -> Any:
        loss, pullback = jax.vjp(lambda z: loss_of(z, targets, mask, **options), z)
        return pullback(upstream.astype(loss.dtype))[0]

    return jax.grad(lambda z: squared_norm(gradient(z)))(logits)


def penalty_oracle(
    inputs: LossInputs, args: tuple[Any, Any, Any], upstream: np.ndarray, *, reduction: str
) -> np.ndarray:
    """:func:`torch_penalty_gradient` of the reference formula in float64, for the values the
    backend holds, padding replaced by zeros."""
    import torch

    from softce_multi.reference import masked_soft_cross_entropy

    padding = inputs.padding[..., None]
    z = torch.tensor(np.where(padding, 0.0, to_float64(args[0])), requires_grad=True)
    p = torch.tensor(np.where(padding, 0.0, to_float64(args[1])))
    loss = masked_soft_cross_entropy(z, p, torch.tensor(to_float64(args[2])), reduction=reduction)
    cotangent = torch.as_tensor(upstream).expand_as(loss)
    (grad,) = torch.autograd.grad(loss, z, cotangent, create_graph=True)
    (second,) = torch.autograd.grad((grad**2).sum(), z, allow_unused=True, materialize_grads=True)
    return second.numpy()


def penalty_bound(oracle: SecondOrderOracle, desired: np.ndarray, inputs: LossInputs) -> Any:
    """How far the derivative of the penalty may be from the float64 one, entry by entry.

    It is ``2 H g``, with ``H = r * sum(p) * (diag(s) - s s^T)`` the hessian of a row. Row
    ``v`` of ``H`` is ``s_v`` times the curvature, so ``2 (H e)_v`` is at most ``4 s_v`` times
    the curvature times the largest error of ``e``: an error of ``g`` (half a unit of the
    logits' dtype, and 8 roundings of its terms in the computation's), or of ``H`` (16
    roundings, of ``s_v``, and of 1 at the largest logit, where the derivative of the row's
    maximum cancels). Then the result is rounded to the logits' dtype.
    """
    compute, dtype = EPS[inputs.compute_dtype], EPS[inputs.logits_dtype]
    spacing = SMALLEST_SPACING[inputs.logits_dtype]
    g_error = dtype / 2 * oracle.gradient + 8 * compute * oracle.terms + spacing / 2
    per_row = oracle.curvature * (4 * g_error + 32 * compute * oracle.gradient)
    bound = np.reshape(oracle.reach * per_row, desired.shape)
    return bound + dtype * np.abs(desired) + spacing


def second_order_inputs(
    data: Any, structure: dict, library: str
) -> tuple[LossInputs, list[Backend]]:
    """Loss values for ``structure``, and the backends of ``library`` for them."""
    pytest.importorskip(library)
    # Finite logits at valid positions: a -inf logit has a NaN float64 gradient in the oracle.
    inputs = data.draw(loss_values(structure, minus_inf=False))
    chosen = [b for b in each_backend(*inputs.dtypes, autodiff=True) if b.library == library]
    assume(chosen)
    return inputs, chosen


@needs_torch
@pytest.mark.parametrize("library", SECOND_ORDER_LIBRARIES)
@few
@given(
    data=st.data(),
    structure=structures(
        "penalty",
        **LOSS_DIMENSIONS,
        reduction=("mean", "sum", "none"),
        positional=(0, 1, 2, 3),
    ),
    seed=seed_st,
)
def test_gradient_penalty_derivatives_are_zero_at_padding_and_agree_with_the_oracle(
    library: str, data: Any, structure: dict, seed: int
) -> None:
    """The derivative of a gradient penalty ``sum(g ** 2)`` (``g`` the logits gradient, by torch
    autograd with ``create_graph`` or ``jax.vjp`` under ``jax.grad``) is finite, exactly 0 at
    every padding position whatever NaN or inf it holds, and the float64 one elsewhere."""
    inputs, chosen = second_order_inputs(data, structure, library)
    reduction = structure["reduction"]
    shape = inputs.padding.shape if reduction == "none" else ()
    upstream = np.random.default_rng(seed).uniform(-2, 2, shape).astype(np.float32)
    options = {"positional": structure["positional"], "reduction": reduction}

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        desired = penalty_oracle(inputs, args, upstream, reduction=reduction)
        # float16 holds no derivative beyond 65504 (of unnormalised targets of a large
        # vocabulary); the oracle's is the same on every backend.
        assume(np.max(np.abs(desired), initial=0.0) <= LARGEST[inputs.logits_dtype] / 2)
        if backend.library == "torch":
            second = torch_penalty_gradient(args, upstream, **options)
        else:
            cotangent = on_backend(backend, upstream, "float64")
            second = call(backend, jax_penalty_gradient, *args, cotangent, **options)
        assert dtype_name(second) == inputs.logits_dtype, f"dtype {dtype_name(second)}"
        assert np.isfinite(to_float64(second)).all(), "a derivative that is not finite"
        assert_zero_at_padding(second, inputs.padding)
        oracle = second_order_oracle(inputs, args, upstream, reduction=reduction)
        bound = penalty_bound(oracle, desired, inputs)
        assert_within(second, desired, bound, backend=backend)

    on_each(chosen, check)


#: Logits shapes of at most 42 entries, whose hessians are small; none empty, which
#: torch.autograd.functional.hessian cannot stack (the penalty's test has empty axes).
HESSIAN_SHAPES = ((7,), (1, 1), (4, 1), (3, 2), (1, 5), (2, 3, 7), (5, 4))


def torch_hessian(args: tuple[Any, Any, Any], upstream: np.ndarray, **options: Any) -> Any:
    """The hessian to the logits of ``sum(upstream * loss)`` by
    :func:`torch.autograd.functional.hessian` (reverse mode over reverse mode)."""
    import torch

    logits, targets, mask = args

    def weighted_loss(z: Any) -> Any:
        loss = loss_of(z, targets, mask, **options)
        return (torch.as_tensor(upstream, dtype=loss.dtype, device=loss.device) * loss).sum()

    return torch.autograd.functional.hessian(weighted_loss, logits)


def jax_hessian(logits: Any, targets: Any, mask: Any, upstream: Any, **options: Any) -> Any:
    """As :func:`torch_hessian`, by ``jax.hessian`` (forward mode over reverse mode)."""
    import jax

    def weighted_loss(z: Any) -> Any:
        loss = loss_of(z, targets, mask, **options)
        return jax.numpy.sum(upstream.astype(loss.dtype) * loss)

    return jax.hessian(weighted_loss)(logits)


def hessian_oracle(
    inputs: LossInputs, args: tuple[Any, Any, Any], upstream: np.ndarray, *, reduction: str
) -> np.ndarray:
    """:func:`torch_hessian` of the reference formula in float64, for the values the backend
    holds, padding replaced by zeros."""
    import torch

    from softce_multi.reference import masked_soft_cross_entropy

    padding = inputs.padding[..., None]
    z = torch.tensor(np.where(padding, 0.0, to_float64(args[0])))
    p = torch.tensor(np.where(padding, 0.0, to_float64(args[1])))
    w = torch.tensor(to_float64(args[2]))

    def weighted_loss(z: Any) -> Any:
        loss = masked_soft_cross_entropy(z, p, w, reduction=reduction)
        return (torch.as_tensor(upstream) * loss).sum()

    return torch.autograd.functional.hessian(weighted_loss, z).numpy()


@needs_torch
@pytest.mark.parametrize("library", SECOND_ORDER_LIBRARIES)
@few
@given(
    data=st.data(),
    structure=structures(
        "hessian",
        **{**LOSS_DIMENSIONS, "shape": HESSIAN_SHAPES},
        reduction=("mean", "sum", "none"),
        positional=(0, 1, 2, 3),
    ),
    seed=seed_st,
)
def test_hessians_are_zero_at_padding_and_agree_with_the_oracle(
    library: str, data: Any, structure: dict, seed: int
) -> None:
    """The hessian to the logits (torch's reverse over reverse mode, ``jax.hessian``'s forward
    over reverse mode) is finite, exactly 0 in every row and column of a padding position
    whatever it holds, and the float64 hessian elsewhere: each entry ``(v, u)`` within 16
    roundings of the computation's dtype of the row's curvature times the larger of ``s_v`` and
    ``s_u`` (see :func:`penalty_bound`), then rounded to the logits' dtype."""
    inputs, chosen = second_order_inputs(data, structure, library)
    reduction = structure["reduction"]
    shape = inputs.padding.shape if reduction == "none" else ()
    upstream = np.random.default_rng(seed).uniform(-2, 2, shape).astype(np.float32)
    options = {"positional": structure["positional"], "reduction": reduction}
    positions, vocab = math.prod(inputs.padding.shape), inputs.logits.shape[-1]
    padding = np.reshape(inputs.padding, -1)
    square = (positions, vocab, positions, vocab)

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        if backend.library == "torch":
            hessian = torch_hessian(args, upstream, **options)
        else:
            cotangent = on_backend(backend, upstream, "float64")
            hessian = call(backend, jax_hessian, *args, cotangent, **options)
        assert dtype_name(hessian) == inputs.logits_dtype, f"dtype {dtype_name(hessian)}"
        values = np.reshape(to_float64(hessian), square)
        assert np.isfinite(values).all(), "a hessian entry that is not finite"
        assert (values[padding] == 0).all(), "a padding row of the hessian is not exactly 0"
        assert (values[:, :, padding] == 0).all(), "a padding column of the hessian is not 0"
        desired = hessian_oracle(inputs, args, upstream, reduction=reduction)
        oracle = second_order_oracle(inputs, args, upstream, reduction=reduction)
        # A row's block is its curvature times s s^T (and diag(s)); the other blocks are 0.
        block = np.maximum(oracle.reach[:, :, None], oracle.reach[:, None, :])
        bound = np.zeros(square)
        rows = np.arange(positions)
        bound[rows, :, rows, :] = (
            16 * EPS[inputs.compute_dtype] * oracle.curvature[..., None] * block
        )
        dtype = inputs.logits_dtype
        bound = np.reshape(bound, desired.shape) + EPS[dtype] * np.abs(desired)
        bound += SMALLEST_SPACING[dtype]
        assert_within(hessian, desired, bound, backend=backend)

    on_each(chosen, check)


# --------------------------------------------------------------------------------------------
# The loss of hidden states and an output projection
# --------------------------------------------------------------------------------------------

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
        reduction=("mean", "sum", "none"),
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
        reduction=("mean", "sum", "none"),
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
        reduction=("mean", "sum", "none"),
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
        reduction=("mean", "sum", "none"),
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


# --------------------------------------------------------------------------------------------
# EAGLE-3: token ids and the vocabulary mapping
# --------------------------------------------------------------------------------------------

#: Shapes of token-id arrays: empty, 0-d, 1-D, 2-D.
ID_SHAPES = ((), (0,), (5,), (2, 3), (3, 0), (2, 2, 4))


def draw_ids(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, size: int) -> Any:
    """Ids in and around ``[0, size)``: inside, negative, -100, beyond, and the dtype's ends."""
    info = np.iinfo(dtype)
    special = [0, size - 1, size, -1, -100, int(info.min), int(info.max)]
    special = [i for i in special if info.min <= i <= info.max]
    inside = rng.integers(0, min(size, int(info.max) + 1), shape).astype(object)
    edges = np.array(special, dtype=object)[rng.integers(0, len(special), shape)]
    return np.where(rng.random(shape) < 0.7, inside, edges).astype(dtype)


@st.composite
def vocab_mapping(draw: st.DrawFn, target_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(d2t, t2d)``: a random non-empty draft vocabulary among ``target_size`` tokens."""
    rng = np.random.default_rng(draw(seed_st))
    t2d = rng.random(target_size) < draw(st.sampled_from([0.1, 0.5, 1.0]))
    t2d[rng.integers(target_size)] = True
    draft_ids = np.flatnonzero(t2d)
    return draft_ids - np.arange(draft_ids.size), t2d


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "target_to_draft",
        shape=ID_SHAPES,
        dtype=SIGNED,
        target_size=(1, 2, 100, 300),
        layout=LAYOUTS,
    ),
)
def test_target_to_draft_ids_agree_with_a_lookup_table(data: Any, structure: dict) -> None:
    _, t2d = data.draw(vocab_mapping(structure["target_size"]))
    dtype = structure["dtype"]
    rng = np.random.default_rng(data.draw(seed_st))
    target_ids = draw_ids(rng, structure["shape"], dtype, t2d.size)
    table = np.where(t2d, np.cumsum(t2d) - 1, -1)
    inside = (target_ids >= 0) & (target_ids < t2d.size)
    expected = np.where(inside, table[np.where(inside, target_ids, 0)], -1).astype(dtype)

    def check(backend: Backend) -> None:
        ids = place(backend, target_ids, dtype, structure["layout"])
        out = call(backend, eagle3.target_to_draft_ids, ids, on_backend(backend, t2d, "bool"))
        assert_equal_arrays(out, expected, library=backend.library, dtype=dtype)

    on_each(each_backend(dtype), check)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "draft_to_target",
        shape=ID_SHAPES,
        ids=INTEGERS,
        d2t=INTEGERS,
        target_size=(1, 2, 100, 300),
        layout=LAYOUTS,
    ),
)
def test_draft_to_target_ids_agree_with_the_offsets(data: Any, structure: dict) -> None:
    d2t, _ = data.draw(vocab_mapping(structure["target_size"]))
    ids_dtype, d2t_dtype = structure["ids"], structure["d2t"]
    assume(d2t.max() <= np.iinfo(d2t_dtype).max)  # the offsets must fit their dtype
    rng = np.random.default_rng(data.draw(seed_st))
    draft_ids = draw_ids(rng, structure["shape"], ids_dtype, d2t.size)
    wide = draft_ids.astype(object)  # Python ints: no dtype wraps
    inside = ((wide >= 0) & (wide < d2t.size)).astype(bool)
    safe = np.where(inside, wide, 0).astype(np.int64)
    expected = np.where(inside, safe + d2t[safe], -1).astype(np.int64)

    def check(backend: Backend) -> None:
        ids = place(backend, draft_ids, ids_dtype, structure["layout"])
        out = call(backend, eagle3.draft_to_target_ids, ids, on_backend(backend, d2t, d2t_dtype))
        assert_equal_arrays(out, expected, library=backend.library, dtype=index_dtype_name(ids))

    on_each(each_backend(ids_dtype, d2t_dtype), check)


def chosen_vocabulary(counts: np.ndarray, size: int, always_include: Sequence[int]) -> np.ndarray:
    """The documented choice: ``always_include`` first, then by count (descending), ties by
    lower id; the chosen ids ascending."""
    forced = set(always_include)
    order = sorted(range(counts.size), key=lambda i: (i not in forced, -counts[i], i))
    return np.sort(np.array(order[:size], dtype=np.int64))


def vocab_mapping_of(token_counts: Any, *, size: int, ids: Any) -> Any:
    """:func:`~softce_multi.eagle3.build_vocab_mapping` with keyword arguments, to be static
    under ``jax.jit``."""
    return eagle3.build_vocab_mapping(token_counts, size, always_include=ids)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "build_vocab_mapping",
        counts=("int8", "int32", "int64", "uint8", "uint16", *FLOATS),
        target_size=(1, 2, 7, 100, 301),
        size_fraction=(0.0, 0.3, 1.0),
        forced=(0, 1, 3),
    ),
)
def test_build_vocab_mapping_chooses_the_most_frequent_tokens(data: Any, structure: dict) -> None:
    target_size, counts_dtype = structure["target_size"], structure["counts"]
    size = max(1, round(structure["size_fraction"] * target_size))
    rng = np.random.default_rng(data.draw(seed_st))
    # Few distinct counts, so that ties are common; every count fits every dtype exactly.
    counts = rng.integers(0, data.draw(st.sampled_from([2, 5, 100])), target_size)
    forced = tuple(rng.integers(0, target_size, min(structure["forced"], size)).tolist())
    chosen = chosen_vocabulary(counts, size, forced)
    expected_t2d = np.isin(np.arange(target_size), chosen)
    always_include = data.draw(st.sampled_from([tuple, list]))(forced) if forced else None

    def check(backend: Backend) -> None:
        token_counts = on_backend(backend, counts, counts_dtype)
        if backend.library == "jax" and always_include is not None:
            static_ids = tuple(always_include)  # a static argument of jax.jit must hash
            d2t, t2d = call(backend, vocab_mapping_of, token_counts, size=size, ids=static_ids)
        else:
            d2t, t2d = call(backend, vocab_mapping_of, token_counts, size=size, ids=always_include)
        index = index_dtype_name(token_counts)
        expected_d2t = chosen - np.arange(size)
        assert_equal_arrays(d2t, expected_d2t, library=backend.library, dtype=index)
        assert_equal_arrays(t2d, expected_t2d, library=backend.library, dtype="bool")

    on_each(each_backend(counts_dtype), check)


# --------------------------------------------------------------------------------------------
# EAGLE-3: shifting, targets, accuracy, steps
# --------------------------------------------------------------------------------------------


def fills_of(dtype: str) -> list[Any]:
    """``fill`` values that fit ``dtype``: its ends, 0, 1, True, and NaN and inf if floating."""
    if dtype == "bool":
        return [0, 1, True, False]
    if dtype in FLOATS:
        return [0, 1.5, -2, True, math.inf, -math.inf, math.nan]
    info = np.iinfo(dtype)
    return [0, 1, True, int(info.min), int(info.max), 7.0]


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "shift_left",
        shape=((1,), (4,), (0, 3), (2, 5), (3, 1, 4), (2, 3, 0)),
        dtype=("bool", *INTEGERS, *FLOATS),
        layout=LAYOUTS,
        axis=(0, 1, -1, 2),
    ),
)
def test_shift_left_moves_values_one_position_along_the_axis(data: Any, structure: dict) -> None:
    shape, dtype = structure["shape"], structure["dtype"]
    axis = structure["axis"]
    assume(-len(shape) <= axis < len(shape))
    fill = data.draw(st.sampled_from(fills_of(dtype)))
    rng = np.random.default_rng(data.draw(seed_st))
    if dtype in FLOATS:
        values = rng.choice(np.array([0.5, -3.25, 1e4, np.nan, np.inf, -np.inf]), shape)
    elif dtype == "bool":
        values = rng.random(shape) < 0.5
    else:
        info = np.iinfo(dtype)
        values = rng.choice(np.array([info.min, 0, 1, 42, info.max], dtype=dtype), shape)

    def check(backend: Backend) -> None:
        x = place(backend, values, dtype, structure["layout"])
        held = to_numpy(x)  # the values the backend holds (16-bit floats rounded)
        moved = np.moveaxis(held, axis, -1)
        pad = np.full((*moved.shape[:-1], min(moved.shape[-1], 1)), fill).astype(held.dtype)
        expected = np.moveaxis(np.concatenate([moved[..., 1:], pad], axis=-1), -1, axis)
        out = call(backend, eagle3.shift_left, x, axis=axis, fill=fill)
        assert_equal_arrays(out, expected, library=backend.library, dtype=dtype)

    on_each(each_backend(dtype), check)


class TargetInputs(NamedTuple):
    logits: np.ndarray
    loss_mask: np.ndarray
    t2d: np.ndarray


@st.composite
def target_inputs(draw: st.DrawFn, structure: dict[str, Any]) -> TargetInputs:
    """Target logits with ties and NaN rows at padding, a loss mask, a draft vocabulary."""
    positions, target_size = structure["shape"]
    _, t2d = draw(vocab_mapping(target_size))
    rng = np.random.default_rng(draw(seed_st))
    # Logits on a grid of 1/4, so that the top token is often tied, and ties are exact in
    # every dtype.
    logits = np.round(rng.standard_normal((*positions, target_size)) * 4) / 4
    loss_mask = draw_mask(rng, positions, structure["mask"])
    if draw(st.booleans()):
        poison_padding(rng, logits, loss_mask == 0)
    if structure["trailing_one"]:
        loss_mask = loss_mask[..., None]
    return TargetInputs(logits, loss_mask, t2d)


def expected_targets(
    logits: np.ndarray, loss_mask: np.ndarray, t2d: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``softmax(logits[..., t2d])`` in float64, and the loss mask where the first argmax
    (NaN counting as the largest) is a draft token, of shape ``[..., 1]``."""
    draft = logits[..., t2d]
    shifted = np.exp(draft - draft.max(axis=-1, keepdims=True))
    probs = shifted / shifted.sum(axis=-1, keepdims=True)
    top = np.argmax(logits, axis=-1)  # NumPy's argmax takes the first NaN, as documented
    mask = np.reshape(loss_mask, top.shape)
    position_mask = np.where(t2d[top], mask, np.zeros_like(mask))[..., None]
    return probs, position_mask


TARGET_SHAPES = (((3,), 5), ((2, 3), 40), ((0,), 4), ((2, 0), 6), ((1,), 1), ((4,), 301))


def finite_rows(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values).all(axis=-1)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "prepare_targets",
        shape=TARGET_SHAPES,
        logits=FLOATS,
        mask=MASK_DTYPES,
        trailing_one=(False, True),
        sized=(False, True),
        layout=LAYOUTS,
    ),
)
def test_prepare_targets_gives_the_draft_softmax_and_the_top_token_mask(
    data: Any, structure: dict
) -> None:
    inputs = data.draw(target_inputs(structure))
    dtype, mask_dtype = structure["logits"], structure["mask"]
    size = int(inputs.t2d.sum()) if structure["sized"] else None
    compute = "float64" if dtype == "float64" else "float32"

    def check(backend: Backend) -> None:
        logits = place(backend, inputs.logits, dtype, structure["layout"])
        loss_mask = on_backend(backend, inputs.loss_mask, mask_dtype)
        t2d = on_backend(backend, inputs.t2d, "bool")
        if size is None and backend.library == "jax":
            # The size is read on the host, which jax.jit refuses, with a TypeError naming it.
            with pytest.raises(TypeError, match="draft_vocab_size"):
                call(backend, eagle3.prepare_targets, logits, loss_mask, t2d)
            return
        if size is None:
            probs, position_mask = eagle3.prepare_targets(logits, loss_mask, t2d)
        else:
            probs, position_mask = call(
                backend, eagle3.prepare_targets, logits, loss_mask, t2d, draft_vocab_size=size
            )
        want_probs, want_mask = expected_targets(to_float64(logits), inputs.loss_mask, inputs.t2d)
        assert_equal_arrays(position_mask, want_mask, library=backend.library, dtype=mask_dtype)
        assert library_of(probs) == backend.library
        assert dtype_name(probs) == compute and tuple(probs.shape) == want_probs.shape
        rows = finite_rows(to_float64(logits))  # rows of NaN or inf (padding) have no softmax
        assert_gradient_close(to_numpy(probs)[rows], want_probs[rows], compute, dtype=compute)

    on_each(each_backend(dtype, mask_dtype), check)


def rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded to the dtype called ``dtype``, as float64."""
    if dtype == "bfloat16":
        import ml_dtypes

        return values.astype(ml_dtypes.bfloat16).astype(np.float64)
    return values.astype(dtype).astype(np.float64)


def matmul_dtype(*dtypes: str) -> str:
    """The promoted dtype of floating dtypes (float16 with bfloat16 gives float32)."""
    if "float64" in dtypes:
        return "float64"
    return dtypes[0] if len(set(dtypes)) == 1 else "float32"


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "prepare_targets_from_hidden",
        shape=(((3,), 4, 5), ((2, 3), 8, 40), ((0,), 4, 3), ((1,), 1, 1), ((2,), 16, 301)),
        hidden=FLOATS,
        weight=FLOATS,
        mask=("bool", "int8", "uint8", "int64", "float16", "float64"),
        trailing_one=(False, True),
        chunks=((None, None), (1, 16), (2, 3), (4, 7)),
    ),
)
def test_prepare_targets_from_hidden_agree_with_the_materialised_logits(
    data: Any, structure: dict
) -> None:
    positions, hidden_size, target_size = structure["shape"]
    _, t2d = data.draw(vocab_mapping(target_size))
    rng = np.random.default_rng(data.draw(seed_st))
    hidden = rng.standard_normal((*positions, hidden_size))
    weight = rng.standard_normal((target_size, hidden_size)) / (2 * math.sqrt(hidden_size))
    loss_mask = draw_mask(rng, positions, structure["mask"])
    if structure["trailing_one"]:
        loss_mask = loss_mask[..., None]
    dtypes = (structure["hidden"], structure["weight"], structure["mask"])
    product = matmul_dtype(*dtypes[:2])
    compute = "float64" if product == "float64" else "float32"
    chunk_rows, chunk_vocab = structure["chunks"]
    size = int(t2d.sum())

    def check(backend: Backend) -> None:
        args = (
            on_backend(backend, hidden, dtypes[0]),
            on_backend(backend, weight, dtypes[1]),
            on_backend(backend, loss_mask, dtypes[2]),
            on_backend(backend, t2d, "bool"),
        )
        probs, position_mask = call(
            backend,
            eagle3.prepare_targets_from_hidden,
            *args,
            draft_vocab_size=size,
            chunk_rows=chunk_rows,
            chunk_vocab=chunk_vocab,
        )
        # The logits of the values the backend holds, rounded to the matmul dtype as the
        # backend's product is.
        logits = rounded(to_float64(args[0]) @ to_float64(args[1]).T, product)
        want_probs, want_mask = expected_targets(logits, to_numpy(args[2]), t2d)
        # The top token may differ where the two largest logits are within the rounding of the
        # product (float32 accumulation against float64).
        ordered = np.sort(logits, axis=-1)
        gap = ordered[..., -1] - ordered[..., -2] if target_size > 1 else np.inf
        tied = np.asarray(gap <= 8 * EPS[product] * np.abs(ordered[..., -1]))
        got_mask = to_numpy(position_mask)
        assert library_of(position_mask) == backend.library
        assert dtype_name(position_mask) == dtypes[2] and got_mask.shape == want_mask.shape
        np.testing.assert_array_equal(got_mask[~tied], want_mask[~tied])
        assert library_of(probs) == backend.library
        assert dtype_name(probs) == compute and tuple(probs.shape) == want_probs.shape
        assert_gradient_close(to_numpy(probs), want_probs, product, dtype=compute)

    on_each(each_backend(*dtypes), check)


@fuzz
@given(
    data=st.data(),
    structure=structures("draft_accuracy", **LOSS_DIMENSIONS, ties=(False, True), layout=LAYOUTS),
)
def test_draft_accuracy_is_the_share_of_valid_positions_with_the_same_top_token(
    data: Any, structure: dict
) -> None:
    inputs = data.draw(loss_values(structure))
    logits, targets = inputs.logits, inputs.targets
    if structure["ties"]:  # values on a coarse grid: equal maxima, first index wins
        logits, targets = np.round(logits), np.round(targets * 2) / 2
        inputs = inputs._replace(logits=logits, targets=targets)
    dtype = inputs.compute_dtype

    def check(backend: Backend) -> None:
        args = inputs.build(backend)
        accuracy = call(backend, eagle3.draft_accuracy, *args)
        z, p = to_float64(args[0]), to_float64(args[1])
        valid = np.reshape(to_numpy(args[2]) != 0, z.shape[:-1])
        hits = np.argmax(z, axis=-1) == np.argmax(p, axis=-1)
        expected = np.asarray((hits & valid).sum() / max(valid.sum(), 1))
        assert_loss_close(accuracy, expected, dtype, library=backend.library, dtype=dtype)

    on_each(each_backend(*inputs.dtypes), check)


@fuzz
@given(
    data=st.data(),
    structure=structures(
        "multi_step_loss",
        steps=(1, 2, 3, 7, 40),
        dtype=FLOATS,
        stacked=(False, True),
        normalize=(True, False),
        decay=(0.0, 0.5, 0.8, 1.0, 1.7, 10.0),
    ),
)
def test_multi_step_loss_is_the_decayed_weighted_sum(data: Any, structure: dict) -> None:
    steps, dtype, decay = structure["steps"], structure["dtype"], structure["decay"]
    normalize = structure["normalize"]
    # Without normalizing, the weights must sum within the dtype (float16: 65504).
    assume(normalize or decay <= 1.7 or steps <= 3)
    values = np.random.default_rng(data.draw(seed_st)).uniform(0, 10, steps)

    def check(backend: Backend) -> None:
        stacked = on_backend(backend, values, dtype)
        losses = stacked if structure["stacked"] else [stacked[i] for i in range(steps)]
        out = call(backend, multi_step_of, losses, decay=decay, normalize=normalize)
        held = to_float64(stacked)
        weights = np.array([decay**i for i in range(steps)])
        if normalize:
            weights = weights / weights.sum()
        expected = np.asarray(np.sum(weights * held))
        # A sum of `steps` products in the losses' dtype: within one rounding per step.
        rtol = (steps + 2) * EPS[dtype]
        assert library_of(out) == backend.library and dtype_name(out) == dtype
        assert tuple(out.shape) == ()
        np.testing.assert_allclose(to_float64(out), expected, rtol=rtol, atol=0.0)

    on_each(each_backend(dtype), check)


def multi_step_of(losses: Any, *, decay: float, normalize: bool) -> Any:
    """:func:`~softce_multi.eagle3.multi_step_loss`, the keywords static under ``jax.jit``."""
    return eagle3.multi_step_loss(losses, decay=decay, normalize=normalize)


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


class Context(NamedTuple):
    """Valid arguments around a bad one: a backend, positions, vocabulary, dtypes."""

    backend: Backend
    positions: tuple[int, ...]
    vocab: int
    float_dtype: str
    mask_dtype: str

    def floats(self, shape: tuple[int, ...] | None = None, dtype: str | None = None) -> Any:
        shape = (*self.positions, self.vocab) if shape is None else shape
        values = np.random.default_rng(0).random(shape)
        return on_backend(self.backend, values, dtype or self.float_dtype)

    def mask(self, shape: tuple[int, ...] | None = None) -> Any:
        shape = self.positions if shape is None else shape
        return on_backend(self.backend, np.ones(shape), self.mask_dtype)

    def loss_args(self) -> tuple[Any, Any, Any]:
        return self.floats(), self.floats(), self.mask()

    def ints(self, values: Any, dtype: str = "int64") -> Any:
        return on_backend(self.backend, np.asarray(values), dtype)

    def t2d(self, size: int | None = None) -> Any:
        return on_backend(self.backend, np.arange(size or self.vocab) % 2 == 0, "bool")

    def linear_args(self, hidden_size: int = 4) -> tuple[Any, Any, Any, Any]:
        return (
            self.floats((*self.positions, hidden_size)),
            self.floats((self.vocab, hidden_size)),
            self.floats(),
            self.mask(),
        )


class Bad(NamedTuple):
    """A call with one bad argument, the exception it must raise, the argument it must name."""

    name: str
    call: Callable[[Context], Any]
    error: type[Exception]
    argument: str

    def __repr__(self) -> str:
        return self.name


def _loss_variants(name: str, call: Callable[..., Any], error: type, argument: str) -> list:
    """The bad call of the loss, and of the loss with its gradient."""
    return [
        Bad(f"{name} (loss)", lambda c: call(c, sc.masked_soft_cross_entropy), error, argument),
        Bad(
            f"{name} (with_grad)",
            lambda c: call(c, sc.masked_soft_cross_entropy_with_grad),
            error,
            argument,
        ),
    ]


def _with_last_axis(c: Context, extra: int) -> Any:
    return c.floats((*c.positions, c.vocab + extra))


BAD_INPUTS = [
    *_loss_variants(
        "targets of another vocabulary",
        lambda c, f: f(c.floats(), _with_last_axis(c, 1), c.mask()),
        ValueError,
        "target_probs",
    ),
    *_loss_variants(
        "targets of another vocabulary, by keyword",
        lambda c, f: f(
            position_mask=c.mask(), target_probs=_with_last_axis(c, 1), logits=c.floats()
        ),
        ValueError,
        "target_probs",
    ),
    *_loss_variants(
        "targets under another name",
        lambda c, f: f(logits=c.floats(), targets=c.floats(), position_mask=c.mask()),
        TypeError,
        "targets",
    ),
    *_loss_variants(
        "a mask with a trailing 2",
        lambda c, f: f(c.floats(), c.floats(), c.mask((*c.positions, 2))),
        ValueError,
        "position_mask",
    ),
    *_loss_variants(
        "a mask with one axis less",
        lambda c, f: f(c.floats(), c.floats(), c.mask(c.positions[:-1])),
        ValueError,
        "position_mask",
    ),
    *_loss_variants(
        "integer logits",
        lambda c, f: f(c.ints(np.ones((*c.positions, c.vocab)), "int32"), c.floats(), c.mask()),
        TypeError,
        "logits",
    ),
    *_loss_variants(
        "bool targets",
        lambda c, f: f(c.floats(), c.ints(np.ones((*c.positions, c.vocab)), "bool"), c.mask()),
        TypeError,
        "target_probs",
    ),
    *_loss_variants(
        "0-d logits",
        lambda c, f: f(c.floats(()), c.floats(()), c.mask(())),
        ValueError,
        "logits",
    ),
    *_loss_variants(
        "an empty vocabulary",
        lambda c, f: f(_with_last_axis(c, -c.vocab), _with_last_axis(c, -c.vocab), c.mask()),
        ValueError,
        "logits",
    ),
    *_loss_variants(
        "logits as a list",
        lambda c, f: f(to_numpy(c.floats()).tolist(), c.floats(), c.mask()),
        TypeError,
        "logits",
    ),
    *_loss_variants(
        "targets of another library",
        lambda c, f: f(
            c.floats(),
            to_numpy(c.floats()) if c.backend.library != "numpy" else [0.5] * c.vocab,
            c.mask(),
        ),
        TypeError,
        "target_probs",
    ),
    *_loss_variants(
        "an unknown reduction",
        lambda c, f: f(*c.loss_args(), reduction="avg"),
        ValueError,
        "reduction",
    ),
    *_loss_variants(
        "a negative num_valid",
        lambda c, f: f(*c.loss_args(), num_valid=-1),
        ValueError,
        "num_valid",
    ),
    *_loss_variants(
        "a NaN num_valid",
        lambda c, f: f(*c.loss_args(), num_valid=math.nan),
        ValueError,
        "num_valid",
    ),
    *_loss_variants(
        "num_valid beyond every float",
        lambda c, f: f(*c.loss_args(), num_valid=10**400),
        ValueError,
        "num_valid",
    ),
    *_loss_variants(
        "a bool num_valid", lambda c, f: f(*c.loss_args(), num_valid=True), TypeError, "num_valid"
    ),
    *_loss_variants(
        "a string num_valid",
        lambda c, f: f(*c.loss_args(), num_valid="3"),
        TypeError,
        "num_valid",
    ),
    *_loss_variants(
        "num_valid with the sum",
        lambda c, f: f(*c.loss_args(), reduction="sum", num_valid=3),
        ValueError,
        "num_valid",
    ),
    *_loss_variants(
        "a 1-D num_valid",
        lambda c, f: f(*c.loss_args(), num_valid=c.ints([3])),
        ValueError,
        "num_valid",
    ),
    *_loss_variants(
        "a bool array num_valid",
        lambda c, f: f(*c.loss_args(), num_valid=c.ints(True, "bool")),
        TypeError,
        "num_valid",
    ),
    Bad(
        "no reduction with a gradient",
        lambda c: sc.masked_soft_cross_entropy_with_grad(*c.loss_args(), reduction="none"),
        ValueError,
        "reduction",
    ),
    Bad(
        "a weight of another hidden size",
        lambda c: sc.linear_masked_soft_cross_entropy(
            c.floats((*c.positions, 4)), c.floats((c.vocab, 5)), c.floats(), c.mask()
        ),
        ValueError,
        "weight",
    ),
    Bad(
        "a weight of another hidden size, by keyword",
        lambda c: sc.linear_masked_soft_cross_entropy_with_grad(
            c.floats((*c.positions, 4)),
            position_mask=c.mask(),
            target_probs=c.floats(),
            weight=c.floats((c.vocab, 5)),
        ),
        ValueError,
        "weight",
    ),
    Bad(
        "hidden states under another name",
        lambda c: sc.linear_masked_soft_cross_entropy(
            hidden_states=c.floats((*c.positions, 4)),
            weight=c.floats((c.vocab, 4)),
            target_probs=c.floats(),
            position_mask=c.mask(),
        ),
        TypeError,
        "hidden_states",
    ),
    Bad(
        "a bias of another vocabulary",
        lambda c: sc.linear_masked_soft_cross_entropy_with_grad(
            *c.linear_args(), bias=c.floats((c.vocab + 1,))
        ),
        ValueError,
        "bias",
    ),
    Bad(
        "zero rows per chunk",
        lambda c: sc.linear_masked_soft_cross_entropy(*c.linear_args(), chunk_rows=0),
        ValueError,
        "chunk_rows",
    ),
    Bad(
        "a fractional chunk",
        lambda c: sc.linear_masked_soft_cross_entropy_with_grad(*c.linear_args(), chunk_rows=2.5),
        TypeError,
        "chunk_rows",
    ),
    Bad(
        "integer hidden states",
        lambda c: sc.linear_masked_soft_cross_entropy(
            c.ints(np.ones((*c.positions, 4))), *c.linear_args()[1:]
        ),
        TypeError,
        "hidden",
    ),
    Bad(
        "an axis out of range",
        lambda c: eagle3.shift_left(c.floats(), axis=len(c.positions) + 1),
        ValueError,
        "axis",
    ),
    Bad(
        "a fill beyond uint8",
        lambda c: eagle3.shift_left(c.ints(np.ones((2, 3)), "uint8"), fill=256),
        TypeError,
        "fill",
    ),
    Bad(
        "a fractional fill of integers",
        lambda c: eagle3.shift_left(c.ints(np.ones((2, 3)), "int16"), fill=0.5),
        TypeError,
        "fill",
    ),
    Bad(
        "unsigned target ids",
        lambda c: eagle3.target_to_draft_ids(c.ints([1, 2], "uint8"), c.t2d()),
        TypeError,
        "target_ids",
    ),
    Bad(
        "an integer t2d",
        lambda c: eagle3.target_to_draft_ids(c.ints([1, 2]), c.ints(np.ones(c.vocab))),
        TypeError,
        "t2d",
    ),
    Bad(
        "a 2-D d2t",
        lambda c: eagle3.draft_to_target_ids(c.ints([0, 1]), c.ints(np.zeros((2, 2)))),
        ValueError,
        "d2t",
    ),
    Bad(
        "floating draft ids",
        lambda c: eagle3.draft_to_target_ids(c.floats((2,)), c.ints([0, 1])),
        TypeError,
        "draft_ids",
    ),
    Bad(
        "an empty draft vocabulary",
        lambda c: eagle3.build_vocab_mapping(c.ints(np.arange(c.vocab)), 0),
        ValueError,
        "draft_vocab_size",
    ),
    Bad(
        "a draft vocabulary beyond the target's",
        lambda c: eagle3.build_vocab_mapping(c.ints(np.arange(c.vocab)), c.vocab + 1),
        ValueError,
        "draft_vocab_size",
    ),
    Bad(
        "a forced id beyond the vocabulary",
        lambda c: eagle3.build_vocab_mapping(
            c.ints(np.arange(c.vocab)), 1, always_include=[c.vocab]
        ),
        ValueError,
        "always_include",
    ),
    Bad(
        "a single forced id",
        lambda c: eagle3.build_vocab_mapping(c.ints(np.arange(c.vocab)), 1, always_include=0),
        TypeError,
        "always_include",
    ),
    Bad(
        "2-D token counts",
        lambda c: eagle3.build_vocab_mapping(c.ints(np.ones((2, c.vocab))), 1),
        ValueError,
        "token_counts",
    ),
    Bad(
        "a t2d of another vocabulary",
        lambda c: eagle3.prepare_targets(c.floats(), c.mask(), c.t2d(c.vocab + 1)),
        ValueError,
        "target_logits",
    ),
    Bad(
        "a t2d choosing nothing",
        lambda c: eagle3.prepare_targets(
            c.floats(), c.mask(), on_backend(c.backend, np.zeros(c.vocab), "bool")
        ),
        ValueError,
        "t2d",
    ),
    Bad(
        "a loss mask of another shape",
        lambda c: eagle3.prepare_targets(c.floats(), c.mask((*c.positions, 3)), c.t2d()),
        ValueError,
        "loss_mask",
    ),
    Bad(
        "a head weight of another hidden size",
        lambda c: eagle3.prepare_targets_from_hidden(
            c.floats((*c.positions, 4)), c.floats((c.vocab, 3)), c.mask(), c.t2d()
        ),
        ValueError,
        "target_head_weight",
    ),
    Bad(
        "zero columns per chunk",
        lambda c: eagle3.prepare_targets_from_hidden(
            c.floats((*c.positions, 4)), c.floats((c.vocab, 4)), c.mask(), c.t2d(), chunk_vocab=0
        ),
        ValueError,
        "chunk_vocab",
    ),
    Bad(
        "no step losses",
        lambda c: eagle3.multi_step_loss([]),
        ValueError,
        "step_losses",
    ),
    Bad(
        "2-D step losses",
        lambda c: eagle3.multi_step_loss(c.floats((2, 2))),
        ValueError,
        "step_losses",
    ),
    Bad(
        "a negative decay",
        lambda c: eagle3.multi_step_loss([c.floats(())], decay=-0.5),
        ValueError,
        "decay",
    ),
    Bad(
        "an integer normalize",
        lambda c: eagle3.multi_step_loss([c.floats(())], normalize=1),
        TypeError,
        "normalize",
    ),
    Bad(
        "an accuracy mask of another shape",
        lambda c: eagle3.draft_accuracy(c.floats(), c.floats(), c.mask((*c.positions, 2))),
        ValueError,
        "position_mask",
    ),
]


@fuzz
@given(
    bad=st.sampled_from(BAD_INPUTS),
    positions=st.sampled_from([(3,), (2, 3), (1, 4, 2)]),
    vocab=st.sampled_from([1, 2, 7]),
    float_dtype=st.sampled_from(FLOATS),
    mask_dtype=st.sampled_from(MASK_DTYPES),
)
def test_a_bad_input_raises_the_same_error_naming_the_argument_on_every_backend(
    bad: Bad, positions: tuple[int, ...], vocab: int, float_dtype: str, mask_dtype: str
) -> None:
    chosen = each_backend(float_dtype, mask_dtype)
    raised = {}
    for backend in chosen:
        with pytest.raises(Exception) as caught:  # the type is compared below
            bad.call(Context(backend, positions, vocab, float_dtype, mask_dtype))
        raised[backend.name] = caught
    types = {name: caught.type.__name__ for name, caught in raised.items()}
    assert set(types.values()) == {bad.error.__name__}, f"{bad.name}: {types}"
    for name, caught in raised.items():
        assert bad.argument in str(caught.value), f"{name}: {caught.value!r}"


# Every bad input at least once per run, besides those hypothesis draws.
for _bad in BAD_INPUTS:
    test_a_bad_input_raises_the_same_error_naming_the_argument_on_every_backend = example(
        bad=_bad, positions=(2, 3), vocab=7, float_dtype="float32", mask_dtype="bool"
    )(test_a_bad_input_raises_the_same_error_naming_the_argument_on_every_backend)


# --------------------------------------------------------------------------------------------
# Signatures and coverage
# --------------------------------------------------------------------------------------------


def loss_entry_points() -> list[Any]:
    """Each public loss function, with its array parameters and its options: those of the
    package, and of the adapters whose library is installed."""
    functions = [
        (sc, "masked_soft_cross_entropy", LOSS_ARRAYS, LOSS_OPTIONS),
        (sc, "masked_soft_cross_entropy_with_grad", LOSS_ARRAYS, LOSS_OPTIONS),
        (sc, "linear_masked_soft_cross_entropy", LINEAR_ARRAYS, LINEAR_OPTIONS),
        (sc, "linear_masked_soft_cross_entropy_with_grad", LINEAR_ARRAYS, LINEAR_OPTIONS),
    ]
    for library in ("torch", "jax"):
        if any(backend.library == library for backend in BACKENDS):
            adapter = importlib.import_module(f"softce_multi.{library}")
            functions.append((adapter, "masked_soft_cross_entropy", LOSS_ARRAYS, LOSS_OPTIONS))
    return [
        pytest.param(getattr(module, name), arrays, options, id=f"{module.__name__}.{name}")
        for module, name, arrays, options in functions
    ]


@pytest.mark.parametrize(("function", "arrays", "options"), loss_entry_points())
def test_the_arrays_are_positional_or_keyword_and_the_options_keyword_only(
    function: Callable[..., Any], arrays: tuple[str, ...], options: tuple[str, ...]
) -> None:
    kinds = {name: p.kind for name, p in inspect.signature(function).parameters.items()}
    expected = {
        **dict.fromkeys(arrays, inspect.Parameter.POSITIONAL_OR_KEYWORD),
        **dict.fromkeys(options, inspect.Parameter.KEYWORD_ONLY),
    }
    assert kinds == expected


#: The public functions, and the tests above that fuzz each.
FUZZED = {
    "masked_soft_cross_entropy": test_loss_agrees_with_the_oracle_on_every_backend,
    "masked_soft_cross_entropy_with_grad": (
        test_loss_with_grad_agrees_with_the_oracle_on_every_backend
    ),
    "linear_masked_soft_cross_entropy": test_linear_loss_agrees_with_the_oracle_on_every_backend,
    "linear_masked_soft_cross_entropy_with_grad": (
        test_linear_loss_with_grad_agrees_with_the_oracle_on_every_backend
    ),
    "eagle3.build_vocab_mapping": test_build_vocab_mapping_chooses_the_most_frequent_tokens,
    "eagle3.draft_accuracy": (
        test_draft_accuracy_is_the_share_of_valid_positions_with_the_same_top_token
    ),
    "eagle3.draft_to_target_ids": test_draft_to_target_ids_agree_with_the_offsets,
    "eagle3.multi_step_loss": test_multi_step_loss_is_the_decayed_weighted_sum,
    "eagle3.prepare_targets": test_prepare_targets_gives_the_draft_softmax_and_the_top_token_mask,
    "eagle3.prepare_targets_from_hidden": (
        test_prepare_targets_from_hidden_agree_with_the_materialised_logits
    ),
    "eagle3.shift_left": test_shift_left_moves_values_one_position_along_the_axis,
    "eagle3.target_to_draft_ids": test_target_to_draft_ids_agree_with_a_lookup_table,
}


def test_every_public_function_is_fuzzed() -> None:
    functions = {name for name in sc.__all__ if callable(getattr(sc, name))}
    functions -= {"LinearGradients"}  # a result type, not a function
    public = functions | {f"eagle3.{name}" for name in eagle3.__all__}
    assert public == set(FUZZED)
