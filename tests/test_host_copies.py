"""On PyTorch, the losses and the EAGLE-3 steps neither copy data from the host nor read a value
back to it while they run.

On a CUDA device, a tensor made from a Python number or list is a copy from the host that waits
for it, and reading a value (``.item()``, ``bool(tensor)``) waits for the device: each is a host
sync, and neither can be captured in a CUDA graph. ``tests/test_cuda.py`` checks that on a GPU.
These tests hold the same promise on the CPU, where every operator a call runs is seen through
a dispatch mode: torch takes data from Python through ``aten.lift_fresh`` and hands a value to
it through ``aten._local_scalar_dense``. On the CPU the package reads values where that is free;
the tests of reads turn that off, as it is on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch", reason="torch not installed")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import softce_multi as sc  # noqa: E402
from softce_multi import eagle3  # noqa: E402
from softce_multi._adapters import torch_shared  # noqa: E402

BATCH, LENGTH, VOCAB, HIDDEN, TARGET_VOCAB, K = 2, 5, 33, 8, 50, 4


class HostTraffic(TorchDispatchMode):
    """Count, while the mode is on, the tensors made from host data and the values read back."""

    def __init__(self) -> None:
        super().__init__()
        self.made_from_host_data = 0
        self.values_read = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.lift_fresh.default:
            self.made_from_host_data += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.values_read += 1
        return func(*args, **(kwargs or {}))


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    t2d = torch.zeros(TARGET_VOCAB, dtype=torch.bool)
    t2d[torch.randperm(TARGET_VOCAB, generator=generator)[:VOCAB]] = True
    probs = torch.softmax(randn(BATCH, LENGTH, VOCAB), dim=-1)
    top_ids, top_probs = eagle3.top_k_targets(probs, K)
    return {
        "logits": randn(BATCH, LENGTH, VOCAB).requires_grad_(True),
        "probs": probs.requires_grad_(True),
        "mask": torch.rand(BATCH, LENGTH, generator=generator) < 0.7,
        "top_probs": top_probs,
        "top_ids": top_ids,
        "hidden": randn(BATCH * LENGTH, HIDDEN).requires_grad_(True),
        "weight": randn(VOCAB, HIDDEN).requires_grad_(True),
        "target_logits": randn(BATCH, LENGTH, TARGET_VOCAB),
        "target_hidden": randn(BATCH, LENGTH, HIDDEN),
        "target_weight": randn(TARGET_VOCAB, HIDDEN),
        "t2d": t2d,
    }


def _loss(reduction: str, **options) -> Callable[[dict], None]:
    def step(x: dict) -> None:
        loss = sc.masked_soft_cross_entropy(
            x["logits"], x["probs"], x["mask"], reduction=reduction, **options
        )
        loss.sum().backward()

    return step


def _linear(x: dict) -> None:
    flat_probs = x["probs"].detach().reshape(-1, VOCAB)
    loss = sc.linear_masked_soft_cross_entropy(
        x["hidden"], x["weight"], flat_probs, x["mask"].reshape(-1)
    )
    loss.backward()


def _sparse(x: dict) -> None:
    loss = sc.masked_soft_cross_entropy(
        x["logits"], x["top_probs"], x["mask"], target_ids=x["top_ids"]
    )
    loss.backward()


def _multi_step(x: dict) -> None:
    losses = [sc.masked_soft_cross_entropy(x["logits"], x["probs"], x["mask"]) for _ in range(3)]
    eagle3.multi_step_loss(losses, decay=0.8).backward()


CALLS = {
    "loss, mean": _loss("mean"),
    "loss, mean over num_valid, a number": _loss("mean", num_valid=7),
    "loss, mean over num_valid, a tensor": lambda x: _loss("mean", num_valid=x["mask"].sum())(x),
    "loss, sum": _loss("sum"),
    "loss, none": _loss("none"),
    "loss with gradient": lambda x: sc.masked_soft_cross_entropy_with_grad(
        x["logits"].detach(), x["probs"].detach(), x["mask"], reduction="sum"
    ),
    "linear loss": _linear,
    "sparse loss": _sparse,
    "multi_step_loss": _multi_step,
    # With draft_vocab_size: without it, the size is sum(t2d), read on the host as documented.
    "prepare_targets": lambda x: eagle3.prepare_targets(
        x["target_logits"], x["mask"], x["t2d"], draft_vocab_size=VOCAB
    ),
    "prepare_targets, an integer mask": lambda x: eagle3.prepare_targets(
        x["target_logits"], x["mask"].to(torch.int32), x["t2d"], draft_vocab_size=VOCAB
    ),
    "prepare_targets_from_hidden": lambda x: eagle3.prepare_targets_from_hidden(
        x["target_hidden"], x["target_weight"], x["mask"], x["t2d"], draft_vocab_size=VOCAB
    ),
    "prepare_top_k_targets_from_hidden": lambda x: eagle3.prepare_top_k_targets_from_hidden(
        x["target_hidden"], x["target_weight"], x["mask"], x["t2d"], K, draft_vocab_size=VOCAB
    ),
    "draft_accuracy": lambda x: eagle3.draft_accuracy(
        x["logits"].detach(), x["probs"].detach(), x["mask"]
    ),
}


@pytest.fixture
def reads_as_on_a_gpu(monkeypatch):
    """Make the package read no value on the host, as it does where that waits for a device."""
    monkeypatch.setattr(torch_shared, "readable_for_free", lambda x: False)


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_makes_no_tensor_from_host_data(call):
    inputs = _inputs()

    with HostTraffic() as watch:
        call(inputs)

    assert watch.made_from_host_data == 0


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_reads_no_value_on_the_host_where_reading_waits(reads_as_on_a_gpu, call):
    inputs = _inputs()

    with HostTraffic() as watch:
        call(inputs)

    assert watch.values_read == 0


def test_the_watch_sees_a_tensor_made_from_a_python_number_and_a_value_read():
    with HostTraffic() as watch:
        bool(torch.tensor(1.0))

    assert (watch.made_from_host_data, watch.values_read) == (1, 1)
