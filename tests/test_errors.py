"""Bad inputs raise TypeError or ValueError, naming the argument and showing what was wrong.

Nothing is broadcast: an argument of a shape that would broadcast is still refused.
"""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest

import softce_multi as sc
from softce_multi import eagle3
from softce_multi.eagle3 import (
    build_vocab_mapping,
    multi_step_loss,
    prepare_targets,
    shift_left,
)
from softce_multi.testing import is_installed, random_inputs

needs_torch = pytest.mark.skipif(not is_installed("torch"), reason="torch not installed")
needs_jax = pytest.mark.skipif(not is_installed("jax"), reason="jax not installed")

LOSS_FUNCTIONS = [
    pytest.param(sc.masked_soft_cross_entropy, id="loss"),
    pytest.param(sc.masked_soft_cross_entropy_with_grad, id="with_grad"),
]


def inputs(shape=(2, 3, 5)):
    """float32 logits and targets, a bool mask: NumPy inputs to spoil one at a time."""
    return random_inputs(0, shape, normalised=False).astype("float32")


def message(*parts):
    """A regex matching every part, in order, anywhere in the message."""
    return ".*".join(re.escape(part) for part in parts)


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
@pytest.mark.parametrize("target_shape", [(2, 3, 4), (1, 3, 5), (3, 5), (2, 3, 5, 1)])
def test_targets_of_another_shape_are_refused(loss, target_shape):
    logits, _, mask = inputs()
    targets = np.full(target_shape, 0.2, dtype=np.float32)

    with pytest.raises(ValueError, match=message("target_probs", str(target_shape), "(2, 3, 5)")):
        loss(logits, targets, mask)


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
@pytest.mark.parametrize(
    "mask_shape", [(2, 3, 5), (1, 3), (3,), (2, 1), (2, 3, 1, 1), (6,), (), (2, 3, 2)]
)
def test_mask_of_neither_allowed_shape_is_refused(loss, mask_shape):
    logits, targets, _ = inputs()
    mask = np.ones(mask_shape, dtype=bool)

    with pytest.raises(
        ValueError, match=message("position_mask", "(2, 3)", "(2, 3, 1)", str(mask_shape))
    ):
        loss(logits, targets, mask)


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
@pytest.mark.parametrize("shape", [(2, 3, 0), (0,)])
def test_empty_vocabulary_axis_is_refused(loss, shape):
    logits, targets, _ = inputs(shape)
    mask = np.ones(shape[:-1], dtype=bool)

    with pytest.raises(ValueError, match=message("logits", "vocabulary", str(shape))):
        loss(logits, targets, mask)


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
def test_zero_dimensional_logits_are_refused(loss):
    with pytest.raises(ValueError, match=message("logits", "vocabulary", "()")):
        loss(np.asarray(1.0), np.asarray(1.0), np.asarray(True))


# --------------------------------------------------------------------------------------------
# Dtypes and types
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64])
def test_non_floating_logits_are_refused(loss, dtype):
    logits, targets, mask = inputs()

    with pytest.raises(TypeError, match=message("logits", np.dtype(dtype).name)):
        loss(logits.astype(dtype), targets, mask)


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64])
def test_non_floating_targets_are_refused(loss, dtype):
    logits, targets, mask = inputs()

    with pytest.raises(TypeError, match=message("target_probs", np.dtype(dtype).name)):
        loss(logits, targets.astype(dtype), mask)


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
def test_complex_mask_is_refused(loss):
    logits, targets, mask = inputs()

    with pytest.raises(TypeError, match=message("position_mask", "complex64")):
        loss(logits, targets, mask.astype(np.complex64))


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("value", [[[0.5, 0.5]], 1.0, None, "logits"], ids=type)
def test_non_array_arguments_are_refused(loss, position, value):
    args = list(inputs((1, 2)))
    args[position] = value
    name = ["logits", "target_probs", "position_mask"][position]

    with pytest.raises(TypeError, match=message(name, "must be an array", type(value).__name__)):
        loss(*args)


# --------------------------------------------------------------------------------------------
# Namespaces and devices
# --------------------------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
def test_torch_logits_with_numpy_targets_are_refused(loss):
    torch = pytest.importorskip("torch")
    logits, targets, mask = inputs()

    with pytest.raises(TypeError, match=message("logits", "target_probs", "torch", "numpy")):
        loss(torch.from_numpy(logits), targets, torch.from_numpy(mask))


