"""``lorakit merge --workflow``: ComfyUI graphs (UI and API format) baked exactly like the equivalent command lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorakit.cli import main
from tests.conftest import ZOO

FILES = {
    "checkpoints/sd15.safetensors": "base/sd15/sd15_tiny_single_file.safetensors",
    "loras/1.5/1.5-dpo-LoRA.safetensors": "kohya/sd15_kohya_lora.safetensors",
    "loras/locon.safetensors": "kohya/sd15_kohya_locon_subset.safetensors",
    "loras/loha.safetensors": "lycoris/sd15_lycoris_loha_subset.safetensors",
    "diffusion_models/flux1-dev-fp8.safetensors": "base/flux/flux1_tiny_dev_fp8_e4m3fn.safetensors",
    "loras/flux_lora.safetensors": "kohya/flux_kohya_lora_te.safetensors",
    "text_encoders/clip_l.safetensors": "base/flux/clip_l_tiny.safetensors",
    "text_encoders/t5xxl.safetensors": "base/flux/t5xxl_tiny.safetensors",
    "diffusion_models/wan2.2_i2v_high_noise_14B_fp16.safetensors": "base/wan/wan22_i2v_a14b_tiny.safetensors",
    "diffusion_models/wan2.2_i2v_low_noise_14B_fp16.safetensors": "base/wan/wan22_i2v_a14b_tiny.safetensors",
    "loras/wan22_HIGH.safetensors": "next/wan/wan22_a14b_aitoolkit.safetensors",
    "loras/wan22_LOW.safetensors": "next/wan/wan21_t2v_musubi.safetensors",
    "diffusion_models/z_image_turbo_bf16.safetensors": "base/zimage/z_image_turbo_tiny.safetensors",
    "loras/zimage_style.safetensors": "next/zimage/z_image_aitoolkit.safetensors",
    "loras/zimage_char.safetensors": "next/zimage/z_image_musubi.safetensors",
    "diffusion_models/flux-2-klein-4b.safetensors": "base/flux2/flux2_klein_tiny.safetensors",
    "loras/klein_lora.safetensors": "next/flux2/flux2_klein_diffusers_peft.safetensors",
}


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    for rel, src in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(ZOO / src)
    return root


# A graph: node id -> (type, widgets, {input name: (source id, slot)}, mode)
def ui_format(graph: dict) -> dict:
    nodes, links = [], []
    for nid, (typ, widgets, inputs, mode) in graph.items():
        ins = []
        for name, (src, slot) in inputs.items():
            links.append([len(links) + 1, src, slot, nid, len(ins), name.upper()])
            ins.append({"name": name, "type": name.upper(), "link": len(links)})
        nodes.append({"id": nid, "type": typ, "mode": mode, "inputs": ins, "outputs": [], "widgets_values": widgets})
    return {"last_node_id": max(graph), "nodes": nodes, "links": links, "version": 0.4}


# Wan 2.2 A14B: a high-noise and a low-noise model, each with its LoRA, into two KSamplerAdvanced
WAN22 = {
    37: ("UNETLoader", ["wan2.2_i2v_high_noise_14B_fp16.safetensors", "default"], {}, 0),
    56: ("UNETLoader", ["wan2.2_i2v_low_noise_14B_fp16.safetensors", "default"], {}, 0),
    91: ("LoraLoaderModelOnly", ["wan22_HIGH.safetensors", 1.0], {"model": (37, 0)}, 0),
    92: ("LoraLoaderModelOnly", ["wan22_LOW.safetensors", 0.6], {"model": (56, 0)}, 0),
    57: ("KSamplerAdvanced", [], {"model": (91, 0)}, 0),
    58: ("KSamplerAdvanced", [], {"model": (92, 0)}, 0),
}

# Z-Image Turbo: UNETLoader -> two LoraLoaderModelOnly -> KSampler (text encoder: Qwen3 via CLIPLoader)
ZIMAGE = {
    16: ("UNETLoader", ["z_image_turbo_bf16.safetensors", "default"], {}, 0),
    18: ("CLIPLoader", ["qwen_3_4b.safetensors", "lumina2"], {}, 0),
    40: ("LoraLoaderModelOnly", ["zimage_style.safetensors", 0.8], {"model": (16, 0)}, 0),
    41: ("LoraLoaderModelOnly", ["zimage_char.safetensors", 1.1], {"model": (40, 0)}, 0),
    3: ("KSampler", [], {"model": (41, 0)}, 0),
}
KLEIN = {
    1: ("UNETLoader", ["flux-2-klein-4b.safetensors", "default"], {}, 0),
    2: ("LoraLoaderModelOnly", ["klein_lora.safetensors", 1.3], {"model": (1, 0)}, 0),
    3: ("KSampler", [], {"model": (2, 0)}, 0),
}

API_FIELDS = {
    "CheckpointLoaderSimple": ["ckpt_name"], "UNETLoader": ["unet_name", "weight_dtype"],
    "DualCLIPLoader": ["clip_name1", "clip_name2", "type"], "CLIPLoader": ["clip_name", "type"],
    "LoraLoader": ["lora_name", "strength_model", "strength_clip"], "LoraLoaderModelOnly": ["lora_name", "strength_model"],
}


def api_format(graph: dict) -> dict:
    out = {}
    for nid, (typ, widgets, inputs, mode) in graph.items():
        if mode in (2, 4):  # ComfyUI leaves muted/bypassed nodes out of API prompts and rewires around them
            continue
        fields = dict(zip(API_FIELDS.get(typ, []), widgets))
        for name, (src, slot) in inputs.items():
            while graph[src][3] in (2, 4):
                src, slot = graph[src][2][name]
            fields[name] = [str(src), slot]
        out[str(nid)] = {"class_type": typ, "inputs": fields}
    return out


SD15 = {
    4: ("CheckpointLoaderSimple", ["sd15.safetensors"], {}, 0),
    10: ("LoraLoader", ["1.5\\1.5-dpo-LoRA.safetensors", 1.0, 1.0], {"model": (4, 0), "clip": (4, 1)}, 0),
    3: ("KSampler", [1234, "fixed", 20, 8, "euler", "normal", 1.0], {"model": (10, 0)}, 0),
    6: ("CLIPTextEncode", ["pixel_art"], {"clip": (10, 1)}, 0),
}
FLUX = {
    12: ("UNETLoader", ["flux1-dev-fp8.safetensors", "fp8_e4m3fn"], {}, 0),
    11: ("DualCLIPLoader", ["t5xxl.safetensors", "clip_l.safetensors", "flux"], {}, 0),
    20: ("LoraLoaderModelOnly", ["flux_lora.safetensors", 0.8], {"model": (12, 0)}, 0),
    3: ("KSampler", [1234, "fixed", 20, 1, "euler", "normal", 1.0], {"model": (20, 0)}, 0),
    6: ("CLIPTextEncode", ["a cat"], {"clip": (11, 0)}, 0),
}
STACK = {
    4: ("CheckpointLoaderSimple", ["sd15.safetensors"], {}, 0),
    10: ("LoraLoader", ["loha.safetensors", 0.5, 0.2], {"model": (4, 0), "clip": (4, 1)}, 0),
    11: ("LoraLoader", ["1.5/1.5-dpo-LoRA.safetensors", 1.0, 1.0], {"model": (10, 0), "clip": (10, 1)}, 4),
    12: ("LoraLoader", ["locon.safetensors", 1.0, 0.0], {"model": (11, 0), "clip": (11, 1)}, 0),
    13: ("LoraLoaderModelOnly", ["1.5/1.5-dpo-LoRA.safetensors", 0.7], {"model": (12, 0)}, 0),
    3: ("KSampler", [1, "fixed", 20, 8, "euler", "normal", 1.0], {"model": (13, 0)}, 0),
    6: ("CLIPTextEncode", ["x"], {"clip": (12, 1)}, 0),
}


def bake(tmp_path: Path, models: Path, graph: dict, fmt, *extra: str):
    wf = tmp_path / f"wf_{fmt.__name__}.json"
    wf.write_text(json.dumps(fmt(graph)))
    out = tmp_path / f"out_{fmt.__name__}"
    out.mkdir(exist_ok=True)
    res = CliRunner().invoke(main, ["merge", "--workflow", str(wf), "--models-dir", str(models), "-o", str(out), *extra],
                             catch_exceptions=False)
    return res, out


def direct(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "reference.safetensors"
    res = CliRunner().invoke(main, ["merge", *args, "-o", str(out), "--force"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("fmt", [ui_format, api_format])
def test_sd15_checkpoint_lora_chain(tmp_path: Path, models: Path, fmt) -> None:
    res, out = bake(tmp_path, models, SD15, fmt)
    assert res.exit_code == 0, res.output
    assert "lorakit merge" in res.output and "1.5-dpo-LoRA.safetensors:1:1" in res.output
    ref = direct(tmp_path, str(models / "checkpoints/sd15.safetensors"),
                 f"{models / 'loras/1.5/1.5-dpo-LoRA.safetensors'}:1:1")
    assert (out / "sd15_lorakit.safetensors").read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("fmt", [ui_format, api_format])
def test_flux_unet_model_only(tmp_path: Path, models: Path, fmt) -> None:
    res, out = bake(tmp_path, models, FLUX, fmt)
    assert res.exit_code == 0, res.output
    assert [p.name for p in out.iterdir()] == ["flux1-dev-fp8_lorakit.safetensors"]  # no text-encoder job
    ref = direct(tmp_path, str(models / "diffusion_models/flux1-dev-fp8.safetensors"),
                 f"{models / 'loras/flux_lora.safetensors'}:0.8:0", "--model-only")
    assert (out / "flux1-dev-fp8_lorakit.safetensors").read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("fmt", [ui_format, api_format])
def test_three_loras_mixed_strengths_and_bypass(tmp_path: Path, models: Path, fmt) -> None:
    res, out = bake(tmp_path, models, STACK, fmt)
    assert res.exit_code == 0, res.output
    lo = models / "loras"
    ref = direct(tmp_path, str(models / "checkpoints/sd15.safetensors"), f"{lo / 'loha.safetensors'}:0.5:0.2",
                 f"{lo / 'locon.safetensors'}:1:0", f"{lo / '1.5/1.5-dpo-LoRA.safetensors'}:0.7:0")
    assert (out / "sd15_lorakit.safetensors").read_bytes() == ref.read_bytes()


def test_clip_strength_goes_to_the_text_encoder_files(tmp_path: Path, models: Path) -> None:
    graph = dict(FLUX)
    graph[20] = ("LoraLoader", ["flux_lora.safetensors", 0.8, 0.5], {"model": (12, 0), "clip": (11, 0)}, 0)
    graph[6] = ("CLIPTextEncode", ["a cat"], {"clip": (20, 1)}, 0)
    res, out = bake(tmp_path, models, graph, ui_format)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["clip_l_lorakit.safetensors", "flux1-dev-fp8_lorakit.safetensors",
                                                     "t5xxl_lorakit.safetensors"]
    ref = direct(tmp_path, str(models / "text_encoders/clip_l.safetensors"),
                 f"{models / 'loras/flux_lora.safetensors'}:0.5:0.5")
    assert (out / "clip_l_lorakit.safetensors").read_bytes() == ref.read_bytes()


def _error(tmp_path: Path, models: Path, graph: dict, *needles: str, extra: tuple = ()) -> None:
    res, out = bake(tmp_path, models, graph, ui_format, *extra)
    assert res.exit_code != 0
    line = res.output.strip()
    assert line.startswith("lorakit: error:") and "\n" not in line, line
    for n in needles:
        assert n in line, line
    assert list(out.iterdir()) == []


def test_missing_model_file_names_node_and_folders(tmp_path: Path, models: Path) -> None:
    graph = dict(SD15)
    graph[10] = ("LoraLoader", ["nope.safetensors", 1.0, 1.0], {"model": (4, 0), "clip": (4, 1)}, 0)
    _error(tmp_path, models, graph, "node 10", "nope.safetensors", str(models / "loras"))


def test_no_lora_loader(tmp_path: Path, models: Path) -> None:
    graph = {4: SD15[4], 3: ("KSampler", [], {"model": (4, 0)}, 0)}
    _error(tmp_path, models, graph, "no active LoraLoader")


def test_two_chains_ask_for_node(tmp_path: Path, models: Path) -> None:
    graph = dict(SD15)
    graph[21] = ("LoraLoaderModelOnly", ["locon.safetensors", 0.5], {"model": (4, 0)}, 0)
    graph[22] = ("KSampler", [], {"model": (21, 0)}, 0)
    _error(tmp_path, models, graph, "2 separate LoRA chains", "--node")
    res, out = bake(tmp_path, models, graph, ui_format, "--node", "21")
    assert res.exit_code == 0, res.output


def test_unknown_node_on_the_path(tmp_path: Path, models: Path) -> None:
    graph = dict(SD15)
    graph[30] = ("ModelSamplingDiscrete", ["eps", False], {"model": (4, 0)}, 0)
    graph[10] = ("LoraLoader", ["1.5/1.5-dpo-LoRA.safetensors", 1.0, 1.0], {"model": (30, 0), "clip": (4, 1)}, 0)
    _error(tmp_path, models, graph, "ModelSamplingDiscrete", "node 30")


def test_dry_run_writes_nothing_and_prints_commands(tmp_path: Path, models: Path) -> None:
    res, out = bake(tmp_path, models, SD15, api_format, "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["jobs"][0]["command"].startswith("lorakit merge ") and list(out.iterdir()) == []


@pytest.mark.parametrize("fmt", [ui_format, api_format])
def test_wan22_a14b_two_models_two_loras(tmp_path: Path, models: Path, fmt) -> None:
    """The usual Wan 2.2 A14B graph: each expert file gets its own LoRA; one output per base."""
    res, out = bake(tmp_path, models, WAN22, fmt)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["wan2.2_i2v_high_noise_14B_fp16_lorakit.safetensors",
                                                     "wan2.2_i2v_low_noise_14B_fp16_lorakit.safetensors"]
    for expert, lora, strength in (("high", "wan22_HIGH", 1.0), ("low", "wan22_LOW", 0.6)):
        ref = direct(tmp_path, str(models / f"diffusion_models/wan2.2_i2v_{expert}_noise_14B_fp16.safetensors"),
                     f"{models / 'loras' / lora}.safetensors:{strength:g}:0", "--model-only")
        assert (out / f"wan2.2_i2v_{expert}_noise_14B_fp16_lorakit.safetensors").read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("fmt", [ui_format, api_format])
def test_z_image_and_flux2_graphs(tmp_path: Path, models: Path, fmt) -> None:
    """The ComfyUI graphs users run for Z-Image (two LoRAs chained) and FLUX.2 klein: each bakes to
    the same bytes as the direct merge."""
    res, out = bake(tmp_path, models, ZIMAGE, fmt)
    assert res.exit_code == 0, res.output
    loras = models / "loras"
    ref = direct(tmp_path, str(models / "diffusion_models/z_image_turbo_bf16.safetensors"),
                 f"{loras / 'zimage_style.safetensors'}:0.8:0", f"{loras / 'zimage_char.safetensors'}:1.1:0",
                 "--model-only")
    assert (out / "z_image_turbo_bf16_lorakit.safetensors").read_bytes() == ref.read_bytes()
    res, out = bake(tmp_path, models, KLEIN, fmt)
    assert res.exit_code == 0, res.output
    ref = direct(tmp_path, str(models / "diffusion_models/flux-2-klein-4b.safetensors"),
                 f"{loras / 'klein_lora.safetensors'}:1.3:0", "--model-only")
    assert (out / "flux-2-klein-4b_lorakit.safetensors").read_bytes() == ref.read_bytes()
