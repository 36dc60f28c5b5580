"""User-facing errors: one line, naming the file and the problem; the CLI prints them without a traceback.

`notify` prints the one-line warnings a user should see (a stale lock taken over, leftovers removed).
"""

from __future__ import annotations

import sys
from pathlib import Path


class DusssError(Exception):
    """An error caused by the user's input (files, flags, configs), shown as one line by the CLI."""


class DataError(DusssError):
    """A data file or manifest row is missing, unreadable or inconsistent."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(DusssError):
    """A config file or flag value is invalid."""


class CheckpointError(DusssError):
    """A checkpoint is missing, of the wrong kind, or incompatible with the requested model."""


class TrainingError(DusssError):
    """Training cannot continue (NaN/inf loss, empty split, ...)."""


def notify(message: str) -> None:
    """Print `warning: <message>` on one line of stderr (for the user; not a Python warning)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
