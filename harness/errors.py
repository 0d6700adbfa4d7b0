"""User-facing errors.

Every problem a user can cause or fix (bad spec, bad data, missing model, a metric that
cannot be computed) is raised as a `HarnessError` subclass with a one-line message; the CLI
prints it without a traceback and exits with the class's `exit_code`.
"""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line, for one-line errors that wrap a library's (often many-line) message."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


class HarnessError(Exception):
    """A user-facing error: one line, exit code 2."""

    exit_code = 2


class SpecError(HarnessError):
    """An invalid task spec or command-line override."""


class DataError(HarnessError):
    """Unreadable or unusable input data."""


class ModelError(HarnessError):
    """A base model or adapter that cannot be found, verified or loaded."""


class MetricError(HarnessError):
    """A metric could not be computed; never reported as a number."""


class RunError(HarnessError):
    """A run folder that is missing, incomplete or not writable."""


class BrokenModelError(ModelError):
    """A base model whose probe perplexity says it is broken (a bad conversion, scrambled or random
    weights): no verdict is given from it. Its own exit code, so scripts can tell it apart."""

    exit_code = 4


class CannotJudge(HarnessError):
    """The candidate cannot be compared with the baseline (exit 2): never a pass."""
