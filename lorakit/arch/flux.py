"""Flux.1 (dev / schnell and their fine-tunes): the BFL transformer layout, with diffusers and XLabs
names as (row-sliced) aliases.

Sizes come from the checkpoint: h = rows(img_attn.qkv) / 3, the mlp width = rows(linear1) - 3h,
block counts from the keys present.
"""

from __future__ import annotations

from ..keys import count
from . import conventions as C
from .modules import Row, Table, View, expand, native_space
from .spec import DENOISER, Convention, Family, Shapes, Signature, Slot, Target, vae_slot
from .text import clip_l_slot, t5_slot

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
LEAVES = ("weight", "scale")  # BFL RMSNorm gains are called scale

# fused native modules: their row parts, by size name
FUSED = {
    "double_blocks.{i}.img_attn.qkv": ("h", "h", "h"),
    "double_blocks.{i}.txt_attn.qkv": ("h", "h", "h"),
    "single_blocks.{i}.linear1": ("h", "h", "h", "mlp"),
}

DIFFUSERS = Table("diffusers", (
    Row("transformer_blocks.{i}.attn.to_q", "double_blocks.{i}.img_attn.qkv", 0),
    Row("transformer_blocks.{i}.attn.to_k", "double_blocks.{i}.img_attn.qkv", 1),
    Row("transformer_blocks.{i}.attn.to_v", "double_blocks.{i}.img_attn.qkv", 2),
    Row("transformer_blocks.{i}.attn.add_q_proj", "double_blocks.{i}.txt_attn.qkv", 0),
    Row("transformer_blocks.{i}.attn.add_k_proj", "double_blocks.{i}.txt_attn.qkv", 1),
    Row("transformer_blocks.{i}.attn.add_v_proj", "double_blocks.{i}.txt_attn.qkv", 2),
    Row("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj"),
    Row("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj"),
    Row("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.0"),
    Row("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.2"),
    Row("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.0"),
    Row("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.2"),
    Row("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.lin"),
    Row("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.lin"),
    Row("transformer_blocks.{i}.attn.norm_q", "double_blocks.{i}.img_attn.norm.query_norm", leaf="scale"),
    Row("transformer_blocks.{i}.attn.norm_k", "double_blocks.{i}.img_attn.norm.key_norm", leaf="scale"),
    Row("transformer_blocks.{i}.attn.norm_added_q", "double_blocks.{i}.txt_attn.norm.query_norm", leaf="scale"),
    Row("transformer_blocks.{i}.attn.norm_added_k", "double_blocks.{i}.txt_attn.norm.key_norm", leaf="scale"),
    Row("single_transformer_blocks.{i}.attn.to_q", "single_blocks.{i}.linear1", 0),
    Row("single_transformer_blocks.{i}.attn.to_k", "single_blocks.{i}.linear1", 1),
    Row("single_transformer_blocks.{i}.attn.to_v", "single_blocks.{i}.linear1", 2),
    Row("single_transformer_blocks.{i}.proj_mlp", "single_blocks.{i}.linear1", 3),
    Row("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2"),
    Row("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.lin"),
    Row("single_transformer_blocks.{i}.attn.norm_q", "single_blocks.{i}.norm.query_norm", leaf="scale"),
    Row("single_transformer_blocks.{i}.attn.norm_k", "single_blocks.{i}.norm.key_norm", leaf="scale"),
    Row("x_embedder", "img_in"),
    Row("context_embedder", "txt_in"),
    Row("proj_out", "final_layer.linear"),
    Row("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    Row("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    Row("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    Row("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    Row("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    Row("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    Row("norm_out.linear", "final_layer.adaLN_modulation.1", transform="swap_halves"),
))
# XLabs x-flux attention processors (BFL block path + processor name)
XLABS = Table("xlabs", (
    Row("double_blocks.{i}.processor.qkv_lora1", "double_blocks.{i}.img_attn.qkv"),
    Row("double_blocks.{i}.processor.proj_lora1", "double_blocks.{i}.img_attn.proj"),
    Row("double_blocks.{i}.processor.qkv_lora2", "double_blocks.{i}.txt_attn.qkv"),
    Row("double_blocks.{i}.processor.proj_lora2", "double_blocks.{i}.txt_attn.proj"),
    Row("single_blocks.{i}.processor.qkv_lora", "single_blocks.{i}.linear1", (0, 3)),
    Row("single_blocks.{i}.processor.proj_lora", "single_blocks.{i}.linear2"),
))
# the q/k/v part of linear1 as one module (USO and some trainers)
LINEAR1_QKV = Table("linear1-qkv", (Row("single_blocks.{i}.linear1_qkv", "single_blocks.{i}.linear1", (0, 3)),))
TABLES = (DIFFUSERS, XLABS, LINEAR1_QKV)

# LoRA-side signals: names Flux.1, Chroma and FLUX.2 share (BFL blocks, diffusers' single blocks and
# embedders) count for each of them, so a file with only those is undetermined and BASE decides;
# names only some of them have tell them apart
BFL_SHARED = (r"double_blocks|single_blocks|single_transformer_blocks|lora_transformer_|x_embedder|context_embedder|"
              r"time_in|guidance_in")
FLUX1_CHROMA = r"transformer_blocks[._]\d+[._](ff|ff_context)[._]net|proj_mlp|single_transformer_blocks[._]\d+[._]proj_out"

BFL_ROOTS = ("double_blocks.", "single_blocks.", "final_layer.", "img_in", "txt_in", "time_in.", "vector_in.",
             "guidance_in.")
CONVENTIONS = (
    C.KOHYA_NATIVE, C.COMFY, C.bare("bfl", BFL_ROOTS),
    C.PEFT_TRANSFORMER, C.PEFT_BASE_MODEL, C.LYCORIS_DIFFUSERS, C.ONETRAINER,
    Convention("xlabs", "denoiser", "", ".", "xlabs", roles="xlabs", alpha="none"),
    Convention("comfy", "denoiser", "diffusion_model.", ".", "linear1-qkv"),
    Convention("kohya", "denoiser", "lora_unet_", "_", "linear1-qkv"),
)


def dims(shapes: Shapes, prefix: str) -> dict[str, int]:
    h = shapes[prefix + "double_blocks.0.img_attn.qkv.weight"][0] // 3
    l1 = shapes.get(prefix + "single_blocks.0.linear1.weight")
    return {"h": h, "mlp": l1[0] - 3 * h if l1 else 4 * h}


def spaces(shapes: Shapes, prefix: str) -> dict[str, dict[str, Target]]:
    d = dims(shapes, prefix)
    out = {"native": native_space(shapes, prefix, LEAVES, FUSED, d)}
    for table in TABLES:
        out[table.space] = expand(table, shapes, prefix, FUSED, d)
    return out


def details(shapes: Shapes, prefix: str) -> dict:
    d = dims(shapes, prefix)
    keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    return {"hidden_size": d["h"], "mlp_hidden": d["mlp"], "double_blocks": count(keys, r"double_blocks\.(\d+)\."),
            "single_blocks": count(keys, r"single_blocks\.(\d+)\.")}


FLUX1 = Family(
    id="flux", name="Flux.1",
    slots=(Slot(DENOISER, PREFIXES, spaces, CONVENTIONS, label="transformer"),
           clip_l_slot("text_encoders.clip_l.transformer."), t5_slot("text_encoders.t5xxl.transformer."),
           vae_slot("vae.")),
    signature=Signature(("double_blocks.0.img_attn.qkv.weight",)),
    lora_signals=(BFL_SHARED, FLUX1_CHROMA,
                  r"img_mod|txt_mod|blocks[._]\d+[._]modulation[._]lin|vector_in|norm1[._]linear|norm1_context|"
                  r"single_transformer_blocks[._]\d+[._]norm[._]linear|time_text_embed|lora_te3_|"
                  r"processor[._](qkv|proj)_lora|(^|[._])text_encoder[._]|lora_te1_"),
    metadata=("flux1",), modelspec=("flux-1",),
    details=details,
    widths={3072: "Flux.1 dev / schnell"},
    diffusers=View("diffusers FluxTransformer2DModel", Signature(("transformer_blocks.0.attn.to_q.weight",
                                                                  "x_embedder.weight")), DIFFUSERS),
)
