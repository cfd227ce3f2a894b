"""Exceptions that the CLI turns into one clear line and an exit code."""


class ArtReatError(Exception):
    """Base class: a failure the user can act on, reported without a traceback (exit 1)."""

    exit_code = 1
    prefix = "Error"  # the CLI prints "<prefix>: <message>"


class UsageError(ArtReatError, ValueError):
    """A bad value in the configuration or on the command line (exit 2)."""

    exit_code = 2


class DataError(UsageError):
    """Missing, corrupt or inconsistent data files (exit 2: the user must fix the input)."""


# reliability: faults during training (see art_reat/faults.py and art_reat/checkpoints.py)
class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM during training: a resumable checkpoint was kept. Exit 128 + signal number
    (130 for SIGINT, 143 for SIGTERM); the MLflow run is marked KILLED.

    A `KeyboardInterrupt` (not an `ArtReatError`): code that handles Ctrl-C (marking runs KILLED,
    the CLI) handles it, and ``except Exception`` does not swallow it. The CLI prints
    ``Interrupted: <message>`` and exits with `exit_code`."""

    prefix = "Interrupted"

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


class NonFiniteLoss(ArtReatError):
    """A NaN / inf training loss: training stops before the optimiser step, the last good
    checkpoint is kept, the MLflow run is marked FAILED (exit 1)."""


class CheckpointWriteError(ArtReatError):
    """A checkpoint could not be written (disk full, unwritable folder); earlier checkpoints are intact."""
