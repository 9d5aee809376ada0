"""A loaded LoRA file: tensors, metadata, hash, format family and target architecture."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import formats
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
    with ThreadPoolExecutor(1) as pool:  # hashlib releases the GIL: hash while the keys are classified
        digest = pool.submit(lambda: hashlib.sha256(raw).hexdigest())
        keys = list(tensors)
        arch, source = formats.lora_arch(keys, metadata)
        family, peft = formats.family(keys), formats.peft_config(metadata)
        sha256 = digest.result()
    return LoraFile(
        path=str(path),
        tensors=tensors,
        metadata=metadata,
        sha256=sha256,
        family=family,
        arch=arch,
        arch_source=source,
        peft=peft,
    )
