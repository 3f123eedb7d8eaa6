"""``bench --linear`` and ``bench --targets``: functions of hidden states that never hold the
``[N, V]`` logits, against the materialised path (``hidden @ weight.T``, then the function of
the logits); with ``--top-k``, ``--targets`` times the top-k targets from hidden states too.

Both paths of a framework run interleaved round by round. Extra peak memory, as a multiple of
one float32 ``[N, V]`` buffer: for torch, the rise of the peak resident set of a fresh process
(:mod:`.measure`); for JAX, XLA's temporaries of the compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from softce_multi import _compat
from softce_multi._cli.bench.cases import Step
from softce_multi._cli.bench.measure import (
    ITEMSIZE,
    MIB,
    in_fresh_process,
    interleaved_times,
    resident_rise,
    unavailable,
    xla_temp_bytes,
)
from softce_multi._types import Reduction

FRAMEWORKS = ("torch", "jax")  # those of --linear and --targets
TOP_K = "top_k"
"""The path of ``prepare_top_k_targets_from_hidden`` (``--targets --top-k K``)."""


class Sizes(NamedTuple):
    """Sizes of a comparison from hidden states, and whether its logits have a bias.

    ``rows`` hidden states of size ``hidden``; ``vocab`` columns of the ``[rows, vocab]`` float32
    array that measures memory (the linear loss's logits, the targets' output, over the draft
    vocabulary); ``target_vocab`` rows of the target head's weight (targets only); ``bias``:
    the logits add a ``[vocab]`` bias, as ``torch.nn.Linear`` does by default (linear only);
    ``autocast``: the name of the dtype of a ``torch.autocast`` around both paths' forward pass
    (linear, torch only), or None; ``reduction``: that of both linear paths (``"none"``'s
    per-position losses are summed, so each gets its own upstream gradient of 1); ``top_k``:
    the ``k`` of a third path, ``prepare_top_k_targets_from_hidden`` (targets only), or None.
    """

    rows: int
    hidden: int
    vocab: int
    target_vocab: int
    bias: bool
    autocast: str | None = None
    reduction: Reduction = "mean"
    top_k: int | None = None

    @property
    def arrays_in_dtype(self) -> int:
        """How many of the input arrays, leading, take the dtype under test: the hidden
        states, the weight and the bias if any. A forward+backward step differentiates them."""
        return 3 if self.bias else 2


@dataclasses.dataclass(frozen=True)
class FromHidden:
    """A function of hidden states that holds only chunks of the logits, and the materialised
    path it equals (``hidden @ weight.T``, then the function of the logits).

    ``function(path, sizes)`` is the computation of ``path`` (:attr:`own` or
    ``"materialised"``) as a function of the arrays ``inputs(sizes, seed)``; the first
    :attr:`Sizes.arrays_in_dtype` of them (the hidden states, the weight, the bias if any) take
    the dtype under test. With :attr:`differentiate`, a step is forward+backward to those;
    otherwise forward only.
    """

    own: str
    function: Callable[[str, Sizes], Callable[..., Any]]
    inputs: Callable[[Sizes, int], tuple[np.ndarray, ...]]
    differentiate: bool
    title: Callable[[Sizes], str]
    """What is compared, at the given sizes."""
    default_rows: tuple[int, ...]
    default_hidden: int


def _random_rows(rng: np.random.Generator, sizes: Sizes, vocab: int) -> tuple[Any, Any]:
    """Standard normal ``[rows, hidden]`` states and a ``[vocab, hidden]`` weight that keeps the
    logits near unit scale, in float32."""
    states = rng.standard_normal((sizes.rows, sizes.hidden), dtype=np.float32)
    weight = rng.standard_normal((vocab, sizes.hidden), dtype=np.float32)
    weight *= np.float32(sizes.hidden**-0.5)
    return states, weight


def _linear_inputs(sizes: Sizes, seed: int) -> tuple[np.ndarray, ...]:
    """Hidden states, the draft head's weight, with ``sizes.bias`` its bias (small, float32),
    probability targets and a bool mask; the same states, weight, targets and mask without the
    bias as with it."""
    rng = np.random.default_rng(seed)
    states, weight = _random_rows(rng, sizes, sizes.vocab)
    target = rng.standard_normal((sizes.rows, sizes.vocab), dtype=np.float32)
    np.exp(target, out=target)
    target /= target.sum(axis=-1, keepdims=True)
    mask = rng.random(sizes.rows) > 0.1
    if not sizes.bias:
        return states, weight, target, mask
    bias = rng.standard_normal(sizes.vocab, dtype=np.float32)
    bias *= np.float32(0.1)
    return states, weight, bias, target, mask


def _linear_function(path: str, sizes: Sizes) -> Callable[..., Any]:
    """The loss of ``path`` as a function of the arrays of :func:`_linear_inputs`."""
    import softce_multi

    def linear(states: Any, weight: Any, bias: Any, target: Any, mask: Any) -> Any:
        return softce_multi.linear_masked_soft_cross_entropy(
            states, weight, target, mask, bias=bias, reduction=sizes.reduction
        ).sum()

    def materialised(states: Any, weight: Any, bias: Any, target: Any, mask: Any) -> Any:
        if _compat.is_torch_array(states):
            import torch

            # nn.Linear's logits: one rounding with a bias, and autocast's dtype under it.
            logits = torch.nn.functional.linear(states, weight, bias)
        else:
            logits = states @ weight.T
            if bias is not None:
                logits = logits + bias
        return softce_multi.masked_soft_cross_entropy(
            logits, target, mask, reduction=sizes.reduction
        ).sum()

    loss = linear if path == "linear" else materialised
    if sizes.bias:
        return loss
    return lambda states, weight, target, mask: loss(states, weight, None, target, mask)


def _linear_title(sizes: Sizes) -> str:
    logits, bias = (
        ("hidden @ weight.T + bias", "a [V] bias as nn.Linear has")
        if sizes.bias
        else ("hidden @ weight.T", "no bias")
    )
    autocast = f", under torch.autocast({sizes.autocast})" if sizes.autocast else ""
    return (
        f"linear_masked_soft_cross_entropy against {logits} then masked_soft_cross_entropy, "
        f"forward+backward; H = {sizes.hidden}, V = {sizes.vocab}, {bias}, "
        f"reduction {sizes.reduction!r}{autocast}"
    )


def _targets_inputs(sizes: Sizes, seed: int) -> tuple[np.ndarray, ...]:
    """The target model's hidden states and head, a bool loss mask and ``t2d``."""
    rng = np.random.default_rng(seed)
    states, weight = _random_rows(rng, sizes, sizes.target_vocab)
    t2d = np.zeros(sizes.target_vocab, dtype=bool)
    t2d[rng.choice(sizes.target_vocab, sizes.vocab, replace=False)] = True
    return states, weight, rng.random(sizes.rows) > 0.1, t2d


