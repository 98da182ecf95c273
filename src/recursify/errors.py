"""Exception types for user-facing failures.

Every error a user can cause (bad arguments, missing files, unsupported models) is raised as a
``RecursifyError`` subclass with a message that says what to do; the CLI prints it as one line and
exits non-zero instead of showing a traceback.
"""


class RecursifyError(Exception):
    """Base class of every error recursify raises on purpose."""


class ConfigError(RecursifyError, ValueError):
    """An option or combination of options is invalid (e.g. loops that do not divide the layers)."""


class SourceError(RecursifyError):
    """A model source (directory, GGUF file, hub id or alias) cannot be resolved or loaded."""


class UnsupportedModelError(RecursifyError):
    """The source model's architecture is not one recursify implements."""


class CheckpointError(RecursifyError):
    """A recursify checkpoint directory is missing, incomplete or corrupt, or would be overwritten."""


class DataError(RecursifyError):
    """A ``--data`` source cannot be read (missing file, wrong format, unknown dataset, empty split)."""


class TrainingError(RecursifyError):
    """Training cannot continue (e.g. the loss became non-finite); the last good checkpoint is kept."""
