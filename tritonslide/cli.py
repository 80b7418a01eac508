"""The ``tritonslide`` command line: ``compare`` (the main job, :mod:`tritonslide.compare`), ``demo``, ``bench``
(:mod:`tritonslide.benchmark`), ``autotune`` (:mod:`tritonslide.autotune`) and ``--version``.

``tritonslide demo`` reruns, at laptop scale, the vanilla-vs-LSH comparison on a 3-layer CNN of CNN-SLIDE
(shared/papers/000_619cf88339ee9234.txt, sec. 5); see :mod:`tritonslide.demo`.
"""

from __future__ import annotations

import argparse
import sys

import tritonslide
from tritonslide import autotune, benchmark, compare
from tritonslide._argtypes import non_negative_int, positive_int
from tritonslide.demo import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tritonslide`` command."""
    parser = argparse.ArgumentParser(
        prog="tritonslide",
        description="Hashing and sketching for cheaper convolutional layers (ALSH, CNN-SLIDE).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {tritonslide.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train a 3-layer CNN on scikit-learn's digits, dense and with ALSH, and compare step time and accuracy",
        description=(
            "Train the 3-layer CNN of CNN-SLIDE (sec. 5) on scikit-learn's bundled 8x8 handwritten digits twice from "
            "the same initial weights, dense and patched with ALSH convolutions, and print the mean training step "
            "time, the test accuracy and the active filter fraction of every ALSH layer. Needs "
            "pip install 'tritonslide[demo]'."
        ),
    )
    demo.add_argument(
        "--epochs", type=positive_int, default=DEFAULT_EPOCHS, help="training epochs per variant (default %(default)s)"
    )
    demo.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="batch size (default %(default)s)"
    )
    demo.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the split, weights, order (default %(default)s)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument(
        "--convert", action="store_true",
        help="instead: train the CNN dense, convert it with every method and fine-tune each for as many epochs",
    )
    compare.add_parser(commands)
    benchmark.add_parser(commands)
    autotune.add_parser(commands)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from tritonslide import demo

    try:
        demo.require_demo_dependencies()
    except demo.MissingDemoDependency as exc:
        print(f"tritonslide: error: {exc}", file=sys.stderr)
        return 1
    if args.convert:
        rows = demo.convert_and_finetune(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                                         progress=not args.no_progress)
        print(f"3-layer CNN on scikit-learn digits: trained dense for {args.epochs} epoch(s) (Adam lr 1e-3, batch "
              f"{args.batch_size}, seed {args.seed}), converted with each method's default config, fine-tuned for "
              f"{args.epochs} epoch(s) with the same optimizer\n", flush=True)
        print(demo.format_conversion_table(rows), flush=True)
        return 0
    rows = demo.run_demo(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)
    print(demo.report(rows, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tritonslide`` console script and of ``python -m tritonslide``; returns the exit code.

    No command prints the help to stderr and returns 2 (a usage error, as argparse's own errors exit).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo":
        return _demo(args)
    if args.command == "compare":
        return compare.run(args)
    if args.command == "bench":
        return benchmark.run(args)
    if args.command == "autotune":
        return autotune.run(args)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse rejects unknown commands
    return 2


if __name__ == "__main__":
    sys.exit(main())
