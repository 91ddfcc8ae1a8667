"""``skypipe``: a thin command line over the library.

Each stage of the data's journey owns its sub-commands in ``pipeline/<stage>/commands.py`` with a
``register(subparsers)`` function; this module only wires them together and turns library errors into
one-line messages with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Sub-packages that contribute commands, in the order of the data's journey.
_COMMAND_MODULES = (
    "pipeline.catalog.commands",
    "pipeline.cube.commands",
    "pipeline.model.commands",
    "pipeline.infer.commands",
    "pipeline.mosaic.commands",
    "pipeline.train.commands",
    "pipeline.eval.commands",
    "pipeline.demo",
)


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The full ``skypipe`` argument parser."""
    from pipeline import __version__

    parser = argparse.ArgumentParser(prog="skypipe", description="Region-scale SkySense V2 pipeline.")
    parser.add_argument("--version", action="version", version=f"skypipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):  # stage not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``skypipe`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (UserError, ValueError, FileNotFoundError, KeyError) as err:
        if args.verbose:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"skypipe: error: {msg}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
