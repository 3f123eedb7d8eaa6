"""Tolerances and the assertions that hold a result to them, 16-bit gradients in ulp included."""

from __future__ import annotations

from typing import Any

import numpy as np

from softce_multi._types import Array
from softce_multi.testing._backends import device_of, dtype_name, library_of, to_float64, to_numpy
from softce_multi.testing._oracle import reference, row_scale

__all__ = [
    "GRAD_RTOL",
    "LOSS_RTOL",
    "ULP_MARGIN",
    "assert_gradient_close",
    "assert_gradient_rounded_once",
    "assert_loss_close",
    "formula_gradient",
    "gradient_tolerance",
    "rounding_errors",
    "ulp_error",
]

#: Relative tolerance of the loss, by the dtype it is computed in.
LOSS_RTOL: dict[str, float] = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}

#: Gradient tolerance relative to the largest entry of the reference gradient, by dtype: the
#: larger of the computation dtype's and the returned gradient dtype's applies.
GRAD_RTOL: dict[str, float] = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}

#: How much further from the float64 gradient a 16-bit gradient may be than the plain float32
#: formula's, in units in the last place of its dtype (:func:`assert_gradient_rounded_once`).
ULP_MARGIN = 0.05

#: The explicit mantissa bits and the smallest normal exponent of each floating dtype.
_FLOAT_FORMATS: dict[str, tuple[int, int]] = {
    "bfloat16": (7, -126),
    "float16": (10, -14),
    "float32": (23, -126),
    "float64": (52, -1022),
}


def _describe(array: Array) -> str:
    return (
        f"{library_of(array)} array of dtype {dtype_name(array)}, shape "
        f"{tuple(array.shape)}, on {device_of(array)}"
    )


def _check_compute_dtype(table: dict[str, float], compute_dtype: str | None) -> None:
    if compute_dtype is not None and compute_dtype not in table:
        msg = f"compute_dtype must be one of {sorted(table)}, got {compute_dtype!r}"
        raise ValueError(msg)


def _tolerance(table: dict[str, float], compute_dtype: str | None, actual: Array) -> float:
    """The tolerance of ``table`` for ``compute_dtype``, or for the dtype of ``actual``."""
    if compute_dtype is not None:
        return table[compute_dtype]
    if dtype_name(actual) not in table:
        msg = (
            f"no tolerance for a result of dtype {dtype_name(actual)}: the loss and its "
            f"gradients are floating ({', '.join(table)})\nactual: {_describe(actual)}"
        )
        raise AssertionError(msg)
    return table[dtype_name(actual)]


def _check_properties(
    actual: Array,
    desired: Array,
    compute_dtype: str | None,
    *,
    library: str | None,
    dtype: str | None,
    device: str | None,
) -> None:
    """Namespace, dtype, shape and device of ``actual``, before any value is compared.

    Each expectation comes from the keyword when given, else from ``desired`` unless ``desired``
    is the float64 oracle (a float64 NumPy array, with ``compute_dtype`` given or for another
    library's result): then only the keywords given are checked.
    """
    if not _is_array(desired):
        kind = type(desired).__name__
        msg = f"desired must be an array, the oracle's or a backend's; got a {kind}"
        raise TypeError(msg)
    if not _is_array(actual):
        msg = f"actual is a {type(actual).__name__}, not an array\ndesired: {_describe(desired)}"
        raise AssertionError(msg)
    desired_is_oracle = (
        library_of(desired) == "numpy"
        and dtype_name(desired) == "float64"
        and (library_of(actual) != "numpy" or compute_dtype is not None)
    )
    expected_library = library or (None if desired_is_oracle else library_of(desired))
    expected_dtype = dtype or (None if desired_is_oracle else dtype_name(desired))
    expected_device = device or (None if desired_is_oracle else device_of(desired))
    both = f"\nactual:  {_describe(actual)}\ndesired: {_describe(desired)}"
    if expected_library is not None and library_of(actual) != expected_library:
        msg = f"namespaces differ: expected {expected_library}, got {library_of(actual)}{both}"
        raise AssertionError(msg)
    if expected_dtype is not None and dtype_name(actual) != expected_dtype:
        msg = f"dtypes differ: expected {expected_dtype}, got {dtype_name(actual)}{both}"
        raise AssertionError(msg)
    _check_shape(actual, desired)
    if expected_device is not None and device_of(actual) != expected_device:
        msg = f"devices differ: expected {expected_device}, got {device_of(actual)}{both}"
        raise AssertionError(msg)


