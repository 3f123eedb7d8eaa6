"""``python -m softce_multi check``: the loss and its gradient on every installed backend.

Each backend gets the same random inputs of EAGLE-3 size, rounded to the dtype under test. Its
loss and logits gradient are compared with the oracle run in float64 on exactly those rounded
values: the PyTorch reference :func:`softce_multi.reference.masked_soft_cross_entropy` (its
gradient from autograd), or, where PyTorch is not installed, the same formula in NumPy.

The autodiff backends (PyTorch, JAX) differentiate the loss times an upstream gradient other
than 1 (``--upstream``, by default a test-time step weight of EAGLE-3 trainers), as a training
step does. A 16-bit gradient is then also measured in units in the last place of its dtype
against the float64 one, beside the plain float32 formula's gradient rounded once
(:func:`softce_multi.testing.rounding_errors`), and fails if it is more than
:data:`softce_multi.testing.ULP_MARGIN` further.

The backends are those of :func:`softce_multi.testing.backends`, the enumeration the test suite
and ``bench`` use. The table names each by its library (``numpy``, ``array_api_strict``,
``torch``, ``jax``, ``cupy``) and its device; ``--backend`` takes a backend's name
(``torch-cpu``) or a library's.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import softce_multi as sc
from softce_multi import testing
from softce_multi._cli._common import finite_float, installed, positive_int, random_seed
from softce_multi.testing import LOSS_RTOL, ULP_MARGIN, gradient_tolerance

DEFAULT_SHAPE = (2, 512, 32000)
DEFAULT_DTYPES = ("float32", "bfloat16")
DTYPES = ("float16", "bfloat16", "float32", "float64")
BACKENDS = tuple(backend.name for backend in testing.known_backends())
LIBRARIES = tuple(dict.fromkeys(backend.library for backend in testing.known_backends()))
#: The weight of the second test-time step of a three-step EAGLE-3 loss (0.8**i over the sum of
#: the three), an upstream gradient that training steps pass to the loss.
DEFAULT_UPSTREAM = 0.8 / 2.44


def loss_tolerance(dtype: str) -> float:
    """Largest relative loss error that passes: half-precision inputs are computed in float32."""
    return LOSS_RTOL["float32" if dtype in ("bfloat16", "float16") else dtype]


def grad_tolerance(dtype: str) -> float:
    """Largest gradient error, relative to the largest reference entry, that passes."""
    return gradient_tolerance("float32" if dtype in ("bfloat16", "float16") else dtype, dtype)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The random inputs of one check, before rounding to a backend's dtype."""

    logits: np.ndarray
    target_probs: np.ndarray
    position_mask: np.ndarray


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one backend computed, with the rounded inputs it computed it from (in float64)."""

    loss: float
    grad: Any
    """The logits gradient as the backend returned it (its dtype kept)."""
    logits: Any
    """The rounded logits as the backend held them (its dtype kept)."""
    target_probs: np.ndarray
    seconds: float
    upstream: float
    """The upstream gradient the loss was differentiated with."""


@dataclasses.dataclass(frozen=True)
class Oracle:
    """The float64 reference: ``compute(logits, target_probs, mask, upstream) -> (loss, grad)``,
    the gradient that of ``upstream * loss``."""

    description: str
    compute: Callable[[np.ndarray, np.ndarray, np.ndarray, float], tuple[float, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a backend and dtype, its errors and its verdict."""

    backend: str  # the backend's library, as the array-API namespace names it
    device: str
    dtype: str
    loss: float
    loss_error: float
    grad_error: float
    seconds: float
    passed: bool
    error: str | None = None
    upstream: float = 1.0
    ulps: tuple[float, float] | None = None
    """For a 16-bit gradient: its error and the plain formula's, in ulps of its dtype."""


