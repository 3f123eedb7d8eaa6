"""Every public function keeps its results on the device of its inputs, with the same values.

array-api-strict has devices besides its default one and refuses to combine arrays of two of
them: a function that makes an array without naming its inputs' device fails here. The same
function on the default device is the oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import softce_multi as sc
from softce_multi import eagle3

xp = pytest.importorskip("array_api_strict")
OTHER_DEVICE = xp.Device("device1")

#: Positions [2, 6], hidden size 4, target vocabulary 9, draft vocabulary 5.
POSITIONS, HIDDEN, TARGET_VOCAB, DRAFT_VOCAB = (2, 6), 4, 9, 5


def host_inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    draft_shape = (*POSITIONS, DRAFT_VOCAB)
    return {
        "logits": rng.standard_normal(draft_shape),
        "targets": rng.dirichlet(np.ones(DRAFT_VOCAB), size=POSITIONS),
        "mask": rng.random(POSITIONS) > 0.3,
        "hidden": rng.standard_normal((*POSITIONS, HIDDEN)),
        "weight": rng.standard_normal((DRAFT_VOCAB, HIDDEN)),
        "target_hidden": rng.standard_normal((*POSITIONS, HIDDEN)),
        "target_weight": rng.standard_normal((TARGET_VOCAB, HIDDEN)),
        "t2d": np.isin(np.arange(TARGET_VOCAB), [0, 2, 3, 5, 8]),
        "d2t": np.array([0, 1, 1, 2, 3]),
        "ids": rng.integers(0, DRAFT_VOCAB, size=(*POSITIONS, 2)),
        "counts": rng.integers(0, 100, size=TARGET_VOCAB),
        "step_losses": rng.random(3),
    }


#: Each public function, called with the inputs of :func:`host_inputs` (arrays ``a``).
CALLS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "masked_soft_cross_entropy": lambda a: sc.masked_soft_cross_entropy(
        a["logits"], a["targets"], a["mask"]
    ),
    "masked_soft_cross_entropy none": lambda a: sc.masked_soft_cross_entropy(
        a["logits"], a["targets"], a["mask"], reduction="none"
    ),
    "masked_soft_cross_entropy sparse": lambda a: sc.masked_soft_cross_entropy(
        a["logits"], a["targets"][..., :2], a["mask"], target_ids=a["ids"]
    ),
    "masked_soft_cross_entropy_with_grad": lambda a: sc.masked_soft_cross_entropy_with_grad(
        a["logits"], a["targets"], a["mask"]
    ),
    "linear_masked_soft_cross_entropy": lambda a: sc.linear_masked_soft_cross_entropy(
        a["hidden"], a["weight"], a["targets"], a["mask"], chunk_rows=5
    ),
    "linear_masked_soft_cross_entropy_with_grad": (
        lambda a: sc.linear_masked_soft_cross_entropy_with_grad(
            a["hidden"], a["weight"], a["targets"], a["mask"], chunk_rows=5
        )
    ),
    "prepare_targets": lambda a: eagle3.prepare_targets(
        a["hidden"] @ a["target_weight"].T, a["mask"], a["t2d"]
    ),
    "prepare_targets_from_hidden": lambda a: eagle3.prepare_targets_from_hidden(
        a["target_hidden"], a["target_weight"], a["mask"], a["t2d"], chunk_rows=5, chunk_vocab=4
    ),
    "prepare_top_k_targets_from_hidden": lambda a: eagle3.prepare_top_k_targets_from_hidden(
        a["target_hidden"], a["target_weight"], a["mask"], a["t2d"], 2, chunk_rows=5
    ),
    "top_k_targets": lambda a: eagle3.top_k_targets(a["targets"], 2),
    "draft_accuracy": lambda a: eagle3.draft_accuracy(a["logits"], a["targets"], a["mask"]),
    "draft_to_target_ids": lambda a: eagle3.draft_to_target_ids(a["ids"], a["d2t"]),
    "target_to_draft_ids": lambda a: eagle3.target_to_draft_ids(a["ids"], a["t2d"]),
    "build_vocab_mapping": lambda a: eagle3.build_vocab_mapping(a["counts"], DRAFT_VOCAB),
    "shift_left": lambda a: eagle3.shift_left(a["logits"]),
    "multi_step_loss": lambda a: eagle3.multi_step_loss(a["step_losses"]),
}


def arrays_of(result: Any) -> list[Any]:
    """The arrays in a result: an array, or a tuple or NamedTuple of them (None skipped)."""
    if isinstance(result, tuple):
        return [array for part in result for array in arrays_of(part)]
    return [] if result is None else [result]


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_results_stay_on_the_inputs_device_with_the_default_devices_values(call):
    inputs = host_inputs(7)
    on_default = call({name: xp.asarray(value) for name, value in inputs.items()})
    on_other = call(
        {name: xp.asarray(value, device=OTHER_DEVICE) for name, value in inputs.items()}
    )

    expected, got = arrays_of(on_default), arrays_of(on_other)
    assert len(got) == len(expected) > 0
    for array, oracle in zip(got, expected, strict=True):
        assert array.device == OTHER_DEVICE
        np.testing.assert_array_equal(
            np.asarray(xp.asarray(array, device=xp.Device("CPU_DEVICE"))), np.asarray(oracle)
        )
