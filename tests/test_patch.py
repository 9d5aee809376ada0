"""lorakit.patch: in-memory patching equals the merge bit for bit; restore and hot swap are exact;
diffusers layouts reach the same tensors as the single-file layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.arch.diffusers import layout
from lorakit.errors import LorakitError, UnmatchedKeysError
from tests.helpers import bits, load_cases
from tests.helpers import differing as same

CASES = load_cases("cases.json")
SUCCESS = [c for c in CASES if c["expect"]["exit"] == "success"]


def specs(case: dict, zoo: Path) -> list[lorakit.LoraSpec]:
    return [lorakit.LoraSpec(str(zoo / lo["path"]), lo["model_strength"], lo["clip_strength"]) for lo in case["loras"]]


def merged(case: dict, zoo: Path, tmp: Path, **kw) -> dict[str, torch.Tensor]:
    f = case["flags"]
    out = tmp / "merged.safetensors"
    lorakit.merge_file(zoo / case["base"], specs(case, zoo), out, model_only=f["model_only"], rounding=f["rounding"],
                       seed=f["seed"] or 0, allow_unmatched=f["allow_unmatched"], progress=False, force=True, **kw)
    return load_file(out)


@pytest.mark.parametrize("case", SUCCESS, ids=[c["id"] for c in SUCCESS])
def test_patch_equals_merge(case: dict, zoo: Path, tmp_path: Path) -> None:
    f = case["flags"]
    sd = load_file(zoo / case["base"])
    original = {k: v.clone() for k, v in sd.items()}
    h = lorakit.patch(sd, specs(case, zoo), model_only=f["model_only"], rounding=f["rounding"], seed=f["seed"] or 0,
                      allow_unmatched=f["allow_unmatched"])
    assert same(sd, merged(case, zoo, tmp_path)) == []
    changed = set(same(sd, original))
    assert changed and changed <= set(h.touched), "the patch changes tensors, and only touched ones"
    h.restore()
    assert same(sd, original) == []


def test_hot_swap_never_drifts(zoo: Path, tmp_path: Path) -> None:
    """Many strength changes, then back: bit-identical to a fresh patch; restore gives the original."""
    base = zoo / "base/flux/flux1_tiny_dev_fp8_e4m3fn_scaled.safetensors"
    lora = zoo / "flux/flux_aitoolkit_lora.safetensors"
    sd = load_file(base)
    original = {k: v.clone() for k, v in sd.items()}
    fresh = load_file(base)
    lorakit.patch(fresh, [f"{lora}:0.8"], seed=3)
    with lorakit.patch(sd, [f"{lora}:0.8"], seed=3) as h:
        assert h.rounding == "stochastic" and h.backup_policy == "beside"  # a copy beside the (CPU) weights
        for s in (0.0, 1.5, -2.0, 0.3, 0.8):
            h.set_strengths([s])
            if s == 0.0:
                assert same(sd, original) == []
        assert same(sd, fresh) == []
    assert same(sd, original) == [], "leaving the with block restores the original bits"


def test_zero_strength_can_be_raised_later(zoo: Path) -> None:
    base = zoo / "base/sd15/sd15_tiny_single_file.safetensors"
    lora = zoo / "kohya/sd15_kohya_lora.safetensors"
    sd, ref = load_file(base), load_file(base)
    h = lorakit.patch(sd, [f"{lora}:0:0"])
    assert same(sd, ref) == []
    lorakit.patch(ref, [f"{lora}:0.7:0.3"])
    h.set_strengths([(0.7, 0.3)])
    assert same(sd, ref) == []


def test_backup_none_refuses_restore(zoo: Path) -> None:
    sd = load_file(zoo / "base/sd15/sd15_tiny_single_file.safetensors")
    h = lorakit.patch(sd, [str(zoo / "kohya/sd15_kohya_lora.safetensors")], backup="none")
    with pytest.raises(LorakitError, match="needs the backup"):
        h.restore()
    with pytest.raises(LorakitError, match="needs the backup"):
        h.set_strengths([0.5])


def test_strict_failure_touches_nothing(zoo: Path) -> None:
    case = next(c for c in CASES if c["id"] == "flux_garbage_key_strict_fails")
    sd = load_file(zoo / case["base"])
    original = {k: v.clone() for k, v in sd.items()}
    with pytest.raises(UnmatchedKeysError):
        lorakit.patch(sd, specs(case, zoo))
    assert same(sd, original) == []


def test_comfyui_internal_names(zoo: Path) -> None:
    """ComfyUI's own model state dict says diffusion_model.X; it patches like the file's names."""
    lora = [f"{zoo / 'flux/flux_aitoolkit_lora.safetensors'}:0.9"]
    plain = load_file(zoo / "base/flux/flux1_tiny_dev_bfl.safetensors")
    comfy = {f"diffusion_model.{k}": v.clone() for k, v in plain.items()}
    lorakit.patch(plain, lora)
    h = lorakit.patch(comfy, lora)
    assert len(h.touched) > 10 and same({k[len("diffusion_model."):]: v for k, v in comfy.items()}, plain) == []


def test_channels_last_and_transposed_weights(zoo: Path) -> None:
    """Weights whose memory is not row-major (channels_last convs, transposed views) are patched
    for real, with the same bits as contiguous ones, and restored exactly."""
    base = zoo / "base/sd15/sd15_tiny_single_file.safetensors"
    lora = [f"{zoo / 'kohya/sd15_kohya_locon.safetensors'}:0.9"]
    plain, odd = load_file(base), load_file(base)
    for k, v in odd.items():
        if v.dim() == 4:
            odd[k] = v.contiguous(memory_format=torch.channels_last)
        elif v.dim() == 2 and v.shape[0] == v.shape[1]:
            odd[k] = v.t().contiguous().t()  # same values, column-major memory
    before = {k: v.clone() for k, v in odd.items()}
    lorakit.patch(plain, lora)
    h = lorakit.patch(odd, lora)
    strided = [k for k in h.touched if not odd[k].is_contiguous()]
    assert len(strided) > 10
    assert same({k: v.contiguous() for k, v in odd.items()}, plain) == []
    h.restore()
    assert same({k: v.contiguous() for k, v in odd.items()}, {k: v.contiguous() for k, v in before.items()}) == []


def test_module_target(zoo: Path) -> None:
    """An nn.Module's parameters are patched in place (and restored) like its state dict."""
    sd = load_file(zoo / "base/flux/flux1_tiny_dev_bfl.safetensors")
    module = torch.nn.Module()
    for k, v in sd.items():  # a module whose state_dict has the BFL names
        *path, leaf = k.split(".")
        owner = module
        for p in path:
            if not hasattr(owner, p):
                owner.add_module(p, torch.nn.Module())
            owner = getattr(owner, p)
        owner.register_parameter(leaf, torch.nn.Parameter(v.clone(), requires_grad=False))
    lora = str(zoo / "flux/flux_bfl_noprefix.safetensors")
    h = lorakit.patch(module, [lora])
    lorakit.patch(sd, [lora])
    got = module.state_dict()
    assert same(got, sd) == []
    h.restore()
    assert same(module.state_dict(), load_file(zoo / "base/flux/flux1_tiny_dev_bfl.safetensors")) == []


