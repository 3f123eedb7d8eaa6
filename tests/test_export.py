"""torch.export of models that call the PyTorch losses.

An exported program keeps operators, not autograd functions: under ``torch.export`` both losses
call an operator whose registered autograd formula is their autograd function's, so that the
exported program differentiates as eager mode does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from softce_multi.testing import random_mask, random_targets

torch = pytest.importorskip("torch")

import softce_multi  # noqa: E402

HIDDEN, VOCAB = 8, 11


class LogitsHead(torch.nn.Module):
    """A linear head, the loss of its logits and a weight decay term after it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, hidden: Any, targets: Any, mask: Any) -> Any:
        loss = softce_multi.masked_soft_cross_entropy(self.head(hidden), targets, mask)
        return loss + 1e-3 * self.head.weight.square().sum()


class LinearHead(LogitsHead):
    """The same head with the linear loss, which never makes the logits."""

    def forward(self, hidden: Any, targets: Any, mask: Any) -> Any:
        weight, bias = self.head.weight, self.head.bias
        loss = softce_multi.linear_masked_soft_cross_entropy(
            hidden, weight, targets, mask, bias=bias
        )
        return loss + 1e-3 * weight.square().sum()


def inputs(seed: int) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(seed)
    hidden = torch.tensor(rng.standard_normal((2, 5, HIDDEN)), dtype=torch.float32)
    targets = torch.tensor(random_targets(rng, (2, 5, VOCAB)), dtype=torch.float32)
    mask = torch.tensor(random_mask(rng, (2, 5)))
    return hidden, targets, mask


@pytest.mark.parametrize("model", [LogitsHead, LinearHead], ids=["logits", "linear"])
def test_an_export_under_no_grad_gives_the_eager_loss(model):
    eager = model()
    with torch.no_grad():
        exported = torch.export.export(eager, inputs(1)).module()

        torch.testing.assert_close(exported(*inputs(2)), eager(*inputs(2)), rtol=0, atol=0)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("model", [LogitsHead, LinearHead], ids=["logits", "linear"])
def test_the_exported_loss_gives_the_eager_gradients(model, strict):
    # The weight decay term after the loss keeps a gradient of its own: a loss exported without
    # its gradient would go unnoticed in the sum, and the weight's gradient be that term's alone.
    eager = model()
    exported = torch.export.export(model(), inputs(4), strict=strict).module()
    hidden, targets, mask = inputs(5)
    eager_hidden = hidden.clone().requires_grad_(True)
    exported_hidden = hidden.clone().requires_grad_(True)

    eager_loss = eager(eager_hidden, targets, mask)
    exported_loss = exported(exported_hidden, targets, mask)
    eager_loss.backward()
    exported_loss.backward()

    # The export saw a hidden state that requires no grad: the linear loss makes its gradient in
    # the backward pass, in eager mode in the forward pass (float32 rounding apart, the same).
    torch.testing.assert_close(exported_loss, eager_loss, rtol=0, atol=0)
    torch.testing.assert_close(exported_hidden.grad, eager_hidden.grad, rtol=1e-5, atol=1e-7)
    for name, parameter in exported.named_parameters():
        eager_grad = eager.get_parameter(name).grad
        torch.testing.assert_close(parameter.grad, eager_grad, rtol=1e-5, atol=1e-7)


def loss_forward_arguments(
    reduction: str, count: Any, sparse: bool, positions: tuple[int, ...] = (2, 3)
) -> tuple[Any, ...]:
    rng = np.random.default_rng(6)
    logits = torch.tensor(rng.standard_normal((*positions, VOCAB)), requires_grad=True)
    mask = torch.tensor(random_mask(rng, positions))
    if sparse:
        ids = torch.tensor(rng.integers(0, VOCAB, (*positions, 4)))
        targets = torch.tensor(random_targets(rng, (*positions, 4)), requires_grad=True)
    else:
        targets = torch.tensor(random_targets(rng, (*positions, VOCAB)), requires_grad=True)
        ids = None
    tensor_count = torch.tensor(count) if isinstance(count, int) else None
    number = count if isinstance(count, float) else None
    with_logits_grad = reduction != "none"
    return (logits, targets, mask, ids, tensor_count, number, reduction, with_logits_grad)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize(
    ("reduction", "count"),
    [("mean", None), ("mean", 4), ("mean", 2.5), ("sum", None), ("none", None)],
)
def test_the_exported_loss_operator_passes_opcheck(reduction, count, sparse):
    from softce_multi._adapters import torch as torch_adapter

    arguments = loss_forward_arguments(reduction, count, sparse)

    torch.library.opcheck(torch_adapter.loss_forward, arguments)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_exported_loss_operator_passes_opcheck_on_an_empty_batch(reduction):
    # Of no rows, the function's outputs are empty arrays, which an operator's outputs may
    # not share.
    from softce_multi._adapters import torch as torch_adapter

    arguments = loss_forward_arguments(reduction, None, False, positions=(0, 3))

    torch.library.opcheck(torch_adapter.loss_forward, arguments)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_linear_operator_passes_opcheck(reduction):
    from softce_multi._adapters import torch_linear

    rng = np.random.default_rng(7)
    hidden = torch.tensor(rng.standard_normal((2, 3, HIDDEN)), requires_grad=True)
    weight = torch.tensor(rng.standard_normal((VOCAB, HIDDEN)), requires_grad=True)
    targets = torch.tensor(random_targets(rng, (2, 3, VOCAB)), requires_grad=True)
    mask = torch.tensor(random_mask(rng, (2, 3)))
    made = reduction != "none"
    arguments = (hidden, weight, None, targets, None, mask, None, None, reduction, 2, None)

    torch.library.opcheck(torch_linear.linear_forward, (*arguments, made, made, False))
