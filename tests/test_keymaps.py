"""Key maps of the real checkpoints (../shared/manifests): frozen as golden JSON, every target reachable.

Regenerate after an intended table change with ``LORAKIT_UPDATE_GOLDEN=1 pytest tests/test_keymaps.py``
and review the diff of tests/golden/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorakit.arch import detect
from tests.conftest import MANIFESTS

GOLDEN = Path(__file__).parent / "golden"
ARCHS = {
    "sd15": "sd15_v1-5-pruned-emaonly.json",
    "sdxl": "sdxl_base_1.0.json",
    "flux": "flux1-dev.json",
    "clip_l": "clip_l.json",
    "t5xxl": "t5xxl.json",
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
    (not the VAE), and Flux's q/k norm scales (replaced by BFL control LoRAs)."""
    keys = []
    for k, s in shapes.items():
        if k.startswith("first_stage_model.") or k.startswith("model_ema.") or "position_ids" in k:
            continue
        if arch in ("sd15", "sdxl") and not k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner.")):
            continue
        if (k.endswith("weight") and len(s) >= 2) or k.endswith("_norm.scale") or k.endswith("text_projection"):
            keys.append(k)
    return keys


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
            rows.setdefault(alias.target.key, []).append(alias.target.rows or (0, shapes[alias.target.key][0]))
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
])
def test_known_names(arch: str, alias: str, target: str, manifests: Path) -> None:
    hit = detect(shapes_of(arch)).lookup(alias)
    assert hit is not None, alias
    assert hit[1].target.describe() == target


def test_sizes_come_from_the_checkpoint(manifests: Path) -> None:
    spec = detect(shapes_of("flux"))
    assert spec.details["hidden_size"] == 3072 and spec.details["mlp_hidden"] == 12288
    assert spec.details["double_blocks"] == 19 and spec.details["single_blocks"] == 38
