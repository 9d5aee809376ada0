"""``lorakit convert``: every zoo LoRA x every target naming, checked by merging both into the base
(bit for bit); the fused <-> split rewrites; the CLI contract; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.convert import convert_file
from lorakit.errors import LorakitError
from tests.conftest import ZOO
from tests.helpers import bits, cli, differing, load_cases, one_line

TOS = ("comfy", "kohya", "diffusers")
# what diffusers' PEFT format cannot hold: LyCORIS algorithms, full diffs, replacements, bias changes
NOT_PEFT = ("hada_", "lokr_", "oft_", ".diff", ".a1.", ".set_weight", ".scale", "lora_B.bias", ".on_input")


def _pairs() -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for name in ("cases.json", "cases-next.json"):
        for case in load_cases(name):
            if case.get("expect", {}).get("exit", "success") != "success":
                continue
            for lo in case["loras"]:
                seen.setdefault((case["base"], lo["path"]), None)
    return list(seen)


PAIRS = _pairs()


def _needs_more_than_peft(lora: Path) -> bool:
    with safe_open(lora, "pt") as f:
        keys = list(f.keys())
    lycoris_bfl = any(k.endswith(".scale") and not k.endswith("weight_scale") for k in keys)
    return any(any(t in k for t in NOT_PEFT[:-3]) for k in keys) or lycoris_bfl or \
        any(k.endswith((".diff_b", ".lora_B.bias")) for k in keys)


@pytest.mark.parametrize("to", TOS)
@pytest.mark.parametrize("base, lora", PAIRS, ids=[f"{Path(l).stem}@{Path(b).stem}" for b, l in PAIRS])
def test_every_zoo_lora_converts_to_the_same_merge(base: str, lora: str, to: str, tmp_path: Path) -> None:
    """Converted, the LoRA merges into its base to the same bits as the original (``--check``); the
    only refusals are what diffusers' PEFT format cannot hold, each one line naming the module."""
    out = tmp_path / "out.safetensors"
    try:
        report = convert_file(ZOO / lora, out, to=to, base=ZOO / base, check=ZOO / base, allow_unmatched=True)
    except LorakitError as e:
        assert to == "diffusers" and _needs_more_than_peft(ZOO / lora), f"{lora} --to {to}: {e}"
        assert "\n" not in str(e) and not out.exists()
        return
    assert report.check["result"] == "PASS", report.check
    assert report.check["identical"] == report.check["tensors"] > 0
    meta = json.loads(safe_open(out, "pt").metadata()["lorakit"])
    assert meta["converted"]["to"] == to and len(meta["converted"]["from"]["sha256"]) == 64


def _keys(path: Path) -> list[str]:
    with safe_open(path, "pt") as f:
        return list(f.keys())


FLUX = ZOO / "base/flux/flux1_tiny_dev_bfl.safetensors"


def test_split_qkv_into_comfy_is_fused_and_back(tmp_path: Path) -> None:
    """diffusers' split q / k / v of Flux become one ``qkv`` module for ComfyUI (rank 3r, block
    diagonal up), and back into three with --to diffusers; both merge to the same bits."""
    src = ZOO / "diffusers/flux_diffusers_peft.safetensors"
    comfy = tmp_path / "comfy.safetensors"
    r = convert_file(src, comfy, to="comfy", base=FLUX, check=FLUX)
    assert r.fused > 0 and r.check["result"] == "PASS"
    keys = _keys(comfy)
    assert all(k.startswith(("diffusion_model.", "text_encoders.clip_l.transformer.text_model.")) for k in keys)
    assert any(k.startswith("text_encoders.") for k in keys)  # CLIP-L parts kept, though BASE lacks CLIP-L
    assert any(k.endswith("img_attn.qkv.lora_down.weight") for k in keys)
    assert not any(".to_q." in k for k in keys)
    t = load_file(comfy)
    src_t = load_file(src)
    q = next(k for k in src_t if "transformer_blocks.0.attn.to_q.lora_A" in k)
    rank = src_t[q].shape[0]
    down = t["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"]
    up = t["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"]
    assert down.shape[0] == 3 * rank
    h = up.shape[0] // 3
    assert not up[:h, rank:].any() and not up[h:2 * h, :rank].any()  # block diagonal
    back = tmp_path / "back.safetensors"
    r2 = convert_file(comfy, back, to="diffusers", base=FLUX, check=FLUX)
    assert r2.split > 0 and r2.check["result"] == "PASS"
    assert any(".attn.to_q.lora_A.weight" in k for k in _keys(back))
    merged = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    for path, lora in zip(merged, (src, comfy, back)):
        assert cli("merge", FLUX, lora, "-o", path).exit_code == 0
    a, b, c = (load_file(p) for p in merged)
    assert not differing(a, b) and not differing(a, c)


