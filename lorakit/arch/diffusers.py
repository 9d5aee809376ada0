"""diffusers model layouts (UNet2DConditionModel, FluxTransformer2DModel, ...) as views of the
single-file layout.

The key maps speak the single-file names (LDM U-Net, BFL Flux). A diffusers state dict is mapped
onto those names once: each logical single-file tensor is made of row blocks of real diffusers
tensors (Flux ``to_q``/``to_k``/``to_v`` are the rows of BFL ``qkv``; ``norm_out.linear`` is
``final_layer.adaLN_modulation.1`` with its two halves swapped). Every LoRA naming scheme that
works on a single-file checkpoint then works on the diffusers model too. Each family declares its
view (``Family.diffusers``); most are read from the same module table as the family's aliases.
"""

from __future__ import annotations

from .modules import Layout
from .registry import FAMILIES
from .spec import Shapes


def layout(shapes: Shapes) -> Layout | None:
    """The single-file view of a diffusers state dict, or None when it is not one lorakit knows.
    Several matching views: the one whose signature names the most keys."""
    keys = set(shapes)
    views = {id(f.diffusers): f.diffusers for f in FAMILIES if f.diffusers is not None}.values()
    hits = [v for v in views if v.signature.matches(keys, "")]
    if not hits:
        return None
    return max(hits, key=lambda v: len(v.signature.all_of)).layout(shapes)
