"""Typed errors, every one lorakit raises. Each message is one line that names the file, the key and
what to do; the CLI prints it after ``lorakit: error:`` and exits with ``exit_code``."""

from __future__ import annotations


class LorakitError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits non-zero."""

    exit_code = 1


class UsageError(LorakitError):
    """An argument is invalid (a library call's or the command line's)."""

    exit_code = 2


class FileFormatError(LorakitError):
    """A file is missing, unreadable, not safetensors, truncated or has a lying header."""


class ArchitectureMismatch(LorakitError):
    """A LoRA was made for another model family than BASE, or BASE is no family lorakit knows."""


class KeyMapError(LorakitError):
    """A base file's names make a LoRA name ambiguous (it would address two tensors)."""


class DuplicateModuleError(LorakitError):
    """A LoRA file changes the same rows of a weight twice, through two of its modules, differently."""


class UnmatchedKeysError(LorakitError):
    """Strict mode: LoRA keys for a component present in BASE address no base tensor."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class NonFiniteError(LorakitError):
    """NaN or inf in LoRA factors."""


class ConversionError(LorakitError):
    """A LoRA module the target naming of ``convert`` cannot express exactly."""


class OutputError(LorakitError):
    """OUT cannot be written: exists, equals an input, folder unwritable, disk full."""


class BackendUnavailable(LorakitError):
    """An explicitly requested device/backend cannot run here."""


class WorkflowError(LorakitError):
    """A ComfyUI workflow cannot be turned into merge jobs."""


class TokenizerError(LorakitError):
    """Tokenizer data for ``lorakit sample`` is missing or unreadable."""

    exit_code = 2


class SampleError(LorakitError):
    """``lorakit sample`` cannot run with these files or options."""

    exit_code = 2


class PatchStateError(LorakitError):
    """A patch handle cannot do what was asked in its current state (no backup, closed)."""
