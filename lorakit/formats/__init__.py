"""Reading a LoRA file's names: key -> (module, factor role), the format family for reports, and
the PEFT configuration in its metadata.

A LoRA key is ``<module name><suffix>``. The suffix says which factor it is (its *role*,
``formats.roles``); the module name is looked up in the base's alias table (``lorakit.arch``,
built from each family's conventions). The format family only matters for reports.
"""

from __future__ import annotations

import json

from .roles import SUFFIX_ROLES, SUFFIXES


def split_key(key: str, known) -> tuple[str, str]:
    """(module, role) of a LoRA key; ``known(module)`` says whether a module name resolves."""
    candidates = [(key[: -len(s)], SUFFIX_ROLES[s]) for s in SUFFIXES if key.endswith(s) and len(key) > len(s)]
    for module, role in candidates:
        if known(module):
            return module, role
    if candidates:
        return candidates[0]
    return key, "unknown"


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
