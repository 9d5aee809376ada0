"""diffusers model layouts (UNet2DConditionModel, FluxTransformer2DModel) as views of the single-file layout.

The key maps speak the single-file names (LDM U-Net, BFL Flux). A diffusers state dict is mapped
onto those names once: each logical single-file tensor is made of row blocks of real diffusers
tensors (Flux ``to_q``/``to_k``/``to_v`` are the rows of BFL ``qkv``; ``norm_out.linear`` is
``final_layer.adaLN_modulation.1`` with its two halves swapped). Every LoRA naming scheme that
works on a single-file checkpoint then works on the diffusers model too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import flux, unet
from .spec import Block

Shapes = dict[str, tuple[int, ...]]


@dataclass
class Layout:
    name: str
    shapes: Shapes  # logical (single-file) key -> shape
    blocks: dict[str, list[Block]]  # logical key -> where its rows live


def _leaves(shapes: Shapes, module: str) -> list[str]:
    return [leaf for leaf in ("weight", "bias") if f"{module}.{leaf}" in shapes]


def _unet_layout(shapes: Shapes) -> Layout:
    """Synthesise the LDM block paths from the diffusers structure, then invert the block table."""
    paths = {k.rsplit(".", 1)[0] for k in shapes}

    def count(pattern: str) -> int:
        found = {int(m.group(1)) for p in paths if (m := re.match(pattern, p))}
        return max(found) + 1 if found else 0

    levels = count(r"down_blocks\.(\d+)\.")
    nres = count(r"down_blocks\.0\.resnets\.(\d+)\.")
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
    table = unet.block_table(ldm)

    logical: Shapes = {}
    blocks: dict[str, list[Block]] = {}
    for key, shape in shapes.items():
        module, _, leaf = key.rpartition(".")
        lp = unet.translate(module, table, to_diffusers=False)
        if lp is None:
            continue
        logical[f"{lp}.{leaf}"] = shape
        blocks[f"{lp}.{leaf}"] = [Block(key, (0, shape[0] if shape else 1))]
    return Layout("diffusers UNet2DConditionModel", logical, blocks)


def _flux_layout(shapes: Shapes) -> Layout:
    h = shapes["transformer_blocks.0.attn.to_q.weight"][0]
    n_double = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    singles = [int(m.group(1)) for k in shapes if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))]
    mlp = shapes["single_transformer_blocks.0.proj_mlp.weight"][0] if singles else 4 * h
    logical: Shapes = {}
    blocks: dict[str, list[Block]] = {}

    def add(bfl: str, diff: str, block: object) -> None:
        for leaf in _leaves(shapes, diff):
            shape = shapes[f"{diff}.{leaf}"]
            bleaf = "scale" if bfl.endswith("_norm") else leaf  # BFL RMSNorm weights are called scale
            if block is None:
                lo, hi = 0, shape[0]
            elif block == "mlp":
                lo, hi = 3 * h, 3 * h + mlp
            else:
                lo, hi = block * h, (block + 1) * h  # type: ignore[operator]
            key = f"{bfl}.{bleaf}"
            blocks.setdefault(key, []).append(Block(f"{diff}.{leaf}", (lo, hi)))
            rows = max(b.rows[1] for b in blocks[key])
            logical[key] = (rows,) + tuple(shape[1:])

    for bfl_block, diff_block, count, table in (("double_blocks", "transformer_blocks", n_double, flux.DOUBLE),
                                               ("single_blocks", "single_transformer_blocks", 1 + max(singles, default=-1),
                                                flux.SINGLE)):
        for i in range(count):
            for diff, (bfl, block) in table.items():
                add(f"{bfl_block}.{i}.{bfl}", f"{diff_block}.{i}.{diff}", block)
    for diff, bfl in flux.GLOBAL.items():
        add(bfl, diff, None)
    for leaf in _leaves(shapes, "norm_out.linear"):  # diffusers [scale; shift] = BFL [shift; scale]
        rows = shapes[f"norm_out.linear.{leaf}"][0]
        half = rows // 2
        key = f"final_layer.adaLN_modulation.1.{leaf}"
        blocks[key] = [Block(f"norm_out.linear.{leaf}", (0, half), half), Block(f"norm_out.linear.{leaf}", (half, rows), 0)]
        logical[key] = shapes[f"norm_out.linear.{leaf}"]
    return Layout("diffusers FluxTransformer2DModel", logical, blocks)


def layout(shapes: Shapes) -> Layout | None:
    """The single-file view of a diffusers state dict, or None when it is not one lorakit knows."""
    if "conv_in.weight" in shapes and "time_embedding.linear_1.weight" in shapes and \
            any(k.startswith("down_blocks.0.resnets.0.") for k in shapes):
        return _unet_layout(shapes)
    if "transformer_blocks.0.attn.to_q.weight" in shapes and "x_embedder.weight" in shapes:
        return _flux_layout(shapes)
    return None
