"""SD1.5 / SDXL U-Net: LDM (single-file) names <-> diffusers names, read from the checkpoint.

The block layout (levels, resnets per level, which blocks carry attention, where the
upsampler sits) is taken from the keys present, never from a hard-coded config, so the
same table serves the real SD1.5/SDXL files and the tiny test models.
"""

from __future__ import annotations

import re

from .spec import Component, Target, underscored

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

    inputs = sorted({int(m.group(1)) for p in paths if (m := re.match(r"input_blocks\.(\d+)\.", p))})
    ops = sorted(int(m.group(1)) for p in paths if (m := re.match(r"input_blocks\.(\d+)\.0\.op$", p)))
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


def build(shapes: dict[str, tuple[int, ...]], prefix: str) -> Component:
    comp = Component("unet", prefix)
    params = [k[len(prefix) :] for k in shapes if k.startswith(prefix)]
    modules = {p.rsplit(".", 1)[0] for p in params if p.endswith(".weight")}
    table = block_table(modules)
    for path in sorted(modules):
        target = Target(prefix + path + ".weight")
        names = [f"lora_unet_{underscored(path)}", f"diffusion_model.{path}"]
        diff = translate(path, table)
        if diff is not None:
            names += [f"lora_unet_{underscored(diff)}", f"lycoris_{underscored(diff)}", f"unet.{diff}", diff]
            proc = processor_form(diff)
            if proc is not None:
                names += [f"unet.{proc}", proc]
        comp.add(names, target)
    return comp


def diffusers_names(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, str]:
    """LDM module path -> diffusers module path (for diffusers-layout key maps and tests)."""
    params = [k[len(prefix) :] for k in shapes if k.startswith(prefix)]
    modules = {p.rsplit(".", 1)[0] for p in params if p.endswith(".weight")}
    table = block_table(modules)
    return {m: d for m in sorted(modules) if (d := translate(m, table)) is not None}
