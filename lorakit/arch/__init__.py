"""Base-checkpoint detection: which architecture, which components, and their key maps."""

from __future__ import annotations

from ..errors import ArchitectureMismatch
from . import clip, flux, unet
from .spec import ARCH_NAMES, COMPONENTS, BaseSpec, Component, Target

__all__ = ["detect", "BaseSpec", "Component", "Target", "ARCH_NAMES", "COMPONENTS"]

UNET_PREFIXES = ["model.diffusion_model.", "diffusion_model.", ""]
FLUX_PREFIXES = ["model.diffusion_model.", "diffusion_model.", ""]
# single-file text-encoder locations: (key prefix, component builder)
SD15_CLIP = "cond_stage_model.transformer."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_CLIP_G = "conditioner.embedders.1.model."


def _first_prefix(shapes: dict, prefixes: list[str], probe: str) -> str | None:
    return next((p for p in prefixes if p + probe in shapes), None)


def detect(shapes: dict[str, tuple[int, ...]], name: str = "BASE") -> BaseSpec:
    """Detect the architecture of a checkpoint from its key -> shape map."""
    fp = _first_prefix(shapes, FLUX_PREFIXES, "double_blocks.0.img_attn.qkv.weight")
    if fp is not None:
        comp, details = flux.build(shapes, fp)
        comps = [comp]
        for te_prefix, builder in (("text_encoders.clip_l.transformer.", clip.build_clip_l),
                                   ("text_encoders.t5xxl.transformer.", clip.build_t5)):
            if any(k.startswith(te_prefix) for k in shapes):
                comps.append(builder(shapes, te_prefix))
        return BaseSpec("flux", comps, {"prefix": fp, **details})
    up = _first_prefix(shapes, UNET_PREFIXES, "input_blocks.0.0.weight")
    if up is not None:
        comps = [unet.build(shapes, up)]
        sdxl = up + "label_emb.0.0.weight" in shapes or any(k.startswith(SDXL_CLIP_G) for k in shapes)
        if any(k.startswith(SD15_CLIP + "text_model.") for k in shapes):
            comps.append(clip.build_clip_l(shapes, SD15_CLIP))
        if any(k.startswith(SDXL_CLIP_L + "text_model.") for k in shapes):
            comps.append(clip.build_clip_l(shapes, SDXL_CLIP_L))
        if any(k.startswith(SDXL_CLIP_G) for k in shapes):
            comps.append(clip.build_clip_g(shapes, SDXL_CLIP_G))
        return BaseSpec("sdxl" if sdxl else "sd15", comps, {"prefix": up})
    if "text_model.encoder.layers.0.self_attn.q_proj.weight" in shapes:
        return BaseSpec("clip_l", [clip.build_clip_l(shapes, "")], {"prefix": ""})
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
        return BaseSpec("t5xxl", [clip.build_t5(shapes, "")], {"prefix": ""})
    sample = ", ".join(sorted(shapes)[:3])
    raise ArchitectureMismatch(
        f"{name}: not a checkpoint lorakit knows (SD1.5, SDXL, Flux.1, CLIP-L or T5-XXL); first keys: {sample}")
