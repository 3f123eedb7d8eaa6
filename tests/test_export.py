"""torch.export of models that call the PyTorch losses.

An exported program keeps the forward pass of an autograd function and differentiates what it
traced: the loss of logits is exported for inference only (a gradient would be lost, so
exporting it with one is refused), and the linear loss exports its operator, whose registered
autograd formula is the autograd function's backward pass.
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


def test_exporting_the_loss_of_logits_with_a_gradient_is_refused_by_name():
    # Exported, its forward pass would run without grad and the loss give no gradient, silently.
    with pytest.raises(RuntimeError, match=r"softce_multi.*torch\.no_grad\(\)"):
        torch.export.export(LogitsHead(), inputs(3))


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_the_exported_linear_loss_gives_the_eager_gradients(strict):
    eager = LinearHead()
    exported = torch.export.export(LinearHead(), inputs(4), strict=strict).module()
    hidden, targets, mask = inputs(5)
    eager_hidden = hidden.clone().requires_grad_(True)
    exported_hidden = hidden.clone().requires_grad_(True)

    eager_loss = eager(eager_hidden, targets, mask)
    exported_loss = exported(exported_hidden, targets, mask)
    eager_loss.backward()
    exported_loss.backward()

    # The export saw a hidden state that requires no grad: its gradient is made in the backward
    # pass, in eager mode in the forward pass (float32 rounding apart, the same).
    torch.testing.assert_close(exported_loss, eager_loss, rtol=0, atol=0)
    torch.testing.assert_close(exported_hidden.grad, eager_hidden.grad, rtol=1e-5, atol=1e-7)
    for name, parameter in exported.named_parameters():
        eager_grad = eager.get_parameter(name).grad
        torch.testing.assert_close(parameter.grad, eager_grad, rtol=1e-5, atol=1e-7)