def _targets_function(path: str, sizes: Sizes) -> Callable[..., Any]:
    from softce_multi.eagle3 import (
        prepare_targets,
        prepare_targets_from_hidden,
        prepare_top_k_targets_from_hidden,
    )

    if path == "from_hidden":
        return functools.partial(prepare_targets_from_hidden, draft_vocab_size=sizes.vocab)
    if path == TOP_K and sizes.top_k is not None:
        k = sizes.top_k

        def top_k(states: Any, weight: Any, loss_mask: Any, t2d: Any) -> Any:
            return prepare_top_k_targets_from_hidden(
                states, weight, loss_mask, t2d, k, draft_vocab_size=sizes.vocab
            )

        return top_k

    def materialised(states: Any, weight: Any, loss_mask: Any, t2d: Any) -> Any:
        return prepare_targets(states @ weight.T, loss_mask, t2d, draft_vocab_size=sizes.vocab)

    return materialised


def _targets_title(sizes: Sizes) -> str:
    top_k = (
        ""
        if sizes.top_k is None
        else f" and prepare_top_k_targets_from_hidden (top_k, k = {sizes.top_k})"
    )
    return (
        f"prepare_targets_from_hidden{top_k} against prepare_targets(hidden @ weight.T), "
        f"forward; H = {sizes.hidden}, V_target = {sizes.target_vocab}, V_draft = {sizes.vocab}"
    )


FROM_HIDDEN: dict[str, FromHidden] = {
    "linear": FromHidden(
        "linear",
        _linear_function,
        _linear_inputs,
        differentiate=True,
        title=_linear_title,
        default_rows=(2048, 8192),
        default_hidden=256,
    ),
    "targets": FromHidden(
        "from_hidden",
        _targets_function,
        _targets_inputs,
        differentiate=False,
        title=_targets_title,
        default_rows=(4096,),
        default_hidden=128,
    ),
}
"""The comparisons from hidden states, by their option (``bench --linear``, ``--targets``)."""


def _framework_arrays(
    framework: str, arrays: Sequence[np.ndarray], dtype: str, in_dtype: int
) -> tuple[Any, ...]:
    """``arrays`` in ``framework``; the first ``in_dtype`` of them in ``dtype``."""
    if framework == "jax":
        import jax.numpy as jnp

        return tuple(
            jnp.asarray(array, getattr(jnp, dtype)) if index < in_dtype else jnp.asarray(array)
            for index, array in enumerate(arrays)
        )
    import torch

    return tuple(
        torch.from_numpy(array).to(getattr(torch, dtype))
        if index < in_dtype
        else torch.from_numpy(array)
        for index, array in enumerate(arrays)
    )


def _from_hidden_torch_step(comparison: FromHidden, path: str, sizes: Sizes) -> Step:
    function = comparison.function(path, sizes)
    if not comparison.differentiate:
        return function

    import torch

    def step(*arrays: Any) -> Any:
        leaves = [array.detach().requires_grad_(True) for array in arrays[: sizes.arrays_in_dtype]]
        # A training step's forward pass under autocast, its backward pass after it.
        autocast = torch.autocast(
            leaves[0].device.type,
            dtype=getattr(torch, sizes.autocast or "float32"),
            enabled=sizes.autocast is not None,
        )
        with autocast:
            loss = function(*leaves, *arrays[sizes.arrays_in_dtype :])
        loss.backward()
        return tuple(leaf.grad for leaf in leaves)

    return step


