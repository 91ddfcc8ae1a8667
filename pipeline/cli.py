"""``skypipe``: a thin command line over the library.

Each stage of the data's journey owns its sub-commands in ``pipeline/<stage>/commands.py`` with a
``register(subparsers)`` function; this module only wires them together and turns errors into exit codes
(:mod:`pipeline.errors`): a user error (bad spec, path, checkpoint, cube, search) is one or two lines on stderr and
exit code 2; a failed run exit code 1; a partial result exit code 3. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pipeline.catalog.redact import install_redaction, redact
from pipeline.errors import EXIT_FAILED, EXIT_USAGE, RunFailedError, UserError

# Sub-packages that contribute commands, in the order of the data's journey.
_COMMAND_MODULES = (
    "pipeline.catalog.commands",
    "pipeline.cube.commands",
    "pipeline.model.commands",
    "pipeline.job.commands",
    "pipeline.mosaic.commands",
    "pipeline.view.commands",
    "pipeline.train.commands",
    "pipeline.finetune.commands",
    "pipeline.eval.commands",
    "pipeline.demo",
)

# What a user can cause: printed as one message, exit code 2. (A LookupError is an empty search.)
_USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, LookupError, OSError)
# A run that cannot finish (actors crash-looping or never starting, unreadable inputs): exit code 1.
_RUN_ERRORS: tuple[type[BaseException], ...] = (RunFailedError,)

__all__ = ["UserError", "build_parser", "main"]


def _own_info(record: logging.LogRecord) -> bool:
    """Without ``-v``: INFO lines of skypipe only (libraries' INFO, e.g. faiss probing its CPU builds, is noise)."""
    return record.levelno >= logging.WARNING or record.name.partition(".")[0] in ("pipeline", "__main__")


def build_parser() -> argparse.ArgumentParser:
    """The full ``skypipe`` argument parser."""
    from pipeline import __version__

    parser = argparse.ArgumentParser(prog="skypipe", description="Region-scale SkySense V2 pipeline.")
    parser.add_argument("--version", action="version", version=f"skypipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="debug logging and full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.filename and str(err.filename) not in str(err):
        return f"{err.strerror or err}: {err.filename}"
    return str(err) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``skypipe`` console script."""
    from pipeline.memory import single_arena

    single_arena()  # before any thread starts: see pipeline.memory
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or args.verbose
    fresh = not logging.getLogger().handlers  # else an embedding program (or pytest) owns the logging set-up
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if fresh and not debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_own_info)
    install_redaction()  # signed URLs' tokens never reach a log line
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        result = args.func(args)
    except _RUN_ERRORS as err:
        if args.debug:
            raise
        print(f"skypipe: failed: {redact(_message(err))}", file=sys.stderr)
        return EXIT_FAILED
    except _USER_ERRORS as err:
        if args.debug:
            raise
        print(f"skypipe: error: {redact(_message(err))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("skypipe: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