def make_inputs(shape: Sequence[int], seed: int) -> Inputs:
    """Return random logits, soft targets and a position mask of ``shape``, in float32.

    The targets are a softmax of random logits (so each row is a peaked distribution, as a
    target model's would be); about a quarter of the positions are padding.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    logits = 2.0 * rng.standard_normal(shape, dtype=np.float32)
    target_logits = 3.0 * rng.standard_normal(shape, dtype=np.float32)
    target_logits -= target_logits.max(axis=-1, keepdims=True)
    target = np.exp(target_logits, out=target_logits)
    target /= target.sum(axis=-1, keepdims=True)
    mask = rng.random((*shape[:-1], 1)) < 0.75
    return Inputs(logits, target, mask)


def relative_error(value: float, reference: float) -> float:
    """Return ``|value - reference| / |reference|``, or ``|value|`` when the reference is 0."""
    if reference == 0:
        return abs(value)
    return abs(value - reference) / abs(reference)


def gradient_error(grad: np.ndarray, reference: np.ndarray) -> float:
    """Return ``max |grad - reference| / max |reference|`` (``max |grad|`` if the latter is 0)."""
    if grad.shape != reference.shape:
        return math.inf
    scale = float(np.max(np.abs(reference), initial=0.0))
    error = float(np.max(np.abs(grad - reference), initial=0.0))
    return error / scale if scale > 0 else error


def numpy_reference(
    logits: np.ndarray, target_probs: np.ndarray, position_mask: np.ndarray, upstream: float = 1.0
) -> tuple[float, np.ndarray]:
    """Return the ``"mean"`` loss and the logits gradient of ``upstream`` times it, by the
    NumPy float64 formula.

    Parameters
    ----------
    logits, target_probs, position_mask : numpy.ndarray
        The arguments of the loss.
    upstream : float, optional
        The factor of the loss whose gradient is returned.

    Returns
    -------
    tuple of float and numpy.ndarray
        The loss and the float64 logits gradient.
    """
    expected = testing.numpy_reference(logits, target_probs, position_mask, upstream=upstream)
    return float(expected.loss), expected.grad_logits


def torch_reference(
    logits: np.ndarray, target_probs: np.ndarray, position_mask: np.ndarray, upstream: float = 1.0
) -> tuple[float, np.ndarray]:
    """:func:`numpy_reference` by :mod:`softce_multi.reference` in float64 and autograd."""
    expected = testing.reference(logits, target_probs, position_mask, upstream=upstream)
    return float(expected.loss), expected.grad_logits


def select_oracle(name: str) -> Oracle:
    """Return the oracle called ``name``: ``"torch"``, ``"numpy"``, or ``"auto"`` (torch if any)."""
    torch_installed = installed("torch")
    if name == "torch" or (name == "auto" and torch_installed):
        return Oracle("softce_multi.reference (PyTorch), float64 on the CPU", torch_reference)
    description = "NumPy float64 implementation of the formula"
    if not torch_installed:
        description += " (PyTorch is not installed, so the PyTorch reference cannot run)"
    return Oracle(description, numpy_reference)


class _CachedOracle:
    """Run the oracle once per distinct set of rounded inputs (keyed by a digest of them)."""

    def __init__(self, oracle: Oracle) -> None:
        self._oracle = oracle
        self._results: dict[bytes, tuple[float, np.ndarray]] = {}

    def __call__(
        self,
        logits: np.ndarray,
        target_probs: np.ndarray,
        position_mask: np.ndarray,
        upstream: float,
    ) -> tuple[float, np.ndarray]:
        digest = hashlib.blake2b(digest_size=32)
        digest.update(repr(upstream).encode())
        for array in (logits, target_probs, position_mask):
            digest.update(str((array.dtype, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).data)
        key = digest.digest()
        if key not in self._results:
            self._results[key] = self._oracle.compute(logits, target_probs, position_mask, upstream)
        return self._results[key]


def _timed(fn: Callable[[], Any], synchronize: Callable[[Any], Any]) -> tuple[Any, float]:
    """Call ``fn`` twice; return the second result and its wall time.

    The first call warms up what a training loop pays for once: JIT compilation, allocator
    caches, thread pools.
    """
    synchronize(fn())
    start = time.perf_counter()
    result = synchronize(fn())
    return result, time.perf_counter() - start


def _synchronizer(backend: testing.Backend) -> Callable[[Any], Any]:
    """``synchronize(result) -> result``, once the backend's device has finished its work."""
    if backend.library == "jax":
        import jax

        return jax.block_until_ready
    if backend.library == "torch" and backend.device == "gpu":
        import torch

        def synchronize_torch(result: Any) -> Any:
            torch.cuda.synchronize()
            return result

        return synchronize_torch
    if backend.library == "cupy":
        import cupy

        def synchronize_cupy(result: Any) -> Any:
            cupy.cuda.get_current_stream().synchronize()
            return result

        return synchronize_cupy
    return lambda result: result


def _loss_and_grad(
    backend: testing.Backend, upstream: float
) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """The ``"mean"`` loss and the logits gradient of ``upstream`` times it as a user of the
    backend computes them: torch autograd, ``jax.jit`` of ``jax.value_and_grad``; elsewhere
    :func:`softce_multi.masked_soft_cross_entropy_with_grad`, whose gradient is that of the
    loss itself (``upstream`` must be 1)."""
    if backend.library == "torch":

        def torch_autograd(logits: Any, target: Any, mask: Any) -> tuple[Any, Any]:
            leaf = logits.detach().requires_grad_(True)
            loss = sc.masked_soft_cross_entropy(
                logits=leaf, target_probs=target, position_mask=mask
            )
            (loss * upstream).backward()
            return loss.detach(), leaf.grad

        return torch_autograd
    if backend.library == "jax":
        import jax

        def scaled(logits: Any, target: Any, mask: Any) -> tuple[Any, Any]:
            loss = sc.masked_soft_cross_entropy(
                logits=logits, target_probs=target, position_mask=mask
            )
            return upstream * loss, loss

        jitted = jax.jit(jax.value_and_grad(scaled, has_aux=True))

        def jax_autodiff(logits: Any, target: Any, mask: Any) -> tuple[Any, Any]:
            (_, loss), grad = jitted(logits, target, mask)
            return loss, grad

        return jax_autodiff
    assert upstream == 1.0
    return lambda logits, target, mask: sc.masked_soft_cross_entropy_with_grad(logits, target, mask)


