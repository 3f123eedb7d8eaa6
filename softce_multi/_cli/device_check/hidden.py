"""The functions of hidden states on the device, against the materialised path and Liger-Kernel.

- ``linear_masked_soft_cross_entropy`` at Liger-Kernel's published fused-linear KL case, bf16,
  forward plus backward to the hidden states and the weight: against ``hidden @ weight.T``
  then the loss, and against Liger's ``LigerFusedLinearKLDivFunction`` (``"batchmean"``, every
  position valid), whose gradients equal ours: its loss is ours minus the targets' entropy,
  which does not depend on the logits. The gradients of ours and Liger's are compared too.
- ``eagle3.prepare_targets_from_hidden`` against ``prepare_targets(hidden @ weight.T, ...)``,
  forward.

The steps are those of ``bench --linear`` and ``bench --targets``; the inputs are drawn on the
device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from softce_multi._cli.bench.from_hidden import FROM_HIDDEN, Sizes, _from_hidden_torch_step
from softce_multi._cli.bench.measure import MIB
from softce_multi._cli.device_check.plan import (
    Plan,
    Record,
    extra_peak_bytes,
    failure_recorded,
    free_device_memory,
    kernels_as_on_a_gpu,
    median_seconds,
)

LIGER = "Liger fused linear KL"
LINEAR = "softce_multi linear"


def _liger_step(states: Any, weight: Any, target: Any, mask: Any) -> tuple[Any, Any]:
    """Liger-Kernel's fused linear KL divergence, forward+backward to the states and weight;
    ``mask`` is all True here (every position valid), which ``"batchmean"`` matches."""
    from liger_kernel.ops.fused_linear_kl_div import LigerFusedLinearKLDivFunction

    leaves = states.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    LigerFusedLinearKLDivFunction.apply(*leaves, target, None, "batchmean").backward()
    return leaves[0].grad, leaves[1].grad


def _measure(
    name: str, step: Callable[..., Any], inputs: tuple[Any, ...], device: str, case: str
) -> dict[str, Any]:
    seconds = median_seconds(lambda: step(*inputs), device=device)
    extra = extra_peak_bytes(lambda: step(*inputs), device=device)
    free_device_memory(device)
    return {
        "implementation": name,
        "case": case,
        "median_s": seconds,
        "extra_peak_mib": None if extra is None else extra / MIB,
    }


def linear_speed(
    plan: Plan,
    device: str,
    dry_run: bool,
    installed: Callable[[str], bool],
    record: Record,
) -> None:
    """Record the rows (``"linear"``) of the linear loss, the materialised path and Liger's loss
    at ``plan.linear_case``, all positions valid, as each is measured; then the relative
    difference of Liger's gradients from ours (``"liger_gradient_difference"``)."""
    import torch

    rows_count, hidden_size, vocab = plan.linear_case
    case = f"N={rows_count}, H={hidden_size}, V={vocab}, bf16"
    sizes = Sizes(rows_count, hidden_size, vocab, vocab, bias=False)
    generator = torch.Generator(device=device).manual_seed(800)
    states = torch.randn(rows_count, hidden_size, generator=generator, device=device)
    weight = torch.randn(vocab, hidden_size, generator=generator, device=device)
    states, weight = states.bfloat16(), (weight * hidden_size**-0.5).bfloat16()
    logits = torch.randn(rows_count, vocab, generator=generator, device=device)
    target = torch.softmax(logits, dim=-1).bfloat16()
    del logits
    mask = torch.ones(rows_count, dtype=torch.bool, device=device)
    inputs = (states, weight, target, mask)
    comparison = FROM_HIDDEN["linear"]
    steps: dict[str, Callable[..., Any]] = {
        LINEAR: _from_hidden_torch_step(comparison, "linear", sizes),
        "materialised": _from_hidden_torch_step(comparison, "materialised", sizes),
    }
    if installed("liger_kernel"):
        steps[LIGER] = _liger_step
    else:
        record("skipped", [{"implementation": LIGER, "reason": "liger_kernel is not installed"}])
    with kernels_as_on_a_gpu(dry_run):
        for name, step in steps.items():
            with failure_recorded(record, name, case=case):
                record("linear", [_measure(name, step, inputs, device, case)])
        if LIGER in steps:
            with failure_recorded(record, f"{LIGER} against {LINEAR}", case=case):
                ours, theirs = steps[LINEAR](*inputs), _liger_step(*inputs)
                difference = {
                    name: float(((a.double() - b.double()).norm() / b.double().norm()).item())
                    for name, a, b in zip(("hidden", "weight"), ours, theirs, strict=True)
                }
                record("liger_gradient_difference", difference)


def targets_speed(plan: Plan, device: str, dry_run: bool) -> list[dict[str, Any]]:
    """Rows of ``prepare_targets_from_hidden`` and the materialised ``prepare_targets`` at
    ``plan.targets_case``; the first with the largest difference of their probabilities and
    whether their position masks are equal."""
    import torch

    rows_count, hidden_size, target_vocab, draft_vocab = plan.targets_case
    case = f"N={rows_count}, H={hidden_size}, V_target={target_vocab}, V_draft={draft_vocab}, bf16"
    sizes = Sizes(rows_count, hidden_size, draft_vocab, target_vocab, bias=False)
    generator = torch.Generator(device=device).manual_seed(900)
    states = torch.randn(rows_count, hidden_size, generator=generator, device=device).bfloat16()
    weight = torch.randn(target_vocab, hidden_size, generator=generator, device=device)
    weight = (weight * hidden_size**-0.5).bfloat16()
    loss_mask = torch.rand(rows_count, generator=generator, device=device) < 0.9
    chosen = torch.randperm(target_vocab, generator=generator, device=device)[:draft_vocab]
    t2d = torch.zeros(target_vocab, dtype=torch.bool, device=device)
    t2d[chosen] = True
    inputs = (states, weight, loss_mask, t2d)
    comparison = FROM_HIDDEN["targets"]
    rows = []
    results = {}
    with kernels_as_on_a_gpu(dry_run):
        for path, name in (
            ("from_hidden", "prepare_targets_from_hidden"),
            ("materialised", "prepare_targets"),
        ):
            step: Callable[..., Any] = _from_hidden_torch_step(comparison, path, sizes)
            rows.append(_measure(name, step, inputs, device, case))
            results[name] = step(*inputs)
    (probs, mask), (expected_probs, expected_mask) = results.values()
    rows[0]["max_probability_difference"] = float((probs - expected_probs).abs().max().item())
    rows[0]["masks_equal"] = bool(torch.equal(mask, expected_mask))
    return rows