@needs_torch
@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
def test_torch_inputs_with_a_numpy_mask_are_refused(loss):
    torch = pytest.importorskip("torch")
    logits, targets, mask = inputs()

    with pytest.raises(TypeError, match=message("position_mask", "torch", "numpy")):
        loss(torch.from_numpy(logits), torch.from_numpy(targets), mask)


@needs_torch
@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
def test_num_valid_array_of_another_library_is_refused(loss):
    torch = pytest.importorskip("torch")
    args = [torch.from_numpy(array) for array in inputs()]

    with pytest.raises(TypeError, match=message("num_valid", "torch", "numpy")):
        loss(*args, num_valid=np.asarray(4))


@needs_jax
@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
def test_jax_logits_with_numpy_targets_are_refused(loss):
    jnp = pytest.importorskip("jax.numpy")
    logits, targets, mask = inputs()

    with pytest.raises(TypeError, match=message("logits", "target_probs", "jax", "numpy")):
        loss(jnp.asarray(logits), targets, jnp.asarray(mask))


@needs_torch
@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
@pytest.mark.parametrize("position", [1, 2])
def test_arrays_on_different_devices_are_refused(loss, position):
    # The meta device stands in for a second device on a machine without a GPU.
    torch = pytest.importorskip("torch")
    args = [torch.from_numpy(array) for array in inputs()]
    args[position] = args[position].to("meta")
    name = ["logits", "target_probs", "position_mask"][position]

    with pytest.raises(ValueError, match=message("device", "logits on cpu", f"{name} on meta")):
        loss(*args)


@needs_torch
@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
def test_num_valid_on_another_device_is_refused(loss):
    torch = pytest.importorskip("torch")
    args = [torch.from_numpy(array) for array in inputs()]

    with pytest.raises(ValueError, match=message("device", "logits on cpu", "num_valid on meta")):
        loss(*args, num_valid=torch.tensor(4.0, device="meta"))


# --------------------------------------------------------------------------------------------
# reduction and num_valid
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
@pytest.mark.parametrize("reduction", ["avg", "Mean", "", None, 1])
def test_unknown_reduction_is_refused(loss, reduction):
    with pytest.raises(ValueError, match=message("reduction", "mean", "sum", repr(reduction))):
        loss(*inputs(), reduction=reduction)


def test_with_grad_refuses_reduction_none():
    with pytest.raises(ValueError, match=message("reduction='none'", "mean", "sum")):
        sc.masked_soft_cross_entropy_with_grad(*inputs(), reduction="none")


def test_linear_with_grad_refuses_reduction_none_naming_the_linear_losses():
    rng = np.random.default_rng(0)
    hidden, weight = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4))
    target_probs, mask = np.full((2, 3, 5), 0.2), np.ones((2, 3), bool)
    expected = message("reduction='none'", "linear_masked_soft_cross_entropy_with_grad")
    with pytest.raises(ValueError, match=expected):
        sc.linear_masked_soft_cross_entropy_with_grad(
            hidden, weight, target_probs, mask, reduction="none"
        )


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
@pytest.mark.parametrize("num_valid", [-1, -0.5, np.int64(-3), np.float32(-2.0)], ids=repr)
def test_negative_num_valid_number_is_refused(loss, num_valid):
    with pytest.raises(ValueError, match=message("num_valid", "non-negative", str(num_valid))):
        loss(*inputs(), num_valid=num_valid)


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
@pytest.mark.parametrize("num_valid", [float("nan"), float("inf")], ids=repr)
def test_non_finite_num_valid_number_is_refused(loss, num_valid):
    with pytest.raises(ValueError, match=message("num_valid", "finite")):
        loss(*inputs(), num_valid=num_valid)


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
@pytest.mark.parametrize("num_valid", [True, "4", [4], 4j], ids=repr)
def test_num_valid_of_another_type_is_refused(loss, num_valid):
    with pytest.raises(TypeError, match=message("num_valid", type(num_valid).__name__)):
        loss(*inputs(), num_valid=num_valid)


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
def test_num_valid_array_that_is_not_zero_dimensional_is_refused(loss):
    with pytest.raises(ValueError, match=message("num_valid", "0-d", "(1,)")):
        loss(*inputs(), num_valid=np.asarray([4]))


