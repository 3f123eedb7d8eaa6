"""The public test helpers of :mod:`softce_multi.testing` hold their own contract."""

from __future__ import annotations

import numpy as np
import pytest

import softce_multi as sc
from softce_multi import testing
from softce_multi.testing import (
    REDUCTIONS,
    Backend,
    assert_gradient_close,
    assert_loss_close,
    known_backends,
    numpy_reference,
    reference,
    to_float64,
    to_numpy,
)

AVAILABLE = [
    pytest.param(
        backend, id=backend.name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))
    )
    for backend, reason in testing.availability()
]


def test_module_imports_without_optional_libraries():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('torch', 'jax', 'cupy', 'array_api_strict'):\n"
        "    sys.modules[name] = None\n"
        "import softce_multi.testing as t\n"
        "assert [b.name for b in t.backends()] == ['numpy'], t.backends()\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_package_does_not_import_the_testing_module():
    import subprocess
    import sys

    code = "import sys, softce_multi\nprint('softce_multi.testing' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_known_backends_are_named_uniquely_and_available_ones_are_a_subset():
    names = [backend.name for backend in known_backends()]
    assert len(set(names)) == len(names)
    assert set(names) >= {"numpy", "array-api-strict", "torch-cpu", "torch-cuda", "jax-cpu"}
    assert {b.name for b in testing.backends()} <= set(names)
    for backend, reason in testing.availability():
        assert (reason is None) == (backend in testing.backends())


