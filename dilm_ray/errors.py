"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class UserError(Exception):
    """A mistake the user can fix (config, data, model name): never shown as a traceback."""


class GenerationError(UserError):
    """The generator could not write the samples a stage asked for (malformed beyond every round):
    a profile too small for the task, fixed in the config (more stage-1 steps, more rounds)."""


class SweepFailed(Exception):
    """Every trial of a ``dilm-ray tune`` sweep failed: the CLI prints one line per trial (its
    reason) and exits with status 1; the ranking with the failures is written first."""


def first_line(error: BaseException | str) -> str:
    """The first non-blank line of an exception's message (for a one-line ``UserError``), else
    its type name: some messages are empty, and ``str(exc).splitlines()[0]`` fails on them."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
