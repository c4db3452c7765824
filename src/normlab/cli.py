"""``normlab`` command line: every subcommand lives with its feature and registers itself here.

A feature module exposes ``register(subparsers)`` which adds its subcommand(s) and sets ``func`` on them;
``func(args)`` returns an exit code. Modules are imported lazily so ``normlab --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it provides): each module's register() adds its own subcommands.
COMMAND_MODULES = [
    "normlab.lab.cli",        # train, experiment, report, demo
    "normlab.bench",          # bench
    "normlab.bench.plot",     # bench-plot
    "normlab.kernels.native",  # build-native
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="Batch normalization and its family: layers, benchmarks and a Fashion-MNIST lab.")
    parser.add_argument("--version", action="version", version=f"normlab {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a feature not built yet must not break the others
            if err.name and err.name.startswith("normlab"):
                continue
            raise
        module.register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("normlab")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
