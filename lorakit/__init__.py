"""lorakit: merge and patch LoRAs into diffusion-model checkpoints, exactly and in bounded memory.

The public API is imported on first use (``lorakit.merge_file`` ...), so ``import lorakit`` and the
command line's start do not pay for torch until a tensor is touched."""

from importlib import import_module

from ._version import __version__
from .errors import (
    ArchitectureMismatch, BackendUnavailable, FileFormatError, LorakitError, NonFiniteError, OutputError,
    UnmatchedKeysError, UsageError,
)

# public name -> the module that defines it
_API = {
    "load_lora": "lora", "LoraFile": "lora", "plan": "merge", "merge_file": "merge", "lowrank_update_": "ops",
    "patch": "patching", "PatchHandle": "patching", "LoraSpec": "planner", "parse_lora_arg": "planner",
}

__all__ = [
    "__version__", *_API, "LorakitError", "UsageError", "FileFormatError", "ArchitectureMismatch",
    "UnmatchedKeysError", "NonFiniteError", "OutputError", "BackendUnavailable",
]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
