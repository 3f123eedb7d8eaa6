"""Row statistics of parts of the vocabulary combine into those of the whole row."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from softce_multi import _core


def statistics(z: np.ndarray, p: np.ndarray) -> _core.RowStatistics:
    with np.errstate(all="ignore"):
        return _core.row_statistics(z, p, xp=np)


def assert_statistics_equal(actual: _core.RowStatistics, expected: _core.RowStatistics) -> None:
    for name, a, e in zip(_core.RowStatistics._fields, actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("split", [1, 3, 6])
def test_merging_two_parts_gives_the_statistics_of_the_row(split):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4, 7)) * 5
    p = rng.random((4, 7))
    p[p < 0.3] = 0.0

    merged = _core.merge_statistics(
        statistics(z[:, :split], p[:, :split]), statistics(z[:, split:], p[:, split:]), xp=np
    )

    assert_statistics_equal(merged, statistics(z, p))


def test_a_part_of_minus_inf_logits_does_not_raise_the_shift():
    rng = np.random.default_rng(1)
    # Every logit far below 0, so the convention shift 0 of an all -inf part would underflow.
    z = rng.standard_normal((3, 6)) - 200.0
    z[:, 3:] = -np.inf
    p = rng.random((3, 6))
    p[:, 3:] = 0.0

    merged = _core.merge_statistics(
        statistics(z[:, :3], p[:, :3]), statistics(z[:, 3:], p[:, 3:]), xp=np
    )

    assert_statistics_equal(merged, statistics(z, p))
    assert np.all(merged.sum_exp >= 1.0)


def test_shifted_parts_add_up_to_the_row_over_many_shards():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((5, 20)) * 3
    p = rng.random((5, 20))
    bounds = [0, 2, 9, 10, 20]
    parts = [statistics(z[:, a:b], p[:, a:b]) for a, b in itertools.pairwise(bounds)]

    maximum = np.max([_core.merge_candidate(part, xp=np) for part in parts], axis=0)
    shift = _core.common_shift(maximum, xp=np)
    shifted = [_core.shift_statistics(part, shift, xp=np) for part in parts]
    sums = [sum(field) for field in zip(*shifted, strict=True)]
    total = _core.RowStatistics(shift, *sums[1:])

    assert_statistics_equal(total, statistics(z, p))
