"""lorakit: merge and patch LoRAs into SD1.5, SDXL and Flux.1 checkpoints, exactly and in bounded memory."""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ArchitectureMismatch, BackendUnavailable, FileFormatError, LorakitError, NonFiniteError, OutputError,
    UnmatchedKeysError,
)
from .lora import LoraFile, load_lora  # noqa: E402
from .merge import merge_file, plan  # noqa: E402
from .ops import lowrank_update_  # noqa: E402
from .patch import PatchHandle, patch  # noqa: E402
from .plan import LoraSpec, parse_lora_arg  # noqa: E402

__all__ = [
    "__version__", "load_lora", "LoraFile", "plan", "merge_file", "lowrank_update_", "patch", "PatchHandle", "LoraSpec", "parse_lora_arg",
    "LorakitError", "FileFormatError", "ArchitectureMismatch", "UnmatchedKeysError", "NonFiniteError",
    "OutputError", "BackendUnavailable",
]
