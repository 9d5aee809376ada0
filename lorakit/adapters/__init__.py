"""Adapter algorithms, one module each, chosen from the roles a LoRA module carries."""

from __future__ import annotations

import torch

from .base import Adapter
from .full import Full, Set
from .lora import LoRA

# Tried in order; when several match one module the last wins (ComfyUI's precedence).
ADAPTERS: list[type[Adapter]] = [LoRA, Full, Set]

# roles that belong to algorithms lorakit recognises but cannot apply yet -> algorithm name
PENDING = {
    "hada_w1_a": "LoHa", "hada_w1_b": "LoHa", "hada_w2_a": "LoHa", "hada_w2_b": "LoHa",
    "hada_t1": "LoHa", "hada_t2": "LoHa",
    "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "lokr_w1_b": "LoKr", "lokr_w2": "LoKr",
    "lokr_w2_a": "LoKr", "lokr_w2_b": "LoKr", "lokr_t2": "LoKr",
    "oft_blocks": "OFT", "rescale": "OFT", "a1": "GLoRA", "a2": "GLoRA", "b1": "GLoRA", "b2": "GLoRA",
    "on_input": "IA3", "ia3_weight": "IA3", "w_norm": "norm", "b_norm": "norm",
}


def select(roles: dict[str, torch.Tensor], default_alpha: float | None) -> tuple[Adapter | None, list[str], list[str]]:
    """(adapter, roles it leaves unused, notes) for one module's tensors."""
    matching = [cls for cls in ADAPTERS if cls.matches(roles.keys())]
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
