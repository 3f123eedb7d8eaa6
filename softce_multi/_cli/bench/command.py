"""The command line of ``python -m softce_multi bench``: its options, the options it refuses
before measuring anything, and what it runs, prints and writes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from softce_multi._cli._common import TORCH_CPU_INSTALL, output_file, positive_int, random_seed
from softce_multi._cli.bench.cases import Case
from softce_multi._cli.bench.from_hidden import FRAMEWORKS, FROM_HIDDEN, TOP_K, MemoryOf, Sizes
from softce_multi._cli.bench.measure import ITEMSIZE, unavailable
from softce_multi._cli.bench.modes import kernel_mode_rows
from softce_multi._cli.bench.profile import main_profile
from softce_multi._cli.bench.report import (
    plot,
    print_from_hidden,
    print_kernel_modes,
    print_skipped,
    print_sweep,
    write_json,
)
from softce_multi._cli.bench.sparse import main as main_sparse
from softce_multi._types import REDUCTIONS

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192)
DEFAULT_TARGET_VOCAB = 128000
MIN_REPEATS = 3
"""The fewest timed rounds whose median one slow round cannot move."""
NOT_DRAWN = "not of --linear, --targets or --sparse"
"""The runs whose ``--json`` ``--from-json`` does not draw: their rows are of other columns."""
DRAWN = f"it draws the --json of the plain bench ({NOT_DRAWN}) and device-check's device_check.json"
"""What ``--from-json`` draws, said when it refuses a file."""

Sweep = Callable[
    [argparse.Namespace, Sequence[Case], Callable[[str], bool]],
    tuple[list[dict[str, Any]], list[dict[str, str]]],
]
"""``run(options, cases, is_installed) -> (rows, skipped)``, as
:func:`~softce_multi._cli.bench.sweep.run`."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m softce_multi bench",
        description=(
            "Time forward+backward and extra peak memory of softce_multi on every installed "
            "backend against NeMo's formula, F.cross_entropy, SpecForge's formula, optax and "
            "plain NumPy, for each sequence length and dtype."
        ),
    )
    parser.add_argument(
        "--lengths",
        type=positive_int,
        nargs="+",
        help=(
            "sequence lengths N of [1, N, V] logits "
            f"(default: {' '.join(map(str, DEFAULT_LENGTHS))})"
        ),
    )
    parser.add_argument(
        "--vocab", type=positive_int, default=32000, help="V; with --targets V_draft (%(default)s)"
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=list(ITEMSIZE),
        help="logits dtypes (default: %(default)s); --linear and --targets run the first",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help=(
            "timed rounds, after one untimed warm-up round in which every case runs once; "
            f"fewer than {MIN_REPEATS} gives a warning (default: %(default)s)"
        ),
    )
    parser.add_argument("--seed", type=random_seed, default=0, help="0 to 2**64 - 1 (%(default)s)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure extra peak memory, in one fresh process per case (default: yes)",
    )
    parser.add_argument(
        "--busy-core",
        action="store_true",
        help=(
            "time every case twice: as the machine is and with one core kept busy by a "
            "spinning process, shown side by side with the 1-minute load averages"
        ),
    )
    parser.add_argument("--json", type=output_file, metavar="PATH", help="write the rows as JSON")
    parser.add_argument(
        "--plot", type=output_file, metavar="PATH", help="draw time and memory (needs matplotlib)"
    )
    parser.add_argument(
        "--from-json",
        type=_existing_file,
        metavar="PATH",
        help=(
            "with --plot: draw the rows of a saved run instead of measuring: a --json file of "
            f"the plain bench ({NOT_DRAWN}, whose rows it does not draw), or the "
            "device_check.json of python -m softce_multi device-check"
        ),
    )
    _add_from_hidden_options(parser)
    parser.add_argument(
        "--sparse",
        type=positive_int,
        metavar="K",
        help=(
            "compare the loss of sparse targets (target_ids, K distinct ids per position) with "
            "the same framework's loss of the dense targets they stand for, on [1, N, V] "
            "logits; with --linear, the linear loss of hidden states, for each --rows"
        ),
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help=(
            "time each stage of the torch CPU loss's block loop on one thread, for a float32 "
            "[N, V] gradient (N: the first --lengths), and the operator on one and on all threads"
        ),
    )
    return parser


