"""Qwen-Image (20B; its Edit variants share the layout): the file already uses diffusers'
QwenImageTransformer2DModel names, so there is one module space, spelt by every trainer's prefix.
Sizes (60 blocks, 3072 wide for the released model) are read from the file."""

from __future__ import annotations

from ..keys import count
from . import conventions as C
from .modules import Fan, Table, expand, native_space
from .spec import DENOISER, Family, Shapes, Signature, Slot, Target

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
LEAVES = ("weight",)
ROOTS = ("transformer_blocks.", "img_in", "txt_in", "txt_norm", "norm_out.", "proj_out", "time_text_embed.")
# diffusers' fused projections (``fuse_qkv_projections``) and SimpleTuner's fused LoRAs: one module
# over the separately stored q, k, v
FUSED_NAMES = Table("native", (
    Fan("transformer_blocks.{i}.attn.to_qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                               "transformer_blocks.{i}.attn.to_v")),
    Fan("transformer_blocks.{i}.attn.to_added_qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                                     "transformer_blocks.{i}.attn.add_k_proj",
                                                     "transformer_blocks.{i}.attn.add_v_proj")),
))
CONVENTIONS = (
    C.KOHYA_NATIVE,  # musubi-tuner: lora_unet_transformer_blocks_0_attn_to_q
    C.COMFY,  # ai-toolkit: diffusion_model.transformer_blocks.0.attn.to_q
    C.bare("diffsynth", ROOTS),  # DiffSynth-Studio: transformer_blocks.0.attn.to_q.lora_A.default.weight
    C.Convention("peft", "denoiser", "transformer.", ".", "native", roles="peft", alpha="metadata"),  # diffusers
    C.Convention("lycoris", "denoiser", "lycoris_", "_", "native"),  # SimpleTuner / LyCORIS
)


def spaces(shapes: Shapes, prefix: str) -> dict[str, dict[str, Target]]:
    return {"native": {**native_space(shapes, prefix, LEAVES, {}, {}), **expand(FUSED_NAMES, shapes, prefix, {}, {})}}


def details(shapes: Shapes, prefix: str) -> dict:
    keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    return {"width": shapes[prefix + "img_in.weight"][0], "blocks": count(keys, r"transformer_blocks\.(\d+)\.")}


QWEN_IMAGE = Family(
    id="qwen-image", name="Qwen-Image",
    slots=(Slot(DENOISER, PREFIXES, spaces, CONVENTIONS, label="transformer"),),
    signature=Signature(("txt_norm.weight", "transformer_blocks.0.img_mod.1.weight", "img_in.weight")),
    lora_signals=(r"transformer_blocks[._]\d+[._](img_mod|txt_mod|img_mlp|txt_mlp)", r"(^|[._])txt_norm"),
    modelspec=("qwen-image",),
    details=details,
    widths={3072: "Qwen-Image 20B"},
)
