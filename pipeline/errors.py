"""Error classes the command line turns into one-line messages, and the exit codes it returns.

Exit codes (documented in the README):

* ``0`` success;
* ``1`` the run failed: its inputs could not be read beyond the job's limits, tiles failed, actors kept crashing;
* ``2`` a user error: an invalid job spec, a path that does not exist, a checkpoint or cube that does not fit,
  an empty search; nothing was written or changed;
* ``3`` a partial result: every stage finished, but some inputs could not be read (the summary and
  ``skypipe status`` list them).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


class UserError(ValueError):
    """An error caused by the user's input; printed as one line without a traceback (exit code 2)."""


class RunFailedError(RuntimeError):
    """A run that cannot produce a result (exit code 1); the message says why and what to try."""


class InputsUnreadableError(RunFailedError):
    """Too much of a job's input data could not be read for its outputs to mean anything."""