def _add_from_hidden_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``--linear`` and ``--targets``."""
    comparisons = parser.add_mutually_exclusive_group()
    comparisons.add_argument(
        "--linear",
        action="store_true",
        help=(
            "compare linear_masked_soft_cross_entropy of [N, H] hidden states and a [V, H] weight "
            "with the materialised path (hidden @ weight.T, then the loss), for each --rows"
        ),
    )
    comparisons.add_argument(
        "--targets",
        action="store_true",
        help=(
            "compare prepare_targets_from_hidden of [N, H] hidden states and a [V_target, H] "
            "head with prepare_targets(hidden @ weight.T), V_draft = --vocab, for each --rows"
        ),
    )
    parser.add_argument(
        "--rows",
        type=positive_int,
        nargs="+",
        help="with --linear or --targets: N (default: 2048 8192; --targets: 4096)",
    )
    parser.add_argument(
        "--hidden",
        type=positive_int,
        help="with --linear or --targets: H (default: 256; --targets: 128)",
    )
    parser.add_argument(
        "--target-vocab",
        type=positive_int,
        help=f"with --targets: V_target ({DEFAULT_TARGET_VOCAB})",
    )
    parser.add_argument(
        "--top-k",
        type=positive_int,
        metavar="K",
        help=(
            "with --targets: also prepare_top_k_targets_from_hidden with this k, timed against "
            "prepare_targets_from_hidden too"
        ),
    )
    parser.add_argument(
        "--bias",
        action=argparse.BooleanOptionalAction,
        help="with --linear: a [V] bias as nn.Linear has, differentiated too (default: yes)",
    )
    parser.add_argument(
        "--reduction",
        choices=REDUCTIONS,
        help="with --linear: the reduction of both paths; none sums the losses (default: mean)",
    )
    parser.add_argument(
        "--autocast",
        choices=("bfloat16", "float16"),
        help=(
            "with --linear: both paths' forward pass under torch.autocast of this dtype, with "
            "the --dtypes float32 inputs as master weights (torch only)"
        ),
    )
    parser.add_argument(
        "--frameworks",
        nargs="+",
        choices=FRAMEWORKS,
        help="with --linear or --targets: the frameworks to run (default: those installed)",
    )


def _existing_file(text: str) -> Path:
    """Argument type of a file to read: one that exists."""
    path = Path(text)
    if not path.is_file():
        msg = f"no file {text}"
        raise argparse.ArgumentTypeError(msg)
    return path


def _frameworks(args: argparse.Namespace) -> Sequence[str]:
    """The frameworks of a comparison from hidden states: JAX has no autocast."""
    return args.frameworks or (("torch",) if args.autocast else FRAMEWORKS)


def _check_arguments(
    parser: argparse.ArgumentParser, args: argparse.Namespace, is_installed: Callable[[str], bool]
) -> None:
    """Refuse, through ``parser.error`` and before anything is measured, the options that the
    run would ignore or fail on, and the outputs it could not write when done."""
    comparison = "--linear" if args.linear else "--targets" if args.targets else None
    if args.from_json is not None:
        _check_from_json_options(parser, args)
        return
    if args.profile:
        _check_profile_options(parser, args, is_installed)
    elif args.sparse is not None:
        _check_sparse_options(parser, args)
    elif comparison is None:
        _check_sweep_options(parser, args)
    else:
        _check_from_hidden_options(parser, args, comparison)
    if args.device == "cuda":
        reason = unavailable("torch", "cuda")
        if reason is not None:
            parser.error(f"--device cuda: {reason}")
    if args.plot is not None and not is_installed("matplotlib"):
        parser.error("--plot needs matplotlib: pip install 'softce_multi[bench]'")


def _check_sweep_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse the options that go only with ``--linear`` or ``--targets``."""
    for flag, value in [
        ("--rows", args.rows),
        ("--hidden", args.hidden),
        ("--target-vocab", args.target_vocab),
        ("--frameworks", args.frameworks),
    ]:
        if value is not None:
            parser.error(f"{flag} goes with --linear or --targets")
    if args.top_k is not None:
        parser.error("--top-k goes with --targets")
    if args.bias is not None:
        parser.error(f"{'--bias' if args.bias else '--no-bias'} goes with --linear")
    if args.autocast is not None:
        parser.error("--autocast goes with --linear")
    if args.reduction is not None:
        parser.error("--reduction goes with --linear")


