"""Loops over chunks of rows: one eager loop and one traced (``jax.lax.scan``) loop.

A chunked computation is written once, as a step ``step(start, size, carry) -> carry`` that
reads its block with ``loop.get`` and writes its results with ``loop.put``, and
:func:`over_chunks` runs it over ``range(total)`` in order, in chunks of ``size``:

* the eager :data:`EAGER` loop (NumPy, CuPy, torch, array-api-strict) is a Python loop over
  slices, and writes its results in place;
* the traced loop of :func:`traced` (JAX, under ``jit``) folds the full chunks with one
  ``lax.scan`` body, reads them with ``lax.dynamic_slice`` and writes them with
  ``lax.dynamic_update_slice``, which XLA performs in place on the loop's carry.

When ``size`` does not divide ``total``, one chunk is shorter: it gets a step of its own, with
static sizes, so no chunk ever reads past the end or recomputes rows of another. The eager loop
runs it last, so that a buffer made for the first chunk fits every chunk. The traced loop runs it
first, so that the loop is the last to write the outputs: XLA then returns them without a copy
(an update after the loop, fused with the reshape of the result, would copy the whole output).

The traced loop reads 16-bit floats as their bits: XLA's CPU backend computes 16-bit floats in
float32, and a slice of a 16-bit array taken as floats would convert the whole array to float32
first. The derivative of such a read is the same read of the tangent (JAX differentiates no
bitcast).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

from softce_multi import _compat
from softce_multi._types import Array, Namespace

__all__ = [
    "EAGER",
    "Loop",
    "check_not_split",
    "loop_for",
    "over_chunks",
    "split_over_devices",
    "traced",
]

#: ``step(start, size, carry)``: the new carry after the chunk of ``size`` items at ``start``
#: (``start`` is an ``int``, or a traced integer in the full chunks of the traced loop).
Step = Callable[[Any, int, Any], Any]


class Loop(NamedTuple):
    """How an engine loops over chunks and reads and writes their blocks."""

    fold: Callable[[int, Callable[[Any, Any], Any], Any], Any]
    """``fold(count, body, carry)``: ``carry = body(index, carry)`` for ``index`` in
    ``range(count)``; ``body`` is traced once by the traced loop."""
    get: Callable[[Array, tuple[Any, ...], tuple[int, ...]], Array]
    """``get(x, starts, sizes)``: the block of ``x`` of shape ``sizes`` at ``starts``."""
    put: Callable[[Array, tuple[Any, ...], Array], Array]
    """``put(out, starts, value)``: ``out`` with the block at ``starts`` set to ``value`` (in
    place where the engine can)."""
    short_first: bool
    """Whether a shorter chunk (``size`` not dividing ``total``) runs first, else last."""


def over_chunks(total: int, size: int, step: Step, carry: Any, loop: Loop) -> Any:
    """Apply ``step(start, size, carry)`` to ``range(total)`` in chunks of ``size``, in order.

    Parameters
    ----------
    total
        The number of items (rows, or columns) to cover; 0 returns ``carry`` unchanged.
    size
        Items per chunk, at least 1; a size beyond ``total`` is ``total``.
    step
        The work of one chunk (see :data:`Step`).
    carry
        The initial state, a pytree of arrays for the traced loop.
    loop
        :data:`EAGER`, or :func:`traced`.

    Returns
    -------
    The carry after the last chunk. The chunks cover ``range(total)`` in order: the full ones
    through ``loop.fold``, and a shorter one, when ``size`` does not divide ``total``, with a
    step of its own and its static size, first or last as ``loop.short_first`` says.
    """
    if not is_static(total):
        return step(0, total, carry)
    if total == 0:
        return carry
    size = max(1, min(size, total))  # a chunk beyond the end would be traced even if never run
    full, rest = total // size, total % size  # Dynamo has no divmod of symbolic sizes
    first = rest if loop.short_first else 0
    if rest and loop.short_first:
        carry = step(0, rest, carry)
    carry = loop.fold(full, lambda index, state: step(first + index * size, size, state), carry)
    if rest and not loop.short_first:
        carry = step(full * size, rest, carry)
    return carry


def _eager_fold(count: int, body: Callable[[Any, Any], Any], carry: Any) -> Any:
    for index in range(count):
        carry = body(index, carry)
    return carry


def _block(starts: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(start, start + size) for start, size in zip(starts, sizes, strict=True))


def _eager_get(x: Array, starts: tuple[int, ...], sizes: tuple[int, ...]) -> Array:
    return x[_block(starts, sizes)]


def _eager_put(out: Array, starts: tuple[int, ...], value: Array) -> Array:
    out[_block(starts, tuple(value.shape))] = value
    return out


#: The eager loop: a Python loop over slices; blocks are views, and written in place.
EAGER = Loop(fold=_eager_fold, get=_eager_get, put=_eager_put, short_first=False)


@functools.cache
def traced() -> Loop:
    """The traced loop of JAX: ``lax.scan``, ``lax.dynamic_slice``, ``lax.dynamic_update_slice``.

    Built on first use, so that this module does not import JAX.
    """
    import jax
    import jax.numpy as jnp

    def fold(count: int, body: Callable[[Any, Any], Any], carry: Any) -> Any:
        def scan_body(state: Any, index: Any) -> tuple[Any, None]:
            return body(index, state), None

        if count == 0:
            return carry
        indices = jnp.arange(count)
        # A scan's carry keeps its type. Inside jax.shard_map a carry of zeros made by the
        # caller varies over no mesh axis, and the body's results over those of its inputs;
        # then the first chunk runs on its own and its results are the loop's carry. Where the
        # types agree, that first run is unused and XLA drops it.
        first = body(indices[0], carry)
        if _types_of(first) == _types_of(carry):
            return jax.lax.scan(scan_body, carry, indices)[0]
        return jax.lax.scan(scan_body, first, indices[1:])[0]

    def _types_of(tree: Any) -> list[Any]:
        return [jax.typeof(leaf) for leaf in jax.tree.leaves(tree)]

    def is_half(x: Any) -> bool:
        return jnp.dtype(x.dtype).itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)

    def get(x: Any, starts: tuple[Any, ...], sizes: tuple[int, ...]) -> Any:
        # The whole array is itself: no slice, which on an array split over devices (a mesh's
        # explicit axes) XLA would have to gather.
        return x if tuple(sizes) == tuple(x.shape) else get_slice(x, starts, sizes)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
    def get_slice(x: Any, starts: tuple[Any, ...], sizes: tuple[int, ...]) -> Any:
        if not is_half(x):
            return jax.lax.dynamic_slice(x, starts, sizes)
        bits = jax.lax.dynamic_slice(jax.lax.bitcast_convert_type(x, jnp.uint16), starts, sizes)
        return jax.lax.bitcast_convert_type(bits, x.dtype)

    @get_slice.defjvp
    def get_derivative(sizes: tuple[int, ...], primals: Any, tangents: Any) -> Any:
        (x, starts), (x_tangent, _) = primals, tangents
        return get_slice(x, starts, sizes), jax.lax.dynamic_slice(x_tangent, starts, sizes)

    def put(out: Any, starts: tuple[Any, ...], value: Any) -> Any:
        return jax.lax.dynamic_update_slice(out, jnp.astype(value, out.dtype), starts)

    return Loop(fold=fold, get=get, put=put, short_first=True)


def loop_for(xp: Namespace) -> Loop:
    """The loop of the engine of namespace ``xp``: :func:`traced` for JAX, else :data:`EAGER`."""
    return traced() if _compat.is_jax_namespace(xp) else EAGER


def is_static(*sizes: Any) -> bool:
    """Whether no size is one of ``jax.export``'s symbolic sizes, an expression whose comparison
    with a number is inconclusive, so that no loop over chunks can be planned on it (the rows
    then go in one chunk). PyTorch's symbolic sizes under ``torch.compile`` compare with
    numbers (Dynamo guards on the outcome), and count as static."""
    return not any(_compat.is_jax_symbolic_size(size) for size in sizes)


def split_over_devices(x: Any) -> bool:
    """Whether ``x`` is a JAX array whose type splits an axis of it over devices (a mesh's
    explicit axes, ``jax.make_mesh``'s default).

    A loop over chunks of rows of such an array would need the rows of every device. With
    automatic axes the type does not say, and this is False; inside ``jax.shard_map`` each
    device's block is whole, and this is False too.
    """
    if not _compat.is_jax_array(x):
        return False
    import jax

    spec = getattr(jax.typeof(x).sharding, "spec", None)
    return spec is not None and any(entry is not None for entry in spec)


def check_not_split(function: str, **arrays: Any) -> None:
    """Refuse arrays split over devices (:func:`split_over_devices`) for ``function``, whose
    chunk loops need every row and every column of them, naming each with its layout."""
    split = {name: x for name, x in arrays.items() if x is not None and split_over_devices(x)}
    if split:
        import jax

        layouts = ", ".join(f"{name} {jax.typeof(x).sharding.spec}" for name, x in split.items())
        msg = (
            f"{function}: its chunk loops need whole rows and columns, and cannot run on arrays "
            f"split over devices by a mesh's explicit axes; got {layouts}. Call it inside "
            "jax.shard_map, where each device's block is whole "
            "(softce_multi.distributed.global_num_valid gives the global count of a split "
            "batch; the vocabulary-parallel functions take a split vocabulary)"
        )
        raise ValueError(msg)
