"""Bad inputs: each raises the same exception type on every backend, naming the argument."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import softce_multi as sc
from softce_multi import eagle3
from softce_multi.testing import (
    Backend,
    to_numpy,
)

from .strategies import (
    FLOATS,
    MASK_DTYPES,
    each_backend,
    fuzz,
    on_backend,
)

# NumPy warns of the NaN and infinities in padding; they are the point.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


class Context(NamedTuple):
    """Valid arguments around a bad one: a backend, positions, vocabulary, dtypes."""

    backend: Backend
    positions: tuple[int, ...]
    vocab: int
    float_dtype: str
    mask_dtype: str

    def floats(self, shape: tuple[int, ...] | None = None, dtype: str | None = None) -> Any:
        shape = (*self.positions, self.vocab) if shape is None else shape
        values = np.random.default_rng(0).random(shape)
        return on_backend(self.backend, values, dtype or self.float_dtype)

    def mask(self, shape: tuple[int, ...] | None = None) -> Any:
        shape = self.positions if shape is None else shape
        return on_backend(self.backend, np.ones(shape), self.mask_dtype)

    def loss_args(self) -> tuple[Any, Any, Any]:
        return self.floats(), self.floats(), self.mask()

    def ints(self, values: Any, dtype: str = "int64") -> Any:
        return on_backend(self.backend, np.asarray(values), dtype)

    def t2d(self, size: int | None = None) -> Any:
        return on_backend(self.backend, np.arange(size or self.vocab) % 2 == 0, "bool")

    def linear_args(self, hidden_size: int = 4) -> tuple[Any, Any, Any, Any]:
        return (
            self.floats((*self.positions, hidden_size)),
            self.floats((self.vocab, hidden_size)),
            self.floats(),
            self.mask(),
        )


class Bad(NamedTuple):
    """A call with one bad argument, the exception it must raise, the argument it must name."""

    name: str
    call: Callable[[Context], Any]
    error: type[Exception]
    argument: str

    def __repr__(self) -> str:
        return self.name


def _loss_variants(name: str, call: Callable[..., Any], error: type, argument: str) -> list:
    """The bad call of the loss, and of the loss with its gradient."""
    return [
        Bad(f"{name} (loss)", lambda c: call(c, sc.masked_soft_cross_entropy), error, argument),
        Bad(
            f"{name} (with_grad)",
            lambda c: call(c, sc.masked_soft_cross_entropy_with_grad),
            error,
            argument,
        ),
    ]


def _with_last_axis(c: Context, extra: int) -> Any:
    return c.floats((*c.positions, c.vocab + extra))


BAD_INPUTS = [
    *_loss_variants(
        "targets of another vocabulary",
        lambda c, f: f(c.floats(), _with_last_axis(c, 1), c.mask()),
        ValueError,
        "target_probs",
    ),
    *_loss_variants(
        "targets of another vocabulary, by keyword",
        lambda c, f: f(
            position_mask=c.mask(), target_probs=_with_last_axis(c, 1), logits=c.floats()
        ),
        ValueError,
        "target_probs",
    ),
    *_loss_variants(
        "targets under another name",
        lambda c, f: f(logits=c.floats(), targets=c.floats(), position_mask=c.mask()),
        TypeError,
        "targets",
    ),
    *_loss_variants(
        "a mask with a trailing 2",
        lambda c, f: f(c.floats(), c.floats(), c.mask((*c.positions, 2))),
        ValueError,
        "position_mask",
    ),
    *_loss_variants(
        "a mask with one axis less",
        lambda c, f: f(c.floats(), c.floats(), c.mask(c.positions[:-1])),
        ValueError,
        "position_mask",
    ),
    *_loss_variants(
        "integer logits",
        lambda c, f: f(c.ints(np.ones((*c.positions, c.vocab)), "int32"), c.floats(), c.mask()),
        TypeError,
        "logits",
    ),
    *_loss_variants(
        "bool targets",
        lambda c, f: f(c.floats(), c.ints(np.ones((*c.positions, c.vocab)), "bool"), c.mask()),
        TypeError,
        "target_probs",
    ),
    *_loss_variants(
        "0-d logits",
        lambda c, f: f(c.floats(()), c.floats(()), c.mask(())),
        ValueError,
        "logits",
    ),
    *_loss_variants(
        "an empty vocabulary",
        lambda c, f: f(_with_last_axis(c, -c.vocab), _with_last_axis(c, -c.vocab), c.mask()),
        ValueError,
        "logits",
    ),
    *_loss_variants(
        "logits as a list",
        lambda c, f: f(to_numpy(c.floats()).tolist(), c.floats(), c.mask()),
        TypeError,
        "logits",
    ),
    *_loss_variants(
        "targets of another library",
        lambda c, f: f(
            c.floats(),
            to_numpy(c.floats()) if c.backend.library != "numpy" else [0.5] * c.vocab,
            c.mask(),
        ),
        TypeError,
        "target_probs",
    ),
    *_loss_variants(
        "an unknown reduction",
        lambda c, f: f(*c.loss_args(), reduction="avg"),
        ValueError,
        "reduction",
    ),
    *_loss_variants(
        "a negative num_valid",
        lambda c, f: f(*c.loss_args(), num_valid=-1),
        ValueError,
        "num_valid",
    ),
    *_loss_variants(
        "a NaN num_valid",
        lambda c, f: f(*c.loss_args(), num_valid=math.nan),
        ValueError,
        "num_valid",
    ),
    *_loss_variants(
        "num_valid beyond every float",
        lambda c, f: f(*c.loss_args(), num_valid=10**400),
        ValueError,
        "num_valid",
    ),
    *_loss_variants(
        "a bool num_valid", lambda c, f: f(*c.loss_args(), num_valid=True), TypeError, "num_valid"
    ),
    *_loss_variants(
        "a string num_valid",
        lambda c, f: f(*c.loss_args(), num_valid="3"),
        TypeError,
        "num_valid",
    ),
    *_loss_variants(
        "num_valid with the sum",
        lambda c, f: f(*c.loss_args(), reduction="sum", num_valid=3),
        ValueError,
        "num_valid",
    ),
    *_loss_variants(
        "a 1-D num_valid",
        lambda c, f: f(*c.loss_args(), num_valid=c.ints([3])),
        ValueError,
        "num_valid",
    ),
    *_loss_variants(
        "a bool array num_valid",
        lambda c, f: f(*c.loss_args(), num_valid=c.ints(True, "bool")),
        TypeError,
        "num_valid",
    ),
    Bad(
        "no reduction with a gradient",
        lambda c: sc.masked_soft_cross_entropy_with_grad(*c.loss_args(), reduction="none"),
        ValueError,
        "reduction",
    ),
    Bad(
        "a weight of another hidden size",
        lambda c: sc.linear_masked_soft_cross_entropy(
            c.floats((*c.positions, 4)), c.floats((c.vocab, 5)), c.floats(), c.mask()
        ),
        ValueError,
        "weight",
    ),
    Bad(
        "a weight of another hidden size, by keyword",
        lambda c: sc.linear_masked_soft_cross_entropy_with_grad(
            c.floats((*c.positions, 4)),
            position_mask=c.mask(),
            target_probs=c.floats(),
            weight=c.floats((c.vocab, 5)),
        ),
        ValueError,
        "weight",
    ),
    Bad(
        "hidden states under another name",
        lambda c: sc.linear_masked_soft_cross_entropy(
            hidden_states=c.floats((*c.positions, 4)),
            weight=c.floats((c.vocab, 4)),
            target_probs=c.floats(),
            position_mask=c.mask(),
        ),
        TypeError,
        "hidden_states",
    ),
    Bad(
        "a bias of another vocabulary",
        lambda c: sc.linear_masked_soft_cross_entropy_with_grad(
            *c.linear_args(), bias=c.floats((c.vocab + 1,))
        ),
        ValueError,
        "bias",
    ),
    Bad(
        "zero rows per chunk",
        lambda c: sc.linear_masked_soft_cross_entropy(*c.linear_args(), chunk_rows=0),
        ValueError,
        "chunk_rows",
    ),
    Bad(
        "a fractional chunk",
        lambda c: sc.linear_masked_soft_cross_entropy_with_grad(*c.linear_args(), chunk_rows=2.5),
        TypeError,
        "chunk_rows",
    ),
    Bad(
        "integer hidden states",
        lambda c: sc.linear_masked_soft_cross_entropy(
            c.ints(np.ones((*c.positions, 4))), *c.linear_args()[1:]
        ),
        TypeError,
        "hidden",
    ),
    Bad(
        "an axis out of range",
        lambda c: eagle3.shift_left(c.floats(), axis=len(c.positions) + 1),
        ValueError,
        "axis",
    ),
    Bad(
        "a fill beyond uint8",
        lambda c: eagle3.shift_left(c.ints(np.ones((2, 3)), "uint8"), fill=256),
        TypeError,
        "fill",
    ),
    Bad(
        "a fractional fill of integers",
        lambda c: eagle3.shift_left(c.ints(np.ones((2, 3)), "int16"), fill=0.5),
        TypeError,
        "fill",
    ),
    Bad(
        "unsigned target ids",
        lambda c: eagle3.target_to_draft_ids(c.ints([1, 2], "uint8"), c.t2d()),
        TypeError,
        "target_ids",
    ),
    Bad(
        "an integer t2d",
        lambda c: eagle3.target_to_draft_ids(c.ints([1, 2]), c.ints(np.ones(c.vocab))),
        TypeError,
        "t2d",
    ),
    Bad(
        "a 2-D d2t",
        lambda c: eagle3.draft_to_target_ids(c.ints([0, 1]), c.ints(np.zeros((2, 2)))),
        ValueError,
        "d2t",
    ),
    Bad(
        "floating draft ids",
        lambda c: eagle3.draft_to_target_ids(c.floats((2,)), c.ints([0, 1])),
        TypeError,
        "draft_ids",
    ),
    Bad(
        "an empty draft vocabulary",
        lambda c: eagle3.build_vocab_mapping(c.ints(np.arange(c.vocab)), 0),
        ValueError,
        "draft_vocab_size",
    ),
    Bad(
        "a draft vocabulary beyond the target's",
        lambda c: eagle3.build_vocab_mapping(c.ints(np.arange(c.vocab)), c.vocab + 1),
        ValueError,
        "draft_vocab_size",
    ),
    Bad(
        "a forced id beyond the vocabulary",
        lambda c: eagle3.build_vocab_mapping(
            c.ints(np.arange(c.vocab)), 1, always_include=[c.vocab]
        ),
        ValueError,
        "always_include",
    ),
    Bad(
        "a single forced id",
        lambda c: eagle3.build_vocab_mapping(c.ints(np.arange(c.vocab)), 1, always_include=0),
        TypeError,
        "always_include",
    ),
    Bad(
        "2-D token counts",
        lambda c: eagle3.build_vocab_mapping(c.ints(np.ones((2, c.vocab))), 1),
        ValueError,
        "token_counts",
    ),
    Bad(
        "a t2d of another vocabulary",
        lambda c: eagle3.prepare_targets(c.floats(), c.mask(), c.t2d(c.vocab + 1)),
        ValueError,
        "target_logits",
    ),
    Bad(
        "a t2d choosing nothing",
        lambda c: eagle3.prepare_targets(
            c.floats(), c.mask(), on_backend(c.backend, np.zeros(c.vocab), "bool")
        ),
        ValueError,
        "t2d",
    ),
    Bad(
        "a loss mask of another shape",
        lambda c: eagle3.prepare_targets(c.floats(), c.mask((*c.positions, 3)), c.t2d()),
        ValueError,
        "loss_mask",
    ),
    Bad(
        "a head weight of another hidden size",
        lambda c: eagle3.prepare_targets_from_hidden(
            c.floats((*c.positions, 4)), c.floats((c.vocab, 3)), c.mask(), c.t2d()
        ),
        ValueError,
        "target_head_weight",
    ),
    Bad(
        "zero columns per chunk",
        lambda c: eagle3.prepare_targets_from_hidden(
            c.floats((*c.positions, 4)), c.floats((c.vocab, 4)), c.mask(), c.t2d(), chunk_vocab=0
        ),
        ValueError,
        "chunk_vocab",
    ),
    Bad(
        "no step losses",
        lambda c: eagle3.multi_step_loss([]),
        ValueError,
        "step_losses",
    ),
    Bad(
        "2-D step losses",
        lambda c: eagle3.multi_step_loss(c.floats((2, 2))),
        ValueError,
        "step_losses",
    ),
    Bad(
        "a negative decay",
        lambda c: eagle3.multi_step_loss([c.floats(())], decay=-0.5),
        ValueError,
        "decay",
    ),
    Bad(
        "an integer normalize",
        lambda c: eagle3.multi_step_loss([c.floats(())], normalize=1),
        TypeError,
        "normalize",
    ),
    Bad(
        "an accuracy mask of another shape",
        lambda c: eagle3.draft_accuracy(c.floats(), c.floats(), c.mask((*c.positions, 2))),
        ValueError,
        "position_mask",
    ),
]


@fuzz
@given(
    bad=st.sampled_from(BAD_INPUTS),
    positions=st.sampled_from([(3,), (2, 3), (1, 4, 2)]),
    vocab=st.sampled_from([1, 2, 7]),
    float_dtype=st.sampled_from(FLOATS),
    mask_dtype=st.sampled_from(MASK_DTYPES),
)
def test_a_bad_input_raises_the_same_error_naming_the_argument_on_every_backend(
    bad: Bad, positions: tuple[int, ...], vocab: int, float_dtype: str, mask_dtype: str
) -> None:
    chosen = each_backend(float_dtype, mask_dtype)
    raised = {}
    for backend in chosen:
        with pytest.raises(Exception) as caught:  # the type is compared below
            bad.call(Context(backend, positions, vocab, float_dtype, mask_dtype))
        raised[backend.name] = caught
    types = {name: caught.type.__name__ for name, caught in raised.items()}
    assert set(types.values()) == {bad.error.__name__}, f"{bad.name}: {types}"
    for name, caught in raised.items():
        assert bad.argument in str(caught.value), f"{name}: {caught.value!r}"


# Every bad input at least once per run, besides those hypothesis draws.
for _bad in BAD_INPUTS:
    test_a_bad_input_raises_the_same_error_naming_the_argument_on_every_backend = example(
        bad=_bad, positions=(2, 3), vocab=7, float_dtype="float32", mask_dtype="bool"
    )(test_a_bad_input_raises_the_same_error_naming_the_argument_on_every_backend)
