"""``python -m softce_multi demo``: train a small EAGLE-3 draft head on the CPU.

A tiny frozen *target model* is built from a seed: a random token embedding, a fixed recurrent
nonlinear map and an output layer over a few thousand tokens. Sequences sampled from it are the
training data. A *draft head* learns to predict the target model's next-token distribution over
a draft vocabulary chosen from token counts, EAGLE-3 style: at the first test-time step it reads
the target model's hidden state and the next token, at later steps its own previous state.

The training step is written once against the array API and runs on PyTorch or JAX; only the
optimiser differs (``torch.optim.Adam``, or a few lines of Adam for JAX).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

import softce_multi as sc
from softce_multi import _compat
from softce_multi._cli._common import (
    TORCH_CPU_INSTALL,
    installed,
    positive_float,
    positive_int,
    progress_bar,
    random_seed,
)
from softce_multi.eagle3 import (
    build_vocab_mapping,
    draft_accuracy,
    multi_step_loss,
    prepare_targets,
    shift_left,
)

BACKENDS = ("torch", "jax")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and settings of the demo; the defaults are those of the command line."""

    backend: str = "torch"
    steps: int = 300
    seed: int = 0
    target_vocab: int = 4096
    draft_vocab: int = 1024
    hidden: int = 64
    draft_hidden: int = 128
    seq_len: int = 32
    train_sequences: int = 2048
    eval_sequences: int = 128
    batch_size: int = 32
    ttt_steps: int = 3
    learning_rate: float = 3e-3
    log_every: int = 30
    torch_threads: int | None = 1
    """PyTorch's intra-op threads during the run (None: leave as is). The demo's tensors are
    small, so one thread spares the synchronisation of several."""
    linear: bool | None = None
    """Whether the loss takes the draft's states and output weight
    (:func:`softce_multi.linear_masked_soft_cross_entropy`) instead of its logits; None for the
    backend's default, :attr:`uses_linear`."""

    @property
    def uses_linear(self) -> bool:
        """Whether the run trains with the linear loss: :attr:`linear`, or by default on JAX and
        not on torch (the times behind that choice are in the performance documentation)."""
        return self.backend == "jax" if self.linear is None else self.linear


@dataclass
class DemoResult:
    """What a demo run measured. Accuracies are per test-time step, on held-out sequences."""

    loss_before: float
    loss_after: float
    accuracy_before: list[float]
    accuracy_after: list[float]
    train_losses: list[float] = field(default_factory=list)
    """Mean training loss of each logging window."""
    seconds: float = 0.0


# --- the frozen target model and its data ------------------------------------------------------


