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
from softce_multi import eagle3  # noqa: E402
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


DRAFT_VOCAB, TARGET_VOCAB, HIDDEN, STEPS = 300, 1000, 64, 3


def eagle3_inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device="cuda").manual_seed(1)
    batch, length = SHAPE[:2]
    draft_logits = torch.randn(
        (STEPS, batch, length, DRAFT_VOCAB), device="cuda", generator=generator
    ).to(torch.bfloat16)
    target_logits = torch.randn(
        (batch, length, TARGET_VOCAB), device="cuda", generator=generator
    ).to(torch.bfloat16)
    loss_mask = torch.rand((batch, length), device="cuda", generator=generator) < 0.8
    t2d = torch.zeros(TARGET_VOCAB, dtype=torch.bool, device="cuda")
    t2d[torch.randperm(TARGET_VOCAB, device="cuda", generator=generator)[:DRAFT_VOCAB]] = True
    return draft_logits.requires_grad_(True), target_logits, loss_mask, t2d


def eagle3_step(draft_logits, target_logits, loss_mask, t2d) -> torch.Tensor:
    """The draft's targets from the target's logits, a loss per step, their decayed sum, and its
    gradient: an EAGLE-3 training step, with the draft vocabulary's size given."""
    losses = []
    for step in range(STEPS):
        probs, position_mask = eagle3.prepare_targets(
            target_logits, loss_mask, t2d, draft_vocab_size=DRAFT_VOCAB
        )
        losses.append(sc.masked_soft_cross_entropy(draft_logits[step], probs, position_mask))
    loss = eagle3.multi_step_loss(losses, decay=0.8)
    loss.backward()
    return loss


def linear_step(hidden, weight, targets, mask) -> torch.Tensor:
    loss = sc.linear_masked_soft_cross_entropy(hidden, weight, targets, mask, chunk_rows=32)
    loss.backward()
    return loss


def linear_inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device="cuda").manual_seed(2)
    rows = SHAPE[0] * SHAPE[1]
    hidden = torch.randn((rows, HIDDEN), device="cuda", generator=generator)
    weight = torch.randn((DRAFT_VOCAB, HIDDEN), device="cuda", generator=generator) / 8
    targets = torch.softmax(
        torch.randn((rows, DRAFT_VOCAB), device="cuda", generator=generator), dim=-1
    )
    mask = torch.rand(rows, device="cuda", generator=generator) < 0.8
    return (
        hidden.to(torch.bfloat16).requires_grad_(True),
        weight.to(torch.bfloat16).requires_grad_(True),
        targets,
        mask,
    )


STEP_FUNCTIONS = {
    "eagle3 step": (eagle3_step, eagle3_inputs),
    "linear loss": (linear_step, linear_inputs),
}


@pytest.mark.parametrize("step", STEP_FUNCTIONS.values(), ids=STEP_FUNCTIONS.keys())
def test_an_eagle3_or_linear_step_never_synchronises_with_the_host(step):
    function, make_inputs = step
    inputs = make_inputs()
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = function(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    assert loss.device == inputs[0].device and inputs[0].grad is not None


@pytest.mark.parametrize("step", STEP_FUNCTIONS.values(), ids=STEP_FUNCTIONS.keys())
def test_an_eagle3_or_linear_step_replays_from_a_cuda_graph(step):
    function, make_inputs = step
    inputs = make_inputs()
    leaves = [x for x in inputs if x.requires_grad]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    for leaf in leaves:
        leaf.grad = None

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = function(*inputs)
    for leaf in leaves:
        leaf.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()

    fresh = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    expected_loss = function(*fresh)
    torch.testing.assert_close(captured_loss, expected_loss)
    for leaf, fresh_leaf in zip(leaves, [x for x in fresh if x.requires_grad], strict=True):
        torch.testing.assert_close(leaf.grad, fresh_leaf.grad)


def test_16_bit_products_add_to_a_float32_weight_gradient_without_a_16_bit_rounding():
    from softce_multi._adapters.torch_shared import add_product

    generator = torch.Generator(device="cuda").manual_seed(1)
    total = torch.randn(64, 32, device="cuda", generator=generator)
    a = torch.randn(64, 256, device="cuda", generator=generator).to(torch.bfloat16)
    b = torch.randn(256, 32, device="cuda", generator=generator).to(torch.bfloat16)
    expected = total.double() + a.double() @ b.double()

    result = add_product(total.clone(), a, b)

    # A product rounded to bfloat16 first (entries of about 16) would be about 0.03 off.
    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-3)