def _is_array(value: Any) -> bool:
    return hasattr(value, "dtype") and hasattr(value, "shape")


def _check_shape(actual: Array, desired: Array) -> None:
    if tuple(actual.shape) != tuple(desired.shape):
        msg = (
            f"shapes differ: expected {tuple(desired.shape)}, got {tuple(actual.shape)}"
            f"\nactual:  {_describe(actual)}\ndesired: {_describe(desired)}"
        )
        raise AssertionError(msg)


def assert_loss_close(
    actual: Array,
    desired: Array,
    compute_dtype: str | None = None,
    /,
    *,
    library: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    atol: float | np.ndarray = 0.0,
) -> None:
    """Assert a loss equals the desired one within the relative tolerance of its dtype.

    Parameters
    ----------
    actual
        The loss: a 0-d array, or per position for ``"none"``, of any backend.
    desired
        The expected loss: an array of the same backend, or the float64 NumPy oracle
        (:func:`reference`).
    compute_dtype
        Name of the dtype the loss was computed in; picks the tolerance in :data:`LOSS_RTOL`,
        and is the dtype ``actual`` must have (a loss has the dtype it is computed in) unless
        ``dtype`` says otherwise. Default: the dtype of ``actual``. Given with a float64 NumPy
        ``desired``, it marks ``desired`` as the oracle, whose dtype is not the one ``actual``
        must have.
    library, dtype, device
        Expected library (``"torch"``...), dtype name and device (``"cpu"``, ``"gpu"``; see
        :func:`device_of`) of ``actual``. Default: those of ``desired`` (the dtype:
        ``compute_dtype`` when given), unless ``desired`` is the oracle: then the library and
        device are checked only when given.
    atol
        An absolute floor, added to the relative tolerance (a number, or per position for
        ``"none"``): for losses whose rounding is set by terms larger than the loss, such as a
        confident row's, a small difference of terms of the size of its target mass.

    Raises
    ------
    AssertionError
        If ``actual`` is not an array or has no floating dtype of :data:`LOSS_RTOL`, if the
        namespace, dtype, shape or device differ (checked in that order, before the values),
        or if a value is further than ``atol`` plus ``LOSS_RTOL[compute_dtype]`` relatively. A
        non-finite desired value (``inf``, ``-inf``, NaN) is matched only by itself.
    TypeError
        If ``desired`` is not an array.
    ValueError
        If ``compute_dtype`` is not a dtype of :data:`LOSS_RTOL`.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.testing import assert_loss_close
    >>> assert_loss_close(np.float32(1.0), np.array(1.0, dtype=np.float32))
    >>> assert_loss_close(np.float32(1.0), np.array(1.0))
    Traceback (most recent call last):
    ...
    AssertionError: dtypes differ: expected float64, got float32...
    """
    _check_compute_dtype(LOSS_RTOL, compute_dtype)
    # A loss has the dtype it is computed in.
    expected_dtype = dtype or compute_dtype
    _check_properties(
        actual, desired, compute_dtype, library=library, dtype=expected_dtype, device=device
    )
    rtol = _tolerance(LOSS_RTOL, compute_dtype, actual)
    actual_values, desired_values = to_float64(actual), to_float64(desired)
    # np.isclose, unlike np.testing.assert_allclose, takes a per-position atol.
    close = np.isclose(actual_values, desired_values, rtol=rtol, atol=atol, equal_nan=True)
    if not np.all(close):
        far = np.atleast_1d(~close)
        allowed = np.broadcast_to(atol + rtol * np.abs(desired_values), far.shape)
        shown = [np.atleast_1d(values)[far][:5] for values in (actual_values, desired_values)]
        msg = (
            f"loss beyond rtol {rtol} and atol at {np.count_nonzero(far)} of {far.size} "
            f"positions: actual {shown[0]}, desired {shown[1]}, allowed difference "
            f"{allowed[far][:5]}\nactual: {_describe(actual)}; desired: {_describe(desired)}"
        )
        raise AssertionError(msg)