@dataclass(frozen=True)
class TargetModel:
    """A frozen toy language model: ``h_t = tanh(E[x_t] A + h_{t-1} R)``, logits ``h_t U + b``."""

    embedding: np.ndarray
    input_map: np.ndarray
    recurrence: np.ndarray
    output: np.ndarray
    output_bias: np.ndarray

    @classmethod
    def from_seed(cls, vocab: int, hidden: int, seed: int) -> TargetModel:
        rng = np.random.default_rng(seed)
        scale = 1.0 / math.sqrt(hidden)
        # A Zipf-like preference over a random order of the tokens, so that the frequent tokens
        # are scattered over the id range, as in a real tokenizer.
        rank = rng.permutation(vocab)
        return cls(
            embedding=rng.standard_normal((vocab, hidden)).astype(np.float32),
            input_map=(1.5 * scale * rng.standard_normal((hidden, hidden))).astype(np.float32),
            recurrence=(0.9 * scale * rng.standard_normal((hidden, hidden))).astype(np.float32),
            output=(12.0 * scale * rng.standard_normal((hidden, vocab))).astype(np.float32),
            output_bias=(-2.0 * np.log1p(rank)).astype(np.float32),
        )

    def sample(self, n: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """Sample ``n`` sequences; return the tokens ``[n, T]`` and hidden states ``[n, T, H]``."""
        vocab, hidden = self.embedding.shape
        tokens = np.empty((n, seq_len), dtype=np.int64)
        states = np.empty((n, seq_len, hidden), dtype=np.float32)
        tokens[:, 0] = _sample_categorical(np.broadcast_to(self.output_bias, (n, vocab)), rng)
        state = np.zeros((n, hidden), dtype=np.float32)
        for t in range(seq_len):
            state = np.tanh(self.embedding[tokens[:, t]] @ self.input_map + state @ self.recurrence)
            states[:, t] = state
            if t + 1 < seq_len:
                tokens[:, t + 1] = _sample_categorical(state @ self.output + self.output_bias, rng)
        return tokens, states


def _sample_categorical(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One sample per row of ``softmax(logits)``, by inverting the cumulative distribution."""
    cumulative = np.cumsum(np.exp(logits - np.max(logits, axis=-1, keepdims=True)), axis=-1)
    threshold = rng.random((logits.shape[0], 1), dtype=np.float32) * cumulative[:, -1:]
    return np.minimum(np.sum(cumulative < threshold, axis=-1), logits.shape[-1] - 1)


@dataclass(frozen=True)
class Split:
    """Sequences of the target model: token ids, hidden states and the loss mask."""

    tokens: np.ndarray
    states: np.ndarray
    loss_mask: np.ndarray

    def rows(self, index: np.ndarray) -> Split:
        return Split(self.tokens[index], self.states[index], self.loss_mask[index])


def _loss_mask(n: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """Train on each sequence after a prompt and before its padding, as a chat trainer does."""
    positions = np.arange(seq_len)
    prompt = rng.integers(2, seq_len // 4, size=(n, 1))
    length = rng.integers(3 * seq_len // 4, seq_len + 1, size=(n, 1))
    return (positions >= prompt) & (positions < length)


def make_splits(target: TargetModel, config: DemoConfig) -> tuple[Split, Split]:
    rng = np.random.default_rng(config.seed + 1)
    n = config.train_sequences + config.eval_sequences
    tokens, states = target.sample(n, config.seq_len, rng)
    data = Split(tokens, states, _loss_mask(n, config.seq_len, rng))
    return data.rows(np.arange(config.train_sequences)), data.rows(
        np.arange(config.train_sequences, n)
    )


def initial_draft_params(config: DemoConfig) -> dict[str, np.ndarray]:
    """The draft head's parameters, from the seed (the same start on every backend)."""
    rng = np.random.default_rng(config.seed + 2)
    h, d = config.hidden, config.draft_hidden

    def dense(fan_in: int, fan_out: int) -> np.ndarray:
        return (rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)).astype(np.float32)

    return {
        "fc": dense(h, d),  # the target's hidden state -> the draft's state (first step)
        "cell": dense(h + d, d),  # [token embedding, state] -> next state
        "cell_bias": np.zeros(d, dtype=np.float32),
        "head": dense(d, config.draft_vocab),  # state -> draft logits
    }


# --- the training step, once, in the array API -------------------------------------------------


def draft_losses(
    params: dict[str, Any],
    batch: tuple[Any, Any, Any],
    frozen: dict[str, Any],
    *,
    ttt_steps: int,
    draft_vocab: int,
    linear: bool = False,
) -> tuple[list[Any], list[Any]]:
    """Run the draft head over the test-time steps; return each step's loss and accuracy.

    ``batch`` is ``(states [B, T, H], tokens [B, T], loss_mask [B, T])`` of the target model;
    ``frozen`` holds the target model's embedding and output layer and the mapping ``t2d``.
    With ``linear``, the loss takes the draft's states and output weight rather than its
    logits (the logits still give the accuracy, which needs no gradient).
    """
    states, tokens, loss_mask = batch
    xp = _compat.array_namespace(states)
    embedding = frozen["embedding"]
    # The target model's logits at every position (its online forward pass).
    target_logits = states @ frozen["output"] + frozen["output_bias"]
    # The draft at position t reads state t and token t + 1 and predicts the target's output
    # at t + 1: shift the target logits, the tokens and the loss mask together.
    target_logits, tokens, loss_mask = (shift_left(x) for x in (target_logits, tokens, loss_mask))
    target_probs, position_mask = prepare_targets(
        target_logits, loss_mask, frozen["t2d"], draft_vocab_size=draft_vocab
    )
    state = states @ params["fc"]
    losses, accuracies = [], []
    for _ in range(ttt_steps):
        embedded = xp.reshape(xp.take(embedding, xp.reshape(tokens, (-1,)), axis=0), states.shape)
        state = xp.tanh(
            xp.concat([embedded, state], axis=-1) @ params["cell"] + params["cell_bias"]
        )
        logits = state @ params["head"]
        if linear:
            weight = xp.matrix_transpose(params["head"])  # [V, D], the layout of nn.Linear
            losses.append(
                sc.linear_masked_soft_cross_entropy(state, weight, target_probs, position_mask)
            )
        else:
            losses.append(sc.masked_soft_cross_entropy(logits, target_probs, position_mask))
        accuracies.append(draft_accuracy(logits, target_probs, position_mask))
        # The next test-time step predicts one token further. prepare_targets works position by
        # position, so shifting its outputs equals preparing shifted logits and loss mask, and
        # the full-vocabulary logits are not copied again.
        tokens, target_probs, position_mask = (
            shift_left(x) for x in (tokens, target_probs, position_mask)
        )
    return losses, accuracies


# --- backends ----------------------------------------------------------------------------------


class _TorchTrainer:
    def __init__(self, params: dict[str, np.ndarray], frozen: dict[str, Any], config: DemoConfig):
        import torch

        self.torch = torch
        torch.manual_seed(config.seed)
        self.params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
        self.frozen = {k: torch.as_tensor(v) for k, v in frozen.items()}
        self.optimizer = torch.optim.Adam(self.params.values(), lr=config.learning_rate)
        self.config = config

    def _losses(self, split: Split) -> tuple[list[Any], list[Any]]:
        as_tensor = self.torch.as_tensor
        batch = (as_tensor(split.states), as_tensor(split.tokens), as_tensor(split.loss_mask))
        return draft_losses(
            self.params,
            batch,
            self.frozen,
            ttt_steps=self.config.ttt_steps,
            draft_vocab=self.config.draft_vocab,
            linear=self.config.uses_linear,
        )

    def train_step(self, split: Split) -> tuple[float, list[float]]:
        losses, accuracies = self._losses(split)
        loss = multi_step_loss(losses)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), [float(a) for a in accuracies]

    def evaluate(self, split: Split) -> tuple[float, list[float]]:
        with self.torch.no_grad():
            losses, accuracies = self._losses(split)
            return float(multi_step_loss(losses)), [float(a) for a in accuracies]


