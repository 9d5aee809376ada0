"""FLUX.2 (dev 32B; klein 4B / 9B): BFL names like Flux.1, with the modulations shared by all blocks
(``double_stream_modulation_img/txt.lin``, ``single_stream_modulation.lin``), SwiGLU MLPs and no
biases; diffusers' Flux2Transformer2DModel names as aliases and as a view.

Sizes come from the checkpoint: h = rows(img_attn.qkv) / 3, the MLP width = rows(img_mlp.0) / 2
(SwiGLU: gate and up stacked), so ``linear1`` = [q; k; v; gate; up] and ``linear2`` reads h + mlp.
dev has a guidance embedder (``guidance_in``), klein does not; klein's size is its width.
"""

from __future__ import annotations

from ..keys import count
from . import conventions as C
from .flux import BFL_SHARED
from .modules import Row, Table, View, expand, native_space
from .spec import DENOISER, Family, Shapes, Signature, Slot, Target

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
LEAVES = ("weight", "scale")

FUSED = {
    "double_blocks.{i}.img_attn.qkv": ("h", "h", "h"),
    "double_blocks.{i}.txt_attn.qkv": ("h", "h", "h"),
    "double_blocks.{i}.img_mlp.0": ("mlp", "mlp"),
    "double_blocks.{i}.txt_mlp.0": ("mlp", "mlp"),
    "single_blocks.{i}.linear1": ("h", "h", "h", "mlp", "mlp"),
}

