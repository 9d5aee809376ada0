"""Stand-in layouts for text encoders a base file lacks (a Flux transformer file has no CLIP-L or
T5-XXL), built from a LoRA's own names: CLIP-L and T5-XXL store every module under its own name
(no fused rows), so their key map needs only the module names, and ``convert`` can rename a
LoRA's text-encoder parts without the encoder's file. Shapes come from the LoRA's factors; only a
real file can check them."""

from __future__ import annotations

import re

from .spec import CLIP_L, T5XXL, BaseSpec, Shapes

# the Linear layers LoRAs train, per layer / block, in each encoder's own names
CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
T5_BLOCK = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.0.SelfAttention.o",
            "layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
            "layer.1.DenseReluDense.wo")
SKELETONS = {  # kind -> (index pattern in a LoRA name, module template, per-index children)
    CLIP_L.id: (r"layers[._](\d+)[._]", "text_model.encoder.layers.{i}.", CLIP_LAYER),
    T5XXL.id: (r"block[._](\d+)[._]", "encoder.block.{i}.", T5_BLOCK),
}
PLACEHOLDER = (1, 1)  # a shape until the LoRA's factors give the real one


def add_stand_ins(spec: BaseSpec, shapes: Shapes, lora_keys: list[str]) -> list[str]:
    """Add to ``spec`` (and ``shapes``) a stand-in for each CLIP-L / T5-XXL slot of its family that
    BASE lacks and the LoRA's names address; returns the stand-ins' labels."""
    added = []
    for slot in spec.family.slots[1:]:
        if slot.kind.id not in SKELETONS or spec.component(slot.kind.id) is not None:
            continue
        claims = tuple(c for c in slot.name_claims() if c)
        mine = [k for k in lora_keys if k.startswith(claims)]
        pattern, template, children = SKELETONS[slot.kind.id]
        indices = {int(m.group(1)) for k in mine if (m := re.search(pattern, k))}
        if not indices:
            continue
        prefix = slot.prefixes[0]
        skeleton = {f"{prefix}{template.format(i=i)}{c}.weight": PLACEHOLDER
                    for i in range(max(indices) + 1) for c in children}
        shapes.update(skeleton)
        spec.components.append(slot.component(skeleton, prefix))
        added.append(slot.word)
    return added