class _JaxTrainer:
    def __init__(self, params: dict[str, np.ndarray], frozen: dict[str, Any], config: DemoConfig):
        import jax
        import jax.numpy as jnp

        self.jnp = jnp
        self.params = {k: jnp.asarray(v) for k, v in params.items()}
        self.moments = jax.tree_util.tree_map(
            lambda p: (jnp.zeros_like(p), jnp.zeros_like(p)), self.params
        )
        self.count = jnp.asarray(0, dtype=jnp.int32)
        frozen = {k: jnp.asarray(v) for k, v in frozen.items()}
        lr = config.learning_rate

        def objective(params: dict[str, Any], batch: tuple[Any, ...]) -> tuple[Any, Any]:
            losses, accuracies = draft_losses(
                params,
                batch,
                frozen,
                ttt_steps=config.ttt_steps,
                draft_vocab=config.draft_vocab,
                linear=config.uses_linear,
            )
            return multi_step_loss(losses), jnp.stack(accuracies)

        def adam(param: Any, grad: Any, moments: tuple[Any, Any], count: Any) -> tuple[Any, Any]:
            beta1, beta2, eps = 0.9, 0.999, 1e-8
            first = beta1 * moments[0] + (1 - beta1) * grad
            second = beta2 * moments[1] + (1 - beta2) * grad * grad
            step = lr * jnp.sqrt(1 - beta2**count) / (1 - beta1**count)
            return param - step * first / (jnp.sqrt(second) + eps), (first, second)

        def train_step(params: Any, moments: Any, count: Any, batch: tuple[Any, ...]) -> Any:
            (loss, accuracies), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
            count = count + 1
            updated = {k: adam(params[k], grads[k], moments[k], count) for k in params}
            params = {k: updated[k][0] for k in params}
            moments = {k: updated[k][1] for k in params}
            return params, moments, count, loss, accuracies

        self._train_step = jax.jit(train_step)
        self._evaluate = jax.jit(objective)

    def _batch(self, split: Split) -> tuple[Any, ...]:
        return tuple(self.jnp.asarray(a) for a in (split.states, split.tokens, split.loss_mask))

    def train_step(self, split: Split) -> tuple[float, list[float]]:
        self.params, self.moments, self.count, loss, accuracies = self._train_step(
            self.params, self.moments, self.count, self._batch(split)
        )
        return float(loss), [float(a) for a in accuracies]

    def evaluate(self, split: Split) -> tuple[float, list[float]]:
        loss, accuracies = self._evaluate(self.params, self._batch(split))
        return float(loss), [float(a) for a in accuracies]


