"""Errors a user can cause. The CLI prints them as one short message and exits with code 2.

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem with the user's input (config, data, paths), not with tuneforge."""


class ConfigError(UserError):
    """A config key that does not exist, a wrong type, or a value out of range."""


class DataError(UserError):
    """A problem with one row of a data file; names the file, the row and the field."""

    def __init__(self, path: str, row: int | None, field: str | None, message: str, reason: str):
        self.path = path
        self.row = row
        self.field = field
        self.message = message
        # A short machine key ("missing_field", "empty_response" ...) used to count skipped rows.
        self.reason = reason
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class TemplateError(UserError):
    """A template that cannot render a conversation or cannot be split into per-message tokens."""


class ModelSourceError(UserError):
    """A model that cannot be found or fetched."""