def _check_profile_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, is_installed: Callable[[str], bool]
) -> None:
    """Refuse the options that do not go with ``--profile``, and a missing PyTorch."""
    for flag, given in [
        ("--linear", args.linear),
        ("--targets", args.targets),
        ("--sparse", args.sparse is not None),
        ("--busy-core", args.busy_core),
        ("--device cuda", args.device == "cuda"),
        ("--json", args.json is not None),
        ("--plot", args.plot is not None),
        ("--rows", args.rows is not None),
        ("--hidden", args.hidden is not None),
        ("--frameworks", args.frameworks is not None),
    ]:
        if given:
            parser.error(f"{flag} does not go with --profile")
    if not is_installed("torch"):
        parser.error(f"--profile times the torch CPU loss: {TORCH_CPU_INSTALL}")


def _check_from_json_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--from-json`` needs ``--plot`` and measures nothing: refuse what would measure."""
    if args.plot is None:
        parser.error("--from-json draws a saved run: give --plot PATH")
    for flag, given in [
        ("--linear", args.linear),
        ("--targets", args.targets),
        ("--sparse", args.sparse is not None),
        ("--profile", args.profile),
        ("--busy-core", args.busy_core),
        ("--json", args.json is not None),
    ]:
        if given:
            parser.error(f"{flag} does not go with --from-json")
    try:
        args.saved = _saved_rows(args.from_json)
    except ValueError as error:
        parser.error(f"--from-json {args.from_json}: {error}")


class SavedRows(NamedTuple):
    """The rows of a saved run, its plot's title, and the key of its rows of panels."""

    rows: list[dict[str, Any]]
    title: str
    panel: str


def _saved_rows(path: Path) -> SavedRows:
    """The rows saved at ``path``: bench's ``{"rows": ...}`` (one row of panels per dtype) or a
    device check's ``{"speed": ...}`` (one per targets dtype and vocabulary).

    Raises ValueError, saying what is wrong, for anything else.
    """
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        msg = f"not a JSON file ({error})"
        raise ValueError(msg) from None
    if isinstance(saved, dict) and "speed" in saved:
        gpu = saved.get("environment", {}).get("gpu", {}).get("name", "the CPU")
        saved_rows = SavedRows(
            saved["speed"], f"forward+backward on {gpu}, {saved.get('date', '')}", "panel"
        )
    elif isinstance(saved, dict) and "rows" in saved:
        saved_rows = SavedRows(saved["rows"], f"forward+backward, from {path.name}", "dtype")
    else:
        msg = f"holds no rows to draw: {DRAWN}"
        raise ValueError(msg)
    rows = saved_rows.rows
    keys = ("implementation", "length", "median_s", "extra_peak_in_grads", saved_rows.panel)
    if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
        msg = "holds no rows of measurements"
        raise ValueError(msg)
    missing = sorted({key for row in rows for key in keys if key not in row})
    if missing:
        msg = f"has rows without {', '.join(missing)}: {DRAWN}"
        raise ValueError(msg)
    return saved_rows