def _modules(path: Path) -> set[str]:
    return {k.split(".")[0] if k.startswith("lora_") else k.rsplit(".", 2)[0] for k in _keys(path)}


ZIMAGE = ZOO / "base/zimage/z_image_turbo_tiny.safetensors"
QWEN = ZOO / "base/qwen/qwen_image_tiny.safetensors"


def test_split_fused_and_fuse_split_force_the_form(tmp_path: Path) -> None:
    """Z-Image: kohya names are musubi-tuner's split q / k / v by default, ``--fuse-split`` writes the
    fused ``qkv``; ComfyUI names are the fused ``qkv`` by default, ``--split-fused`` writes the parts.
    Qwen-Image stores q, k, v apart: ``--fuse-split`` writes diffusers' fused ``to_qkv``."""
    src = ZOO / "next/zimage/z_image_aitoolkit.safetensors"
    runs = {}
    for name, extra in (("kohya", ["--to", "kohya"]), ("kohya_fused", ["--to", "kohya", "--fuse-split"]),
                        ("comfy", ["--to", "comfy"]), ("comfy_split", ["--to", "comfy", "--split-fused"])):
        out = runs[name] = tmp_path / f"{name}.safetensors"
        res = cli("convert", src, "-o", out, "--base", ZIMAGE, "--check", ZIMAGE, *extra)
        assert res.exit_code == 0 and "check PASS" in res.output, res.output
    assert "lora_unet_layers_0_attention_to_q" in _modules(runs["kohya"])
    assert "lora_unet_layers_0_attention_qkv" in _modules(runs["kohya_fused"])
    assert "diffusion_model.layers.0.attention.qkv" in _modules(runs["comfy"])
    assert "diffusion_model.layers.0.attention.to_q" in _modules(runs["comfy_split"])
    qwen_src = ZOO / "next/qwen/qwen_image_diffusers_peft.safetensors"
    fused = tmp_path / "qwen_fused.safetensors"
    res = cli("convert", qwen_src, "-o", fused, "--to", "diffusers", "--base", QWEN, "--fuse-split", "--check", QWEN)
    assert res.exit_code == 0 and "check PASS" in res.output, res.output
    assert "transformer.transformer_blocks.0.attn.to_qkv" in _modules(fused)
    assert cli("convert", src, "-o", tmp_path / "x.safetensors", "--to", "kohya", "--base", ZIMAGE, "--split-fused",
               "--fuse-split").exit_code == 2


def test_kohya_split_qkv_keeps_its_per_part_scale(tmp_path: Path) -> None:
    """A kohya split_qkv file (block-diagonal up, alpha per part) means alpha / r; written for
    ComfyUI (which reads alpha / (3r)) its alpha is rescaled, so both tools apply what was trained."""
    g = torch.Generator().manual_seed(3)
    shapes = {k: tuple(v.shape) for k, v in load_file(FLUX).items()}
    rows, cols = shapes["double_blocks.0.img_attn.qkv.weight"]
    r, h = 2, rows // 3
    up = torch.zeros(rows, 3 * r)
    for i in range(3):
        up[i * h:(i + 1) * h, i * r:(i + 1) * r] = torch.randn(h, r, generator=g)
    lora = tmp_path / "split_qkv.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(3 * r, cols, generator=g),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0)}, lora)
    out = tmp_path / "comfy.safetensors"
    rep = convert_file(lora, out, to="comfy", base=FLUX, check=FLUX)
    assert rep.check["result"] == "PASS"
    t = load_file(out)
    assert float(t["diffusion_model.double_blocks.0.img_attn.qkv.alpha"]) == 3.0  # (alpha / r) x 3r


