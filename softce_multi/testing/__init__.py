"""Helpers to test code that uses :mod:`softce_multi`, on every array library.

The module is public in the way ``scipy._lib._array_api`` and ``array_api_extra.testing`` are:
it holds, written once, what a test of the loss needs.

- :class:`Backend`, :func:`backends` and :func:`known_backends`: the array libraries and devices
  the loss runs on, and which of them this machine has (with the reason a missing one is
  missing);
- :func:`to_numpy` and :func:`to_float64`: copies of any backend's array in NumPy (bfloat16
  becomes float32, exactly);
- :func:`random_inputs` and :func:`make_case`: random logits, targets and masks, in NumPy or on
  a backend (with the exact float64 values they hold, for the oracle); :data:`REDUCTIONS`, every
  reduction the loss takes;
- :func:`reference`: the float64 oracle (loss and both gradients, every reduction, ``num_valid``,
  a per-position cotangent for ``"none"``), from :mod:`softce_multi.reference` and torch autograd
  when torch is installed, else from :func:`numpy_reference`; :func:`dense_targets`, the dense
  targets that sparse ones stand for;
- :data:`LOSS_RTOL` and :data:`GRAD_RTOL`: the tolerances, by dtype;
- :func:`assert_loss_close` and :func:`assert_gradient_close`: comparisons that check the
  namespace, dtype, shape and device before the values;
- :func:`group_of_one`: a ``torch.distributed`` group of this one process, on loopback, for
  the vocabulary-parallel losses and anything else that needs a process group;
- :func:`ulp_error`, :func:`formula_gradient`, :func:`rounding_errors` and
  :func:`assert_gradient_rounded_once`: the accuracy of a 16-bit gradient in units in the last
  place, against that of the plain formula;
- :func:`triton_interpreter_rounds_to_nearest`: Triton's interpreter rounding to bfloat16 as a
  GPU does, for 16-bit checks of the Triton kernels without a GPU.

It imports with NumPy alone; every other library is imported when it is used. The rest of the
package does not import it.
"""

from softce_multi._types import REDUCTIONS
from softce_multi.testing._assertions import (
    GRAD_RTOL,
    LOSS_RTOL,
    ULP_MARGIN,
    assert_gradient_close,
    assert_gradient_rounded_once,
    assert_loss_close,
    formula_gradient,
    gradient_tolerance,
    rounding_errors,
    ulp_error,
)
from softce_multi.testing._backends import (
    Backend,
    Unavailable,
    availability,
    backends,
    device_of,
    dtype_name,
    group_of_one,
    is_installed,
    known_backends,
    library_of,
    to_float64,
    to_numpy,
)
from softce_multi.testing._inputs import (
    Case,
    RandomInputs,
    compute_dtype,
    make_case,
    random_inputs,
    random_logits,
    random_mask,
    random_targets,
)
from softce_multi.testing._interpreters import triton_interpreter_rounds_to_nearest
from softce_multi.testing._oracle import Expected, dense_targets, numpy_reference, reference

__all__ = [
    "GRAD_RTOL",
    "LOSS_RTOL",
    "REDUCTIONS",
    "ULP_MARGIN",
    "Backend",
    "Case",
    "Expected",
    "RandomInputs",
    "Unavailable",
    "assert_gradient_close",
    "assert_gradient_rounded_once",
    "assert_loss_close",
    "availability",
    "backends",
    "compute_dtype",
    "dense_targets",
    "device_of",
    "dtype_name",
    "formula_gradient",
    "gradient_tolerance",
    "group_of_one",
    "is_installed",
    "known_backends",
    "library_of",
    "make_case",
    "numpy_reference",
    "random_inputs",
    "random_logits",
    "random_mask",
    "random_targets",
    "reference",
    "rounding_errors",
    "to_float64",
    "to_numpy",
    "triton_interpreter_rounds_to_nearest",
    "ulp_error",
]
