"""Rank agreement on the inputs of the torch vocabulary-parallel losses, with its messages.

Before a torch call with ``check_shapes``, every rank validates its arguments and describes
them as :data:`DESCRIPTION_SIZE` int64 (:class:`InputDescription`), or as zeros if it refuses
them; the ranks all-gather the descriptions and read them on the host (:func:`agree_on_inputs`),
and inputs that disagree, or that one rank refuses, raise on every rank
(:func:`disagreement_message` shows each rank's values) instead of hanging in collectives of
mismatched sizes. torch is imported on first use.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from softce_multi import _compat, _core
from softce_multi._types import REDUCTIONS
from softce_multi._validate import is_array

#: Leading dimensions of the inputs that the shape agreement sends one by one, to show them
#: when they differ; the whole shape is compared through its digest (:func:`shape_digest`).
AGREED_DIMS = 8


class InputDescription(NamedTuple):
    """What the ranks must agree on, read from one rank's (already validated) inputs."""

    positions: tuple[int, ...]
    """The shape of the positions (the inputs' leading axes)."""
    mask_ndim: int
    """``position_mask.ndim``."""
    arrays: tuple[Any, ...]
    """The floating inputs (None for an absent bias), for the computation dtype."""
    reduction: str
    num_valid: Any
    hidden_size: int = 0
    """``H`` of the linear loss (0 for the loss of logits)."""
    has_bias: bool = False
    """Whether the linear loss has a bias."""

    def as_ints(self) -> list[int]:
        """The description as :data:`DESCRIPTION_FIELDS`, the digest of the positions' shape,
        then its first :data:`AGREED_DIMS` dimensions (-1 past its end)."""
        present = [array for array in self.arrays if array is not None]
        dtype = _core.compute_dtype(*present, xp=_compat.array_namespace(*present))
        dims = [*self.positions[:AGREED_DIMS], *[-1] * (AGREED_DIMS - len(self.positions))]
        num_valid_kind = 0 if self.num_valid is None else 2 if is_array(self.num_valid) else 1
        return [
            1,
            len(self.positions),
            math.prod(self.positions),
            self.mask_ndim - len(self.positions),
            dtype.itemsize * 8,
            REDUCTIONS.index(self.reduction),
            num_valid_kind,
            self.hidden_size,
            int(self.has_bias),
            shape_digest(self.positions),
            *dims,
        ]


def shape_digest(shape: tuple[int, ...]) -> int:
    """A digest of the whole shape as a non-negative int64, the same in every process."""
    digest = hashlib.blake2b(repr(tuple(shape)).encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


#: The fields of :meth:`InputDescription.as_ints` with how to show them; the digest of the
#: positions' shape and their leading dimensions follow.
DESCRIPTION_FIELDS: tuple[tuple[str, Callable[[int], str]], ...] = (
    ("valid", str),
    ("number of position axes", str),
    ("number of positions", str),
    ("position_mask trailing axis of size 1", lambda extra: "yes" if extra else "no"),
    ("computation dtype", lambda bits: f"float{bits}"),
    ("reduction", lambda index: repr(REDUCTIONS[index])),
    ("num_valid", lambda kind: ("None", "a number", "an array")[kind]),
    ("hidden size", str),
    ("bias", lambda given: "given" if given else "None"),
)

#: How many int64 each rank sends to the shape agreement.
DESCRIPTION_SIZE = len(DESCRIPTION_FIELDS) + 1 + AGREED_DIMS


def agree_on_inputs(describe: Callable[[], InputDescription], *, device: Any, group: Any) -> None:
    """Validate the inputs on every rank and check that the ranks agree on them.

    ``describe`` checks this rank's arguments and describes them. Every rank takes part in one
    ``all_gather`` of :data:`DESCRIPTION_SIZE` int64 per rank, read on the host, whatever
    ``describe`` raises: the rank whose arguments are refused then raises its own error, the
    others a ValueError naming it; if the descriptions differ, every rank raises the same
    ValueError, showing each rank's values.
    """
    import torch
    import torch.distributed as dist

    try:
        ints = describe().as_ints()
        local_error = None
    except Exception as error:  # re-raised after the collective, which the others wait in
        local_error = error
        ints = [0] * DESCRIPTION_SIZE
    local = torch.tensor(ints, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    descriptions = [tuple(row) for row in torch.stack(gathered).tolist()]
    if local_error is not None:
        raise local_error
    refused = [rank for rank, row in enumerate(descriptions) if row[0] == 0]
    if refused:
        msg = (
            f"rank(s) {refused} of the group refused their inputs (the error is raised there), "
            "so no rank computes the vocabulary-parallel loss"
        )
        raise ValueError(msg)
    if len(set(descriptions)) > 1:
        raise ValueError(disagreement_message(descriptions))


def disagreement_message(descriptions: list[tuple[int, ...]]) -> str:
    """Which inputs differ across the ranks, and each rank's value."""
    n_fields = len(DESCRIPTION_FIELDS)
    differences = []
    for index, (name, show) in enumerate(DESCRIPTION_FIELDS):
        values = [row[index] for row in descriptions]
        if len(set(values)) > 1:
            differences.append(f"{name}: " + _per_rank(values, show))
    digests = [row[n_fields] for row in descriptions]
    shapes = [row[n_fields + 1 :] for row in descriptions]
    if not differences and len(set(shapes)) > 1:
        shown = [tuple(dim for dim in dims if dim >= 0) for dims in shapes]
        differences.append("shape of the positions: " + _per_rank(shown, str))
    elif not differences:
        # The shapes differ past the dimensions sent: number them by first appearance.
        numbers = {digest: number for number, digest in enumerate(dict.fromkeys(digests), 1)}
        differences.append(
            f"shape of the positions past their first {AGREED_DIMS} axes: "
            + _per_rank([numbers[digest] for digest in digests], lambda number: f"shape {number}")
        )
    return (
        f"the ranks of the group disagree on the inputs of the vocabulary-parallel loss "
        f"({'; '.join(differences)}); every rank must hold the same positions, with the "
        "same mask shape, dtypes, reduction and num_valid"
    )


def _per_rank(values: list[Any], show: Callable[[Any], str]) -> str:
    """``"a on ranks [0, 2], b on rank [1]"``."""
    ranks: dict[Any, list[int]] = {}
    for rank, value in enumerate(values):
        ranks.setdefault(value, []).append(rank)
    return ", ".join(
        f"{show(value)} on rank{'s' if len(members) > 1 else ''} {members}"
        for value, members in ranks.items()
    )