# -- diffusers layouts ---------------------------------------------------------------------------

def _gather(lay, tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    blocks = lay.blocks[key]
    out = torch.empty(lay.shapes[key], dtype=tensors[blocks[0].key].dtype)
    for b in blocks:
        out[b.rows[0]:b.rows[1]] = tensors[b.key][b.offset:b.offset + b.rows[1] - b.rows[0]]
    return out


def test_flux_diffusers_layout_is_the_bfl_checkpoint(zoo: Path) -> None:
    """The zoo's diffusers transformer and BFL file hold the same weights: the layout must
    rebuild every BFL tensor from diffusers tensors exactly, using every diffusers tensor."""
    dsd = load_file(zoo / "base/flux/diffusers/transformer/diffusion_pytorch_model.safetensors")
    bfl = load_file(zoo / "base/flux/flux1_tiny_dev_bfl.safetensors")
    lay = layout({k: tuple(v.shape) for k, v in dsd.items()})
    assert lay is not None and set(lay.shapes) == set(bfl)
    assert {b.key for bl in lay.blocks.values() for b in bl} == set(dsd)
    for key in bfl:
        assert torch.equal(_gather(lay, dsd, key), bfl[key]), key


FLUX_LORAS = ["flux/flux_aitoolkit_lora.safetensors", "flux/flux_bfl_lorawrapper.safetensors",
              "flux/flux_xlabs_lora.safetensors", "diffusers/flux_diffusers_peft.safetensors",
              "lycoris/flux_lycoris_lokr.safetensors"]


@pytest.mark.parametrize("lora", FLUX_LORAS)
def test_flux_diffusers_patch_equals_bfl_patch(zoo: Path, lora: str) -> None:
    dsd = load_file(zoo / "base/flux/diffusers/transformer/diffusion_pytorch_model.safetensors")
    bfl = load_file(zoo / "base/flux/flux1_tiny_dev_bfl.safetensors")
    before = {k: v.clone() for k, v in dsd.items()}
    lay = layout({k: tuple(v.shape) for k, v in dsd.items()})
    h = lorakit.patch(dsd, [f"{zoo / lora}:0.9"], model_only=True)
    lorakit.patch(bfl, [f"{zoo / lora}:0.9"], model_only=True)
    for key in bfl:
        assert torch.equal(_gather(lay, dsd, key), bfl[key]), key
    h.restore()
    assert same(dsd, before) == []


@pytest.mark.parametrize("arch, sidecar, lora", [
    ("sd15", "diffusers/sd15_peft_lora_with_metadata.json", "kohya/sd15_kohya_lora.safetensors"),
    ("sdxl", "diffusers/sdxl_diffusers_dreambooth.json", "kohya/sdxl_kohya_lora_subset.safetensors"),
])
def test_unet_diffusers_layout_against_diffusers_converter(zoo: Path, arch: str, sidecar: str, lora: str) -> None:
    """diffusers' own LDM -> diffusers conversion of the zoo checkpoint, seen through lorakit's
    layout, gives back the single-file U-Net exactly; patching either layout changes the same bits."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    cfg = json.loads((zoo / sidecar).read_text())["base_model"]["unet_config"]
    single = load_file(zoo / f"base/{arch}/{arch}_tiny_single_file.safetensors")
    # clones: the converter returns views of the checkpoint's tensors, and each side is patched on its own
    conv = {k: v.clone() for k, v in sfu.convert_ldm_unet_checkpoint(single, dict(UNet2DConditionModel(**cfg).config)).items()}
    lay = layout({k: tuple(v.shape) for k, v in conv.items()})
    prefix = "model.diffusion_model."
    unet = {k[len(prefix):]: v.clone() for k, v in single.items() if k.startswith(prefix)}
    assert set(lay.shapes) == set(unet)
    for key in unet:
        assert torch.equal(_gather(lay, conv, key), unet[key]), key
    module = UNet2DConditionModel(**cfg).to(next(iter(conv.values())).dtype)  # the file's fp16, like conv
    module.load_state_dict(conv, strict=True)
    before = {k: v.clone() for k, v in unet.items()}
    lorakit.patch(conv, [f"{zoo / lora}:0.8"], model_only=True)
    lorakit.patch(unet, [f"{zoo / lora}:0.8"], model_only=True)
    assert len(same(unet, before)) >= 10  # the LoRA really changes tensors on both sides
    for key in unet:
        assert torch.equal(_gather(lay, conv, key), unet[key]), key
    with lorakit.patch(module, [f"{zoo / lora}:0.8"], model_only=True):  # the diffusers nn.Module itself
        assert same(module.state_dict(), conv) == []


def test_patch_with_the_kernel_backend(zoo: Path) -> None:
    """backend="triton" (the interpreter on CPU) through the whole patch path: every tensor within
    1 ulp of the reference patch, at most 0.1 % of elements differing (k-sum order, see ops)."""
    pytest.importorskip("triton", reason="triton is a Linux-only test extra")
    base = zoo / "base/sd15/sd15_tiny_single_file.safetensors"
    lora = f"{zoo / 'kohya/sd15_kohya_lora.safetensors'}:0.7:0.3"
    ref, ker, original = load_file(base), load_file(base), load_file(base)
    lorakit.patch(ref, [lora])
    h = lorakit.patch(ker, [lora], backend="triton")
    assert len(same(ker, original)) == len(h.touched) > 0
    diff = total = 0
    for k in ref:
        if ref[k].is_floating_point():
            d = (ref[k].double() - ker[k].double()).abs()
            spacing = torch.finfo(ref[k].dtype).eps * ref[k].double().abs().clamp(min=2.0 ** -14)
            assert bool((d <= spacing).all()), k
            diff += int((bits(ref[k]) != bits(ker[k])).sum())
            total += ref[k].numel()
    assert diff <= 1e-3 * total


def test_hot_swap_with_the_kernel_backend(zoo: Path) -> None:
    """The kernel's one-pass re-patch from the backup equals a fresh kernel patch bit for bit."""
    pytest.importorskip("triton", reason="triton is a Linux-only test extra")
    base = zoo / "base/flux/flux1_tiny_dev_fp8_e4m3fn.safetensors"
    lora = zoo / "flux/flux_bfl_noprefix.safetensors"
    sd, fresh, original = load_file(base), load_file(base), load_file(base)
    lorakit.patch(fresh, [f"{lora}:0.6"], seed=9, backend="triton")
    h = lorakit.patch(sd, [f"{lora}:1.2"], seed=9, backend="triton")
    assert h.saturated == {} and h.rounding == "stochastic"
    h.set_strengths([0.6])
    assert h._from_backup is not None, "the one-pass path ran"
    assert same(sd, fresh) == []
    h.set_strengths([0.0])
    assert same(sd, original) == []


@pytest.mark.parametrize("base_name", ["flux1_tiny_dev_bfl", "flux1_tiny_dev_fp8_e4m3fn_scaled"])
def test_thousand_patch_cycles_stay_bit_exact(zoo: Path, base_name: str) -> None:
    """1000 cycles of set_strengths / restore / apply in a seeded random order on the zoo's Flux
    model: every state equals a fresh patch at the same strength, every restore the original bits."""
    import random

    base = zoo / f"base/flux/{base_name}.safetensors"
    lora = str(zoo / "flux/flux_aitoolkit_lora.safetensors")
    strengths = [0.0, 0.3, -1.0, 0.8, 1.7]
    fresh = {}
    for s in strengths:
        sd = load_file(base)
        lorakit.patch(sd, [f"{lora}:{s}"], seed=5)
        fresh[s] = sd
    original = load_file(base)
    sd = load_file(base)
    rng = random.Random(1000)
    with lorakit.patch(sd, [f"{lora}:0.8"], seed=5) as h:
        current = 0.8
        for _ in range(1000):
            action = rng.random()
            if action < 0.6:
                current = rng.choice(strengths)
                h.set_strengths([current])
                assert same(sd, fresh[current]) == []
            elif action < 0.8:
                h.restore()
                assert same(sd, original) == []
            else:
                h.apply()
                assert same(sd, fresh[current]) == []
        assert h.report().loras[0].model_strength == current
    assert same(sd, original) == []
