"""Reading a LoRA file's names: key -> (module, factor role), the format family for reports, and
the PEFT configuration in its metadata.

A LoRA key is ``<module name><suffix>``. The suffix says which factor it is (its *role*,
``formats.roles``); the module name is looked up in the base's alias table (``lorakit.arch``,
built from each family's conventions). The format family only matters for reports.
"""

from __future__ import annotations

import json
import math
import re

from ..errors import FileFormatError
from .roles import SUFFIX_ROLES, SUFFIXES, role_problem

# a file is a LoRA when at least this share of its keys carry an adapter-factor suffix
LORA_FRACTION = 0.5
NOT_FACTORS = ("unknown", "ia3_weight", "set")  # roles every checkpoint's keys also end in


def split_key(key: str, known) -> tuple[str, str]:
    """(module, role) of a LoRA key; ``known(module)`` says whether a module name resolves."""
    candidates = [(key[: -len(s)], SUFFIX_ROLES[s]) for s in SUFFIXES if key.endswith(s) and len(key) > len(s)]
    for module, role in candidates:
        if known(module):
            return module, role
    if candidates:
        return candidates[0]
    return key, "unknown"


def looks_like_lora(keys: list[str]) -> bool:
    """Most keys name LoRA factors (a checkpoint's ``.weight`` / ``.scale`` keys do not count)."""
    roles = [split_key(k, lambda m: False)[1] for k in keys]
    return bool(keys) and sum(r not in NOT_FACTORS for r in roles) >= LORA_FRACTION * len(keys)


def factor_problems(roles: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """``key: reason`` for every factor of a module (role -> key) whose shape cannot be its role's."""
    return [f"{key}: {why}" for role, key in roles.items() if (why := role_problem(role, shapes[key]))]


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


def _number(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def peft_config(metadata: dict[str, str], name: str = "LoRA") -> dict[str, dict]:
    """Per-component LoraConfig from diffusers' ``lora_adapter_metadata`` (may be absent).

    It sets alphas, so it is checked like tensor data: valid JSON, ``lora_alpha`` / ``r`` finite
    numbers, ``alpha_pattern`` / ``rank_pattern`` maps of compilable patterns to finite numbers."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}

    def refuse(reason: str) -> FileFormatError:
        return FileFormatError(f"{name}: metadata lora_adapter_metadata {reason}")

    try:
        flat = json.loads(raw)
    except (ValueError, RecursionError):
        raise refuse("is not valid JSON") from None
    if not isinstance(flat, dict):
        raise refuse("is not a JSON object")
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp, _, field = k.partition(".")
        if field in ("lora_alpha", "r") and v is not None and not _number(v):
            raise refuse(f"{k} = {str(v)[:40]!r} is not a finite number")
        if field in ("alpha_pattern", "rank_pattern") and v is not None:
            if not isinstance(v, dict) or not all(isinstance(p, str) and _number(x) for p, x in v.items()):
                raise refuse(f"{k} must map patterns to finite numbers")
            for p in v:
                try:
                    re.compile(p)
                except (re.error, RecursionError, OverflowError):
                    raise refuse(f"{k}: {p[:60]!r} is not a valid pattern") from None
        out.setdefault(comp, {})[field] = v
    return out


def peft_alpha(peft: dict[str, dict], module: str, rank: int) -> float | None:
    """The alpha a PEFT configuration (``peft_config``) gives a module (``unet.…`` / ``transformer.…``):
    ``alpha_pattern`` first, else ``lora_alpha``; rsLoRA's alpha / sqrt(r) as an equivalent alpha."""
    comp, _, rel = module.partition(".")
    cfg = peft.get(comp)
    if not cfg:
        return None
    alpha = cfg.get("lora_alpha")
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", rel):
            alpha = value
            break
    if alpha is None:
        return None
    if cfg.get("use_rslora"):
        return float(alpha) * math.sqrt(rank)  # so that alpha/rank == lora_alpha/sqrt(r)
    return float(alpha)