def run_backend(backend: testing.Backend, inputs: Inputs, dtype: str, upstream: float) -> Outcome:
    """Run the loss and its gradient on ``backend`` in ``dtype``; time the second of two calls.

    ``upstream`` multiplies the loss on the autodiff backends; the others take 1.
    """
    upstream = upstream if backend.is_autodiff else 1.0
    logits = backend.asarray(inputs.logits, dtype)
    target = backend.asarray(inputs.target_probs, dtype)
    mask = backend.asarray(inputs.position_mask)
    loss_and_grad = _loss_and_grad(backend, upstream)
    (loss, grad), seconds = _timed(
        lambda: loss_and_grad(logits, target, mask), _synchronizer(backend)
    )
    return Outcome(float(loss), grad, logits, testing.to_float64(target), seconds, upstream)


def backend_dtypes(backend: testing.Backend) -> tuple[str, ...]:
    """The dtypes of :data:`DTYPES` that ``backend`` runs here: JAX has float64 only with
    ``jax_enable_x64``."""
    dtypes = tuple(dtype for dtype in DTYPES if backend.supports(dtype))
    if backend.library == "jax":
        import jax

        if not jax.config.read("jax_enable_x64"):
            return tuple(dtype for dtype in dtypes if dtype != "float64")
    return dtypes


def check_backend(
    backend: testing.Backend,
    dtype: str,
    inputs: Inputs,
    oracle: Callable[..., tuple[float, np.ndarray]],
    *,
    upstream: float = DEFAULT_UPSTREAM,
) -> Row:
    """Run ``backend`` in ``dtype`` on ``inputs`` and compare it with the oracle.

    A 16-bit gradient is also measured in ulps against the plain formula's when PyTorch is
    installed (:func:`softce_multi.testing.rounding_errors`).
    """
    try:
        outcome = run_backend(backend, inputs, dtype, upstream)
        logits = testing.to_float64(outcome.logits)
        reference_loss, reference_grad = oracle(
            logits, outcome.target_probs, inputs.position_mask, outcome.upstream
        )
        ulps = None
        if dtype in ("bfloat16", "float16") and installed("torch"):
            arrays = (outcome.grad, outcome.logits, outcome.target_probs, inputs.position_mask)
            ulps = testing.rounding_errors(*arrays, upstream=outcome.upstream)
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        nan = math.nan
        return Row(backend.library, backend.device, dtype, nan, nan, nan, nan, False, message)
    loss_error = relative_error(outcome.loss, reference_loss)
    grad_error = gradient_error(testing.to_float64(outcome.grad), reference_grad)
    # A NaN error compares false, and so fails.
    passed = loss_error <= loss_tolerance(dtype) and grad_error <= grad_tolerance(dtype)
    if ulps is not None:
        passed = passed and ulps[0] <= ulps[1] + ULP_MARGIN
    return Row(
        backend.library,
        backend.device,
        dtype,
        outcome.loss,
        loss_error,
        grad_error,
        outcome.seconds,
        passed,
        upstream=outcome.upstream,
        ulps=ulps,
    )