@pytest.mark.parametrize("loss", LOSS_FUNCTIONS)
@pytest.mark.parametrize("dtype", [np.bool_, np.complex64])
def test_num_valid_array_of_a_non_real_dtype_is_refused(loss, dtype):
    with pytest.raises(TypeError, match=message("num_valid", np.dtype(dtype).name)):
        loss(*inputs(), num_valid=np.asarray(4, dtype=dtype))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_num_valid_with_a_reduction_other_than_mean_is_refused(reduction):
    with pytest.raises(ValueError, match=message("num_valid", "mean", repr(reduction))):
        sc.masked_soft_cross_entropy(*inputs(), reduction=reduction, num_valid=4)


def test_num_valid_with_sum_is_refused_by_with_grad():
    with pytest.raises(ValueError, match=message("num_valid", "mean", "'sum'")):
        sc.masked_soft_cross_entropy_with_grad(*inputs(), reduction="sum", num_valid=4)


@needs_torch
@pytest.mark.parametrize("num_valid", [np.int64(4), np.float32(4.0)], ids=repr)
def test_numpy_scalar_num_valid_is_a_host_number_for_any_backend(num_valid):
    torch = pytest.importorskip("torch")
    args = [torch.from_numpy(array) for array in inputs()]

    loss = sc.masked_soft_cross_entropy(*args, num_valid=num_valid)

    torch.testing.assert_close(loss, sc.masked_soft_cross_entropy(*args, num_valid=4))


# --------------------------------------------------------------------------------------------
# Other entry points
# --------------------------------------------------------------------------------------------


@needs_torch
def test_torch_module_refuses_an_unknown_reduction_when_built():
    from softce_multi.torch import MaskedSoftCrossEntropy

    with pytest.raises(ValueError, match=message("reduction", "'avg'")):
        MaskedSoftCrossEntropy(reduction="avg")


@needs_torch
def test_torch_module_refuses_bad_shapes():
    torch = pytest.importorskip("torch")
    from softce_multi.torch import MaskedSoftCrossEntropy

    logits, targets, _ = (torch.from_numpy(array) for array in inputs())
    mask = torch.ones(2, 3, 5, dtype=torch.bool)

    with pytest.raises(ValueError, match=message("position_mask", "(2, 3, 5)")):
        MaskedSoftCrossEntropy()(logits, targets, mask)


@needs_jax
def test_jax_entry_point_refuses_bad_shapes_under_jit():
    jax = pytest.importorskip("jax")
    from softce_multi.jax import masked_soft_cross_entropy

    logits, targets, mask = (jax.numpy.asarray(array) for array in inputs())

    with pytest.raises(ValueError, match=message("target_probs", "(2, 3, 4)", "(2, 3, 5)")):
        jax.jit(masked_soft_cross_entropy)(logits, targets[..., :4], mask)


# --------------------------------------------------------------------------------------------
# Host numbers beyond the computation dtype, and dtypes the library cannot compute in
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_valid", [10**400, 1e39, 2.0**127, Fraction(10**50)], ids=repr)
def test_num_valid_beyond_float32_is_refused(backend, num_valid):
    with pytest.raises(ValueError, match=r"num_valid.*float32"):
        sc.masked_soft_cross_entropy(*random_inputs(0, (2, 3, 5)).on(backend), num_valid=num_valid)


@pytest.mark.parametrize("num_valid", [1e-50, 1e-40, np.float32(1e-39)], ids=repr)
def test_a_tiny_num_valid_is_refused_rather_than_flushed_to_zero(backend, num_valid):
    with pytest.raises(ValueError, match=r"num_valid.*float32"):
        sc.masked_soft_cross_entropy(*random_inputs(0, (2, 3, 5)).on(backend), num_valid=num_valid)


needs_wide_longdouble = pytest.mark.skipif(
    np.finfo(np.longdouble).bits <= 64, reason="np.longdouble is float64 on this platform"
)


@needs_wide_longdouble
@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize(
    "loss", [sc.masked_soft_cross_entropy, sc.masked_soft_cross_entropy_with_grad]
)
def test_longdouble_inputs_are_refused(position, loss):
    args = list(inputs())
    args[position] = args[position].astype(np.longdouble)
    name = ["logits", "target_probs"][position]
    with pytest.raises(TypeError, match=f"{name}.*longdouble|{name}.*float128"):
        loss(*args)


