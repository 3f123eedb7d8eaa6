"""On a CUDA device, the loss and its gradients never synchronise with the host.

These tests need a CUDA device and skip without one (``nox -s gpu`` runs them). They hold the
CUDA path (the Triton ops behind autograd) to the promise that nothing waits on the host: no
``.item()``, no data-dependent shape, no copy to the CPU. Two checks, each of which fails on a
synchronisation: PyTorch's sync debug mode set to raise, and capture into a CUDA graph (which
rejects any synchronising call during capture).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch not installed")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton", reason="triton not installed")

import softce_multi as sc  # noqa: E402
from softce_multi.testing import REDUCTIONS  # noqa: E402

SHAPE = (2, 64, 1000)


def cuda_inputs(dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(SHAPE, device="cuda", generator=generator).to(dtype)
    targets = torch.softmax(torch.randn(SHAPE, device="cuda", generator=generator), dim=-1)
    mask = torch.rand(SHAPE[:-1], device="cuda", generator=generator) < 0.8
    return logits.requires_grad_(True), targets.requires_grad_(True), mask


def training_step(logits, targets, mask, reduction: str) -> torch.Tensor:
    loss = sc.masked_soft_cross_entropy(
        logits,
        targets,
        mask,
        reduction=reduction,
        num_valid=mask.sum() if reduction == "mean" else None,
    )
    loss.sum().backward()
    return loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_a_training_step_never_synchronises_with_the_host(reduction):
    logits, targets, mask = cuda_inputs()
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        training_step(logits, targets, mask, reduction)
        loss, grad = sc.masked_soft_cross_entropy_with_grad(logits.detach(), targets.detach(), mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    assert logits.grad is not None and targets.grad is not None
    assert grad.shape == logits.shape and loss.device == logits.device


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_a_training_step_replays_from_a_cuda_graph(reduction):
    logits, targets, mask = cuda_inputs(torch.float32)
    # Warm up on a side stream, as CUDA graph capture requires, then capture one step.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        training_step(logits, targets, mask, reduction)
    torch.cuda.current_stream().wait_stream(stream)
    logits.grad = targets.grad = None

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = training_step(logits, targets, mask, reduction)
    with torch.no_grad():
        logits.copy_(torch.randn_like(logits))
    logits.grad.zero_()
    targets.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()

    fresh_logits = logits.detach().clone().requires_grad_(True)
    fresh_targets = targets.detach().clone().requires_grad_(True)
    expected_loss = training_step(fresh_logits, fresh_targets, mask, reduction)
    torch.testing.assert_close(captured_loss, expected_loss)
    torch.testing.assert_close(logits.grad, fresh_logits.grad)
    torch.testing.assert_close(targets.grad, fresh_targets.grad)