def test_a_backend_of_a_missing_library_says_why():
    missing = Backend("nothing", "no_such_array_library_here", "cpu")
    assert missing.unavailable_reason() == "no_such_array_library_here not installed"
    assert not missing.is_available


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
def test_round_trip_through_a_backend_keeps_the_rounded_values(backend: Backend, dtype: str):
    if not backend.supports(dtype):
        pytest.skip(f"{backend.library} has no {dtype}")
    values = np.random.default_rng(0).standard_normal((2, 5))
    array = backend.asarray(values, dtype)
    assert testing.dtype_name(array) == dtype
    assert testing.library_of(array) == backend.library.split(".")[0]
    assert testing.device_of(array) == backend.device
    back = to_float64(array)
    assert back.dtype == np.float64
    tolerance = {"float64": 0, "float32": 1e-7, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    np.testing.assert_allclose(back, values, rtol=tolerance, atol=0)
    assert to_numpy(array).dtype == (np.float32 if dtype == "bfloat16" else np.dtype(dtype))


@pytest.mark.parametrize(
    ("reduction", "num_valid"),
    [*((reduction, None) for reduction in REDUCTIONS), ("mean", 2.5), ("mean", 0.0)],
)
def test_numpy_formula_matches_the_torch_reference(reduction: str, num_valid):
    pytest.importorskip("torch", reason="torch not installed")
    logits, targets, mask = testing.random_inputs(1, (3, 4, 7), mask_kind="float")
    rng = np.random.default_rng(2)
    upstream = rng.standard_normal(mask.shape) if reduction == "none" else 1.5
    kwargs = {"reduction": reduction, "num_valid": num_valid, "upstream": upstream}
    expected = reference(logits, targets, mask, **kwargs)
    formula = numpy_reference(logits, targets, mask, **kwargs)
    for got, want in zip(formula, expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert num_valid == 0.0 or np.any(expected.grad_logits != 0)


def test_zero_targets_give_exact_zero_terms_with_infinite_logits():
    logits = np.array([[0.0, -np.inf, 1.0]])
    targets = np.array([[0.5, 0.0, 0.5]])
    expected = numpy_reference(logits, targets, np.ones(1))
    assert np.isfinite(expected.loss)


# --- the assertions -------------------------------------------------------------------------

ASSERTIONS = [assert_loss_close, assert_gradient_close]


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_assertion_accepts_equal_values(assertion):
    values = np.array([1.0, -2.0, 3.0])
    assertion(values, values.copy())
    assertion(values.astype(np.float32), values.astype(np.float32) * (1 + 1e-7))


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_assertion_rejects_a_wrong_value(assertion):
    with pytest.raises(AssertionError, match="actual: numpy array"):
        assertion(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-6]))


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_assertion_rejects_a_wrong_dtype(assertion):
    with pytest.raises(AssertionError, match="dtypes differ: expected float64, got float32"):
        assertion(np.ones(3, np.float32), np.ones(3))


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_assertion_rejects_a_wrong_dtype_given_by_name_against_the_oracle(assertion):
    torch = pytest.importorskip("torch", reason="torch not installed")
    with pytest.raises(AssertionError, match="dtypes differ: expected float32, got float64"):
        assertion(torch.ones(3, dtype=torch.float64), np.ones(3), dtype="float32")


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_assertion_rejects_a_wrong_shape(assertion):
    with pytest.raises(AssertionError, match=r"shapes differ: expected \(3,\), got \(3, 1\)"):
        assertion(np.ones((3, 1)), np.ones(3))


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_assertion_rejects_a_wrong_namespace(assertion):
    torch = pytest.importorskip("torch", reason="torch not installed")
    with pytest.raises(AssertionError, match="namespaces differ: expected numpy, got torch"):
        assertion(torch.ones(3, dtype=torch.float64), np.ones(3), library="numpy")
    with pytest.raises(AssertionError, match="namespaces differ: expected torch, got numpy"):
        assertion(np.ones(3), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_a_numpy_desired_that_is_not_float64_is_no_oracle_for_another_library(assertion):
    torch = pytest.importorskip("torch", reason="torch not installed")
    with pytest.raises(AssertionError, match="namespaces differ: expected numpy, got torch"):
        assertion(torch.ones(3), np.ones(3, np.float32))


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_assertion_rejects_a_wrong_device(assertion):
    torch = pytest.importorskip("torch", reason="torch not installed")
    cpu = torch.ones(3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="devices differ: expected gpu, got cpu"):
        assertion(cpu, np.ones(3), device="gpu")
    assertion(cpu, np.ones(3), library="torch", dtype="float64", device="cpu")


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_properties_are_checked_before_values(assertion):
    with pytest.raises(AssertionError, match="dtypes differ"):
        assertion(np.full(3, 7.0, np.float32), np.ones(3))


def test_gradient_tolerance_scales_with_the_largest_entry():
    desired = np.array([1000.0, 0.0], np.float32)
    assert_gradient_close(np.array([1000.0, 5e-3], np.float32), desired)
    with pytest.raises(AssertionError):
        assert_gradient_close(np.array([1000.0, 2e-2], np.float32), desired)


def test_loss_tolerance_follows_the_compute_dtype():
    desired = np.array(1.0)
    assert_loss_close(np.array(1.0 + 1e-6), desired, "float32", dtype="float64")
    with pytest.raises(AssertionError):
        assert_loss_close(np.array(1.0 + 1e-6), desired)


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_an_absolute_floor_admits_the_rounding_of_larger_terms_and_no_more(assertion):
    """A float32 result that should be 0 (a cancelled gradient, the loss of a confident row)
    differs by the rounding of its terms: within ``atol`` it passes, beyond it fails."""
    desired = np.zeros(2)
    rounded = np.array([3e-7, -3e-7], np.float32)
    with pytest.raises(AssertionError):
        assertion(rounded, desired, "float32", dtype="float32")
    assertion(rounded, desired, "float32", dtype="float32", atol=1e-6)
    with pytest.raises(AssertionError):
        assertion(rounded * 10, desired, "float32", dtype="float32", atol=1e-6)


@pytest.mark.parametrize("oracle", ["reference", "numpy_reference"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_the_oracles_refuse_num_valid_with_another_reduction_than_mean(oracle, reduction):
    """As the loss does: ``num_valid`` replaces the mean's denominator and nothing else."""
    if oracle == "reference":
        pytest.importorskip("torch", reason="torch not installed")
    logits, targets, mask = testing.random_inputs(1, (3, 4, 7))

    with pytest.raises(ValueError, match="num_valid replaces the denominator"):
        getattr(testing, oracle)(logits, targets, mask, reduction=reduction, num_valid=2.0)
    with pytest.raises(ValueError, match="num_valid replaces the denominator"):
        sc.masked_soft_cross_entropy(logits, targets, mask, reduction=reduction, num_valid=2.0)


# --- non-finite desired values ----------------------------------------------------------------


def test_a_gradient_with_infinite_entries_is_judged_on_its_finite_ones():
    """An infinite desired entry must not make the tolerance of the others infinite."""
    desired = np.array([[np.inf, 0.5, -0.25]])
    with pytest.raises(AssertionError, match="gradient"):
        assert_gradient_close(np.array([[np.inf, 123.0, 7.0]]), desired)
    assert_gradient_close(desired.copy(), desired)
    # The targets gradient at a -inf logit is +inf (docs/semantics.rst allows -inf logits).
    expected = numpy_reference(
        np.array([[0.0, -np.inf, 1.0, 2.0]]), np.array([[0.5, 0.0, 0.25, 0.25]]), np.ones(1)
    )
    assert np.isposinf(expected.grad_targets[0, 1])
    wrong = np.where(np.isfinite(expected.grad_targets), 1e6, expected.grad_targets)
    with pytest.raises(AssertionError):
        assert_gradient_close(wrong, expected.grad_targets)
    assert_gradient_close(expected.grad_targets.copy(), expected.grad_targets)


@pytest.mark.parametrize("non_finite", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_non_finite_desired_entries_must_be_matched_exactly(assertion, non_finite):
    desired = np.array([non_finite, 1.0, -2.0])
    assertion(desired.copy(), desired)
    for other in {np.inf, -np.inf, np.nan, 1e300, 0.0} - {non_finite}:
        if np.isnan(other) and np.isnan(non_finite):
            continue
        with pytest.raises(AssertionError):
            assertion(np.array([other, 1.0, -2.0]), desired)
    with pytest.raises(AssertionError):
        assertion(np.array([non_finite, 1.0, 5.0]), desired)


def test_a_finite_desired_entry_is_not_matched_by_an_infinite_one():
    with pytest.raises(AssertionError):
        assert_gradient_close(np.array([np.inf, 1.0]), np.array([2.0, 1.0]))
    with pytest.raises(AssertionError):
        assert_loss_close(np.array([np.nan, 1.0]), np.array([2.0, 1.0]))


# --- dense_targets, the oracle of sparse targets ----------------------------------------------


@pytest.mark.parametrize("bad_id", [-1, 3, 7, -(2**40)])
def test_dense_targets_of_an_id_outside_the_vocabulary_with_mass_are_nan(bad_id):
    """As the loss does: that position's loss is NaN (docs/sparse.rst), never another column's
    target."""
    ids = np.array([[0, bad_id], [2, 1]])
    probs = np.array([[0.5, 0.5], [0.25, 0.75]])
    dense = testing.dense_targets(ids, probs, 3)
    assert np.isnan(dense[0]).all()
    np.testing.assert_array_equal(dense[1], [0.0, 0.75, 0.25])
    logits, mask = np.zeros((2, 3)), np.ones(2, dtype=bool)
    library = sc.masked_soft_cross_entropy(logits, probs, mask, target_ids=ids, reduction="none")
    oracle = numpy_reference(logits, dense, mask, reduction="none").loss
    np.testing.assert_array_equal(np.isnan(oracle), np.isnan(library))
    np.testing.assert_allclose(oracle[1], library[1], rtol=1e-12)


def test_dense_targets_ignore_any_id_whose_probability_is_zero():
    ids = np.array([[-1, 3, 2**40, 1]], dtype=np.int64)
    probs = np.array([[0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(testing.dense_targets(ids, probs, 3), [[0.0, 1.0, 0.0]])


def test_dense_targets_refuse_ids_that_are_not_integers():
    with pytest.raises(TypeError, match="target_ids"):
        testing.dense_targets(np.array([[0.0, 1.0]]), np.array([[0.5, 0.5]]), 3)
    with pytest.raises(TypeError, match="target_ids"):
        testing.dense_targets(np.array([[True, False]]), np.array([[0.5, 0.5]]), 3)


@pytest.mark.parametrize(
    ("ids_shape", "probs_shape"), [((3, 2), (2, 3)), ((2, 2), (2, 3)), ((), ())]
)
def test_dense_targets_refuse_shapes_that_disagree(ids_shape, probs_shape):
    ids = np.zeros(ids_shape, dtype=np.int64)
    with pytest.raises(ValueError, match="target_ids"):
        testing.dense_targets(ids, np.ones(probs_shape), 4)


def test_dense_targets_refuse_a_negative_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        testing.dense_targets(np.zeros((1, 2), np.int64), np.zeros((1, 2)), -1)


# --- the oracle pattern of docs/testing.rst checks the loss's dtype and device ----------------


@pytest.mark.parametrize("backend", AVAILABLE)
def test_the_documented_oracle_pattern_fails_a_float64_loss_where_float32_was_promised(backend):
    """The example of docs/testing.rst, which says it fails such a loss."""
    case = testing.make_case(backend, np.random.default_rng(0), (2, 8, 50))
    loss = sc.masked_soft_cross_entropy(case.logits, case.target_probs, case.position_mask)
    expected = testing.reference(case.z, case.p, case.w)
    expectations = {"library": backend.library, "dtype": "float32", "device": backend.device}
    testing.assert_loss_close(loss, expected.loss, "float32", **expectations)
    wide = backend.asarray(to_numpy(loss), "float64")
    with pytest.raises(AssertionError, match="dtypes differ: expected float32, got float64"):
        testing.assert_loss_close(wide, expected.loss, "float32", **expectations)
    if backend.library != "numpy":
        with pytest.raises(AssertionError, match="namespaces differ"):
            testing.assert_loss_close(to_numpy(loss), expected.loss, "float32", **expectations)


def test_against_the_oracle_a_loss_has_its_compute_dtype():
    """A float64 NumPy desired with a compute dtype is the oracle, not a float64 promise: the
    loss must have the compute dtype, or the dtype given."""
    assert_loss_close(np.array(1.0, np.float32), np.array(1.0), "float32")
    with pytest.raises(AssertionError, match="dtypes differ: expected float32, got float64"):
        assert_loss_close(np.array(1.0), np.array(1.0), "float32")
    with pytest.raises(AssertionError, match="dtypes differ: expected float16, got float32"):
        assert_loss_close(np.array(1.0, np.float32), np.array(1.0), "float32", dtype="float16")


def test_a_gradient_against_the_oracle_keeps_the_dtype_of_its_input():
    """A bfloat16 gradient computed in float32: its dtype is not the compute dtype."""
    torch = pytest.importorskip("torch", reason="torch not installed")
    assert_gradient_close(torch.ones(3, dtype=torch.bfloat16), np.ones(3), "float32")


# --- 16-bit gradients in ulp: shapes ----------------------------------------------------------


def test_ulp_error_refuses_arrays_of_different_shapes():
    with pytest.raises(AssertionError, match=r"shapes differ: expected \(1, 3\), got \(0, 3\)"):
        testing.ulp_error(np.zeros((0, 3)), np.ones((1, 3)))
    with pytest.raises(AssertionError, match=r"shapes differ: expected \(1, 3\), got \(3,\)"):
        testing.ulp_error(np.ones(3), np.ones((1, 3)))
    assert testing.ulp_error(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0


def test_a_16_bit_gradient_must_have_the_shape_of_its_logits():
    torch = pytest.importorskip("torch", reason="torch not installed")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 8, generator=generator).to(torch.bfloat16)
    targets = torch.softmax(torch.randn(1, 8, generator=generator), -1)
    mask = torch.ones(1, dtype=torch.bool)
    grad = torch.func.grad(lambda z: sc.masked_soft_cross_entropy(z, targets, mask).float())(
        logits.clone()
    )
    testing.assert_gradient_rounded_once(grad, logits, targets, mask)
    with pytest.raises(AssertionError, match=r"shapes differ: expected \(1, 8\), got \(8,\)"):
        testing.assert_gradient_rounded_once(grad[0], logits, targets, mask)
    with pytest.raises(AssertionError, match=r"shapes differ: expected \(1, 8\), got \(0, 8\)"):
        testing.assert_gradient_rounded_once(grad[:0], logits, targets, mask)
    testing.assert_gradient_rounded_once(grad[:0], logits[:0], targets[:0], mask[:0])


# --- backends: JAX without x64, devices -------------------------------------------------------


def test_jax_without_x64_has_no_64_bit_dtypes():
    """``jax.numpy`` would silently make float64 float32 (int64 int32, uint64 uint32)."""
    pytest.importorskip("jax", reason="jax not installed")
    import subprocess
    import sys

    code = (
        "import jax\n"
        "jax.config.update('jax_enable_x64', False)\n"
        "import pytest\n"
        "from softce_multi.testing import known_backends\n"
        "jax_cpu = next(b for b in known_backends() if b.name == 'jax-cpu')\n"
        "for name in ('float64', 'int64', 'uint64'):\n"
        "    assert not jax_cpu.supports(name), name\n"
        "    try:\n"
        "        array = jax_cpu.asarray([1], name)\n"
        "    except pytest.skip.Exception as skipped:\n"
        "        assert name in str(skipped), skipped\n"
        "    else:\n"
        "        raise AssertionError(f'{name} gave {array.dtype}')\n"
        "assert jax_cpu.supports('float32') and jax_cpu.supports('int32')\n"
        "jax.config.update('jax_enable_x64', True)\n"
        "assert jax_cpu.supports('float64')\n"
        "assert str(jax_cpu.asarray([1.0], 'float64').dtype) == 'float64'\n"
        "print('ok')\n"
    )
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_device_of_sees_the_devices_of_array_api_strict():
    strict = pytest.importorskip("array_api_strict", reason="array-api-strict not installed")
    on_cpu = strict.asarray([1.0])
    elsewhere = strict.asarray([1.0], device=strict.Device("device1"))
    assert testing.device_of(on_cpu) == "cpu"
    assert testing.device_of(elsewhere) not in {"cpu", "gpu"}
    with pytest.raises(AssertionError, match="devices differ"):
        assert_loss_close(elsewhere, on_cpu)
    assert_loss_close(elsewhere, strict.asarray([1.0], device=strict.Device("device1")))


def test_device_of_a_torch_meta_tensor_is_meta():
    torch = pytest.importorskip("torch", reason="torch not installed")
    assert testing.device_of(torch.zeros(1, device="meta")) == "meta"
    assert testing.device_of(torch.zeros(1)) == "cpu"


def test_dtype_name_of_a_big_endian_array_is_its_name():
    assert testing.dtype_name(np.zeros(2, ">f4")) == "float32"
    assert testing.dtype_name(np.zeros(2, ">i8")) == "int64"
    assert_loss_close(np.zeros((), ">f4"), np.zeros((), "<f4"))


# --- random inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0), (3, 0, 4), (5,)])
def test_random_inputs_of_empty_shapes(shape):
    inputs = testing.random_inputs(0, shape)
    assert inputs.logits.shape == shape
    assert inputs.target_probs.shape == shape
    assert inputs.position_mask.shape == shape[:-1]


def test_random_inputs_refuse_a_shape_without_a_vocabulary_axis():
    with pytest.raises(ValueError, match="shape"):
        testing.random_inputs(0, ())


@pytest.mark.parametrize(
    ("option", "allowed"),
    [("valid", "'random', 'all', 'none'"), ("mask_kind", "'bool', 'int', 'float'")],
)
def test_random_inputs_refuse_unknown_mask_options(option, allowed):
    with pytest.raises(ValueError, match=f"{option}.*{allowed}.*'bogus'"):
        testing.random_inputs(0, (2, 3), **{option: "bogus"})
    with pytest.raises(ValueError, match="'bogus'"):
        testing.make_case(known_backends()[0], 0, (2, 3), **{option: "bogus"})


# --- clear errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_assertion_of_an_integer_result_says_it_is_no_floating_result(assertion):
    with pytest.raises(AssertionError, match="int64"):
        assertion(np.array([1]), np.array([1]))


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_assertion_refuses_an_unknown_compute_dtype(assertion):
    with pytest.raises(ValueError, match=r"compute_dtype must be one of .*float32.*, got 'float'"):
        assertion(np.array([1.0]), np.array([1.0]), "float")


@pytest.mark.parametrize("assertion", ASSERTIONS)
def test_assertion_of_a_python_number_says_it_is_no_array(assertion):
    with pytest.raises(AssertionError, match="actual is a float, not an array"):
        assertion(1.0, np.array(1.0))
    with pytest.raises(TypeError, match="desired"):
        assertion(np.array(1.0), 1.0)


def test_a_second_group_of_one_is_a_value_error():
    pytest.importorskip("torch", reason="torch not installed")
    with (
        testing.group_of_one(),
        pytest.raises(ValueError, match="process group"),
        testing.group_of_one(),
    ):
        pass


def test_float_masks_reach_jax_without_x64_as_float32():
    """Without ``jax_enable_x64`` JAX has no float64, but a float mask's weights are exact in
    float32: the case is made, not skipped."""
    jax = pytest.importorskip("jax", reason="jax not installed")
    backend = next(b for b in testing.known_backends() if b.library == "jax")
    enabled = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        case = testing.make_case(backend, 3, (2, 3, 5), mask_kind="float")
        inputs = testing.random_inputs(3, (2, 3, 5), mask_kind="float").on(backend)
    finally:
        jax.config.update("jax_enable_x64", enabled)
    for mask in (case.position_mask, inputs.position_mask):
        assert testing.dtype_name(mask) == "float32"
    np.testing.assert_array_equal(testing.to_float64(case.position_mask), case.w)