@needs_wide_longdouble
@pytest.mark.parametrize(
    ("step_losses", "name"),
    [
        ([np.longdouble(1) / 3, np.longdouble(2)], r"step_losses\[0\]"),
        (np.array([1.0, 2.0], np.longdouble), "step_losses"),
    ],
)
def test_longdouble_step_losses_are_refused(step_losses, name):
    with pytest.raises(TypeError, match=f"{name} must be float16.*float128"):
        eagle3.multi_step_loss(step_losses)


@needs_wide_longdouble
def test_a_longdouble_num_valid_is_refused(backend):
    with pytest.raises(TypeError, match=r"num_valid.*longdouble"):
        sc.masked_soft_cross_entropy(
            *random_inputs(0, (2, 3, 5)).on(backend), num_valid=np.longdouble(4)
        )


#: The floating dtypes of torch narrower than 16 bits, by name.
_TORCH_NARROW_FLOATS = ["float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float4_e2m1fn_x2"]


def torch_array_of(torch, dtype_name: str, shape: tuple[int, ...]):
    """Random bytes viewed as ``dtype_name`` (float4_e2m1fn_x2 packs two values in one)."""
    rng = np.random.default_rng(3)
    return torch.from_numpy(rng.integers(0, 64, size=shape, dtype=np.uint8)).view(
        getattr(torch, dtype_name)
    )


@needs_torch
@pytest.mark.parametrize("argument", ["logits", "target_probs", "position_mask", "num_valid"])
@pytest.mark.parametrize("dtype_name", _TORCH_NARROW_FLOATS)
def test_torch_float8_and_float4_arrays_are_refused_naming_the_argument(argument, dtype_name):
    torch = pytest.importorskip("torch")
    if not hasattr(torch, dtype_name):
        pytest.skip(f"torch {torch.__version__} has no {dtype_name}")
    arrays = dict(zip(("logits", "target_probs", "position_mask"), inputs(), strict=True))
    arrays = {name: torch.from_numpy(array) for name, array in arrays.items()}
    shape = () if argument == "num_valid" else tuple(arrays[argument].shape)
    arrays[argument] = torch_array_of(torch, dtype_name, shape)

    with pytest.raises(TypeError, match=f"{argument} must be float16.*{dtype_name}"):
        sc.masked_soft_cross_entropy(**arrays)


@needs_jax
@pytest.mark.parametrize("argument", ["logits", "target_probs"])
@pytest.mark.parametrize("dtype_name", ["float8_e4m3fn", "float8_e5m2", "float4_e2m1fn"])
def test_jax_float8_and_float4_arrays_are_refused_naming_the_argument(argument, dtype_name):
    jnp = pytest.importorskip("jax.numpy")
    if not hasattr(jnp, dtype_name):
        pytest.skip(f"jax has no {dtype_name}")
    arrays = dict(zip(("logits", "target_probs", "position_mask"), inputs(), strict=True))
    arrays = {name: jnp.asarray(array) for name, array in arrays.items()}
    arrays[argument] = jnp.astype(arrays[argument], getattr(jnp, dtype_name))

    with pytest.raises(TypeError, match=f"{argument} must be float16.*{dtype_name}"):
        sc.masked_soft_cross_entropy(**arrays)


@needs_torch
@pytest.mark.parametrize("argument", ["logits", "target_probs", "position_mask"])
@pytest.mark.parametrize("layout", ["sparse_coo", "nested"])
def test_torch_tensors_that_are_not_dense_are_refused_naming_the_argument(argument, layout):
    torch = pytest.importorskip("torch")
    arrays = dict(zip(("logits", "target_probs", "position_mask"), inputs(), strict=True))
    arrays = {name: torch.from_numpy(array) for name, array in arrays.items()}
    if layout == "sparse_coo":
        arrays[argument] = arrays[argument].to_sparse()
    else:
        arrays[argument] = torch.nested.nested_tensor(list(arrays[argument]))

    with pytest.raises(TypeError, match=f"{argument} must be a dense"):
        sc.masked_soft_cross_entropy(**arrays)


def test_a_float16_numpy_num_valid_is_checked_without_overflow_warnings(backend):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = sc.masked_soft_cross_entropy(
            *random_inputs(0, (2, 3, 5)).on(backend), num_valid=np.float16(4)
        )
    assert loss.shape == ()


