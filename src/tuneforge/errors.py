"""Errors a user can cause. The CLI prints them as one short message and exits with code 2.

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

USER_ERROR_EXIT_CODE = 2

# How a message names an option of `tuneforge train`: as the front end in use spells it. Messages are written once,
# with option("overwrite") where the flag goes; the Python API runs under python_api() and reads its own words.
_OPTION_WORDS = {
    "cli": {"overwrite": "--overwrite", "resume": "--resume", "force": "--force", "merged": "--merged",
            "resume_command": "tuneforge train CONFIG --resume"},
    "api": {"overwrite": "overwrite=True", "resume": "resume=True", "force": "force=True", "merged": "merged=True",
            "resume_command": "tuneforge.train(...) again with the same arguments and resume=True"},
}
_FRONT_END: contextvars.ContextVar[str] = contextvars.ContextVar("tuneforge_front_end", default="cli")


def option(name: str) -> str:
    """``--overwrite`` on the command line, ``overwrite=True`` inside :func:`python_api` (likewise ``resume``,
    ``force``, and ``resume_command``: how to continue a stopped run)."""
    return _OPTION_WORDS[_FRONT_END.get()][name]


@contextlib.contextmanager
def python_api() -> Iterator[None]:
    """Messages raised or logged inside name options in the Python API's words."""
    token = _FRONT_END.set("api")
    try:
        yield
    finally:
        _FRONT_END.reset(token)


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
