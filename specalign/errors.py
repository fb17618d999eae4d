"""Errors the user can act on. Each message names the file and says what to do next."""

from __future__ import annotations

from pathlib import Path


class SpecalignError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class DataError(SpecalignError):
    """A file is missing, unreadable or malformed."""

    def __init__(self, path: str | Path, problem: str, hint: str | None = None):
        self.path = str(path)
        self.problem = problem
        msg = f"{self.path}: {problem}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class ConfigError(SpecalignError):
    """A config value is missing, empty or of the wrong type, or the command line does not compose."""


class StoreMismatch(SpecalignError):
    """A feature store was made with other models/layers/settings than the consumer expects."""


class SystematicFailure(SpecalignError):
    """Every sample so far failed: the cause is not the samples but the setup."""


class OutputInUse(SpecalignError):
    """`out=` points at a directory or file that this stage did not make (or made for another input)."""