def format_table(rows: Sequence[Row]) -> str:
    """Return the rows as an aligned text table."""
    header = (
        "backend",
        "device",
        "dtype",
        "upstream",
        "loss",
        "loss rel err",
        "grad err",
        "ulp (formula)",
        "time",
        "status",
    )
    lines = [header]
    for row in rows:
        ulps = "-" if row.ulps is None else f"{row.ulps[0]:.3f} ({row.ulps[1]:.3f})"
        lines.append(
            (
                row.backend,
                row.device,
                row.dtype,
                f"{row.upstream:.4g}",
                f"{row.loss:.6f}",
                f"{row.loss_error:.2e}",
                f"{row.grad_error:.2e}",
                ulps,
                f"{row.seconds * 1e3:.1f} ms",
                "PASS" if row.passed else "FAIL",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``python -m softce_multi check``."""
    parser = argparse.ArgumentParser(
        prog="python -m softce_multi check",
        description=(
            "Run the loss and its logits gradient on every installed backend and compare them "
            "with the float64 reference computed on the same rounded inputs. Exits with status "
            "1 if any backend fails its tolerance."
        ),
    )
    parser.add_argument(
        "--shape",
        type=positive_int,
        nargs="+",
        default=list(DEFAULT_SHAPE),
        metavar="N",
        help="shape of the logits, vocabulary last (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=DTYPES,
        default=list(DEFAULT_DTYPES),
        help="dtypes of the inputs; each backend runs those it supports (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=random_seed, default=0, help="random seed, 0 to 2**64 - 1 (default: 0)"
    )
    parser.add_argument(
        "--upstream",
        type=finite_float,
        default=DEFAULT_UPSTREAM,
        help=(
            "upstream gradient of the loss on PyTorch and JAX, as a training step passes it; "
            "the other backends, which have no autodiff, take 1 "
            "(default: %(default).4g, a test-time step weight 0.8 / 2.44)"
        ),
    )
    parser.add_argument(
        "--backend",
        nargs="+",
        choices=BACKENDS + tuple(name for name in LIBRARIES if name not in BACKENDS),
        help=(
            "check only these backends, by backend (torch-cpu) or by library, which selects "
            "its backends on every device present (torch) (default: every one available here)"
        ),
    )
    parser.add_argument(
        "--oracle",
        choices=("auto", "torch", "numpy"),
        default="auto",
        help="reference implementation; auto uses PyTorch when installed (default: auto)",
    )
    return parser


def _selected(backend: testing.Backend, names: Sequence[str]) -> bool:
    """Whether ``--backend names`` selects ``backend``, by its name or by its library's."""
    return backend.name in names or backend.library in names


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check from command-line arguments; return 0 if every row passes, else 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    backends = list(testing.backends())
    if args.backend is not None:
        reasons = [
            f"{entry.backend.name}: {entry.reason}"
            for entry in testing.availability()
            if entry.backend.name in args.backend and entry.reason is not None
        ]
        if reasons:
            parser.error(f"--backend {'; '.join(reasons)}")
        backends = [backend for backend in backends if _selected(backend, args.backend)]
        if not backends:
            parser.error(f"--backend {' '.join(args.backend)}: none of them is available here")
    if args.oracle == "torch" and not installed("torch"):
        parser.error("--oracle torch needs PyTorch, which is not installed; use --oracle numpy")
    oracle = select_oracle(args.oracle)
    try:
        inputs = make_inputs(args.shape, args.seed)
    except (MemoryError, ValueError) as error:  # NumPy's ValueError: beyond its address space
        parser.error(
            f"--shape {' '.join(map(str, args.shape))}: the inputs do not fit in memory ({error})"
        )
    cached_oracle = _CachedOracle(oracle)

    n_valid = int(np.count_nonzero(inputs.position_mask))
    print(
        f"softce_multi check: logits shape {tuple(args.shape)}, seed {args.seed}, "
        f"{n_valid} of {inputs.position_mask.size} positions valid, reduction 'mean'"
    )
    print(f"oracle: {oracle.description}, on the same rounded inputs")
    print("loss rel err = |loss - ref| / |ref|;  grad err = max |grad - ref| / max |ref|")
    print(
        f"upstream: the gradient is that of upstream * loss ({args.upstream:.4g} on PyTorch and "
        "JAX, 1 elsewhere)"
    )
    print(
        "ulp (formula): a 16-bit gradient's largest error in units in the last place, and in "
        "parentheses that of the plain float32 formula rounded once; at most "
        f"{ULP_MARGIN} more passes"
    )
    print("time = forward + backward, the second of two calls (JAX: jit of value_and_grad)")
    print()

    rows, notes = [], []
    for backend in backends:
        for dtype in args.dtype:
            if dtype not in backend_dtypes(backend):
                notes.append(f"{backend.name}: {dtype} skipped (not supported by this backend)")
                continue
            row = check_backend(backend, dtype, inputs, cached_oracle, upstream=args.upstream)
            rows.append(row)
            if row.error is not None:
                notes.append(f"{backend.name} {dtype}: {row.error}")
    print(format_table(rows))
    print()
    tolerances = ", ".join(
        f"{dtype} loss {loss_tolerance(dtype):.0e} grad {grad_tolerance(dtype):.1e}"
        for dtype in args.dtype
    )
    print(f"tolerances: {tolerances}")
    for note in notes:
        print(f"note: {note}")
    failed = sum(not row.passed for row in rows)
    if not rows:
        print("check: FAIL, no backend ran in the requested dtypes")
        return 1
    if failed:
        print(f"check: FAIL, {failed} of {len(rows)} rows outside tolerance")
        return 1
    print(f"check: PASS, all {len(rows)} rows within tolerance")
    return 0
