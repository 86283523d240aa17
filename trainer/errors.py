"""Errors of a run that the console script reports in one line and exit code 2 (like ConfigError):
the user can act on them (lower a learning rate, start a fresh run directory, restore a checkpoint)."""


class RunError(RuntimeError):
    """Base class: ``tailrec: error: <message>``, exit code 2."""


class TrainingDiverged(RunError):
    """The loss became NaN or inf; raised before any checkpoint of such weights is written."""


class CheckpointError(RunError):
    """No usable checkpoint: every complete one failed verification, or writing one failed."""
