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
    assert_loss_close(np.array(1.0 + 1e-6), desired, "float32")
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