@needs_torch
@pytest.mark.parametrize("library", ["numpy", "jax"])
@pytest.mark.parametrize("face", ["function", "module"])
def test_the_torch_face_refuses_arrays_of_another_library(library, face):
    if library == "jax":
        pytest.importorskip("jax")
    from softce_multi.testing import known_backends
    from softce_multi.torch import MaskedSoftCrossEntropy, masked_soft_cross_entropy

    backend = next(b for b in known_backends() if b.library == library and b.device == "cpu")
    loss = masked_soft_cross_entropy if face == "function" else MaskedSoftCrossEntropy()
    with pytest.raises(TypeError, match=r"softce_multi\.torch\..* takes arrays of torch"):
        loss(*random_inputs(0, (2, 3, 5)).on(backend))


@needs_torch
@pytest.mark.parametrize("library", ["numpy", "jax"])
def test_the_torch_linear_module_refuses_arrays_of_another_library(library):
    if library == "jax":
        pytest.importorskip("jax")
    from softce_multi.testing import known_backends
    from softce_multi.torch import LinearMaskedSoftCrossEntropy

    backend = next(b for b in known_backends() if b.library == library and b.device == "cpu")
    rng = np.random.default_rng(5)
    hidden, weight = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4))
    targets, mask = np.full((2, 3, 5), 0.2), np.ones((2, 3), bool)
    arrays = (backend.asarray(x) for x in (hidden, weight, targets, mask))
    with pytest.raises(TypeError, match="LinearMaskedSoftCrossEntropy takes arrays of torch"):
        LinearMaskedSoftCrossEntropy()(*arrays)


@needs_jax
@pytest.mark.parametrize("library", ["torch", "array_api_strict"])
def test_the_jax_face_refuses_arrays_of_another_library(library):
    pytest.importorskip(library)
    from softce_multi.jax import masked_soft_cross_entropy
    from softce_multi.testing import known_backends

    backend = next(b for b in known_backends() if b.library == library)
    with pytest.raises(TypeError, match=r"softce_multi\.jax\..* takes arrays of jax, got"):
        masked_soft_cross_entropy(*random_inputs(0, (2, 3, 5)).on(backend))


@needs_jax
def test_the_jax_face_takes_numpy_arrays_as_jax_does():
    from softce_multi.jax import masked_soft_cross_entropy

    case = random_inputs(0, (2, 3, 5))
    loss = masked_soft_cross_entropy(*(np.asarray(x, np.float32) for x in case[:2]), case[2])
    np.testing.assert_allclose(float(loss), float(sc.masked_soft_cross_entropy(*case)), rtol=1e-6)


@needs_jax
def test_the_jax_face_takes_numpy_arrays_beside_a_differentiated_one():
    jax = pytest.importorskip("jax")
    from softce_multi.jax import masked_soft_cross_entropy

    logits, targets, mask = random_inputs(0, (2, 3, 5))
    logits, targets = np.asarray(logits, np.float32), np.asarray(targets, np.float32)

    grad = jax.grad(masked_soft_cross_entropy)(logits, targets, mask)

    as_jax = (jax.numpy.asarray(x) for x in (logits, targets, mask))
    expected = jax.grad(sc.masked_soft_cross_entropy)(*as_jax)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-6, atol=1e-7)


@needs_jax
def test_the_jax_face_refuses_a_numpy_array_jax_cannot_hold_by_name():
    from softce_multi.jax import masked_soft_cross_entropy

    logits, targets, mask = random_inputs(0, (2, 3, 5))

    with pytest.raises(TypeError, match="position_mask"):
        masked_soft_cross_entropy(logits, targets, np.asarray(mask, dtype=object))


_PROBS = np.full((2, 3), 1 / 3, dtype=np.float32)
_MASK = np.ones(2, dtype=bool)

#: Calls with one NumPy array of the given dtype, by the name of that argument.
_CALLS_WITH_ONE_ARRAY_OF = {
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
def test_numpy_bfloat16_is_refused_naming_the_argument_and_the_dtype(argument):
    # NumPy's array API knows no bfloat16 (ml_dtypes', which JAX arrays become in NumPy).
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed")
    with pytest.raises(TypeError, match=rf"^{argument} has dtype bfloat16, which numpy does not"):
        _CALLS_WITH_ONE_ARRAY_OF[argument](np.dtype(ml_dtypes.bfloat16))
