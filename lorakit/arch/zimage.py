"""Z-Image (Turbo / Base, 6B; the Lumina 2 architecture): the original / ComfyUI layout with a fused
``attention.qkv`` in the main layers and in the noise and context refiners, diffusers'
ZImageTransformer2DModel names (split ``to_q`` / ``to_k`` / ``to_v``, ``to_out.0``,
``all_x_embedder.2-1``, ...) as aliases and as a view.

Sizes come from the checkpoint: the width is ``x_embedder``'s rows, the key / value rows of the
fused ``qkv`` are what the width leaves (equal to it in Z-Image; fewer in Lumina-Image 2.0, whose
grouped-query attention this layout shares, so it is told apart by that).
"""

from __future__ import annotations

from ..keys import count
from . import conventions as C
from .modules import Row, Table, View, expand, native_space
from .spec import DENOISER, Convention, Family, Shapes, Signature, Slot, Target

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
LEAVES = ("weight",)
GROUPS = ("layers", "noise_refiner", "context_refiner")
FUSED = {f"{g}.{{i}}.attention.qkv": ("h", "kv", "kv") for g in GROUPS}


def _block_rows(group: str) -> tuple[Row, ...]:
    b = f"{group}.{{i}}"
    same = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention_norm1", "attention_norm2",
            "ffn_norm1", "ffn_norm2", "adaLN_modulation.0")
    return (Row(f"{b}.attention.to_q", f"{b}.attention.qkv", 0),
            Row(f"{b}.attention.to_k", f"{b}.attention.qkv", 1),
            Row(f"{b}.attention.to_v", f"{b}.attention.qkv", 2),
            Row(f"{b}.attention.to_out.0", f"{b}.attention.out"),
            Row(f"{b}.attention.norm_q", f"{b}.attention.q_norm"),
            Row(f"{b}.attention.norm_k", f"{b}.attention.k_norm")) + tuple(Row(f"{b}.{m}", f"{b}.{m}") for m in same)


# diffusers ZImageTransformer2DModel (convert_z_image_transformer_checkpoint_to_diffusers)
DIFFUSERS = Table("diffusers", sum((_block_rows(g) for g in GROUPS), ()) + (
    Row("all_x_embedder.2-1", "x_embedder"),
    Row("all_final_layer.2-1.linear", "final_layer.linear"),
    Row("all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
    Row("cap_embedder.0", "cap_embedder.0"),
    Row("cap_embedder.1", "cap_embedder.1"),
    Row("t_embedder.mlp.0", "t_embedder.mlp.0"),
    Row("t_embedder.mlp.2", "t_embedder.mlp.2"),
    Row("x_pad_token", "x_pad_token", leaf=""),
    Row("cap_pad_token", "cap_pad_token", leaf=""),
))

ROOTS = tuple(g + "." for g in GROUPS) + ("x_embedder", "final_layer.", "cap_embedder.", "t_embedder.",
                                          "all_x_embedder.", "all_final_layer.", "x_pad_token", "cap_pad_token")
CONVENTIONS = (  # per naming, the first is the one ``convert`` writes (musubi-tuner's split q / k / v for kohya)
    Convention("kohya", "denoiser", "lora_unet_", "_", "diffusers"),  # musubi-tuner: lora_unet_layers_0_attention_to_q
    C.KOHYA_NATIVE,  # lora_unet_layers_0_attention_qkv (kohya-style on the original model)
    C.COMFY,  # diffusion-pipe, OneTrainer's ComfyUI format: diffusion_model.layers.0.attention.qkv
    Convention("comfy", "denoiser", "diffusion_model.", ".", "diffusers"),  # ai-toolkit: ....attention.to_q
    C.bare("bare", ROOTS), C.bare("bare", ROOTS, space="diffusers"),
    C.PEFT_TRANSFORMER, C.PEFT_BASE_MODEL, C.LYCORIS_DIFFUSERS, C.ONETRAINER,
)


def dims(shapes: Shapes, prefix: str) -> dict[str, int]:
    h = shapes[prefix + "x_embedder.weight"][0]
    return {"h": h, "kv": (shapes[prefix + "layers.0.attention.qkv.weight"][0] - h) // 2}


def spaces(shapes: Shapes, prefix: str) -> dict[str, dict[str, Target]]:
    d = dims(shapes, prefix)
    return {"native": native_space(shapes, prefix, LEAVES, FUSED, d, bare=True),
            "diffusers": expand(DIFFUSERS, shapes, prefix, FUSED, d)}


def variant(shapes: Shapes, prefix: str) -> tuple[str, str]:
    d = dims(shapes, prefix)
    if d["kv"] != d["h"]:
        return "lumina2", "Lumina-Image 2.0" + ("" if d["h"] == 2304 else f", width {d['h']}")
    return "z-image", "Z-Image" + ("" if d["h"] == 3840 else f", width {d['h']}")


def details(shapes: Shapes, prefix: str) -> dict:
    d = dims(shapes, prefix)
    keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    return {"width": d["h"], "key_value_rows": d["kv"], "layers": count(keys, r"layers\.(\d+)\."),
            "refiners": count(keys, r"noise_refiner\.(\d+)\.")}


Z_IMAGE = Family(
    id="z-image", name="Z-Image",
    slots=(Slot(DENOISER, PREFIXES, spaces, CONVENTIONS, label="transformer"),),
    signature=Signature(("layers.0.attention.qkv.weight", "cap_embedder.1.weight",
                         "noise_refiner.0.attention.k_norm.weight")),
    lora_signals=(r"(^|[._])(layers|noise_refiner|context_refiner)[._]\d+[._](attention|feed_forward|adaLN_modulation|"
                  r"ffn_norm)", r"cap_embedder|all_x_embedder|all_final_layer|t_embedder[._]mlp|x_pad_token|cap_pad_token"),
    metadata=("zimage", "z_image", "z-image"), modelspec=("z-image", "zimage"),
    details=details, variant=variant,
    widths={3840: "Z-Image", 2304: "Lumina-Image 2.0"},
    diffusers=View("diffusers ZImageTransformer2DModel",
                   Signature(("layers.0.attention.to_q.weight", "all_x_embedder.2-1.weight", "cap_embedder.1.weight")),
                   DIFFUSERS),
)
