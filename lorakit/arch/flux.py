"""Flux.1 transformer in the BFL layout, with diffusers / XLabs names as (row-sliced) aliases.

Sizes come from the checkpoint: h = rows(img_attn.qkv) / 3, the mlp width = rows(linear1) - 3h,
block counts from the keys present.
"""

from __future__ import annotations

import re

from .spec import Component, Target, underscored

# diffusers double-block module -> (BFL module, row block): row block i of 3 means [i*h, (i+1)*h)
DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1), "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
    "attn.norm_q": ("img_attn.norm.query_norm", None), "attn.norm_k": ("img_attn.norm.key_norm", None),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", None), "attn.norm_added_k": ("txt_attn.norm.key_norm", None),
}
SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", "mlp"), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
    "attn.norm_q": ("norm.query_norm", None), "attn.norm_k": ("norm.key_norm", None),
}
GLOBAL = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
# XLabs x-flux attention processors (BFL block path + processor name)
XLABS_DOUBLE = {"processor.qkv_lora1": ("img_attn.qkv", None), "processor.proj_lora1": ("img_attn.proj", None),
                "processor.qkv_lora2": ("txt_attn.qkv", None), "processor.proj_lora2": ("txt_attn.proj", None)}
XLABS_SINGLE = {"processor.qkv_lora": ("linear1", "qkv"), "processor.proj_lora": ("linear2", None)}

DIFFUSERS_PREFIXES = ["transformer.", "base_model.model."]  # dotted
DIFFUSERS_UNDERSCORED = ["lycoris_", "lora_transformer_"]


def param_key(prefix: str, module: str, shapes: dict) -> str | None:
    for suffix in (".weight", ".scale"):
        if prefix + module + suffix in shapes:
            return prefix + module + suffix
    return None


def build(shapes: dict[str, tuple[int, ...]], prefix: str) -> tuple[Component, dict[str, int]]:
    comp = Component("unet", prefix)
    h = shapes[prefix + "double_blocks.0.img_attn.qkv.weight"][0] // 3
    n_double = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"double_blocks\.(\d+)\.", k)))
    singles = [int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"single_blocks\.(\d+)\.", k))]
    n_single = 1 + max(singles) if singles else 0
    l1 = prefix + "single_blocks.0.linear1.weight"
    mlp = shapes[l1][0] - 3 * h if l1 in shapes else 4 * h

    def rows_of(block: object) -> tuple[int, int] | None:
        if block is None:
            return None
        if block == "mlp":
            return (3 * h, 3 * h + mlp)
        if block == "qkv":
            return (0, 3 * h)
        return (block * h, (block + 1) * h)  # type: ignore[operator]

    def add_diffusers(diff: str, bfl: str, block: object, transform: str | None = None) -> None:
        key = param_key(prefix, bfl, shapes)
        if key is None:
            return
        names = [p + diff for p in DIFFUSERS_PREFIXES] + [p + underscored(diff) for p in DIFFUSERS_UNDERSCORED]
        comp.add(names, Target(key, rows_of(block), transform))

    # native BFL names first: every weight/scale of the transformer
    for key in sorted(shapes):
        if not key.startswith(prefix):
            continue
        path = key[len(prefix):]
        module, _, leaf = path.rpartition(".")
        if leaf not in ("weight", "scale") or not module:
            continue
        splits = None
        if module.endswith(("img_attn.qkv", "txt_attn.qkv")):
            splits = (h, h, h)
        elif module.endswith("linear1") and module.startswith("single_blocks."):
            splits = (h, h, h, mlp)
        comp.add([f"lora_unet_{underscored(module)}", f"diffusion_model.{module}", module], Target(key, splits=splits))
    for bfl_block, diff_block, count, table, xlabs in (("double_blocks", "transformer_blocks", n_double, DOUBLE, XLABS_DOUBLE),
                                                       ("single_blocks", "single_transformer_blocks", n_single, SINGLE,
                                                        XLABS_SINGLE)):
        for i in range(count):
            for diff, (bfl, block) in table.items():
                add_diffusers(f"{diff_block}.{i}.{diff}", f"{bfl_block}.{i}.{bfl}", block)
            for xl, (bfl, block) in xlabs.items():
                key = param_key(prefix, f"{bfl_block}.{i}.{bfl}", shapes)
                if key:
                    comp.add([f"{bfl_block}.{i}.{xl}"], Target(key, rows_of(block)))
    for i in range(n_single):
        key = param_key(prefix, f"single_blocks.{i}.linear1", shapes)
        if key:  # the q/k/v part of linear1 as one module (USO and some trainers)
            comp.add([f"diffusion_model.single_blocks.{i}.linear1_qkv", f"lora_unet_single_blocks_{i}_linear1_qkv"],
                     Target(key, rows_of("qkv")))
    for diff, bfl in GLOBAL.items():
        add_diffusers(diff, bfl, None)
    add_diffusers("norm_out.linear", "final_layer.adaLN_modulation.1", None, "swap_halves")
    return comp, {"hidden_size": h, "mlp_hidden": mlp, "double_blocks": n_double, "single_blocks": n_single}
