"""Exceptions that the CLI turns into one clear line and an exit code."""


class ArtReatError(Exception):
    """Base class: a failure the user can act on, reported without a traceback (exit 1)."""

    exit_code = 1


class UsageError(ArtReatError, ValueError):
    """A bad value in the configuration or on the command line (exit 2)."""

    exit_code = 2


class DataError(UsageError):
    """Missing, corrupt or inconsistent data files (exit 2: the user must fix the input)."""