def test_dtype_changes_the_factors_within_one_ulp(tmp_path: Path) -> None:
    src = ZOO / "kohya/flux_kohya_lora_te.safetensors"
    out = tmp_path / "fp32.safetensors"
    res = cli("convert", src, "-o", out, "--to", "comfy", "--base", FLUX, "--dtype", "fp32", "--allow-unmatched",
              "--check", FLUX, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["check"]["result"] == "PASS" and report["dtype"] == "fp32"
    assert all(v.dtype == torch.float32 for v in load_file(out).values())


def test_diffusers_output_carries_its_alphas_in_metadata(tmp_path: Path) -> None:
    src = ZOO / "kohya/flux_kohya_lora_te.safetensors"
    out = tmp_path / "d.safetensors"
    assert cli("convert", src, "-o", out, "--to", "diffusers", "--base", FLUX).exit_code == 0
    meta = safe_open(out, "pt").metadata()
    cfg = json.loads(meta["lora_adapter_metadata"])
    for comp in ("transformer", "text_encoder", "text_encoder_2"):  # Flux pipelines: CLIP-L, T5-XXL
        assert cfg[f"{comp}.r"] > 0 and cfg[f"{comp}.target_modules"], comp
    assert all(k.startswith(("transformer.", "text_encoder.", "text_encoder_2.")) and
               (".lora_A." in k or ".lora_B." in k) for k in _keys(out))
    assert not any(k.endswith(".alpha") for k in _keys(out))


def test_metadata_is_kept_with_provenance(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    t = load_file(ZOO / "kohya/flux_kohya_lora_te.safetensors")
    save_file({k: v for k, v in t.items() if k.startswith("lora_unet_")}, src,
              metadata={"ss_network_module": "networks.lora_flux", "modelspec.title": "mine", "ss_tag_frequency": "{}"})
    out = tmp_path / "out.safetensors"
    assert cli("convert", src, "-o", out, "--to", "diffusers", "--base", FLUX).exit_code == 0
    meta = safe_open(out, "pt").metadata()
    assert meta["modelspec.title"] == "mine" and meta["ss_network_module"] == "networks.lora_flux"
    assert "converted" in json.loads(meta["lorakit"])


# -- bad input: one line, non-zero exit, no OUT, inputs untouched ---------------------------------

def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    src = ZOO / "kohya/flux_kohya_lora_te.safetensors"
    before = bits(torch.frombuffer(bytearray(src.read_bytes()), dtype=torch.uint8)).clone()
    out = tmp_path / "o.safetensors"
    cases = [
        (["--to", "comfy"], "--base BASE"),
        (["--to", "comfy", "--base", FLUX, "--arch", "sdxl", "--allow-unmatched"], "not --arch sdxl"),
        (["--to", "comfy", "--base", ZOO / "base/sd15/sd15_tiny_single_file.safetensors"], "SD"),
        (["--to", "comfy", "--base", src], "LoRA"),
    ]
    for extra, needle in cases:
        res = cli("convert", src, "-o", out, *extra)
        line = one_line(res)
        assert res.exit_code != 0 and needle in line, (extra, line)
        assert not out.exists()
    same = cli("convert", src, "-o", src, "--to", "comfy", "--base", FLUX, "--allow-unmatched", "--force")
    assert same.exit_code != 0 and "never overwritten" in one_line(same)
    out.write_bytes(b"keep")
    exists = cli("convert", src, "-o", out, "--to", "comfy", "--base", FLUX, "--allow-unmatched")
    assert exists.exit_code != 0 and "--force" in one_line(exists) and out.read_bytes() == b"keep"
    assert torch.equal(before, bits(torch.frombuffer(bytearray(src.read_bytes()), dtype=torch.uint8)))
    assert not list(tmp_path.glob(".*lorakit-tmp"))


def test_lycoris_to_diffusers_is_refused_with_the_reason(tmp_path: Path) -> None:
    res = cli("convert", ZOO / "lycoris/sd15_lycoris_loha_subset.safetensors", "-o", tmp_path / "o.safetensors",
              "--to", "diffusers", "--base", ZOO / "base/sd15/sd15_tiny_single_file.safetensors")
    line = one_line(res)
    assert res.exit_code == 1 and "loha" in line and "--to kohya" in line
    assert not (tmp_path / "o.safetensors").exists()


def test_nonfinite_factors_are_refused(tmp_path: Path) -> None:
    t = load_file(ZOO / "kohya/flux_kohya_lora_te.safetensors")
    t = {k: v for k, v in t.items() if k.startswith("lora_unet_")}
    k = next(k for k in t if k.endswith("lora_up.weight"))
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")
    src = tmp_path / "nan.safetensors"
    save_file(t, src)
    res = cli("convert", src, "-o", tmp_path / "o.safetensors", "--to", "comfy", "--base", FLUX)
    assert res.exit_code != 0 and "NaN" in one_line(res)
    assert not (tmp_path / "o.safetensors").exists()


def test_text_encoder_parts_convert_without_the_encoder_file(tmp_path: Path) -> None:
    """A Flux transformer file has no CLIP-L: the LoRA's CLIP-L modules are renamed from their names,
    and merged into the stand-alone CLIP-L file they give the same bits as the original."""
    clip = ZOO / "base/flux/clip_l_tiny.safetensors"
    src = ZOO / "kohya/flux_kohya_lora_te.safetensors"
    for to in TOS:
        out = tmp_path / f"{to}.safetensors"
        r = convert_file(src, out, to=to, base=FLUX, check=FLUX, allow_unmatched=to == "diffusers")
        assert any("no CLIP-L" in n for n in r.notes) and r.check["result"] == "PASS"
        from lorakit.convert_check import same_merge

        on_clip = same_merge(clip, src, out, exact=True)
        assert on_clip["result"] == "PASS" and on_clip["tensors"] >= 6, on_clip
