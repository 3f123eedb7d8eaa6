"""Parity on the device: every torch path of softce_multi against the float64 reference there.

The paths: the loss and its backward (the Triton forward and backward kernels on CUDA), the
loss with its gradient (the forward kernel that writes the gradient), the in-place operators
against the functional ones (bit for bit), the linear loss against the materialised formula,
and the vocabulary-parallel loss on a process group of one. Each row of the result says the
errors, the tolerances of :mod:`softce_multi.testing` they are held to, and whether the padding
positions' gradients are exactly 0 and every value finite.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from softce_multi._cli.device_check.inputs import (
    CASES,
    REDUCTIONS,
    UPSTREAM,
    Expected,
    Inputs,
    make_inputs,
    reference,
)
from softce_multi._cli.device_check.plan import (
    LOW_PRECISION,
    Plan,
    free_device_memory,
    kernels_as_on_a_gpu,
)

LINEAR_MARGIN = 0.02
"""How much larger than the materialised formula's a linear loss gradient's error norm from the
float64 gradient may be (the test suite's margin)."""

Path = Callable[[Inputs], tuple[Any, Any, Any]]
"""``path(inputs) -> (loss, logits gradient, targets gradient or None)`` for the upstream of
``inputs``."""


def as_torch(array: Any) -> Any:
    """``array`` (torch, JAX or CuPy, on any device) as a torch tensor on the same device."""
    import torch

    return array if isinstance(array, torch.Tensor) else torch.from_dlpack(array)


def max_error(actual: Any, desired: Any) -> float:
    """``max |actual - desired| / max |desired|`` in float64 over the entries where ``desired``
    is finite; where it is not (the ``inf`` targets gradient of a ``-inf`` logit), ``actual``
    must equal it, else the error is ``inf``. NaN where ``actual`` holds NaN."""
    import torch

    actual, desired = as_torch(actual).double(), desired.double()
    if actual.shape != desired.shape:
        msg = f"shapes differ: {tuple(actual.shape)} against {tuple(desired.shape)}"
        raise ValueError(msg)
    finite = desired.isfinite()
    if not bool(finite.all().item()):
        if not bool((actual[~finite] == desired[~finite]).all().item()):
            return float("inf")
        actual, desired = torch.where(finite, actual, 0.0), torch.where(finite, desired, 0.0)
    if actual.numel() == 0:
        return 0.0
    scale = desired.abs().max().clamp_min(1e-300)
    return float(((actual - desired).abs().max() / scale).item())


def compare(
    path: str,
    label: dict[str, Any],
    inputs: Inputs,
    expected: Expected,
    loss: Any,
    grad_logits: Any,
    grad_targets: Any = None,
    *,
    scale: float = 1.0,
) -> dict[str, Any]:
    """The row of one path on one case: errors, tolerances, and whether it passes.

    ``scale`` multiplies the gradients (in float64) before they are compared: the upstream of a
    case, for a path whose gradient is that of upstream 1. The tolerances are those of the
    dtypes the path returned.
    """
    from softce_multi import testing

    loss_t, grad_t = as_torch(loss).double(), as_torch(grad_logits).double() * scale
    loss_dtype, grad_dtype = testing.dtype_name(loss), testing.dtype_name(grad_logits)
    loss_tol = max(testing.LOSS_RTOL["float32"], testing.LOSS_RTOL[loss_dtype])
    grad_tol = testing.gradient_tolerance("float32", grad_dtype)
    padding = ~inputs.mask
    row = {
        "path": path,
        **label,
        "loss_error": max_error(loss_t, expected.loss),
        "loss_tolerance": loss_tol,
        "grad_error": max_error(grad_t, expected.grad_logits),
        "grad_tolerance": grad_tol,
        "padding_exact_zero": bool((grad_t[padding] == 0).all().item()),
        "finite": bool(grad_t.isfinite().all().item() and loss_t.isfinite().all().item()),
    }
    checks = [
        row["loss_error"] <= loss_tol,
        row["grad_error"] <= grad_tol,
        row["padding_exact_zero"],
        row["finite"],
    ]
    if grad_targets is not None and expected.grad_targets is not None:
        targets_tol = testing.gradient_tolerance("float32", testing.dtype_name(grad_targets))
        row["targets_grad_error"] = max_error(grad_targets, expected.grad_targets)
        row["targets_grad_tolerance"] = targets_tol
        checks.append(row["targets_grad_error"] <= targets_tol)
    row["ok"] = all(checks)
    return row


def _upstream_like(loss: Any, upstream: Any) -> Any:
    import torch

    return torch.as_tensor(upstream, dtype=loss.dtype, device=loss.device).expand_as(loss)


def autograd_path(loss_function: Callable[..., Any]) -> Path:
    """The path that runs ``loss_function`` on fresh leaves and its backward pass."""

    def run(inputs: Inputs) -> tuple[Any, Any, Any]:
        logits = inputs.logits.detach().requires_grad_(True)
        targets = inputs.targets.detach().requires_grad_(True)
        loss = loss_function(
            logits,
            targets,
            inputs.mask,
            reduction=inputs.reduction,
            num_valid=inputs.num_valid,
        )
        loss.backward(_upstream_like(loss, inputs.upstream))
        return loss.detach(), logits.grad, targets.grad

    return run


def with_grad_path(inputs: Inputs) -> tuple[Any, Any, Any]:
    """``masked_soft_cross_entropy_with_grad``: the loss and gradient of upstream 1."""
    import softce_multi

    loss, grad = softce_multi.masked_soft_cross_entropy_with_grad(
        inputs.logits,
        inputs.targets,
        inputs.mask,
        reduction=inputs.reduction,  # type: ignore[arg-type]
        num_valid=inputs.num_valid,
    )
    return loss, grad, None


def _cases(plan: Plan) -> Iterator[tuple[tuple[int, ...], str, str, str]]:
    """``(shape, dtype, case, reduction)`` of every parity case of ``plan``, the ones a stage
    stopped at its limit would miss most first: the first shape in every dtype with the random
    case, then the large cases, then the second shape in every dtype, case and reduction, and
    the rest in every dtype with the random case and the mean."""
    first, *others = plan.parity_shapes
    for dtype in LOW_PRECISION:
        yield first, dtype, "random", "mean"
    yield from plan.parity_large
    if others:
        middle, *rest = others
        yield from itertools.product([middle], LOW_PRECISION, CASES, REDUCTIONS)
        for shape in rest:
            for dtype in LOW_PRECISION:
                yield shape, dtype, "random", "mean"


def failed_row(path: str, label: dict[str, Any], error: Exception) -> dict[str, Any]:
    """The row of a case whose run raised: it fails, with the error, and the next case runs."""
    return {"path": path, **label, "ok": False, "error": f"{type(error).__name__}: {error}"}


def torch_parity(plan: Plan, device: str, dry_run: bool) -> Iterator[dict[str, Any]]:
    """Rows of the loss's torch paths (the Triton kernels on CUDA) on every case of ``plan``."""
    import softce_multi

    backward = autograd_path(softce_multi.masked_soft_cross_entropy)
    with kernels_as_on_a_gpu(dry_run):
        for index, (shape, dtype, case, reduction) in enumerate(_cases(plan)):
            label = {"shape": list(shape), "dtype": dtype, "case": case, "reduction": reduction}
            try:
                inputs = make_inputs(shape, dtype, case, reduction, device=device, seed=index)
                large = shape not in plan.parity_shapes
                expected = reference(inputs, targets_grad=not large)
                yield compare("torch backward", label, inputs, expected, *backward(inputs))
                if not large and inputs.reduction != "none" and dtype in ("bfloat16", "float16"):
                    # A 16-bit gradient made in the forward pass and kept for an upstream of 1.
                    unit = dataclasses.replace(inputs, upstream=1.0)
                    path = "torch backward, upstream 1"
                    yield compare(path, label, unit, reference(unit), *backward(unit))
                if inputs.reduction != "none":
                    result = with_grad_path(inputs)
                    yield compare(
                        "torch with_grad", label, inputs, expected, *result, scale=UPSTREAM
                    )
            except Exception as error:  # reported as a failing row
                yield failed_row("torch", label, error)
            free_device_memory(device)


def compiled_rows(plan: Plan, device: str, dry_run: bool) -> Iterator[dict[str, Any]]:
    """The loss under ``torch.compile(fullgraph=True)``, its backward included, called by
    keyword as trainers do, against the reference: bf16 and float32, the mean and ``"none"``.

    On the GPU, Inductor around the Triton operators. In a dry run, ``aot_eager`` around the
    torch CPU operators: the Triton interpreter cannot run on the fake tensors a trace uses.
    """
    import torch

    import softce_multi

    backend = "aot_eager" if dry_run else "inductor"
    compiled = torch.compile(
        softce_multi.masked_soft_cross_entropy, fullgraph=True, backend=backend
    )
    path = autograd_path(compiled)
    name = f"torch.compile(fullgraph=True, backend={backend!r})"
    shape = plan.parity_shapes[-1]
    for index, (dtype, reduction) in enumerate(
        itertools.product(("bfloat16", "float32"), ("mean", "none"))
    ):
        case = {"shape": list(shape), "dtype": dtype, "case": "nan_inf_padding"}
        yield path_row(name, path, {**case, "reduction": reduction}, device, seed=150 + index)


def operator_rows(plan: Plan, device: str, dry_run: bool) -> Iterator[dict[str, Any]]:
    """The in-place Triton operators against the functional ones, bit for bit, per dtype.

    ``triton_row_routine_`` must leave in the logits the gradient that ``triton_row_routine``
    returns, and ``triton_gradient_routine_`` the one ``triton_gradient_routine`` returns, with
    the same statistics and targets gradient.
    """
    shape = plan.parity_shapes[-1]
    with kernels_as_on_a_gpu(dry_run):
        for index, dtype in enumerate(LOW_PRECISION):
            label = {"shape": list(shape), "dtype": dtype, "case": "nan_inf_padding"}
            try:
                inputs = make_inputs(
                    shape, dtype, "nan_inf_padding", "mean", device=device, seed=100 + index
                )
                identical = _operators_identical(inputs)
                row = {"path": "torch in-place operators", **label, "reduction": "mean"}
                yield {**row, **identical, "ok": all(identical.values())}
            except Exception as error:  # reported as a failing row
                yield failed_row("torch in-place operators", label, error)


def _operators_identical(inputs: Inputs) -> dict[str, bool]:
    """Whether each in-place Triton operator leaves what its functional twin returns."""
    import torch

    from softce_multi.kernels import triton as triton_kernels

    vocab = inputs.logits.shape[-1]
    z, p = inputs.logits.reshape(-1, vocab), inputs.targets.reshape(-1, vocab)
    weights = inputs.mask.reshape(-1).float()
    scale = weights / weights.sum().clamp_min(1)
    functional = triton_kernels.triton_row_routine(z, p, weights, scale, True, None)
    over = z.clone()
    statistics = triton_kernels.triton_row_routine_(over, p, weights, scale, None)
    pairs = zip((*statistics, over), functional, strict=True)
    row_same = all(torch.equal(a, b) for a, b in pairs)
    saved = functional[1:4]
    grads = triton_kernels.triton_gradient_routine(z, p, *saved, scale, True, True, None)
    over = z.clone()
    grad_p = triton_kernels.triton_gradient_routine_(over, p, *saved, scale, True, None)
    gradient_same = torch.equal(over, grads[0]) and torch.equal(grad_p, grads[1])
    return {"row_operator_identical": row_same, "gradient_operator_identical": gradient_same}


def _linear_loss(hidden: Any, weight: Any, inputs: Inputs) -> Any:
    import softce_multi

    return softce_multi.linear_masked_soft_cross_entropy(
        hidden, weight, inputs.targets, inputs.mask, reduction=inputs.reduction
    )


def _materialised_loss(hidden: Any, weight: Any, inputs: Inputs) -> Any:
    from softce_multi.reference import masked_soft_cross_entropy

    return masked_soft_cross_entropy(
        hidden @ weight.T, inputs.targets, inputs.mask, reduction=inputs.reduction
    )


def _linear_gradients(
    loss_of: Callable[[Any, Any, Inputs], Any], hidden: Any, weight: Any, inputs: Inputs
) -> tuple[Any, dict[str, Any]]:
    """The loss ``loss_of(hidden, weight, inputs)`` and its gradients to fresh leaves."""
    leaves = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    loss = loss_of(*leaves, inputs)
    loss.backward(_upstream_like(loss, inputs.upstream))
    return loss.detach(), {"hidden": leaves[0].grad, "weight": leaves[1].grad}


def linear_rows(plan: Plan, device: str, dry_run: bool) -> Iterator[dict[str, Any]]:
    """The linear loss (the in-place operators on each chunk) against the materialised formula,
    in every dtype, with the mean and ``"none"``."""
    shape = plan.parity_shapes[-1]
    sizes = (shape[0] * shape[1], 64, shape[-1])
    with kernels_as_on_a_gpu(dry_run):
        for index, (dtype, reduction) in enumerate(
            itertools.product(LOW_PRECISION, ("mean", "none"))
        ):
            label = {"shape": list(sizes), "dtype": dtype, "case": "random", "reduction": reduction}
            try:
                yield {
                    "path": "torch linear loss",
                    **label,
                    **_linear_errors(sizes, label, device, index),
                }
            except Exception as error:  # reported as a failing row
                yield failed_row("torch linear loss", label, error)
            free_device_memory(device)


def _linear_errors(
    sizes: tuple[int, int, int], label: dict[str, Any], device: str, index: int
) -> dict[str, Any]:
    """The errors of the linear loss and of the materialised formula at ``sizes`` ``(N, H, V)``.

    As in the test suite: each gradient's root-sum-square error from the float64 gradients of
    the formula's own rounded logits may be at most ``1 + LINEAR_MARGIN`` times the formula's
    (or within float32's rounding of the gradient's norm).
    """
    import torch

    rows_count, hidden_size, vocab = sizes
    inputs = make_inputs(
        (rows_count, vocab),
        "float32",
        "random",
        label["reduction"],
        device=device,
        seed=200 + index,
    )
    generator = torch.Generator(device=device).manual_seed(300 + index)
    real = getattr(torch, label["dtype"])
    hidden = torch.randn(rows_count, hidden_size, generator=generator, device=device).to(real)
    weight = torch.randn(vocab, hidden_size, generator=generator, device=device) / 4
    weight = weight.to(real)
    ours_loss, ours = _linear_gradients(_linear_loss, hidden, weight, inputs)
    formula_loss, formula = _linear_gradients(_materialised_loss, hidden, weight, inputs)
    logits = (hidden @ weight.T).double()
    exact = reference(
        Inputs(logits, inputs.targets, inputs.mask, inputs.reduction, None, inputs.upstream),
        targets_grad=False,
    )
    exact_grads = {
        "hidden": exact.grad_logits @ weight.double(),
        "weight": exact.grad_logits.T @ hidden.double(),
    }
    row: dict[str, Any] = {
        "loss_error": max_error(ours_loss, exact.loss),
        "formula_loss_error": max_error(formula_loss, exact.loss),
    }
    ok = row["loss_error"] <= max(2 * row["formula_loss_error"], 1e-5)
    for name, exact_grad in exact_grads.items():
        error = float((ours[name].double() - exact_grad).norm().item())
        formula_error = float((formula[name].double() - exact_grad).norm().item())
        row[f"{name}_error_norm_ratio"] = error / max(formula_error, 1e-300)
        floor = 1e-5 * float(exact_grad.norm().item())
        ok = ok and (error <= (1 + LINEAR_MARGIN) * formula_error or error <= floor)
    return {**row, "ok": bool(ok)}


def path_row(
    name: str, path: Callable[[Inputs], Any], label: dict[str, Any], device: str, *, seed: int
) -> dict[str, Any]:
    """The row of ``path`` on the case ``label`` names (shape, dtype, case, reduction) against
    the reference, or a failing row if anything raises."""
    try:
        inputs = make_inputs(
            tuple(label["shape"]),
            label["dtype"],
            label["case"],
            label["reduction"],
            device=device,
            seed=seed,
        )
        return compare(name, label, inputs, reference(inputs), *path(inputs))
    except Exception as error:  # reported as a failing row
        return failed_row(name, label, error)


def distributed_rows(plan: Plan, device: str, dry_run: bool) -> Iterator[dict[str, Any]]:
    """``vocab_parallel_masked_soft_cross_entropy`` on a process group of one (NCCL on CUDA,
    gloo on the CPU), against the reference, per dtype and reduction."""
    from softce_multi import testing
    from softce_multi.distributed import vocab_parallel_masked_soft_cross_entropy

    shape = plan.parity_shapes[-1]
    backend = "nccl" if device == "cuda" else "gloo"
    name = f"torch vocab-parallel ({backend}, one rank)"
    with testing.group_of_one(backend=backend) as group, kernels_as_on_a_gpu(dry_run):

        def loss_function(*arrays: Any, **options: Any) -> Any:
            return vocab_parallel_masked_soft_cross_entropy(*arrays, group=group, **options)

        path = autograd_path(loss_function)
        for index, (dtype, reduction) in enumerate(
            itertools.product(LOW_PRECISION, ("mean", "none", "mean with num_valid"))
        ):
            label = {"shape": list(shape), "dtype": dtype, "case": "random", "reduction": reduction}
            yield path_row(name, path, label, device, seed=400 + index)
