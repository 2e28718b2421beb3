"""The colbatch error tree: every error the library raises derives from `ColbatchError`."""

from __future__ import annotations

from typing import Any


class ColbatchError(Exception):
    """Base class of every colbatch error; context lives in attributes, not only the text."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.context = context
        for key, value in context.items():
            setattr(self, key, value)


class ConfigError(ColbatchError):
    """A job file, option or argument is invalid."""


class SourceError(ColbatchError):
    """An input cannot be read at all (missing, truncated, corrupt); names the file."""


class SchemaError(ColbatchError):
    """A declared schema or a step's columns do not fit the data."""


class UdfError(ColbatchError):
    """A user-supplied function raised; never used for colbatch's own bugs."""


class SinkError(ColbatchError):
    """An output could not be written or committed."""


class ErrorThresholdExceeded(ColbatchError):
    """Rejected rows passed `max_errors` or `max_error_rate`; the run was aborted."""


class CheckpointError(ColbatchError):
    """The ledger of committed work is missing, locked or does not match the job."""


class MissingDependencyError(ColbatchError):
    """An optional dependency needed by the requested feature is not installed."""