# diffusers Flux2Transformer2DModel (convert_flux2_transformer_checkpoint_to_diffusers, module by module)
DIFFUSERS = Table("diffusers", (
    Row("transformer_blocks.{i}.attn.to_q", "double_blocks.{i}.img_attn.qkv", 0),
    Row("transformer_blocks.{i}.attn.to_k", "double_blocks.{i}.img_attn.qkv", 1),
    Row("transformer_blocks.{i}.attn.to_v", "double_blocks.{i}.img_attn.qkv", 2),
    Row("transformer_blocks.{i}.attn.add_q_proj", "double_blocks.{i}.txt_attn.qkv", 0),
    Row("transformer_blocks.{i}.attn.add_k_proj", "double_blocks.{i}.txt_attn.qkv", 1),
    Row("transformer_blocks.{i}.attn.add_v_proj", "double_blocks.{i}.txt_attn.qkv", 2),
    # fused names (diffusers' fuse_qkv_projections; its BFL LoKr conversion targets these)
    Row("transformer_blocks.{i}.attn.to_qkv", "double_blocks.{i}.img_attn.qkv"),
    Row("transformer_blocks.{i}.attn.to_added_qkv", "double_blocks.{i}.txt_attn.qkv"),
    Row("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj"),
    Row("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj"),
    Row("transformer_blocks.{i}.ff.linear_in", "double_blocks.{i}.img_mlp.0"),
    Row("transformer_blocks.{i}.ff.linear_out", "double_blocks.{i}.img_mlp.2"),
    Row("transformer_blocks.{i}.ff_context.linear_in", "double_blocks.{i}.txt_mlp.0"),
    Row("transformer_blocks.{i}.ff_context.linear_out", "double_blocks.{i}.txt_mlp.2"),
    Row("transformer_blocks.{i}.attn.norm_q", "double_blocks.{i}.img_attn.norm.query_norm", leaf="scale"),
    Row("transformer_blocks.{i}.attn.norm_k", "double_blocks.{i}.img_attn.norm.key_norm", leaf="scale"),
    Row("transformer_blocks.{i}.attn.norm_added_q", "double_blocks.{i}.txt_attn.norm.query_norm", leaf="scale"),
    Row("transformer_blocks.{i}.attn.norm_added_k", "double_blocks.{i}.txt_attn.norm.key_norm", leaf="scale"),
    Row("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj", "single_blocks.{i}.linear1"),
    Row("single_transformer_blocks.{i}.attn.to_out", "single_blocks.{i}.linear2"),
    Row("single_transformer_blocks.{i}.attn.norm_q", "single_blocks.{i}.norm.query_norm", leaf="scale"),
    Row("single_transformer_blocks.{i}.attn.norm_k", "single_blocks.{i}.norm.key_norm", leaf="scale"),
    Row("double_stream_modulation_img.linear", "double_stream_modulation_img.lin"),
    Row("double_stream_modulation_txt.linear", "double_stream_modulation_txt.lin"),
    Row("single_stream_modulation.linear", "single_stream_modulation.lin"),
    Row("x_embedder", "img_in"),
    Row("context_embedder", "txt_in"),
    Row("time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    Row("time_guidance_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    Row("time_guidance_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    Row("time_guidance_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    Row("proj_out", "final_layer.linear"),
    Row("norm_out.linear", "final_layer.adaLN_modulation.1", transform="swap_halves"),
))

ROOTS = ("double_blocks.", "single_blocks.", "final_layer.", "img_in", "txt_in", "time_in.", "guidance_in.",
         "double_stream_modulation_", "single_stream_modulation.")
CONVENTIONS = (
    C.KOHYA_NATIVE,  # kohya / musubi: lora_unet_double_blocks_0_img_attn_qkv
    C.COMFY,  # ai-toolkit (its own BFL model), ComfyUI: diffusion_model.double_blocks.0.img_attn.qkv
    C.bare("bfl", ROOTS),
    C.PEFT_TRANSFORMER, C.PEFT_BASE_MODEL, C.LYCORIS_DIFFUSERS, C.ONETRAINER,
)
KLEIN_SIZES = {3072: "4b", 4096: "9b"}


def dims(shapes: Shapes, prefix: str) -> dict[str, int]:
    h = shapes[prefix + "double_blocks.0.img_attn.qkv.weight"][0] // 3
    return {"h": h, "mlp": shapes[prefix + "double_blocks.0.img_mlp.0.weight"][0] // 2}


def spaces(shapes: Shapes, prefix: str) -> dict[str, dict[str, Target]]:
    d = dims(shapes, prefix)
    return {"native": native_space(shapes, prefix, LEAVES, FUSED, d),
            "diffusers": expand(DIFFUSERS, shapes, prefix, FUSED, d)}


def variant(shapes: Shapes, prefix: str) -> tuple[str, str]:
    """(``flux2-dev``, ``FLUX.2 dev``) or (``flux2-klein-4b``, ``FLUX.2 klein 4B``), by the guidance
    embedder and the width (a width no released klein has: ``FLUX.2 klein, width N``)."""
    width = dims(shapes, prefix)["h"]
    if prefix + "guidance_in.in_layer.weight" in shapes:
        return "flux2-dev", "FLUX.2 dev" + ("" if width == 6144 else f", width {width}")
    size = KLEIN_SIZES.get(width)
    return ("flux2-klein-" + size, f"FLUX.2 klein {size.upper()}") if size else \
        ("flux2-klein", f"FLUX.2 klein, width {width}")


def details(shapes: Shapes, prefix: str) -> dict:
    d = dims(shapes, prefix)
    keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    return {"hidden_size": d["h"], "mlp_hidden": d["mlp"], "double_blocks": count(keys, r"double_blocks\.(\d+)\."),
            "single_blocks": count(keys, r"single_blocks\.(\d+)\.")}


FLUX2 = Family(
    id="flux2", name="FLUX.2",
    slots=(Slot(DENOISER, PREFIXES, spaces, CONVENTIONS, label="transformer"),),
    signature=Signature(("double_blocks.0.img_attn.qkv.weight", "double_stream_modulation_img.lin.weight")),
    lora_signals=(BFL_SHARED, r"(double|single)_stream_modulation|ff(_context)?[._]linear_(in|out)|to_qkv_mlp_proj|"
                              r"time_guidance_embed|single_transformer_blocks[._]\d+[._]attn[._]to_out"),
    modelspec=("flux-2", "flux.2"),
    details=details, variant=variant,
    widths={6144: "FLUX.2 dev", 4096: "FLUX.2 klein 9B", 3072: "FLUX.2 klein 4B"},
    diffusers=View("diffusers Flux2Transformer2DModel",
                   Signature(("transformer_blocks.0.attn.to_q.weight", "x_embedder.weight",
                              "double_stream_modulation_img.linear.weight")), DIFFUSERS),
)