# --- progress and the command line -------------------------------------------------------------


def _percent(values: Sequence[float]) -> str:
    return " / ".join(f"{100 * v:.1f}%" for v in values)


def run(config: DemoConfig, out: TextIO = sys.stdout) -> DemoResult:
    """Build the target model, sample data, train the draft head; print progress to ``out``."""
    if config.backend not in BACKENDS:
        msg = f"backend must be one of {BACKENDS}, got {config.backend!r}"
        raise ValueError(msg)
    with _torch_threads(config):
        return _train(config, out)


@contextlib.contextmanager
def _torch_threads(config: DemoConfig) -> Iterator[None]:
    """Set PyTorch's thread count for the run, and restore it afterwards."""
    if config.backend != "torch" or config.torch_threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(config.torch_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(config: DemoConfig, out: TextIO) -> DemoResult:
    start = time.perf_counter()
    target = TargetModel.from_seed(config.target_vocab, config.hidden, config.seed)
    train, held_out = make_splits(target, config)
    counts = np.bincount(train.tokens.reshape(-1), minlength=config.target_vocab)
    d2t, t2d = build_vocab_mapping(counts, config.draft_vocab)
    coverage = counts[t2d].sum() / counts.sum()
    frozen = {
        "embedding": target.embedding,
        "output": target.output,
        "output_bias": target.output_bias,
        "t2d": t2d,
    }
    trainer_class: Callable[..., Any] = _TorchTrainer if config.backend == "torch" else _JaxTrainer
    trainer = trainer_class(initial_draft_params(config), frozen, config)

    print(
        f"target model: vocabulary {config.target_vocab}, hidden size {config.hidden}, "
        f"seed {config.seed}; {config.train_sequences} training and {config.eval_sequences} "
        f"held-out sequences of {config.seq_len} tokens",
        file=out,
    )
    print(
        f"draft vocabulary: the {config.draft_vocab} most frequent tokens "
        f"(d2t[-1] = {int(d2t[-1])}), {100 * coverage:.1f}% of the sampled tokens",
        file=out,
    )
    loss_name = (
        "linear_masked_soft_cross_entropy" if config.uses_linear else "masked_soft_cross_entropy"
    )
    print(
        f"training a draft head on {config.backend} with {loss_name}: "
        f"{config.ttt_steps} test-time steps, "
        f"batch {config.batch_size}, {config.steps} steps, Adam lr {config.learning_rate}",
        file=out,
    )
    loss_before, accuracy_before = trainer.evaluate(held_out)
    print(
        f"before training: held-out loss {loss_before:.4f}, accuracy per test-time step "
        f"{_percent(accuracy_before)}",
        file=out,
    )

    rng = np.random.default_rng(config.seed + 3)
    # A bar on a terminal; elsewhere (a log file, a captured stream) only the logged lines.
    progress = progress_bar(config.steps, "step", out, disable=not out.isatty(), leave=False)
    window_losses: list[float] = []
    window_accuracies: list[list[float]] = []
    train_losses: list[float] = []
    for step in range(1, config.steps + 1):
        batch = train.rows(rng.choice(config.train_sequences, config.batch_size, replace=False))
        loss, accuracies = trainer.train_step(batch)
        window_losses.append(loss)
        window_accuracies.append(accuracies)
        progress.update()
        progress.set_postfix_str(f"loss {loss:.4f}  accuracy {100 * accuracies[0]:.1f}%")
        if step % config.log_every == 0 or step == config.steps:
            mean_loss = float(np.mean(window_losses))
            train_losses.append(mean_loss)
            mean_accuracy = np.mean(window_accuracies, axis=0)
            progress.write(
                f"step {step:>{len(str(config.steps))}}/{config.steps}  loss {mean_loss:.4f}  "
                f"accuracy {_percent(mean_accuracy)}",
                file=out,
            )
            window_losses, window_accuracies = [], []

    progress.close()
    loss_after, accuracy_after = trainer.evaluate(held_out)
    seconds = time.perf_counter() - start
    print(
        f"after training: held-out loss {loss_after:.4f}, accuracy per test-time step "
        f"{_percent(accuracy_after)}",
        file=out,
    )
    print(
        f"draft accuracy (first test-time step) {100 * accuracy_before[0]:.1f}% -> "
        f"{100 * accuracy_after[0]:.1f}%, loss {loss_before:.4f} -> {loss_after:.4f}, "
        f"in {seconds:.1f} s on {config.backend}",
        file=out,
    )
    return DemoResult(
        loss_before, loss_after, accuracy_before, accuracy_after, train_losses, seconds
    )


MAX_LEARNING_RATE = 3.4e37
"""The largest ``--lr``: PyTorch's Adam takes ``lr / (1 - 0.9)`` as a float32 on its first
step, and refuses a value beyond float32's largest, about 3.4e38."""


def learning_rate(text: str) -> float:
    """Argument type of ``--lr``: a finite number above 0 and at most
    :data:`MAX_LEARNING_RATE`."""
    value = positive_float(text)
    if value > MAX_LEARNING_RATE:
        msg = (
            f"must be at most {MAX_LEARNING_RATE:.2g} (Adam's first step, 10 x lr, must fit in "
            f"float32), got {text}"
        )
        raise argparse.ArgumentTypeError(msg)
    return value


#: The command line's valued options: flag, the :class:`DemoConfig` field it sets, its type and
#: its help.
_OPTIONS: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
    ("--steps", "steps", positive_int, "training steps (%(default)s)"),
    ("--seed", "seed", random_seed, "seed of the target model and data"),
    ("--batch-size", "batch_size", positive_int, "sequences per step"),
    ("--ttt-steps", "ttt_steps", positive_int, "test-time steps per training step (%(default)s)"),
    (
        "--lr",
        "learning_rate",
        learning_rate,
        f"Adam learning rate, at most {MAX_LEARNING_RATE:.2g}",
    ),
    ("--log-every", "log_every", positive_int, "steps per logged line"),
    (
        "--torch-threads",
        "torch_threads",
        positive_int,
        "PyTorch intra-op threads (default: %(default)s; small tensors gain little from more)",
    ),
)


