"""The parity cases' inputs, made on the device, and their float64 reference on the same device.

Every case draws fresh random values (a seed per case, never zeros alone):

- ``random``: logits of scale 3, softmax targets, about 80% of the positions valid;
- ``nan_inf_padding``: the padding positions' logits hold NaN, ``inf`` and ``-inf`` and their
  targets NaN, which the loss must never read;
- ``neg_inf_logits``: about a tenth of each row's logits are ``-inf`` where the target is 0;
- ``unnormalised``: each row's targets scaled by a factor in ``[0, 3)``.

The reference is :func:`softce_multi.reference.masked_soft_cross_entropy` on float64 copies
of the inputs as they are rounded to their dtypes, with torch autograd for the gradients, on the
device the case runs on. It multiplies the mask in, so its copies hold 0 at the padding
positions and ``-1e300`` for ``-inf`` (whose softmax and term are still exactly 0); the targets
gradient there is set to the ``inf`` it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from softce_multi._types import Reduction

CASES = ("random", "nan_inf_padding", "neg_inf_logits", "unnormalised")
REDUCTIONS = ("mean", "sum", "none", "mean with num_valid")
UPSTREAM = 0.7
"""The cotangent of a scalar loss in every case (the ``"none"`` loss gets one per position)."""


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The torch tensors of one case, and what the loss is called with."""

    logits: Any
    targets: Any
    mask: Any
    reduction: Reduction
    num_valid: Any  # a 0-d tensor, or None
    upstream: Any  # the loss's cotangent: a number, or a tensor of the loss's shape


@dataclasses.dataclass(frozen=True)
class Expected:
    """The float64 reference: the loss and the gradients to the logits and the targets."""

    loss: Any
    grad_logits: Any
    grad_targets: Any | None


def make_inputs(
    shape: tuple[int, ...],
    dtype: str,
    case: str,
    reduction: str,
    *,
    device: str,
    seed: int,
    targets_dtype: str = "float32",
) -> Inputs:
    """The inputs of one parity case, on ``device`` (see the module's docstring)."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)

    def uniform(*size: int) -> Any:
        return torch.rand(size, generator=generator, device=device)

    logits = 3 * torch.randn(shape, generator=generator, device=device)
    targets = torch.softmax(2 * torch.randn(shape, generator=generator, device=device), dim=-1)
    mask = uniform(*shape[:-1]) < 0.8
    if case == "unnormalised":
        targets = targets * (3 * uniform(*shape[:-1], 1))
    elif case == "neg_inf_logits":
        hidden = uniform(*shape) < 0.1
        targets = torch.where(hidden, 0.0, targets)
        logits = torch.where(hidden, -torch.inf, logits)
    elif case == "nan_inf_padding":
        pick = uniform(*shape)
        poison = torch.where(pick < 0.3, torch.nan, torch.where(pick < 0.6, torch.inf, -torch.inf))
        padding = ~mask[..., None]
        logits = torch.where(padding, poison, logits)
        targets = torch.where(padding, torch.nan, targets)
    elif case != "random":
        msg = f"case must be one of {CASES}, got {case!r}"
        raise ValueError(msg)
    num_valid = None
    if reduction == "mean with num_valid":
        num_valid = mask.sum() + 3
    upstream: Any = UPSTREAM
    if reduction == "none":
        upstream = uniform(*shape[:-1]) + 0.5
    return Inputs(
        logits.to(getattr(torch, dtype)),
        targets.to(getattr(torch, targets_dtype)),
        mask,
        cast(Reduction, reduction.split()[0]),
        num_valid,
        upstream,
    )


def reference(inputs: Inputs, *, targets_grad: bool = True) -> Expected:
    """The float64 loss and gradients of ``inputs`` by the reference formula, on their device."""
    import torch

    from softce_multi.reference import masked_soft_cross_entropy

    valid = inputs.mask[..., None]
    logits = torch.where(valid, inputs.logits.double(), 0.0)
    logits = torch.where(torch.isneginf(logits), -1e300, logits).requires_grad_(True)
    targets = torch.where(valid, inputs.targets.double(), 0.0).requires_grad_(targets_grad)
    loss = masked_soft_cross_entropy(
        logits,
        targets,
        inputs.mask,
        reduction=inputs.reduction,
        num_valid=None if inputs.num_valid is None else inputs.num_valid.double(),
    )
    upstream = torch.as_tensor(inputs.upstream, dtype=torch.float64, device=loss.device)
    loss.backward(upstream.expand_as(loss))
    grad_targets = targets.grad
    if grad_targets is not None:
        # d/dp of -p log q is -log q: +inf at a -inf logit of a position that counts.
        counted = torch.isneginf(inputs.logits) & (grad_targets > 0)
        grad_targets = torch.where(counted, torch.inf, grad_targets)
    return Expected(loss.detach(), logits.grad, grad_targets)
