"""Random inputs of the loss: logits, targets and masks as NumPy arrays or on a backend."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from softce_multi._types import Array
from softce_multi.testing._backends import Backend, to_float64

__all__ = [
    "Case",
    "RandomInputs",
    "compute_dtype",
    "make_case",
    "random_inputs",
    "random_logits",
    "random_mask",
    "random_targets",
]


def random_logits(
    rng: np.random.Generator, shape: tuple[int, ...], scale: float = 3.0
) -> np.ndarray:
    """Normal float64 logits of standard deviation ``scale``."""
    return rng.standard_normal(shape) * scale


def random_targets(
    rng: np.random.Generator, shape: tuple[int, ...], *, normalised: bool = True
) -> np.ndarray:
    """Non-negative float64 targets with some exact zeros; rows sum to 1 if ``normalised``
    (a row of zeros becomes uniform)."""
    targets = rng.random(shape) ** 3
    targets[rng.random(shape) < 0.2] = 0.0
    if normalised and shape[-1] > 0:
        totals = targets.sum(axis=-1, keepdims=True)
        targets = np.where(totals > 0, targets / np.where(totals > 0, totals, 1.0), 1.0 / shape[-1])
    return targets


# The mask kinds of random_mask (boolean, int32 0/1, non-negative float weights), and which
# positions it makes valid (about 70% of them, all, none).
_MASK_KINDS = ("bool", "int", "float")
_VALID = ("random", "all", "none")


def _check_choice(argument: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        msg = f"{argument} must be one of {', '.join(map(repr, allowed))}; got {value!r}"
        raise ValueError(msg)


def random_mask(
    rng: np.random.Generator,
    positions: tuple[int, ...],
    *,
    kind: str = "bool",
    valid: str = "random",
) -> np.ndarray:
    """A mask over ``positions``.

    ``kind`` is ``"bool"``, ``"int"`` (int32 0/1) or ``"float"`` (non-negative weights, some 0);
    ``valid`` is ``"random"`` (about 70% valid, at least one unless there is no position),
    ``"all"`` or ``"none"``. Any other ``kind`` or ``valid`` is a ValueError.
    """
    _check_choice("kind", kind, _MASK_KINDS)
    _check_choice("valid", valid, _VALID)
    if valid == "all":
        keep = np.ones(positions, dtype=bool)
    elif valid == "none":
        keep = np.zeros(positions, dtype=bool)
    else:
        keep = rng.random(positions) < 0.7
        if keep.size:
            keep.flat[rng.integers(keep.size)] = True
    if kind == "bool":
        return keep
    if kind == "int":
        return keep.astype(np.int32)
    weights = rng.choice(np.array([0.25, 0.5, 1.0, 2.5]), size=positions)
    return np.where(keep, weights, 0.0)


class RandomInputs(NamedTuple):
    """The three array arguments of the loss: logits, target probabilities, position mask."""

    logits: Array
    target_probs: Array
    position_mask: Array

    def astype(self, dtype: str) -> RandomInputs:
        """NumPy copies with the logits and the targets in ``dtype``, the mask unchanged."""
        return RandomInputs(
            np.asarray(self.logits).astype(dtype),
            np.asarray(self.target_probs).astype(dtype),
            np.asarray(self.position_mask).copy(),
        )

    def on(self, backend: Backend, dtype: str = "float32") -> RandomInputs:
        """Copies on ``backend``: logits and targets in ``dtype``, the mask in its own dtype.

        Skips the calling pytest test if the backend has no ``dtype``.
        """
        return RandomInputs(
            backend.asarray(self.logits, dtype),
            backend.asarray(self.target_probs, dtype),
            _mask_on(backend, self.position_mask),
        )


def _mask_on(backend: Backend, mask: np.ndarray) -> Array:
    """``mask`` on ``backend`` in its own dtype, or float32 for float64 weights on a backend
    without float64 (JAX without ``jax_enable_x64``): :func:`random_mask`'s weights are exact
    there."""
    mask = np.asarray(mask)
    if mask.dtype == np.float64 and not backend.supports("float64"):
        mask = mask.astype(np.float32)
    return backend.asarray(mask)


def random_inputs(
    seed: int | np.random.Generator,
    shape: tuple[int, ...],
    *,
    scale: float = 3.0,
    offset: float = 0.0,
    normalised: bool = True,
    mask_kind: str = "bool",
    valid: str = "random",
) -> RandomInputs:
    """Random inputs of the loss for logits of ``shape``, as NumPy arrays.

    Parameters
    ----------
    seed
        A seed, or the generator to draw from (drawn from in place).
    shape
        ``[..., V]``: the shape of the logits and the targets; the mask has ``shape[:-1]``.
        Any axis may be empty.
    scale, offset
        The logits are ``offset`` plus normal noise of standard deviation ``scale`` (float64).
    normalised
        As in :func:`random_targets` (float64).
    mask_kind, valid
        As in :func:`random_mask` (``kind`` and ``valid``).

    Returns
    -------
    RandomInputs
        NumPy arrays; :meth:`RandomInputs.astype` and :meth:`RandomInputs.on` convert them.
        The same seed gives the same inputs as :func:`make_case` with that seed.

    Raises
    ------
    ValueError
        If ``shape`` has no axis, or ``mask_kind`` or ``valid`` is not one of the values
        :func:`random_mask` takes.

    Examples
    --------
    >>> from softce_multi.testing import random_inputs
    >>> inputs = random_inputs(0, (2, 3, 5)).astype("float32")
    >>> inputs.logits.dtype, inputs.target_probs.shape, inputs.position_mask.shape
    (dtype('float32'), (2, 3, 5), (2, 3))
    """
    if len(shape) == 0:
        msg = "shape must have at least one axis, the vocabulary's: [..., V]"
        raise ValueError(msg)
    _check_choice("mask_kind", mask_kind, _MASK_KINDS)
    _check_choice("valid", valid, _VALID)
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, shape[:-1], kind=mask_kind, valid=valid)
    logits = offset + random_logits(rng, shape, scale)
    return RandomInputs(logits, random_targets(rng, shape, normalised=normalised), mask)


class Case(NamedTuple):
    """Inputs on a backend, and the exact float64 values they hold (for the oracle)."""

    logits: Array
    target_probs: Array
    position_mask: Array
    z: np.ndarray
    p: np.ndarray
    w: np.ndarray


def make_case(
    backend: Backend,
    rng: int | np.random.Generator,
    shape: tuple[int, ...],
    *,
    logits_dtype: str = "float32",
    target_dtype: str = "float32",
    mask_kind: str = "bool",
    mask_trailing_one: bool = False,
    valid: str = "random",
    scale: float = 3.0,
    offset: float = 0.0,
    normalised: bool = True,
) -> Case:
    """Random inputs of ``shape`` on ``backend`` (skips the test if a dtype is missing).

    The values are those of :func:`random_inputs` with the same arguments; ``rng`` may also
    be a seed. ``mask_trailing_one`` gives the mask the shape ``[..., 1]``.
    """
    backend.require(logits_dtype, target_dtype)
    inputs = random_inputs(
        rng,
        shape,
        scale=scale,
        offset=offset,
        normalised=normalised,
        mask_kind=mask_kind,
        valid=valid,
    )
    mask = inputs.position_mask
    if mask_trailing_one:
        mask = mask.reshape((*shape[:-1], 1))
    logits = backend.asarray(inputs.logits, logits_dtype)
    targets = backend.asarray(inputs.target_probs, target_dtype)
    return Case(
        logits,
        targets,
        _mask_on(backend, mask),
        to_float64(logits),
        to_float64(targets),
        mask.astype(np.float64),
    )


def compute_dtype(logits_dtype: str, target_dtype: str) -> str:
    """The dtype the loss is computed and returned in, from the inputs' dtype names."""
    return "float64" if "float64" in (logits_dtype, target_dtype) else "float32"