def ulp_error(
    actual: Array,
    desired: Array,
    dtype: str | None = None,
    *,
    resolution: float | np.ndarray = 0.0,
) -> float:
    """The largest distance of ``actual`` from ``desired``, in units in the last place.

    Each entry's distance is divided by the spacing of ``dtype`` at the desired value (the
    spacing of its binade; below the smallest normal number, that of the subnormals), or at
    ``resolution`` where that is larger. A value rounded once, correctly, from an exact one is
    at most 0.5 from it.

    Parameters
    ----------
    actual
        An array of any backend, for example a bfloat16 gradient.
    desired
        The exact values, or nearly (the float64 oracle of :func:`reference`), same shape.
    dtype
        ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``"float64"``; by default the dtype of
        ``actual``.
    resolution
        The smallest magnitude, per entry or for all, that the computation of ``actual`` can
        resolve: an entry whose desired value is smaller is measured in the spacing at
        ``resolution`` instead (see :func:`assert_gradient_rounded_once`).

    Returns
    -------
    float
        The largest distance, in units of ``dtype``; ``inf`` where ``actual`` is not finite
        and ``desired`` is; entries where ``desired`` is not finite are not counted. 0 for an
        empty array.

    Raises
    ------
    AssertionError
        If the shapes of ``actual`` and ``desired`` differ.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.testing import ulp_error
    >>> ulp_error(np.float32(1 + 2**-23), np.array(1.0))
    1.0
    >>> ulp_error(np.array([1.0, 2.0]), np.array([1.0 + 2**-9, 2.0]), "bfloat16")
    0.25
    """
    _check_shape(actual, desired)
    mantissa_bits, min_exponent = _FLOAT_FORMATS[dtype or dtype_name(actual)]
    actual_values, desired_values = to_float64(actual), to_float64(desired)
    counted = np.isfinite(desired_values)
    # frexp: |x| = m * 2**e with m in [0.5, 1), so the binade of x starts at 2**(e - 1).
    magnitude = np.maximum(np.abs(np.where(counted, desired_values, 0.0)), resolution)
    _, exponent = np.frexp(magnitude)
    binade = np.maximum(exponent - 1, min_exponent)
    spacing = np.ldexp(1.0, binade - mantissa_bits)
    with np.errstate(invalid="ignore"):
        distance = np.abs(actual_values - desired_values) / spacing
    distance = np.where(np.isnan(distance), np.inf, distance)
    return float(np.max(distance[counted], initial=0.0))


