"""LoRA naming conventions: tensor-name suffixes (factor roles), format families, target arch.

A LoRA key is ``<module name><suffix>``. The suffix says which factor it is (its *role*);
the module name is looked up in the base's alias table (``lorakit.arch``). Families and
prefixes only matter for reports and for sorting unmatched keys into components.
"""

from __future__ import annotations

import json
import re

# suffix -> role. Tried longest first; the first whose module name resolves wins.
SUFFIX_ROLES: dict[str, str] = {
    # kohya / LyCORIS LoRA, LoCon (+Tucker mid)
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha",
    # PEFT / ai-toolkit / BFL wrapper
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_B.bias": "up_bias",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    # diffusers converted and legacy attention processors
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",
    # XLabs processors (module name ends in qkv_lora1 / proj_lora ...)
    ".down.weight": "down", ".up.weight": "up",
    # full-weight deltas and replacements
    ".diff": "diff", ".diff_b": "diff_b", ".set_weight": "set", ".scale": "set",
    # DoRA magnitude
    ".dora_scale": "dora_scale", ".lora_magnitude_vector": "dora_scale",
    # LyCORIS algorithms (applied by the adapters of their own modules)
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".oft_blocks": "oft_blocks", ".oft_diag": "oft_blocks", ".rescale": "rescale",
    ".a1.weight": "a1", ".a2.weight": "a2", ".b1.weight": "b1", ".b2.weight": "b2",
    ".on_input": "on_input", ".weight": "ia3_weight",
    # LyCORIS norm modules: full deltas of a norm layer's weight and bias, i.e. diff / diff_b
    ".w_norm": "diff", ".b_norm": "diff_b",
}
_SUFFIXES = sorted(SUFFIX_ROLES, key=len, reverse=True)


def split_key(key: str, known) -> tuple[str, str]:
    """(module, role) of a LoRA key; ``known(module)`` says whether a module name resolves."""
    candidates = [(key[: -len(s)], SUFFIX_ROLES[s]) for s in _SUFFIXES if key.endswith(s) and len(key) > len(s)]
    for module, role in candidates:
        if known(module):
            return module, role
    if candidates:
        return candidates[0]
    return key, "unknown"


# prefix of a module name -> component id; "te2" is OpenCLIP bigG on SDXL and T5 on Flux
COMPONENT_PREFIXES: list[tuple[str, str]] = [
    ("lora_unet_", "unet"), ("lora_transformer_", "unet"), ("lycoris_", "unet"),
    ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"), ("unet.", "unet"),
    ("transformer.", "unet"), ("base_model.model.", "unet"),
    ("double_blocks.", "unet"), ("single_blocks.", "unet"), ("final_layer.", "unet"),
    ("img_in", "unet"), ("txt_in", "unet"), ("time_in.", "unet"), ("vector_in.", "unet"), ("guidance_in.", "unet"),
    ("down_blocks.", "unet"), ("mid_block.", "unet"), ("up_blocks.", "unet"),
    ("lora_te1_", "clip_l"), ("lora_te_", "clip_l"), ("text_encoder.", "clip_l"), ("text_encoders.clip_l.", "clip_l"),
    ("lora_te2_", "te2"), ("text_encoder_2.", "te2"),
    ("lora_te3_", "t5xxl"), ("text_encoders.t5xxl.", "t5xxl"), ("text_encoders.clip_g.", "clip_g"),
]


def component_of(module: str, lora_arch: str | None) -> str | None:
    for prefix, comp in COMPONENT_PREFIXES:
        if module.startswith(prefix):
            if comp == "te2":
                return "t5xxl" if lora_arch == "flux" else "clip_g"
            return comp
    return None


def family(keys: list[str]) -> str:
    """Format family, for reports (the key mapping itself does not depend on it)."""
    ks = keys
    if any(".processor." in k and "_lora" in k for k in ks):
        return "xlabs" if any(k.startswith(("double_blocks.", "single_blocks.")) for k in ks) else "diffusers-legacy"
    if any(k.startswith("lycoris_") for k in ks):
        return "lycoris"
    lyco = (".hada_", ".lokr_", ".oft_blocks", ".diff", ".a1.weight", ".dora_scale", ".on_input")
    if any(k.startswith("lora_") and ".lora_down" not in k and any(t in k for t in lyco) for k in ks):
        return "lycoris"
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in ks):
        return "onetrainer" if any(k.startswith("lora_transformer_") for k in ks) else "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in ks):
        if any(k.startswith(("double_blocks.", "single_blocks.")) for k in ks):
            return "bfl"
        return "peft"
    if any(".lora.down." in k or ".lora_linear_layer." in k for k in ks):
        return "diffusers"
    if any(k.startswith("diffusion_model.") for k in ks):
        return "comfyui"
    return "unknown"


# metadata values -> arch
META_ARCH = {
    "sd_v1": "sd15", "sd_1.5": "sd15", "sdxl_base_v1-0": "sdxl", "sdxl_1.0": "sdxl", "flux1": "flux",
}
MODELSPEC_ARCH = [("stable-diffusion-v1", "sd15"), ("stable-diffusion-xl", "sdxl"), ("flux-1", "flux")]
KEY_ARCH = [
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks|transformer\.transformer_blocks|"
                r"lycoris_transformer_blocks|lora_transformer_|lora_te3_|x_embedder"), "flux"),
    (re.compile(r"lora_te2_|text_encoder_2\.|transformer_blocks[._][1-9]|label_emb|add_embedding"), "sdxl"),
    (re.compile(r"input_blocks_[12]_1_|output_blocks_(9|10|11)_|down_blocks[._]0[._]attentions|"
                r"up_blocks[._]3[._]attentions"), "sd15"),
]


def lora_arch(keys: list[str], metadata: dict[str, str]) -> tuple[str | None, str]:
    """(arch or None, how it was decided)."""
    v = metadata.get("ss_base_model_version", "")
    if v in META_ARCH:
        return META_ARCH[v], f"metadata ss_base_model_version={v}"
    spec = metadata.get("modelspec.architecture", "")
    for prefix, arch in MODELSPEC_ARCH:
        if spec.startswith(prefix):
            return arch, f"metadata modelspec.architecture={spec}"
    for pattern, arch in KEY_ARCH:
        hit = next((k for k in keys if pattern.search(k)), None)
        if hit:
            return arch, f"key {hit}"
    return None, "undetermined"


def peft_config(metadata: dict[str, str]) -> dict[str, dict]:
    """Per-component LoraConfig from diffusers' ``lora_adapter_metadata`` (may be absent)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp, _, field = k.partition(".")
        out.setdefault(comp, {})[field] = v
    return out
