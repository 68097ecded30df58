"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class UserError(Exception):
    """A mistake the user can fix (config, data, model name): never shown as a traceback."""
