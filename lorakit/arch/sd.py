"""SD1.5 and SDXL: the U-Net's LDM (single-file) names <-> diffusers names, read from the checkpoint,
and the families' records.

The block layout (levels, resnets per level, which blocks carry attention, where the
upsampler sits) is taken from the keys present, never from a hard-coded config, so the
same table serves the real SD1.5/SDXL files and the tiny test models.
"""

from __future__ import annotations

from ..keys import count, indices
from . import conventions as C
from .modules import Layout, View
from .spec import DENOISER, Block, Convention, Family, Shapes, Signature, Slot, Target, vae_slot
from .text import clip_g_slot, clip_l_slot

# resnet children: LDM name -> diffusers name
RESNET_CHILDREN = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}

# top-level modules outside the block structure
TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}

# diffusers attention projections and their legacy attention-processor spelling
PROCESSOR_FORMS = {".to_q": ".processor.to_q", ".to_k": ".processor.to_k", ".to_v": ".processor.to_v", ".to_out.0": ".processor.to_out"}


def block_table(paths: set[str]) -> list[tuple[str, str, str]]:
    """(ldm prefix, diffusers prefix, kind) for every U-Net block; kind = resnet|attn|plain."""

    def has(prefix: str) -> bool:
        return any(p == prefix or p.startswith(prefix + ".") for p in paths)

    inputs = indices(paths, r"input_blocks\.(\d+)\.")
    ops = indices(paths, r"input_blocks\.(\d+)\.0\.op$")
    nres = (ops[0] - 1) if ops else len(inputs) - 1
    levels = len(inputs) // (nres + 1)
    table: list[tuple[str, str, str]] = []
    for i in range(levels):
        for j in range(nres):
            k = 1 + i * (nres + 1) + j
            table.append((f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", "resnet"))
            if has(f"input_blocks.{k}.1"):
                table.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", "attn"))
        if i < levels - 1:
            table.append((f"input_blocks.{(i + 1) * (nres + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv", "plain"))
    table.append(("middle_block.0", "mid_block.resnets.0", "resnet"))
    if has("middle_block.2"):
        table.append(("middle_block.1", "mid_block.attentions.0", "attn"))
        table.append(("middle_block.2", "mid_block.resnets.1", "resnet"))
    else:
        table.append(("middle_block.1", "mid_block.resnets.1", "resnet"))
    for i in range(levels):
        for j in range(nres + 1):
            k = i * (nres + 1) + j
            table.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            if has(f"output_blocks.{k}.1") and not has(f"output_blocks.{k}.1.conv"):
                table.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn"))
            for slot in (1, 2):
                if has(f"output_blocks.{k}.{slot}.conv"):
                    table.append((f"output_blocks.{k}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv", "plain"))
    return table


def translate(path: str, table: list[tuple[str, str, str]], *, to_diffusers: bool = True) -> str | None:
    """An LDM module path as its diffusers path (or back, ``to_diffusers=False``); None if unmapped."""
    top = TOP_LEVEL if to_diffusers else {d: l for l, d in TOP_LEVEL.items()}
    children = RESNET_CHILDREN if to_diffusers else {d: l for l, d in RESNET_CHILDREN.items()}
    if path in top:
        return top[path]
    for ldm, diff, kind in table:
        src, dst = (ldm, diff) if to_diffusers else (diff, ldm)
        if path == src and kind == "plain":
            return dst
        if path.startswith(src + "."):
            rest = path[len(src) + 1:]
            if kind == "resnet":
                rest = children.get(rest)
                if rest is None:
                    return None
            return f"{dst}.{rest}"
    return None


def processor_form(diffusers_path: str) -> str | None:
    for plain, proc in PROCESSOR_FORMS.items():
        if diffusers_path.endswith(plain) and (".attn1" in diffusers_path or ".attn2" in diffusers_path):
            return diffusers_path[: -len(plain)] + proc
    return None


def spaces(shapes: Shapes, prefix: str) -> dict[str, dict[str, Target]]:
    """native: LDM module paths; diffusers: their diffusers names; diffusers-processor: the legacy
    attention-processor spelling of the attention projections."""
    params = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    modules = {p.rsplit(".", 1)[0] for p in params if p.endswith(".weight")}
    table = block_table(modules)
    out: dict[str, dict[str, Target]] = {"native": {}, "diffusers": {}, "diffusers-processor": {}}
    for path in sorted(modules):
        target = Target(prefix + path + ".weight")
        out["native"][path] = target
        diff = translate(path, table)
        if diff is not None:
            out["diffusers"][diff] = target
            proc = processor_form(diff)
            if proc is not None:
                out["diffusers-processor"][proc] = target
    return out


def diffusers_layout(shapes: Shapes) -> Layout:
    """A diffusers UNet2DConditionModel as the LDM layout: synthesise the LDM block paths from the
    diffusers structure, then invert the block table."""
    paths = {k.rsplit(".", 1)[0] for k in shapes}
    levels = count(paths, r"down_blocks\.(\d+)\.")
    nres = count(paths, r"down_blocks\.0\.resnets\.(\d+)\.")
    ldm = {"input_blocks.0.0", "middle_block.0", "middle_block.1"}
    if any(p.startswith("mid_block.attentions.0.") for p in paths):
        ldm.add("middle_block.2")
    for i in range(levels):
        for j in range(nres):
            k = 1 + i * (nres + 1) + j
            ldm.add(f"input_blocks.{k}.0")
            if any(p.startswith(f"down_blocks.{i}.attentions.{j}.") for p in paths):
                ldm.add(f"input_blocks.{k}.1")
        if any(p.startswith(f"down_blocks.{i}.downsamplers.0.") for p in paths):
            ldm.add(f"input_blocks.{(i + 1) * (nres + 1)}.0.op")
        has_attn = any(p.startswith(f"up_blocks.{i}.attentions.") for p in paths)
        for j in range(nres + 1):
            k = i * (nres + 1) + j
            ldm.add(f"output_blocks.{k}.0")
            if has_attn:
                ldm.add(f"output_blocks.{k}.1")
        if any(p.startswith(f"up_blocks.{i}.upsamplers.0.") for p in paths):
            ldm.add(f"output_blocks.{i * (nres + 1) + nres}.{2 if has_attn else 1}.conv")
    table = block_table(ldm)
    logical: Shapes = {}
    blocks: dict[str, list[Block]] = {}
    for key, shape in shapes.items():
        module, _, leaf = key.rpartition(".")
        lp = translate(module, table, to_diffusers=False)
        if lp is None:
            continue
        logical[f"{lp}.{leaf}"] = shape
        blocks[f"{lp}.{leaf}"] = [Block(key, (0, shape[0] if shape else 1))]
    return Layout("diffusers UNet2DConditionModel", logical, blocks)


PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
CONVENTIONS = (
    Convention("comfy-generic", "denoiser", "lora_unet_", "_", "native"), C.COMFY,
    Convention("kohya", "denoiser", "lora_unet_", "_", "diffusers"), C.LYCORIS_DIFFUSERS,
    Convention("peft", "denoiser", "unet.", ".", "diffusers", roles="peft", alpha="metadata"),
    C.bare("diffusers", ("down_blocks.", "mid_block.", "up_blocks."), space="diffusers"),
    Convention("diffusers-legacy", "denoiser", "unet.", ".", "diffusers-processor", roles="diffusers-processor"),
    Convention("diffusers-legacy", "denoiser", "", ".", "diffusers-processor", roles="diffusers-processor"),
)
UNET = Slot(DENOISER, PREFIXES, spaces, CONVENTIONS, claims=("model.diffusion_model.",), label="U-Net")
DIFFUSERS_VIEW = View("diffusers UNet2DConditionModel",
                      Signature(("conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.")),
                      build=diffusers_layout)

SD15 = Family(
    id="sd15", name="SD1.5",
    slots=(UNET, clip_l_slot("cond_stage_model.transformer.", kohya=("lora_te_", "lora_te1_")),
           vae_slot("first_stage_model.")),
    signature=Signature(("input_blocks.0.0.weight",)),
    lora_signals=(r"input_blocks_[12]_1_|output_blocks_(9|10|11)_|down_blocks[._]0[._]attentions|"
                  r"up_blocks[._]3[._]attentions",),
    metadata=("sd_v1", "sd_1.5"), modelspec=("stable-diffusion-v1",),
    diffusers=DIFFUSERS_VIEW,
)
SDXL = Family(
    id="sdxl", name="SDXL",
    slots=(UNET, clip_l_slot("conditioner.embedders.0.transformer."), clip_g_slot("conditioner.embedders.1.model."),
           vae_slot("first_stage_model.")),
    signature=Signature(("input_blocks.0.0.weight", "label_emb.0.0.weight")),
    lora_signals=(r"lora_te2_|text_encoder_2\.|attentions[._]\d+[._]transformer_blocks[._][1-9]|label_emb|"
                  r"add_embedding",),
    metadata=("sdxl_base_v1-0", "sdxl_1.0"), modelspec=("stable-diffusion-xl",),
    diffusers=DIFFUSERS_VIEW,
)
