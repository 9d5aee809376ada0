"""A loaded LoRA file: tensors, metadata, hash, format family and target architecture."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import formats
from .arch import detect, lora_family
from .errors import FileFormatError, LorakitError
from .io import open_container
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

    @property
    def converted(self) -> bool:
        """Written by ``lorakit convert``: its modules mean exactly what their names and alphas say
        (a block-diagonal fused module is not a kohya split_qkv file, whose alpha is per part)."""
        try:
            entry = json.loads(self.metadata.get("lorakit", "{}"))
        except ValueError:
            return False
        return isinstance(entry, dict) and "converted" in entry


def load_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file completely (LoRAs are small) and classify it. A checkpoint given as the LoRA
    is recognised from its header, before its data is read."""
    with open_container(path) as f:
        keys, shapes = f.keys(), f.shapes()
    if keys and not formats.looks_like_lora(keys):
        try:
            spec = detect(shapes, str(path))
        except LorakitError:
            spec = None
        if spec is not None:
            raise FileFormatError(f"{path}: is a checkpoint ({spec.name}), not a LoRA: BASE and LORA swapped?")
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
