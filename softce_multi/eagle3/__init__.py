"""The steps around the loss that every EAGLE-3 trainer needs, for every array-API backend.

An EAGLE-3 draft model predicts over a *draft vocabulary*, a subset of the target model's
vocabulary. Per training step: :func:`build_vocab_mapping` (once, before training) chooses it
and returns the ``d2t``/``t2d`` mappings, which :func:`draft_to_target_ids` and
:func:`target_to_draft_ids` apply to token ids; :func:`shift_left` aligns the target logits, the
input ids and the loss mask with the draft's predictions; :func:`prepare_targets` gives the
target probabilities over the draft vocabulary and the position mask
(:func:`prepare_targets_from_hidden` from the target model's hidden states;
:func:`top_k_targets` and :func:`prepare_top_k_targets_from_hidden` their ``k`` most probable
tokens, for an offline cache); :func:`softce_multi.masked_soft_cross_entropy` the loss of a
test-time step and :func:`draft_accuracy` its top-1 agreement; :func:`multi_step_loss`
combines the steps.
The whole recipe, with the reasons behind it, is in the documentation (:doc:`/eagle3`).

Every function takes NumPy, PyTorch, JAX, CuPy or array-api-strict arrays and returns arrays of
the same library on the same device. Nothing reads a device array back to the host, except
:func:`build_vocab_mapping` when ``always_include`` is an array and :func:`prepare_targets`,
:func:`prepare_targets_from_hidden` and :func:`prepare_top_k_targets_from_hidden` when
``draft_vocab_size`` is not given; given, it is checked
against ``t2d`` on the host where ``t2d`` is there already, on the device elsewhere. The targets
are constants: on PyTorch they come back detached, on JAX behind ``jax.lax.stop_gradient``.
"""

from softce_multi.eagle3._from_hidden import (
    DEFAULT_TARGET_CHUNK_ROWS as DEFAULT_TARGET_CHUNK_ROWS,
)
from softce_multi.eagle3._from_hidden import (
    TARGET_CHUNK_ELEMENTS as TARGET_CHUNK_ELEMENTS,
)
from softce_multi.eagle3._from_hidden import prepare_targets_from_hidden
from softce_multi.eagle3._steps import draft_accuracy, multi_step_loss
from softce_multi.eagle3._targets import prepare_targets, shift_left
from softce_multi.eagle3._top_k import prepare_top_k_targets_from_hidden, top_k_targets
from softce_multi.eagle3._vocabulary import (
    build_vocab_mapping,
    draft_to_target_ids,
    target_to_draft_ids,
)

__all__ = [
    "build_vocab_mapping",
    "draft_accuracy",
    "draft_to_target_ids",
    "multi_step_loss",
    "prepare_targets",
    "prepare_targets_from_hidden",
    "prepare_top_k_targets_from_hidden",
    "shift_left",
    "target_to_draft_ids",
    "top_k_targets",
]
