"""Key maps of the real checkpoints (../shared/manifests): frozen as golden JSON, every target reachable.

Regenerate after an intended table change with ``LORAKIT_UPDATE_GOLDEN=1 pytest tests/test_keymaps.py``
and review the diff of tests/golden/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorakit.arch import Split, detect
from tests.conftest import MANIFESTS

GOLDEN = Path(__file__).parent / "golden"
ARCHS = {  # detected architecture id -> the real file's manifest
    "sd15": "sd15_v1-5-pruned-emaonly.json",
    "sdxl": "sdxl_base_1.0.json",
    "flux": "flux1-dev.json",
    "clip_l": "clip_l.json",
    "t5xxl": "t5xxl.json",
    "wan2.1-t2v-14b": "wan2.1_t2v_14b.json",
    "wan2.1-t2v-1.3b": "wan2.1_t2v_1.3b.json",
    "wan2.1-i2v-14b": "wan2.1_i2v_14b.json",
    "wan2.2-ti2v-5b": "wan2.2_ti2v_5b.json",
    "wan2.2-i2v-a14b": "wan2.2_i2v_a14b.json",
    "qwen-image": "qwen_image.json",
    "z-image": "z_image_turbo.json",
    "flux2-dev": "flux2_dev.json",
    "flux2-klein-4b": "flux2_klein_4b.json",
    "flux2-klein-9b": "flux2_klein_9b.json",
    "chroma": "chroma.json",
}


def shapes_of(arch: str) -> dict[str, tuple[int, ...]]:
    raw = json.loads((MANIFESTS / ARCHS[arch]).read_text())
    return {k: tuple(v[0]) for k, v in raw.items()}


def expanded(arch: str) -> dict[str, list[str]]:
    spec = detect(shapes_of(arch))
    assert spec.arch == arch
    table: dict[str, list[str]] = {}
    for comp in spec.components:
        for name, alias in comp.aliases.items():
            table.setdefault(f"{comp.id}:{alias.target.describe()}", []).append(name)
    return {k: sorted(v) for k, v in sorted(table.items())}


def targetable(arch: str, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Tensors a LoRA may address: every weight matrix / conv kernel of the U-Net/DiT and text encoders
    (not the VAE), Flux's q/k norm scales (replaced by BFL control LoRAs), and bare parameters
    (Wan's 3-D ``modulation``: lightx2v files carry full diffs of them)."""
    keys = []
    for k, s in shapes.items():
        if k.startswith("first_stage_model.") or k.startswith("model_ema.") or "position_ids" in k:
            continue
        if arch in ("sd15", "sdxl") and not k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner.")):
            continue
        leaf = k.rpartition(".")[2]
        bare = arch.startswith("wan") and leaf not in ("weight", "bias", "scale")
        if (k.endswith("weight") and len(s) >= 2) or k.endswith("_norm.scale") or k.endswith("text_projection") or bare:
            keys.append(k)
    return keys


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_manifest_is_detected_precisely(arch: str, manifests: Path) -> None:
    assert detect(shapes_of(arch)).arch == arch


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_golden_keymap(arch: str, manifests: Path) -> None:
    table = expanded(arch)
    path = GOLDEN / f"keymap_{arch}.json"
    if os.environ.get("LORAKIT_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(table, indent=0, sort_keys=True) + "\n")
    golden = json.loads(path.read_text())
    assert table == golden, f"key map of {arch} changed; review and regenerate tests/golden/{path.name}"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_targetable_key_is_reachable(arch: str, manifests: Path) -> None:
    shapes = shapes_of(arch)
    spec = detect(shapes)
    rows: dict[str, list[tuple[int, int]]] = {}
    for comp in spec.components:
        for alias in comp.aliases.values():
            for t in alias.target.parts if isinstance(alias.target, Split) else (alias.target,):
                rows.setdefault(t.key, []).append(t.rows or (0, shapes[t.key][0]))
    missing = []
    for key in targetable(arch, shapes):
        spans = sorted(rows.get(key, []))
        covered = 0
        for a, b in spans:
            if a <= covered:
                covered = max(covered, b)
        if covered < shapes[key][0]:
            missing.append(key)
    assert not missing, f"{len(missing)} targetable keys of {arch} have no LoRA name: {missing[:5]}"


@pytest.mark.parametrize("arch, alias, target", [
    ("sd15", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
     "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
    ("sd15", "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.processor.to_out",
     "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight"),
    ("sd15", "lora_unet_up_blocks_0_upsamplers_0_conv", "model.diffusion_model.output_blocks.2.1.conv.weight"),
    ("sd15", "lora_unet_mid_block_resnets_1_time_emb_proj", "model.diffusion_model.middle_block.2.emb_layers.1.weight"),
    ("sd15", "text_encoder.encoder.layers.11.self_attn.to_out",
     "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.out_proj.weight"),
    ("sdxl", "lora_unet_up_blocks_1_upsamplers_0_conv", "model.diffusion_model.output_blocks.5.2.conv.weight"),
    ("sdxl", "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_ff_net_2",
     "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.2.weight"),
    ("sdxl", "lora_te2_text_model_encoder_layers_31_self_attn_v_proj",
     "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight[2560:3840]"),
    ("sdxl", "lora_te2_text_projection", "conditioner.embedders.1.model.text_projection (transpose)"),
    ("flux", "transformer.single_transformer_blocks.37.proj_mlp", "single_blocks.37.linear1.weight[9216:21504]"),
    ("flux", "lora_transformer_transformer_blocks_18_attn_add_k_proj", "double_blocks.18.txt_attn.qkv.weight[3072:6144]"),
    ("flux", "transformer.norm_out.linear", "final_layer.adaLN_modulation.1.weight (swap_halves)"),
    ("flux", "single_blocks.5.processor.qkv_lora", "single_blocks.5.linear1.weight[0:9216]"),
    ("t5xxl", "lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1", "encoder.block.23.layer.1.DenseReluDense.wi_1.weight"),
    ("wan2.1-t2v-14b", "lora_unet_blocks_39_cross_attn_o", "blocks.39.cross_attn.o.weight"),
    ("wan2.1-t2v-14b", "transformer.blocks.7.attn1.to_out.0", "blocks.7.self_attn.o.weight"),
    ("wan2.1-t2v-14b", "transformer.blocks.7.norm2", "blocks.7.norm3.weight"),
    ("wan2.1-t2v-14b", "diffusion_model.blocks.3.modulation", "blocks.3.modulation"),
    ("wan2.1-t2v-14b", "transformer.condition_embedder.time_proj", "time_projection.1.weight"),
    ("wan2.1-i2v-14b", "transformer.blocks.0.attn2.add_k_proj", "blocks.0.cross_attn.k_img.weight"),
    ("wan2.1-i2v-14b", "transformer.condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3.weight"),
    ("wan2.2-ti2v-5b", "blocks.29.ffn.0", "blocks.29.ffn.0.weight"),
    ("wan2.1-t2v-14b", "transformer.blocks.2.attn1.to_qkv",
     "blocks.2.self_attn.q.weight + blocks.2.self_attn.k.weight + blocks.2.self_attn.v.weight"),
    ("qwen-image", "lycoris_transformer_blocks_59_attn_to_added_qkv", "transformer_blocks.59.attn.add_q_proj.weight + "
     "transformer_blocks.59.attn.add_k_proj.weight + transformer_blocks.59.attn.add_v_proj.weight"),
    ("z-image", "lora_unet_layers_29_attention_to_v", "layers.29.attention.qkv.weight[7680:11520]"),
    ("z-image", "diffusion_model.noise_refiner.1.attention.to_out.0", "noise_refiner.1.attention.out.weight"),
    ("z-image", "transformer.all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1.weight"),
    ("z-image", "diffusion_model.context_refiner.0.attention.qkv", "context_refiner.0.attention.qkv.weight"),
    ("flux2-dev", "transformer.single_transformer_blocks.47.attn.to_qkv_mlp_proj", "single_blocks.47.linear1.weight"),
    ("flux2-dev", "transformer.transformer_blocks.7.attn.add_v_proj", "double_blocks.7.txt_attn.qkv.weight[12288:18432]"),
    ("flux2-dev", "lora_unet_double_stream_modulation_img_lin", "double_stream_modulation_img.lin.weight"),
    ("flux2-dev", "transformer.time_guidance_embed.guidance_embedder.linear_2", "guidance_in.out_layer.weight"),
    ("flux2-klein-4b", "transformer.norm_out.linear", "final_layer.adaLN_modulation.1.weight (swap_halves)"),
    ("flux2-klein-9b", "lycoris_transformer_blocks_7_ff_context_linear_in", "double_blocks.7.txt_mlp.0.weight"),
    ("chroma", "transformer.distilled_guidance_layer.layers.4.linear_2",
     "distilled_guidance_layer.layers.4.out_layer.weight"),
    ("chroma", "lora_unet_single_blocks_37_linear1", "single_blocks.37.linear1.weight"),
    ("chroma", "transformer.single_transformer_blocks.37.proj_mlp", "single_blocks.37.linear1.weight[9216:21504]"),
    ("qwen-image", "lora_unet_transformer_blocks_59_img_mlp_net_0_proj", "transformer_blocks.59.img_mlp.net.0.proj.weight"),
    ("qwen-image", "lycoris_transformer_blocks_0_txt_mod_1", "transformer_blocks.0.txt_mod.1.weight"),
    ("qwen-image", "transformer.norm_out.linear", "norm_out.linear.weight"),
])
def test_known_names(arch: str, alias: str, target: str, manifests: Path) -> None:
    hit = detect(shapes_of(arch)).lookup(alias)
    assert hit is not None, alias
    assert hit[1].target.describe() == target


def test_sizes_come_from_the_checkpoint(manifests: Path) -> None:
    spec = detect(shapes_of("flux"))
    assert spec.details["hidden_size"] == 3072 and spec.details["mlp_hidden"] == 12288
    assert spec.details["double_blocks"] == 19 and spec.details["single_blocks"] == 38
