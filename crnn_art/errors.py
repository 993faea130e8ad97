"""Every error crnn-art raises on purpose, and what a one-line message quotes of a library's error.

``CrnnArtError`` subclasses are errors the user can fix: the CLI prints their message as one line and
exits with ``exit_code`` (2 unless said otherwise). This module imports nothing, so that the CLI can
catch them without importing torch.
"""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200, empty: str = "") -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters (``empty`` when it has none).

    Library errors run to many lines (HTTP bodies, torch's notes, tracebacks of workers); a crnn-art
    error keeps one line, so it quotes only the first.
    """
    return (str(exc).strip().splitlines() or [empty])[0][:limit]


class CrnnArtError(Exception):
    """An error the user can fix; the message is one line naming the problem and the fix."""

    exit_code = 2


class ConfigError(CrnnArtError, ValueError):
    """A config problem; the message is one line naming the key and what is allowed."""


class DataError(CrnnArtError, ValueError):
    """A problem with the data a run was pointed at; the message says what to change."""


class ModelLoadError(CrnnArtError, RuntimeError):
    """A checkpoint or weight file that cannot be used; the message says which and what to do."""


class CheckpointError(CrnnArtError, RuntimeError):
    """A training checkpoint that is missing, incomplete or altered; the message says what to use instead."""


class RunFolderError(CrnnArtError, RuntimeError):
    """A run folder that cannot be used or written; the message names the folder and the fix."""


class LaunchError(CrnnArtError, RuntimeError):
    """The processes were not started the way the run needs; the message says how to launch."""


class HubError(CrnnArtError, RuntimeError):
    """The Hub could not be reached or refused the upload; the message names the repository and the fix."""


class NonFiniteLoss(CrnnArtError, RuntimeError):
    """Too many consecutive steps with a NaN/inf loss; the last good checkpoint is untouched."""

    exit_code = 3


class TrainingStopped(CrnnArtError, RuntimeError):
    """The run stopped before its end on purpose (a signal); ``exit_code`` is 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DecodeError(ValueError):
    """This file cannot become a painting; the loader skips and counts it (never shown as an error)."""
