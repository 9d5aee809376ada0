"""Adapter algorithms, one module each, chosen from the roles a LoRA module carries."""

from __future__ import annotations

import torch

from .base import Adapter
from .boft import BOFT
from .full import Full, Set
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .oft import OFT

# Tried in order; when several match one module the last wins (ComfyUI's precedence).
ADAPTERS: list[type[Adapter]] = [LoRA, LoHa, LoKr, GLoRA, OFT, BOFT, IA3, Full, Set]

def select(roles: dict[str, torch.Tensor], default_alpha: float | None) -> tuple[Adapter | None, list[str], list[str]]:
    """(adapter, roles it leaves unused, notes) for one module's tensors."""
    matching = [cls for cls in ADAPTERS if cls.matches(roles)]
    notes: list[str] = []
    if not matching:
        return None, sorted(roles), notes
    if len(matching) > 1:
        notes.append("several adapter types in one module: " + ", ".join(c.__name__ for c in matching)
                     + f"; the last ({matching[-1].__name__}) applies, as in ComfyUI")
    cls = matching[-1]
    used = cls.required | cls.optional | cls.common
    adapter = cls({r: t for r, t in roles.items() if r in used}, default_alpha)
    return adapter, sorted(set(roles) - used), notes
