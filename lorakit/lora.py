"""A loaded LoRA file: tensors, metadata, hash, format family and target architecture."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import formats
from .arch import lora_family
from .io.safetensors import load_all


@dataclass
class LoraFile:
    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str
    family: str
    arch: str | None
    arch_source: str
    peft: dict[str, dict] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return Path(self.path).name


def load_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file completely (LoRAs are small) and classify it."""
    tensors, metadata, raw = load_all(path)
    keys = list(tensors)
    arch, source = lora_family(keys, metadata)
    return LoraFile(
        path=str(path),
        tensors=tensors,
        metadata=metadata,
        sha256=hashlib.sha256(raw).hexdigest(),
        family=formats.family(keys),
        arch=arch,
        arch_source=source,
        peft=formats.peft_config(metadata, str(path)),
    )
