"""Wan 2.1 / 2.2 (T2V 1.3B / 14B, I2V 14B, TI2V 5B, the A14B high- and low-noise experts): the
original / ComfyUI "diffusion_models" layout, with diffusers' WanTransformer3DModel names as aliases
and as a view.

The variant is read from the file: the width (``blocks.0.self_attn.q``: 5120 = 14B, 3072 = 5B,
1536 = 1.3B), the input channels of ``patch_embedding`` (16 text-to-video, 36 image-to-video,
48 Wan 2.2 TI2V) and whether an image embedder (``img_emb``, Wan 2.1 I2V) is there. Wan 2.2's A14B
experts share one layout (the high- and low-noise files cannot be told apart by their weights);
a Wan 2.2 T2V A14B expert has exactly Wan 2.1 T2V 14B's layout and is reported as that.
"""

from __future__ import annotations

from ..keys import count
from . import conventions as C
from .modules import Fan, Row, Table, View, expand, native_space
from .spec import DENOISER, Convention, Family, Shapes, Signature, Slot, Target

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
LEAVES = ("weight",)
SIZES = {5120: "14b", 3072: "5b", 1536: "1.3b"}  # width -> model size
TASKS = {16: "t2v", 36: "i2v", 48: "ti2v"}  # patch_embedding input channels -> task


def _attn(block: str, native: str) -> tuple[Row, ...]:
    rows = [Row(f"blocks.{{i}}.{block}.{d}", f"blocks.{{i}}.{native}.{n}")
            for d, n in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"),
                         ("norm_k", "norm_k"))]
    if native == "cross_attn":  # image-to-video 2.1: the image's keys and values
        rows += [Row("blocks.{i}.attn2.add_k_proj", "blocks.{i}.cross_attn.k_img"),
                 Row("blocks.{i}.attn2.add_v_proj", "blocks.{i}.cross_attn.v_img"),
                 Row("blocks.{i}.attn2.norm_added_k", "blocks.{i}.cross_attn.norm_k_img")]
    return tuple(rows)


# diffusers WanTransformer3DModel (diffusers' convert_wan_transformer_to_diffusers, module by module)
DIFFUSERS = Table("diffusers", _attn("attn1", "self_attn") + _attn("attn2", "cross_attn") + (
    Row("blocks.{i}.ffn.net.0.proj", "blocks.{i}.ffn.0"),
    Row("blocks.{i}.ffn.net.2", "blocks.{i}.ffn.2"),
    Row("blocks.{i}.norm2", "blocks.{i}.norm3"),  # diffusers numbers the affine cross-attention norm 2
    Row("blocks.{i}.scale_shift_table", "blocks.{i}.modulation", leaf=""),
    Row("proj_out", "head.head"),
    Row("scale_shift_table", "head.modulation", leaf=""),
    Row("patch_embedding", "patch_embedding"),
    Row("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    Row("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    Row("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    Row("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    Row("condition_embedder.time_proj", "time_projection.1"),
    Row("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    Row("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    Row("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    Row("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    # diffusers' fused projections (WanAttention.fuse_projections): one module over separate tensors
    Fan("blocks.{i}.attn1.to_qkv", ("blocks.{i}.self_attn.q", "blocks.{i}.self_attn.k", "blocks.{i}.self_attn.v")),
    Fan("blocks.{i}.attn2.to_kv", ("blocks.{i}.cross_attn.k", "blocks.{i}.cross_attn.v")),
    Fan("blocks.{i}.attn2.to_added_kv", ("blocks.{i}.cross_attn.k_img", "blocks.{i}.cross_attn.v_img")),
))

ROOTS = ("blocks.", "head.", "patch_embedding", "text_embedding.", "time_embedding.", "time_projection.", "img_emb.")
CONVENTIONS = (
    C.KOHYA_NATIVE,  # musubi-tuner: lora_unet_blocks_0_self_attn_q
    Convention("kohya", "denoiser", "lora_unet__", "_", "native"),  # Wan-Fun files (ComfyUI's convert_lora_wan_fun)
    C.COMFY,  # ai-toolkit, diffusion-pipe, lightx2v: diffusion_model.blocks.0.self_attn.q
    C.bare("diffsynth", ROOTS),  # DiffSynth-Studio (PEFT .default. names on the native model)
    C.PEFT_TRANSFORMER,  # diffusers / finetrainers: transformer.blocks.0.attn1.to_q
    C.LYCORIS_DIFFUSERS,  # SimpleTuner LyCORIS
)


def spaces(shapes: Shapes, prefix: str) -> dict[str, dict[str, Target]]:
    return {"native": native_space(shapes, prefix, LEAVES, {}, {}, bare=True),
            "diffusers": expand(DIFFUSERS, shapes, prefix, {}, {})}


def variant(shapes: Shapes, prefix: str) -> tuple[str, str]:
    """(``wan2.1-t2v-14b``, ``Wan 2.1 T2V 14B``), ... (no size for a width no released model has)."""
    width = shapes[prefix + "blocks.0.self_attn.q.weight"][0]
    in_dim = shapes.get(prefix + "patch_embedding.weight", (0, 16))[1]
    task = TASKS.get(in_dim, f"in{in_dim}")
    image = any(k.startswith(prefix + "img_emb.") for k in shapes)
    version = "2.2" if task == "ti2v" or (task == "i2v" and not image) else "2.1"
    size = SIZES.get(width)
    if version == "2.2" and task == "i2v":
        size = "a14b"  # only the A14B experts have this layout
    fid = f"wan{version}-{task}" + (f"-{size}" if size else "")
    return fid, f"Wan {version} {task.upper()}" + (f" {size.upper()}" if size else f", width {width}")


def details(shapes: Shapes, prefix: str) -> dict:
    keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    return {"width": shapes[prefix + "blocks.0.self_attn.q.weight"][0],
            "blocks": count(keys, r"blocks\.(\d+)\."),
            "input_channels": shapes.get(prefix + "patch_embedding.weight", (0, 0))[1]}


WAN = Family(
    id="wan", name="Wan 2.1 / 2.2",
    slots=(Slot(DENOISER, PREFIXES, spaces, CONVENTIONS, label="transformer"),),
    signature=Signature(("blocks.0.self_attn.q.weight", "head.modulation", "patch_embedding.weight")),
    lora_signals=(r"(^|lora_unet__?|diffusion_model\.|transformer\.|lycoris_)blocks[._]\d+[._]"
                  r"(self_attn|cross_attn|ffn|norm3|modulation|attn1|attn2)",
                  r"(^|[._])(head[._]head|img_emb[._]proj|time_projection|text_embedding[._][02])"),
    modelspec=("wan",),
    details=details, variant=variant,
    widths={5120: "Wan 14B", 3072: "Wan 2.2 TI2V 5B", 1536: "Wan 2.1 T2V 1.3B"},
    diffusers=View("diffusers WanTransformer3DModel", Signature(("blocks.0.attn1.to_q.weight", "scale_shift_table",
                                                                "condition_embedder.time_proj.weight")), DIFFUSERS),
)