def _check_sparse_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse the options that do not go with ``--sparse`` (and ``--linear``, if given), and a
    ``K`` above the vocabulary."""
    mode = "--linear --sparse" if args.linear else "--sparse"
    for flag, given in [
        ("--targets", args.targets),
        ("--busy-core", args.busy_core),
        ("--top-k", args.top_k is not None),
        ("--target-vocab", args.target_vocab is not None),
        ("--frameworks", args.frameworks is not None),
        ("--autocast", args.autocast is not None),
        ("--reduction", args.reduction is not None),
        ("--device cuda", args.device == "cuda"),
        ("--plot", args.plot is not None),
        ("--lengths", args.linear and args.lengths is not None),
        ("--rows", not args.linear and args.rows is not None),
        ("--hidden", not args.linear and args.hidden is not None),
        ("--bias" if args.bias else "--no-bias", not args.linear and args.bias is not None),
    ]:
        if given:
            parser.error(f"{flag} does not go with {mode}")
    if args.sparse > args.vocab:
        parser.error(
            f"--sparse {args.sparse} is more than --vocab {args.vocab}: each position has K "
            "distinct ids in the vocabulary"
        )


def _check_from_hidden_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, comparison: str
) -> None:
    """Refuse the options that do not go with ``comparison`` (``--linear`` or ``--targets``),
    and frameworks that are not installed."""
    for flag, given in [
        ("--lengths", args.lengths is not None),
        ("--busy-core", args.busy_core),
        ("--device cuda", args.device == "cuda"),
        ("--plot", args.plot is not None),
        ("--target-vocab", args.linear and args.target_vocab is not None),
        ("--top-k", args.linear and args.top_k is not None),
        ("--bias" if args.bias else "--no-bias", args.targets and args.bias is not None),
        ("--autocast", args.targets and args.autocast is not None),
        ("--reduction", args.targets and args.reduction is not None),
    ]:
        if given:
            parser.error(f"{flag} does not go with {comparison}")
    target_vocab = args.target_vocab or DEFAULT_TARGET_VOCAB
    if args.targets and args.vocab > target_vocab:
        parser.error(
            f"--vocab {args.vocab} is more than --target-vocab {target_vocab}: the draft "
            "vocabulary is a subset of the target's"
        )
    if args.top_k is not None and args.top_k > args.vocab:
        parser.error(
            f"--top-k {args.top_k} is more than --vocab {args.vocab}: k draft tokens are kept "
            "out of the draft vocabulary"
        )
    if args.autocast is not None and "jax" in (args.frameworks or ()):
        parser.error("--autocast is torch.autocast: it does not go with --frameworks jax")
    frameworks = _frameworks(args)
    reasons = [unavailable(framework, "cpu") for framework in frameworks]
    missing = [reason for reason in reasons if reason is not None]
    if missing and (args.frameworks is not None or len(missing) == len(frameworks)):
        parser.error(f"{comparison} runs on {' or '.join(frameworks)}: {'; '.join(missing)}")


def main(
    argv: Sequence[str] | None,
    *,
    cases: Sequence[Case],
    is_installed: Callable[[str], bool],
    run: Sweep,
    run_from_hidden: Callable[..., list[dict[str, Any]]],
    memory_from_hidden: MemoryOf,
) -> int:
    """Parse ``argv``, refuse what the run could not do, then run ``bench`` with these parts
    (:func:`softce_multi._cli.bench.main` gives those of its package)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_arguments(parser, args, is_installed)
    if args.repeats < MIN_REPEATS:
        print(
            f"warning: --repeats {args.repeats}: under {MIN_REPEATS} timed rounds, one slow "
            "round makes the median",
            file=sys.stderr,
        )
    if args.from_json is not None:
        return _main_from_json(args)
    if args.profile:
        args.lengths = args.lengths or [2048]
        return main_profile(args)
    if args.sparse is not None:
        args.lengths = args.lengths or list(DEFAULT_LENGTHS)
        return main_sparse(args)
    if args.linear or args.targets:
        name = "linear" if args.linear else "targets"
        return _main_from_hidden(name, args, run_from_hidden, memory_from_hidden)
    return _main_sweep(args, run, cases, is_installed)


