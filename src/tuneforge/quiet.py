"""Silence the messages third-party libraries print that are not the user's business.

Each is matched precisely (its logger or warning category and module, and the start of its text), so the
user's own warnings, other warnings of the same libraries and real errors still show:

- bitsandbytes, imported by PEFT and transformers even when nothing is quantized, logs on CPUs with AVX512-BF16
  that it could not fetch an optional CPU kernel from the Hub (``Failed to load CPU gemm_4bit_forward from
  kernels-community``); 4-bit layers work without it, and nothing tuneforge loads unquantized uses it.
- transformers deprecated ``is_gradient_checkpointing``, which PEFT still reads when it wraps or loads an
  adapter (``FutureWarning: `is_gradient_checkpointing` is deprecated``): PEFT's business, not the user's.
- lm-eval records the git commit of the working directory by running ``git describe``, whose ``fatal: not a
  git repository`` goes straight to the terminal outside a git checkout; tuneforge does not use that hash.

``tuneforge <verb>`` applies :func:`quiet_third_party` before it runs; a notebook or script can call it too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings

# (logger, the start of the message) of log records dropped.
_LOG_RECORDS = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)
# (category, module that warns, regex matched at the start of the message) of warnings ignored.
_WARNINGS = (
    (FutureWarning, r"transformers\.modeling_utils", r"`is_gradient_checkpointing` is deprecated"),
)


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Install the filters above (idempotent). Imports nothing: the filters wait for the libraries to log."""
    prefixes: dict[str, tuple[str, ...]] = {}
    for name, prefix in _LOG_RECORDS:
        prefixes[name] = prefixes.get(name, ()) + (prefix,)
    for name, dropped in prefixes.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(dropped))
    for category, module, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_lm_eval_git() -> None:
    """Make lm-eval's look-up of the working directory's git commit silent: the same ``git describe --always``
    with its standard error discarded, and lm-eval's own fallback (reading ``.git``) when it fails. Call after
    importing lm-eval."""
    from lm_eval import evaluator
    from lm_eval.loggers.utils import get_commit_from_path

    def git_commit_hash() -> str | None:
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, check=True)  # noqa: S607
            return done.stdout.decode().strip()
        except (subprocess.CalledProcessError, OSError):
            return get_commit_from_path(os.getcwd())

    evaluator.get_git_commit_hash = git_commit_hash
