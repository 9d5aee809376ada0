"""lorakit: merge and patch LoRAs into diffusion-model checkpoints, exactly and in bounded memory."""

from ._version import __version__
from .errors import (
    ArchitectureMismatch, BackendUnavailable, FileFormatError, LorakitError, NonFiniteError, OutputError,
    UnmatchedKeysError, UsageError,
)
from .lora import LoraFile, load_lora
from .merge import merge_file, plan
from .ops import lowrank_update_
from .patch import PatchHandle, patch
from .planner import LoraSpec, parse_lora_arg

__all__ = [
    "__version__", "load_lora", "LoraFile", "plan", "merge_file", "lowrank_update_", "patch", "PatchHandle",
    "LoraSpec", "parse_lora_arg", "LorakitError", "UsageError", "FileFormatError", "ArchitectureMismatch",
    "UnmatchedKeysError", "NonFiniteError", "OutputError", "BackendUnavailable",
]