def _main_from_json(args: argparse.Namespace) -> int:
    """Draw the rows of ``args.saved`` (read by :func:`_check_from_json_options`) to
    ``args.plot``."""
    rows, title, panel = args.saved
    plot(rows, args.plot, title, panel=panel)
    print(f"drew {args.plot}")
    return 0


def _main_sweep(
    args: argparse.Namespace, run: Sweep, cases: Sequence[Case], is_installed: Callable[[str], bool]
) -> int:
    """Time ``cases`` on ``[1, N, V]`` logits, then, on CUDA, each kernel mode on its own; exit
    status 2 when every case was skipped and nothing was measured."""
    args.lengths = args.lengths or list(DEFAULT_LENGTHS)
    rows, skipped = run(args, cases, is_installed)
    print_sweep(rows, args.vocab, args.device, args.repeats)
    modes = []
    if args.device == "cuda":
        modes = [
            row
            for dtype in args.dtypes
            for length in args.lengths
            for row in kernel_mode_rows(
                (1, length, args.vocab), dtype, args.seed, args.repeats, args.device
            )
        ]
        print_kernel_modes(modes)
    print_skipped(skipped)
    write_json(args.json, {"rows": rows, "skipped": skipped, "kernel_modes": modes})
    if not rows and not modes:
        print(
            "python -m softce_multi bench: error: nothing was measured: every implementation "
            f"was skipped in --dtypes {' '.join(args.dtypes)} (the reasons are above)",
            file=sys.stderr,
        )
        return 2
    if args.plot:
        plot(rows, args.plot, f"[1, N, {args.vocab}] logits on {args.device}, forward+backward")
    return 0


def _main_from_hidden(
    name: str,
    args: argparse.Namespace,
    run_from_hidden: Callable[..., list[dict[str, Any]]],
    memory_from_hidden: MemoryOf,
) -> int:
    """Compare both paths of ``FROM_HIDDEN[name]`` at the sizes of ``args``."""
    comparison = FROM_HIDDEN[name]
    hidden = args.hidden or comparison.default_hidden
    target_vocab = args.target_vocab or DEFAULT_TARGET_VOCAB
    bias = name == "linear" and args.bias is not False  # nn.Linear's default: with a bias
    sizes = [
        Sizes(
            rows,
            hidden,
            args.vocab,
            target_vocab,
            bias,
            args.autocast,
            args.reduction or "mean",
            args.top_k,
        )
        for rows in args.rows or comparison.default_rows
    ]
    dtype = args.dtypes[0]
    frameworks = _frameworks(args)
    skipped = [
        {"implementation": framework, "dtype": dtype, "reason": reason}
        for framework in frameworks
        if (reason := unavailable(framework, "cpu")) is not None
    ]
    rows = run_from_hidden(
        name,
        sizes,
        dtype,
        args.repeats,
        args.seed,
        frameworks,
        memory=args.memory,
        measure_memory=memory_from_hidden,
    )
    write_json(args.json, rows)
    print_from_hidden(rows, comparison.title(sizes[0]), dtype, args.repeats)
    _print_top_k(rows, comparison.own)
    print_skipped(skipped)
    return 0


def _print_top_k(rows: Sequence[dict[str, Any]], own: str) -> None:
    """Print, for each ``--top-k`` row, its time over that of the path ``own``."""
    for row in rows:
        if row["implementation"] == TOP_K:
            print(
                f"{TOP_K}, {row['framework']}, N = {row['rows']}: {row['time_vs_own']:.2f}x the "
                f"time of {own} (per round, median)"
            )
