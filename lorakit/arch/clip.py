"""Text encoders: CLIP-L (HF names), OpenCLIP bigG (SDXL te2, fused in_proj) and T5-XXL."""

from __future__ import annotations

import re

from .spec import Component, Target, underscored

# LoRA spellings per component: (prefix, joins-with-dots?)
CLIP_L_PREFIXES = ["lora_te_", "lora_te1_"]
CLIP_L_DOTTED = ["text_encoder."]
CLIP_G_PREFIXES = ["lora_te2_"]
CLIP_G_DOTTED = ["text_encoder_2."]
T5_PREFIXES = ["lora_te3_", "lora_te2_"]  # te2 = OneTrainer's Flux T5 naming
T5_DOTTED = ["text_encoder_2."]

# diffusers <= 0.20 attention-processor names for CLIP attention
LEGACY_ATTN = {"self_attn.q_proj": "self_attn.to_q", "self_attn.k_proj": "self_attn.to_k",
               "self_attn.v_proj": "self_attn.to_v", "self_attn.out_proj": "self_attn.to_out"}


def _hf_names(hf: str, underscore_prefixes: list[str], dotted_prefixes: list[str], generic: str) -> list[str]:
    """Every LoRA spelling of the HF CLIP module path ``hf`` (``text_model.encoder...``)."""
    short = hf[len("text_model."):] if hf.startswith("text_model.") else None  # transformers >= 5
    forms = [hf] + ([short] if short else [])
    legacy = [f[: -len(plain)] + old for f in forms for plain, old in LEGACY_ATTN.items() if f.endswith(plain)]
    names = [p + underscored(f) for p in underscore_prefixes for f in forms]
    names += [p + f for p in dotted_prefixes for f in forms + legacy]
    names.append(generic + hf)
    return names


def build_clip_l(shapes: dict[str, tuple[int, ...]], prefix: str) -> Component:
    comp = Component("clip_l", prefix)
    for key in sorted(shapes):
        if key.startswith(prefix + "text_model.") and key.endswith(".weight"):
            hf = key[len(prefix) : -len(".weight")]
            comp.add(_hf_names(hf, CLIP_L_PREFIXES, CLIP_L_DOTTED, "text_encoders.clip_l.transformer."), Target(key))
    return comp


# OpenCLIP resblock children -> (HF path, row block index into in_proj or None)
OPENCLIP_BLOCK = {
    "attn.out_proj.weight": "self_attn.out_proj",
    "mlp.c_fc.weight": "mlp.fc1",
    "mlp.c_proj.weight": "mlp.fc2",
    "ln_1.weight": "layer_norm1",
    "ln_2.weight": "layer_norm2",
}
OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding",
    "positional_embedding": "text_model.embeddings.position_embedding",
    "ln_final.weight": "text_model.final_layer_norm",
}


def build_clip_g(shapes: dict[str, tuple[int, ...]], prefix: str) -> Component:
    comp = Component("clip_g", prefix)
    generic = "text_encoders.clip_g.transformer."

    def add(hf: str, target: Target) -> None:
        comp.add(_hf_names(hf, CLIP_G_PREFIXES, CLIP_G_DOTTED, generic), target)

    for key in sorted(shapes):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", rest)
        if m:
            layer, child = m.groups()
            base = f"text_model.encoder.layers.{layer}."
            if child == "attn.in_proj_weight":
                h = shapes[key][0] // 3
                for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    add(base + "self_attn." + proj, Target(key, rows=(i * h, (i + 1) * h)))
            elif child in OPENCLIP_BLOCK:
                add(base + OPENCLIP_BLOCK[child], Target(key))
        elif rest in OPENCLIP_TOP:
            add(OPENCLIP_TOP[rest], Target(key))
        elif rest == "text_projection":
            # OpenCLIP applies x @ P, HF x @ W^T: a LoRA delta (HF orientation) lands transposed
            target = Target(key, transform="transpose")
            comp.add(["lora_te2_text_projection", "text_encoder_2.text_projection", generic + "text_projection"], target)
    return comp


def build_t5(shapes: dict[str, tuple[int, ...]], prefix: str) -> Component:
    comp = Component("t5xxl", prefix)
    for key in sorted(shapes):
        if key.startswith(prefix) and key.endswith(".weight"):
            path = key[len(prefix) : -len(".weight")]
            if not (path.startswith("encoder.") or path == "shared"):
                continue
            names = [p + underscored(path) for p in T5_PREFIXES]
            names += [p + path for p in T5_DOTTED] + ["text_encoders.t5xxl.transformer." + path]
            comp.add(names, Target(key))
    return comp
