"""Text encoders: CLIP-L (HF names), OpenCLIP bigG (SDXL te2, fused in_proj) and T5-XXL, as slots of
the image families and as stand-alone encoder files (``clip_l.safetensors``, ``t5xxl_fp16.safetensors``).

LoRAs name CLIP modules in HF space (``text_model.encoder.layers.N...``), also without the
``text_model.`` root (transformers >= 5) and with diffusers <= 0.20's attention names (``to_q``).
OpenCLIP bigG stores them its own way (``transformer.resblocks.N``, q/k/v fused in ``in_proj``),
so its HF space maps onto row slices.
"""

from __future__ import annotations

import re

from .spec import CLIP_G, CLIP_L, T5XXL, Convention, Family, Shapes, Signature, Slot, Target

# diffusers <= 0.20 attention-processor names for CLIP attention
LEGACY_ATTN = {"self_attn.q_proj": "self_attn.to_q", "self_attn.k_proj": "self_attn.to_k",
               "self_attn.v_proj": "self_attn.to_v", "self_attn.out_proj": "self_attn.to_out"}
# OpenCLIP resblock children -> HF path
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


def _hf_spaces(hf: dict[str, Target]) -> dict[str, dict[str, Target]]:
    """The HF space of a CLIP and its two variants: the short form (no ``text_model.``) and
    diffusers' legacy attention names of both."""
    short = {p[len("text_model."):]: t for p, t in hf.items() if p.startswith("text_model.")}
    legacy = {f[: -len(plain)] + old: t for space in (hf, short) for f, t in space.items()
              for plain, old in LEGACY_ATTN.items() if f.endswith(plain)}
    return {"hf": hf, "hf-short": short, "hf-legacy": legacy}


def clip_l_spaces(shapes: Shapes, prefix: str) -> dict[str, dict[str, Target]]:
    hf = {key[len(prefix): -len(".weight")]: Target(key) for key in sorted(shapes)
          if key.startswith(prefix + "text_model.") and key.endswith(".weight")}
    return _hf_spaces(hf)


def clip_g_spaces(shapes: Shapes, prefix: str) -> dict[str, dict[str, Target]]:
    hf: dict[str, Target] = {}
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
                    hf[base + "self_attn." + proj] = Target(key, rows=(i * h, (i + 1) * h))
            elif child in OPENCLIP_BLOCK:
                hf[base + OPENCLIP_BLOCK[child]] = Target(key)
        elif rest in OPENCLIP_TOP:
            hf[OPENCLIP_TOP[rest]] = Target(key)
        elif rest == "text_projection":
            # OpenCLIP applies x @ P, HF x @ W^T: a LoRA delta (HF orientation) lands transposed
            hf["text_projection"] = Target(key, transform="transpose")
    return _hf_spaces(hf)


def t5_spaces(shapes: Shapes, prefix: str) -> dict[str, dict[str, Target]]:
    native = {}
    for key in sorted(shapes):
        if key.startswith(prefix) and key.endswith(".weight"):
            path = key[len(prefix): -len(".weight")]
            if path.startswith("encoder.") or path == "shared":
                native[path] = Target(key)
    return {"native": native}


def _hf_conventions(kind: str, kohya: tuple[str, ...], peft: str, comfy: str) -> tuple[Convention, ...]:
    out = [Convention("kohya", kind, p, "_", space) for p in kohya for space in ("hf", "hf-short")]
    out += [Convention("peft", kind, peft, ".", space, roles="peft", alpha="metadata") for space in ("hf", "hf-short")]
    out.append(Convention("diffusers-legacy", kind, peft, ".", "hf-legacy", roles="diffusers-processor"))
    out.append(Convention("comfy", kind, comfy, ".", "hf"))
    return tuple(out)


def clip_l_slot(prefix: str, kohya: tuple[str, ...] = ("lora_te1_", "lora_te_")) -> Slot:
    """CLIP-L at ``prefix`` in a single file; ``kohya``: its kohya prefixes, the one written first."""
    return Slot(CLIP_L, (prefix,), clip_l_spaces,
                _hf_conventions("clip_l", kohya, "text_encoder.", "text_encoders.clip_l.transformer."),
                probe="text_model.", claims=("text_encoders.clip_l.",))


def clip_g_slot(prefix: str) -> Slot:
    return Slot(CLIP_G, (prefix,), clip_g_spaces,
                _hf_conventions("clip_g", ("lora_te2_",), "text_encoder_2.", "text_encoders.clip_g.transformer."),
                claims=("text_encoders.clip_g.",))


def t5_slot(prefix: str) -> Slot:
    conventions = (Convention("kohya", "t5xxl", "lora_te3_", "_", "native"),
                   Convention("onetrainer", "t5xxl", "lora_te2_", "_", "native"),
                   Convention("peft", "t5xxl", "text_encoder_2.", ".", "native", roles="peft", alpha="metadata"),
                   Convention("comfy", "t5xxl", "text_encoders.t5xxl.transformer.", ".", "native"))
    return Slot(T5XXL, (prefix,), t5_spaces, conventions, claims=("text_encoders.t5xxl.",))


CLIP_L_FILE = Family(
    id="clip_l", name="stand-alone CLIP-L text encoder",
    slots=(clip_l_slot(""),),
    signature=Signature(("text_model.encoder.layers.0.self_attn.q_proj.weight",)),
    own_loras=False,
)
T5XXL_FILE = Family(
    id="t5xxl", name="stand-alone T5-XXL text encoder",
    slots=(t5_slot(""),),
    signature=Signature(("encoder.block.0.layer.0.SelfAttention.q.weight",)),
    own_loras=False,
)
