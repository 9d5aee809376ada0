"""Typed errors. Each message is one line that names the file, the key and what to do."""

from __future__ import annotations


class LorakitError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits non-zero."""

    exit_code = 1


class FileFormatError(LorakitError):
    """A file is missing, unreadable, not safetensors, truncated or has a lying header."""


class ArchitectureMismatch(LorakitError):
    """A LoRA was made for another model family than BASE."""


class UnmatchedKeysError(LorakitError):
    """Strict mode: LoRA keys for a component present in BASE address no base tensor."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


class NonFiniteError(LorakitError):
    """NaN or inf in LoRA factors."""


class OutputError(LorakitError):
    """OUT cannot be written: exists, equals BASE, folder unwritable, disk full."""


class BackendUnavailable(LorakitError):
    """An explicitly requested device/backend cannot run here."""
