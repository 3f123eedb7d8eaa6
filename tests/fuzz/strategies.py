"""What the fuzz tests share: the structures of their inputs, inputs on every backend, calls
(under ``jax.jit`` on JAX), the loss's drawn inputs and the checks of its results."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import array_api_compat
import array_api_extra as xpx
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

import softce_multi as sc
from softce_multi.testing import (
    Backend,
    assert_gradient_close,
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

#: Skips a fuzz test of gradients where no installed backend differentiates (NumPy alone).
needs_autodiff = pytest.mark.skipif(
    not any(backend.is_autodiff for backend in BACKENDS),
    reason="no installed backend differentiates (torch or jax)",
)


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
LOSS_OPTIONS = ("reduction", "num_valid", "target_ids")
LINEAR_OPTIONS = ("bias", "reduction", "num_valid", "chunk_rows", "target_ids")


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


#: Examples of the costlier fuzz tests (float64 oracles of second derivatives, hessians, a
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