def formula_gradient(
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    /,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> np.ndarray:
    """The logits gradient of the plain formula, as EAGLE-3 trainers compute it in 16 bits.

    :func:`softce_multi.reference.masked_soft_cross_entropy` (``log_softmax`` of the logits
    upcast to float32) differentiated by torch autograd, for logits of the dtype of
    ``logits``: the gradient is computed in float32 and rounded once to that dtype. Needs torch.

    Parameters
    ----------
    logits, target_probs, position_mask, reduction, num_valid, upstream
        As in :func:`reference`; ``logits`` of any backend, its values and dtype kept.

    Returns
    -------
    numpy.ndarray
        The gradient's values in float64 (bfloat16 and float16 values are exact there).
    """
    import torch

    from softce_multi.reference import masked_soft_cross_entropy

    dtype = getattr(torch, dtype_name(logits))
    z = torch.tensor(to_numpy(logits)).to(dtype).requires_grad_(True)
    p = torch.tensor(to_numpy(target_probs))
    loss = masked_soft_cross_entropy(
        z, p, torch.tensor(to_numpy(position_mask)), reduction=reduction, num_valid=num_valid
    )
    loss.backward(torch.as_tensor(np.asarray(upstream), dtype=loss.dtype).expand_as(loss))
    assert z.grad is not None
    return to_float64(z.grad)


def rounding_errors(
    actual: Array,
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    /,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> tuple[float, float]:
    """The :func:`ulp_error` of a logits gradient and that of the plain formula's, in the
    logits' dtype, as :func:`assert_gradient_rounded_once` measures them. Needs torch.

    Returns
    -------
    tuple of float
        The largest error of ``actual``, then of :func:`formula_gradient`, against the float64
        gradient, each entry in the spacing at ``max(|exact|, 2**(m - 16) * terms)``.
    """
    dtype = dtype_name(logits)
    options: dict[str, Any] = {"reduction": reduction, "num_valid": num_valid, "upstream": upstream}
    exact = reference(logits, target_probs, position_mask, **options).grad_logits
    formula = formula_gradient(logits, target_probs, position_mask, **options)
    z, p = to_float64(logits), to_float64(target_probs)
    softmax = np.exp(z - z.max(axis=-1, keepdims=True))
    softmax /= softmax.sum(axis=-1, keepdims=True)
    scale = row_scale(to_float64(position_mask), z.shape[:-1], **options)
    terms = np.abs(scale) * (np.abs(p.sum(axis=-1, keepdims=True)) * softmax + np.abs(p))
    resolution = np.ldexp(terms, _FLOAT_FORMATS[dtype][0] - 16)
    return (
        ulp_error(actual, exact, dtype, resolution=resolution),
        ulp_error(formula, exact, dtype, resolution=resolution),
    )


def assert_gradient_rounded_once(
    actual: Array,
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    /,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> None:
    """Assert a 16-bit logits gradient is as accurate as the plain float32 formula's.

    Its :func:`ulp_error` against the float64 gradient (:func:`reference`) may exceed that of
    :func:`formula_gradient`, computed in float32 and rounded once, by at most
    :data:`ULP_MARGIN`. A gradient rounded twice (made in 16 bits for a unit upstream gradient,
    then multiplied by the upstream gradient in 16 bits) is about 0.5 further. Needs torch.

    Each entry ``r * (sum(p) * softmax(z)_v - p_v)`` is a difference of two terms, which
    float32 computes to within a few of its roundings of their size (``2**-21`` of it, say).
    Where they nearly cancel, no float32 computation resolves the entry to a 16-bit spacing,
    and which of two float32 computations lands nearer is chance. So an entry is measured in
    the spacing at ``max(|exact|, 2**(m - 16) * terms)``, ``m`` the dtype's mantissa bits and
    ``terms = |r| * (sum(p) * softmax(z)_v + |p_v|)``: there float32's own error is at most
    ``2**-21 / 2**-16 = 1/32`` of a spacing.

    Parameters
    ----------
    actual
        The logits gradient to judge, of any backend, in the dtype of ``logits``.
    logits, target_probs, position_mask, reduction, num_valid, upstream
        What ``actual`` is the gradient of, as in :func:`reference`.

    Raises
    ------
    AssertionError
        If the dtypes or the shapes of ``actual`` and ``logits`` differ, or ``actual`` is
        further from the float64 gradient than allowed; the message gives both errors.
    """
    dtype = dtype_name(logits)
    if dtype_name(actual) != dtype:
        msg = f"dtypes differ: the gradient is {dtype_name(actual)}, the logits {dtype}"
        raise AssertionError(msg)
    _check_shape(actual, logits)
    error, formula_error = rounding_errors(
        actual,
        logits,
        target_probs,
        position_mask,
        reduction=reduction,
        num_valid=num_valid,
        upstream=upstream,
    )
    if error > formula_error + ULP_MARGIN:
        msg = (
            f"{dtype} gradient {error:.3f} ulp from the float64 gradient, where the plain "
            f"float32 formula rounded once is {formula_error:.3f} ulp from it (allowed: "
            f"{formula_error + ULP_MARGIN:.3f}); upstream {upstream}, reduction {reduction!r}"
        )
        raise AssertionError(msg)


def gradient_tolerance(compute_dtype: str, gradient_dtype: str) -> float:
    """Gradient tolerance relative to the largest entry: the coarser of the two dtypes'.

    Raises
    ------
    ValueError
        If either dtype is not one of :data:`GRAD_RTOL`.
    """
    for argument, name in (("compute_dtype", compute_dtype), ("gradient_dtype", gradient_dtype)):
        if name not in GRAD_RTOL:
            msg = f"{argument} must be one of {sorted(GRAD_RTOL)}, got {name!r}"
            raise ValueError(msg)
    return max(GRAD_RTOL[compute_dtype], GRAD_RTOL[gradient_dtype])


def assert_gradient_close(
    actual: Array,
    desired: Array,
    compute_dtype: str | None = None,
    /,
    *,
    library: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    atol: float = 0.0,
) -> None:
    """Assert a gradient equals the desired one within a tolerance of its largest entry.

    Every entry must be within ``gradient_tolerance(compute_dtype, dtype of actual)`` times
    the largest finite ``abs(desired)`` of the desired entry, or within ``atol`` if that is
    larger: the gradient of a loss is judged on the scale of its largest component, since small
    entries carry the rounding of large ones. Where ``desired`` is not finite (``inf``,
    ``-inf``, NaN), ``actual`` must hold the same value.

    Parameters
    ----------
    actual, desired, compute_dtype, library, dtype, device
        As in :func:`assert_loss_close`. A gradient has the dtype of what it is the gradient
        of (a bfloat16 gradient of a loss computed in float32): against the oracle, pass that
        as ``dtype``.
    atol
        An absolute floor for gradients whose largest entry is below the rounding of the terms
        they are computed from (a gradient that cancels, such as every gradient of ``V = 1``),
        or below what their dtype resolves (float16 subnormals).

    Raises
    ------
    AssertionError
        If ``actual`` is not an array or has no floating dtype of :data:`GRAD_RTOL`, if the
        namespace, dtype, shape or device differ (before the values), if a non-finite desired
        entry is not matched exactly, or if a value is outside the tolerance.
    TypeError
        If ``desired`` is not an array.
    ValueError
        If ``compute_dtype`` is not a dtype of :data:`GRAD_RTOL`.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.testing import assert_gradient_close
    >>> assert_gradient_close(np.array([1.0, 1e-13]), np.array([1.0, 0.0]))
    >>> assert_gradient_close(np.array([1.0, 0.0]), np.array([1.0]))
    Traceback (most recent call last):
    ...
    AssertionError: shapes differ: expected (1,), got (2,)...
    """
    _check_compute_dtype(GRAD_RTOL, compute_dtype)
    _check_properties(actual, desired, compute_dtype, library=library, dtype=dtype, device=device)
    rtol = max(_tolerance(GRAD_RTOL, compute_dtype, actual), _tolerance(GRAD_RTOL, None, actual))
    actual_values, desired_values = to_float64(actual), to_float64(desired)
    described = f"actual: {_describe(actual)}; desired: {_describe(desired)}"
    finite = np.isfinite(desired_values)
    both_nan = np.isnan(actual_values) & np.isnan(desired_values)
    differ = ~finite & ~((actual_values == desired_values) | both_nan)
    if np.any(differ):
        msg = (
            f"gradient differs where desired is not finite, at {np.count_nonzero(differ)} of "
            f"{np.count_nonzero(~finite)} such entries: actual {actual_values[differ][:5]}, "
            f"desired {desired_values[differ][:5]}\n{described}"
        )
        raise AssertionError(msg)
    largest = float(np.max(np.abs(desired_values[finite]), initial=0.0))
    np.testing.assert_allclose(
        np.where(finite, actual_values, 0.0),
        np.where(finite, desired_values, 0.0),
        rtol=0.0,
        atol=max(rtol * largest, atol),
        err_msg=f"gradient; {described}",
    )