def _parser() -> argparse.ArgumentParser:
    """The parser of ``python -m softce_multi demo``; each option's ``dest`` is a config field."""
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="python -m softce_multi demo",
        description=(
            "Train a small EAGLE-3-style draft head on a tiny frozen target model, on the CPU, "
            "with prepare_targets, masked_soft_cross_entropy (or, with --linear, the default on "
            "jax, linear_masked_soft_cross_entropy) and multi_step_loss."
        ),
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=defaults.backend,
        help="array library to train with (default: %(default)s)",
    )
    for flag, name, kind, text in _OPTIONS:
        parser.add_argument(flag, dest=name, type=kind, default=getattr(defaults, name), help=text)
    parser.add_argument(
        "--linear",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "train with linear_masked_soft_cross_entropy of the draft's states and output "
            "weight, or not (default: on jax, where it is faster; off on torch, where it is not)"
        ),
    )
    return parser


def main(argv: list[str]) -> int:
    """Run the demo with command-line arguments ``argv``; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    sequences = DemoConfig.train_sequences
    if args.batch_size > sequences:
        parser.error(
            f"--batch-size {args.batch_size}: a batch has at most the {sequences} training "
            "sequences"
        )
    if not installed(args.backend):
        if args.backend == "torch":
            install = (
                f"{TORCH_CPU_INSTALL} (the CPU build, from PyTorch's CPU index; torch from "
                "PyPI is a CUDA build of several GB)"
            )
        else:
            install = "pip install 'softce_multi[jax]'"
        print(
            f"the {args.backend} backend of the demo needs {args.backend}, which is not "
            f"installed; install it with: {install} "
            f"(or choose --backend {'jax' if args.backend == 'torch' else 'torch'})",
            file=sys.stderr,
        )
        return 2
    config = DemoConfig(**vars(args))
    run(config)
    return 0