def _from_hidden_jax_step(
    comparison: FromHidden, path: str, sizes: Sizes, inputs: Sequence[Any]
) -> tuple[Step, int]:
    """The jitted step and XLA's count of its temporaries, in bytes."""
    import jax

    function = comparison.function(path, sizes)
    if comparison.differentiate:
        function = jax.value_and_grad(function, argnums=tuple(range(sizes.arrays_in_dtype)))
    jitted = jax.jit(function)

    def step(*arrays: Any) -> Any:
        return jax.block_until_ready(jitted(*arrays))

    return step, xla_temp_bytes(jitted, *inputs)


def peak_extra_memory_from_hidden(
    name: str, path: str, sizes: tuple[Any, ...], dtype: str, seed: int
) -> int:
    """Bytes of extra peak resident memory of one torch step of ``path`` of comparison ``name``
    at ``sizes``, the fields of a :class:`Sizes`.

    The libraries are warmed up on a tiny case first, so that no freed buffer of this size is
    reused; ``VmHWM`` is reset once the inputs exist.
    """
    comparison = FROM_HIDDEN[name]
    full = Sizes(*sizes)
    tiny = full._replace(
        rows=8, hidden=8, vocab=16, target_vocab=32, top_k=full.top_k and min(full.top_k, 16)
    )
    warm_up = _from_hidden_torch_step(comparison, path, tiny)
    warm_up(*_framework_arrays("torch", comparison.inputs(tiny, seed), dtype, tiny.arrays_in_dtype))
    step = _from_hidden_torch_step(comparison, path, full)
    inputs = _framework_arrays("torch", comparison.inputs(full, seed), dtype, full.arrays_in_dtype)
    return resident_rise(lambda: step(*inputs))


MemoryOf = Callable[[str, str, Sizes, str, int], int | None]
"""``memory(name, path, sizes, dtype, seed)``: bytes of extra peak memory of a torch step."""


def _memory_from_hidden(name: str, path: str, sizes: Sizes, dtype: str, seed: int) -> int | None:
    """:func:`peak_extra_memory_from_hidden` in a fresh process; None if it fails."""
    return in_fresh_process("peak_extra_memory_from_hidden", name, path, tuple(sizes), dtype, seed)


def run_from_hidden(
    name: str,
    sizes: Sequence[Sizes],
    dtype: str,
    repeats: int,
    seed: int,
    frameworks: Sequence[str] = FRAMEWORKS,
    *,
    memory: bool = True,
    measure_memory: MemoryOf = _memory_from_hidden,
) -> list[dict[str, Any]]:
    """Comparison ``name`` at each of ``sizes``: interleaved times of its paths and, with
    ``memory``, the torch paths' extra peak memory (``measure_memory``: by default a fresh
    process's resident set); the JAX paths' is XLA's count of temporaries. A size with a
    ``top_k`` adds the path :data:`TOP_K`, whose rows also give its time over that of
    ``comparison.own``, per round, median (``time_vs_own``)."""
    comparison = FROM_HIDDEN[name]
    rows = []
    for framework in frameworks:
        if unavailable(framework, "cpu") is not None:
            continue
        for size in sizes:
            extra_paths = () if size.top_k is None else (TOP_K,)
            paths = (comparison.own, *extra_paths, "materialised")
            inputs = _framework_arrays(
                framework, comparison.inputs(size, seed), dtype, size.arrays_in_dtype
            )
            steps: dict[str, Step] = {}
            extras: dict[str, int | None] = dict.fromkeys(paths)
            for path in paths:
                if framework == "jax":
                    steps[path], extras[path] = _from_hidden_jax_step(
                        comparison, path, size, inputs
                    )
                else:
                    steps[path] = _from_hidden_torch_step(comparison, path, size)
            times = interleaved_times(steps, inputs, repeats)
            del inputs, steps
            for path in paths:
                if framework == "torch" and memory:
                    extras[path] = measure_memory(name, path, size, dtype, seed)
                row = {
                    "comparison": name,
                    "framework": framework,
                    **size._asdict(),
                    "dtype": dtype,
                    "implementation": path,
                    "median_s": statistics.median(times[path]),
                    "time_vs_materialised": _median_ratio(times[path], times["materialised"]),
                    **_extra_memory(extras[path], size),
                }
                if path == TOP_K:
                    row["time_vs_own"] = _median_ratio(times[path], times[comparison.own])
                rows.append(row)
    return rows


def _median_ratio(times: Sequence[float], baseline: Sequence[float]) -> float:
    """The median over the rounds of ``times`` over ``baseline`` of the same round."""
    return statistics.median(a / b for a, b in zip(times, baseline, strict=True))


def _extra_memory(extra: int | None, sizes: Sizes) -> dict[str, float | None]:
    """The fields of a row that give its extra peak memory ``extra`` in bytes, or None."""
    logits_bytes = sizes.rows * sizes.vocab * ITEMSIZE["float32"]
    return {
        "extra_peak_mib": None if extra is None else extra / MIB,
        "extra_peak_in_logits": None if extra is None else extra / logits_bytes,
    }
