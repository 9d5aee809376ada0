"""The house's seams: families detected by their most specific signature, LoRA families scored
across all families, conventions that collide refused when a table is built, codecs as the one
place that knows storage types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit import codecs
from lorakit.arch import FAMILIES, detect, lora_family
from lorakit.arch.spec import DENOISER, Component, Convention, Target
from lorakit.errors import ArchitectureMismatch, KeyMapError
from lorakit.io.container import TensorDict
from lorakit.lora import load_lora

GOLDEN = Path(__file__).parent / "golden"


def test_family_ids_and_names_are_unique() -> None:
    assert len({f.id for f in FAMILIES}) == len(FAMILIES) == len({f.name for f in FAMILIES})


def test_the_most_specific_signature_wins() -> None:
    sd = {"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3)}
    assert detect(sd).arch == "sd15"
    xl = dict(sd, **{"model.diffusion_model.label_emb.0.0.weight": (128, 256)})
    assert detect(xl).arch == "sdxl"  # one more signature key, no edit of the SD1.5 record


def test_unknown_checkpoint_names_what_lorakit_knows() -> None:
    with pytest.raises(ArchitectureMismatch, match=r"weights.safetensors: not a checkpoint lorakit knows \(SD1.5"):
        detect({"foo.weight": (2, 2)}, "weights.safetensors")


def test_lora_family_is_scored_across_families() -> None:
    keys = [f"transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight" for i in range(3)]
    # diffusers names Flux.1's and Qwen-Image's double blocks alike (and blocks 1, 2 could be SDXL's):
    # no family from these alone; one key only one of them has decides
    assert lora_family(keys, {})[0] is None
    flux = keys + ["transformer.transformer_blocks.0.norm1.linear.lora_A.weight"]  # per-block modulation
    assert lora_family(flux, {})[0] == "flux"
    # the single blocks are Flux.1's, Chroma's and FLUX.2's alike
    shared = keys + ["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]
    fam, why = lora_family(shared, {})
    assert fam is None and all(n in why for n in ("Flux.1", "Chroma", "FLUX.2"))
    flux2 = keys + ["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight"]
    assert lora_family(flux2, {})[0] == "flux2"
    assert lora_family(keys + ["distilled_guidance_layer.in_proj.lora_A.weight"], {})[0] == "chroma"
    qwen = keys + ["transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight"]
    assert lora_family(qwen, {})[0] == "qwen-image"
    tie = ["lora_unet_down_blocks_0_attentions_0_x.lora_down.weight", "lora_te2_text_model_y.lora_down.weight"]
    fam, why = lora_family(tie, {})
    assert fam is None and "SD1.5" in why and "SDXL" in why
    assert lora_family(keys, {"ss_base_model_version": "sd_v1"}) == ("sd15", "metadata ss_base_model_version=sd_v1")


def test_zoo_lora_families_unchanged(zoo: Path) -> None:
    """Format and family of every SD / Flux LoRA of the zoo, frozen (tests/golden/zoo_lora_families.json)."""
    golden = json.loads((GOLDEN / "zoo_lora_families.json").read_text())
    got = {rel: list((lambda lo: (lo.family, lo.arch))(load_lora(zoo / rel))) for rel in golden}
    assert got == golden


def test_two_conventions_claiming_one_name_is_an_error() -> None:
    a = Convention("a", "denoiser", "lora_unet_", "_", "native")
    b = Convention("b", "denoiser", "lora_unet_", "_", "diffusers")
    spaces = {"native": {"down.blocks": Target("x.weight")}, "diffusers": {"down_blocks": Target("y.weight")}}
    with pytest.raises(KeyMapError, match="lora_unet_down_blocks.*x.weight.*y.weight"):
        Component(DENOISER, "", spaces, (a, b))
    same = {"native": {"m": Target("x.weight")}, "diffusers": {"m": Target("x.weight")}}
    assert Component(DENOISER, "", same, (a, b)).aliases["lora_unet_m"].convention is a  # same target: fine


def test_every_alias_knows_its_convention_and_module(zoo: Path) -> None:
    """The alias table reads both ways: each LoRA name is (convention, module, target), and the
    convention spells the module back into the same name."""
    from safetensors import safe_open

    with safe_open(str(zoo / "base/flux/flux1_tiny_dev_bfl.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    spec = detect(shapes)
    names = {c.name for comp in spec.components for a in comp.aliases.values() for c in [a.convention]}
    assert {"kohya", "comfy", "bfl", "peft", "lycoris", "onetrainer", "xlabs"} <= names
    for comp in spec.components:
        for name, alias in comp.aliases.items():
            assert alias.convention.spell(alias.module) == name


def test_codecs_know_the_storage_types() -> None:
    assert [c.name for c in codecs.CODECS.values()] == ["fp64", "fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"]
    assert codecs.plain(torch.float8_e4m3fn).coarse and not codecs.plain(torch.bfloat16).coarse
    assert codecs.default_rounding([codecs.plain(torch.float16)]) == "nearest"
    assert codecs.default_rounding([codecs.plain(torch.float16), codecs.plain(torch.float8_e5m2)]) == "stochastic"
    assert codecs.default_rounding([codecs.plain(torch.float8_e5m2)], "nearest") == "nearest"


def test_scaled_fp8_is_bound_from_the_file_layout() -> None:
    w8 = torch.tensor([[1.0, -2.0]]).to(torch.float8_e4m3fn)
    sd = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "a.weight": w8,
          "a.scale_weight": torch.tensor(0.5), "b.weight": w8.clone(), "c.bias": torch.zeros(2)}
    files = TensorDict(sd)
    a, b = files.codec("a.weight"), files.codec("b.weight")
    assert a.scale == 0.5 and a.aux == ("a.scale_weight",) and b.scale is None
    assert torch.equal(files.decode("a.weight")[0], torch.tensor([[0.5, -1.0]]))
    assert files.is_aux("a.scale_weight") and files.is_aux("scaled_fp8") and not files.is_aux("a.weight")
