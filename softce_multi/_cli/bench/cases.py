"""The implementations ``bench`` times on ``[1, N, V]`` logits, and their inputs.

Every comparison is a :class:`Case` in :data:`CASES`: a name, its framework, the libraries it
needs, and a factory of one forward+backward step ``step(logits, target, mask) -> gradient``.
A new comparison is one more ``Case``. A case whose library is missing is reported as skipped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from softce_multi._cli.bench.measure import xla_temp_bytes

BASELINE = "NeMo formula[torch]"

Step = Callable[[Any, Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class Case:
    """One implementation to time: ``make(device)`` returns its forward+backward step."""

    name: str
    framework: str  # "torch", "jax" or "numpy": how inputs are built and memory is measured
    make: Callable[[str], Step]
    requires: tuple[str, ...] = ()  # libraries it needs beyond its framework
    peer: str | None = None  # the case of the same framework it is compared with
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")


def _torch_step(loss_fn: Callable[[Any, Any, Any], Any]) -> Step:
    def step(logits: Any, target: Any, mask: Any) -> Any:
        leaf = logits.detach().requires_grad_(True)
        loss_fn(leaf, target, mask).backward()
        return leaf.grad

    return step


def _jax_step(loss_fn: Callable[[Any, Any, Any], Any]) -> Step:
    """The jitted loss and gradient; its ``temp_bytes(*inputs)`` counts XLA's temporaries."""
    import jax

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))

    def step(logits: Any, target: Any, mask: Any) -> Any:
        return jax.block_until_ready(grad_fn(logits, target, mask))

    step.temp_bytes = functools.partial(xla_temp_bytes, grad_fn)  # type: ignore[attr-defined]
    return step


def _softce_torch(device: str) -> Step:
    import softce_multi

    return _torch_step(softce_multi.masked_soft_cross_entropy)


def nemo_formula(logits: Any, target: Any, mask: Any) -> Any:
    """NeMo AutoModel's soft cross entropy as its users write it in PyTorch."""
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    per_position = -(target * log_probs).sum(dim=-1)
    weights = mask.reshape(per_position.shape).float()
    return (per_position * weights).sum() / weights.sum().clamp(min=1)


def _nemo_formula(device: str) -> Step:
    """The step of :func:`nemo_formula`."""
    return _torch_step(nemo_formula)


def _torch_cross_entropy(device: str) -> Step:
    """``torch.nn.functional.cross_entropy`` with probability targets, then the masked mean."""
    import torch

    def loss(logits: Any, target: Any, mask: Any) -> Any:
        vocab = logits.shape[-1]
        per_position = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab).float(), target.reshape(-1, vocab), reduction="none"
        )
        weights = mask.reshape(per_position.shape).float()
        return (per_position * weights).sum() / weights.sum().clamp(min=1)

    return _torch_step(loss)


def _specforge_formula(device: str) -> Step:
    """SpecForge's EAGLE-3 loss: ``-sum(mask * p * log_softmax(z))`` over the vocabulary, mean
    over positions, in the logits' dtype."""
    import torch

    def loss(logits: Any, target: Any, mask: Any) -> Any:
        log_probs = torch.log_softmax(logits, dim=-1)
        return -torch.sum(mask * (target * log_probs), dim=-1).mean()

    return _torch_step(loss)


def _softce_jax(device: str) -> Step:
    from softce_multi.jax import masked_soft_cross_entropy

    return _jax_step(masked_soft_cross_entropy)


def _optax_loss(device: str) -> Step:
    """``optax.softmax_cross_entropy`` under ``jax.jit``, then the masked mean."""
    import jax.numpy as jnp
    import optax

    def loss(logits: Any, target: Any, mask: Any) -> Any:
        per_position = optax.softmax_cross_entropy(logits.astype(jnp.float32), target)
        weights = jnp.reshape(mask, per_position.shape).astype(jnp.float32)
        return jnp.sum(per_position * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    return _jax_step(loss)


def _softce_numpy(device: str) -> Step:
    import softce_multi

    def step(logits: Any, target: Any, mask: Any) -> Any:
        return softce_multi.masked_soft_cross_entropy_with_grad(logits, target, mask)[1]

    return step


def _plain_numpy(device: str) -> Step:
    """The loss and its gradient in NumPy as written by hand: the softmax materialised."""

    def step(logits: Any, target: Any, mask: Any) -> Any:
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        weights = mask.reshape(logits.shape[:-1]).astype(logits.dtype)
        denominator = max(weights.sum(), 1.0)
        loss = -((target * log_probs).sum(axis=-1) * weights).sum() / denominator
        scale = (weights / denominator)[..., None]
        grad = scale * (target.sum(axis=-1, keepdims=True) * np.exp(log_probs) - target)
        return loss, grad

    return step


CASES: list[Case] = [
    Case("softce_multi[torch]", "torch", _softce_torch, peer=BASELINE),
    Case(BASELINE, "torch", _nemo_formula),
    Case("F.cross_entropy[torch]", "torch", _torch_cross_entropy, peer=BASELINE),
    Case("SpecForge formula[torch]", "torch", _specforge_formula, peer=BASELINE),
    Case("softce_multi[jax.jit]", "jax", _softce_jax, peer="optax[jax.jit]"),
    Case("optax[jax.jit]", "jax", _optax_loss, ("optax",)),
    Case(
        "softce_multi[numpy]",
        "numpy",
        _softce_numpy,
        peer="plain NumPy",
        dtypes=("float32", "float64"),
    ),
    Case("plain NumPy", "numpy", _plain_numpy, dtypes=("float32", "float64")),
]
"""Every comparison ``bench`` runs, in order; add a :class:`Case` to add one."""


def case_named(name: str) -> Case:
    """The case of :data:`CASES` named ``name``."""
    for case in CASES:
        if case.name == name:
            return case
    msg = f"no bench case named {name!r}; the cases are {[case.name for case in CASES]}"
    raise ValueError(msg)


def make_inputs(
    framework: str, shape: Sequence[int], dtype: str, seed: int, device: str = "cpu"
) -> tuple[Any, Any, Any]:
    """Logits of ``dtype``, float32 probability targets and a ``[..., 1]`` bool mask."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(tuple(shape), dtype=np.float32)
    target = rng.standard_normal(tuple(shape), dtype=np.float32)
    np.exp(target, out=target)
    target /= target.sum(axis=-1, keepdims=True)
    mask = rng.random((*shape[:-1], 1)) > 0.1
    if framework == "torch":
        import torch

        kind = getattr(torch, dtype)
        return (
            torch.from_numpy(logits).to(device=device, dtype=kind),
            torch.from_numpy(target).to(device),
            torch.from_numpy(mask).to(device),
        )
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.asarray(logits, getattr(jnp, dtype)), jnp.asarray(target), jnp.asarray(mask)
    return logits.astype(dtype), target, mask
