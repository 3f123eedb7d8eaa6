"""The signatures of the public losses, and a fuzz test for every public function."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import pytest

import softce_multi as sc
from softce_multi import eagle3

from . import test_eagle3 as eagle3_tests
from . import test_linear as linear_tests
from . import test_loss as loss_tests
from . import test_sparse as sparse_tests
from .strategies import (
    BACKENDS,
    LINEAR_ARRAYS,
    LINEAR_OPTIONS,
    LOSS_ARRAYS,
    LOSS_OPTIONS,
)

# NumPy warns of the NaN and infinities in padding; they are the point.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def loss_entry_points() -> list[Any]:
    """Each public loss function, with its array parameters and its options: those of the
    package, and of the adapters whose library is installed."""
    functions = [
        (sc, "masked_soft_cross_entropy", LOSS_ARRAYS, LOSS_OPTIONS),
        (sc, "masked_soft_cross_entropy_with_grad", LOSS_ARRAYS, LOSS_OPTIONS),
        (sc, "linear_masked_soft_cross_entropy", LINEAR_ARRAYS, LINEAR_OPTIONS),
        (sc, "linear_masked_soft_cross_entropy_with_grad", LINEAR_ARRAYS, LINEAR_OPTIONS),
    ]
    for library in ("torch", "jax"):
        if any(backend.library == library for backend in BACKENDS):
            adapter = importlib.import_module(f"softce_multi.{library}")
            functions.append((adapter, "masked_soft_cross_entropy", LOSS_ARRAYS, LOSS_OPTIONS))
    return [
        pytest.param(getattr(module, name), arrays, options, id=f"{module.__name__}.{name}")
        for module, name, arrays, options in functions
    ]


@pytest.mark.parametrize(("function", "arrays", "options"), loss_entry_points())
def test_the_arrays_are_positional_or_keyword_and_the_options_keyword_only(
    function: Callable[..., Any], arrays: tuple[str, ...], options: tuple[str, ...]
) -> None:
    kinds = {name: p.kind for name, p in inspect.signature(function).parameters.items()}
    expected = {
        **dict.fromkeys(arrays, inspect.Parameter.POSITIONAL_OR_KEYWORD),
        **dict.fromkeys(options, inspect.Parameter.KEYWORD_ONLY),
    }
    assert kinds == expected


#: The public functions, and the tests that fuzz each.
FUZZED = {
    "masked_soft_cross_entropy": loss_tests.test_loss_agrees_with_the_oracle_on_every_backend,
    "masked_soft_cross_entropy_with_grad": (
        loss_tests.test_loss_with_grad_agrees_with_the_oracle_on_every_backend
    ),
    "linear_masked_soft_cross_entropy": (
        linear_tests.test_linear_loss_agrees_with_the_oracle_on_every_backend
    ),
    "linear_masked_soft_cross_entropy_with_grad": (
        linear_tests.test_linear_loss_with_grad_agrees_with_the_oracle_on_every_backend
    ),
    "eagle3.build_vocab_mapping": (
        eagle3_tests.test_build_vocab_mapping_chooses_the_most_frequent_tokens
    ),
    "eagle3.draft_accuracy": (
        eagle3_tests.test_draft_accuracy_is_the_share_of_valid_positions_with_the_same_top_token
    ),
    "eagle3.draft_to_target_ids": eagle3_tests.test_draft_to_target_ids_agree_with_the_offsets,
    "eagle3.multi_step_loss": eagle3_tests.test_multi_step_loss_is_the_decayed_weighted_sum,
    "eagle3.prepare_targets": (
        eagle3_tests.test_prepare_targets_gives_the_draft_softmax_and_the_top_token_mask
    ),
    "eagle3.prepare_targets_from_hidden": (
        eagle3_tests.test_prepare_targets_from_hidden_agree_with_the_materialised_logits
    ),
    "eagle3.shift_left": eagle3_tests.test_shift_left_moves_values_one_position_along_the_axis,
    "eagle3.target_to_draft_ids": eagle3_tests.test_target_to_draft_ids_agree_with_a_lookup_table,
    "eagle3.top_k_targets": sparse_tests.test_top_k_targets_are_the_largest_entries_in_order,
    "eagle3.prepare_top_k_targets_from_hidden": (
        sparse_tests.test_prepare_top_k_targets_from_hidden_are_the_top_k_of_the_dense_targets
    ),
}


def test_every_public_function_is_fuzzed() -> None:
    functions = {name for name in sc.__all__ if callable(getattr(sc, name))}
    functions -= {"LinearGradients"}  # a result type, not a function
    public = functions | {f"eagle3.{name}" for name in eagle3.__all__}
    assert public == set(FUZZED)
