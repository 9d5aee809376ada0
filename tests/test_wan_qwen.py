"""Wan 2.1 / 2.2 and Qwen-Image against diffusers (test extras, offline): diffusers' own single-file
conversion of the zoo's tiny bases seen through lorakit's view gives back every tensor; patching
diffusers' WanTransformer3DModel / QwenImageTransformer2DModel equals merging the single file bit
for bit; and diffusers' own ``load_lora_weights`` + ``fuse_lora`` (whose converters read musubi,
ai-toolkit and lightx2v files) agrees with lorakit's merge within 1 ulp, on an fp32 copy as the
zoo's oracles ran."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.arch.diffusers import layout
from tests.conftest import ZOO
from tests.golden_compare import check_float
from tests.helpers import bits, differing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import diffusers  # noqa: E402  (test extras)
from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin, WanLoraLoaderMixin  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

WAN_BASES = ["wan21_t2v_tiny", "wan21_i2v_tiny", "wan22_ti2v_5b_tiny", "wan22_i2v_a14b_tiny"]
WAN_T2V_LORAS = ["wan21_t2v_musubi", "wan21_t2v_aitoolkit", "wan21_t2v_diffusers_peft", "wan21_t2v_lightx2v_mix"]


def _base(family: str, name: str) -> tuple[Path, dict]:
    path = ZOO / f"base/{family}/{name}.safetensors"
    return path, json.loads(path.with_suffix(".json").read_text())


def diffusers_state(family: str, name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The diffusers model of a tiny base (its sidecar's config) holding diffusers' conversion of the file."""
    path, side = _base(family, name)
    single = load_file(path)
    if family == "wan":
        model = diffusers.WanTransformer3DModel(**side["config"])
        state = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in single.items()})
    else:
        model = diffusers.QwenImageTransformer2DModel(**side["config"])
        state = {k: v.clone() for k, v in single.items()}
    model = model.to(next(iter(single.values())).dtype)
    model.load_state_dict(state, strict=True)
    return model, state


def _gather(lay, tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    out = torch.empty(lay.shapes[key], dtype=tensors[lay.blocks[key][0].key].dtype)
    for b in lay.blocks[key]:
        out[b.rows[0]:b.rows[1]] = tensors[b.key][b.offset:b.offset + b.rows[1] - b.rows[0]]
    return out


@pytest.mark.parametrize("name", WAN_BASES)
def test_wan_diffusers_layout_is_the_single_file(name: str) -> None:
    _, state = diffusers_state("wan", name)
    single = load_file(_base("wan", name)[0])
    lay = layout({k: tuple(v.shape) for k, v in state.items()})
    assert lay is not None and set(lay.shapes) == set(single)
    assert {b.key for blocks in lay.blocks.values() for b in blocks} == set(state)
    for key in single:
        assert torch.equal(bits(_gather(lay, state, key)), bits(single[key])), key


@pytest.mark.parametrize("lora", WAN_T2V_LORAS)
def test_patching_diffusers_wan_equals_merging_the_file(lora: str, tmp_path: Path) -> None:
    base, _ = _base("wan", "wan21_t2v_tiny")
    model, state = diffusers_state("wan", "wan21_t2v_tiny")
    spec = f"{ZOO / 'next/wan' / lora}.safetensors:0.9"
    out = tmp_path / "merged.safetensors"
    lorakit.merge_file(base, [lorakit.LoraSpec(f"{ZOO / 'next/wan' / lora}.safetensors", 0.9)], out, progress=False)
    merged = load_file(out)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with lorakit.patch(model, [spec]):
        patched = model.state_dict()
        lay = layout({k: tuple(v.shape) for k, v in patched.items()})
        assert len(differing(patched, before)) >= 10
        for key in merged:
            assert torch.equal(bits(_gather(lay, patched, key)), bits(merged[key])), key
    assert differing(model.state_dict(), before) == []


def test_patching_diffusers_qwen_equals_merging_the_file(tmp_path: Path) -> None:
    base, _ = _base("qwen", "qwen_image_tiny")
    model, _ = diffusers_state("qwen", "qwen_image_tiny")
    lora = ZOO / "next/qwen/qwen_image_diffusers_peft.safetensors"
    out = tmp_path / "merged.safetensors"
    lorakit.merge_file(base, [lorakit.LoraSpec(str(lora), 0.8)], out, progress=False)
    with lorakit.patch(model, [f"{lora}:0.8"]) as h:
        assert len(h.touched) >= 10 and differing(model.state_dict(), load_file(out)) == []


class _Holder:
    """The part of a diffusers pipeline that load_lora_weights / fuse_lora use: the transformer."""

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"
    hf_device_map = None

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer

    @property
    def components(self) -> dict:
        return {"transformer": self.transformer}


class WanHolder(_Holder, WanLoraLoaderMixin):
    pass


class QwenHolder(_Holder, QwenImageLoraLoaderMixin):
    pass


# (family, base, LoRA, strength): formats diffusers' own loader reads. Not the lightx2v file: diffusers
# 0.42.1 drops its norm diffs and reads head.head.diff as a LoRA down matrix (the zoo's notes); its
# cases are checked against ComfyUI's merge and the formula (cases-next.json)
ORACLE = [
    ("wan", "wan21_t2v_tiny", "wan/wan21_t2v_musubi", 0.8),
    ("wan", "wan21_t2v_tiny", "wan/wan21_t2v_aitoolkit", 1.0),
    ("wan", "wan21_t2v_tiny", "wan/wan21_t2v_diffusers_peft", 0.7),
    ("wan", "wan21_i2v_tiny", "wan/wan21_i2v_aitoolkit", 1.0),
    ("wan", "wan22_ti2v_5b_tiny", "wan/wan22_ti2v_5b_musubi", 1.2),
    ("qwen", "qwen_image_tiny", "qwen/qwen_image_musubi", 1.0),
    ("qwen", "qwen_image_tiny", "qwen/qwen_image_aitoolkit", -0.5),
    ("qwen", "qwen_image_tiny", "qwen/qwen_image_diffusers_peft", 0.8),
]


@pytest.mark.parametrize("family, base_name, lora, strength", ORACLE, ids=[o[2].split("/")[1] for o in ORACLE])
def test_diffusers_fuse_agrees_with_the_merge(family: str, base_name: str, lora: str, strength: float,
                                              tmp_path: Path) -> None:
    base, _ = _base(family, base_name)
    model, state = diffusers_state(family, base_name)
    model = model.float()
    holder = (WanHolder if family == "wan" else QwenHolder)(model)
    holder.load_lora_weights(str(ZOO / f"next/{lora}.safetensors"), adapter_name="oracle")
    holder.fuse_lora(components=["transformer"], lora_scale=strength)
    holder.unload_lora_weights()
    fused = model.state_dict()
    changed = [k for k in state if not torch.equal(fused[k], state[k].float())]
    assert len(changed) >= 8, "diffusers' fuse changed too little to compare"
    out = tmp_path / "merged.safetensors"
    lorakit.merge_file(base, [lorakit.LoraSpec(str(ZOO / f"next/{lora}.safetensors"), strength)], out,
                       progress=False)
    merged = load_file(out)
    lay = layout({k: tuple(v.shape) for k, v in state.items()})
    by_real = {b.key: key for key, blocks in (lay.blocks.items() if lay else []) for b in blocks}
    for dkey in changed:
        key = by_real.get(dkey, dkey)
        ours = merged[key] if lay is None else merged[key].reshape(fused[dkey].shape)
        check_float(ours, fused[dkey].to(torch.float64), f"{lora}: {dkey}")


def _random_factors(params, seed: int) -> None:
    """Producers zero-initialise one factor; seeded noise in every factor makes the merge change weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _agrees(merged: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
            what: str) -> None:
    """lorakit's merge (single-file names, stored dtype) within 1 ulp of a producer's fp32 merge
    of the same diffusers model, on every tensor the producer changed."""
    lay = layout({k: tuple(v.shape) for k, v in original.items()})
    by_real = {b.key: key for key, blocks in lay.blocks.items() for b in blocks}
    changed = [k for k in original if not torch.equal(reference[k], original[k])]
    assert len(changed) >= 8, f"{what}: the producer's merge changed too little"
    for dkey in changed:
        check_float(merged[by_real[dkey]].reshape(reference[dkey].shape), reference[dkey].double(), f"{what}: {dkey}")


@pytest.mark.parametrize("algo, extra", [("loha", {}), ("lokr", {"factor": 4}), ("locon", {})])
def test_lycoris_on_diffusers_wan(algo: str, extra: dict, tmp_path: Path) -> None:
    """SimpleTuner's way: LyCORIS (lycoris-lora, a test extra) on diffusers' WanTransformer3DModel writes
    ``lycoris_blocks_N_attn1_to_q`` names; its own ``merge_to`` is the reference (alpha = rank, where
    LyCORIS' merge and ComfyUI's agree)."""
    from lycoris import LycorisNetwork, create_lycoris

    base, _ = _base("wan", "wan21_t2v_tiny")
    model, state = diffusers_state("wan", "wan21_t2v_tiny")
    model = model.float()
    original = {k: v.float() for k, v in state.items()}
    LycorisNetwork.apply_preset({"target_module": ["WanTransformerBlock"]})
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=4.0, algo=algo, **extra)
    net.apply_to()
    _random_factors(net.parameters(), 11)
    lora = tmp_path / f"wan_lycoris_{algo}.safetensors"
    net.save_weights(str(lora), torch.float32, {})
    net.merge_to(1.0)
    out = tmp_path / "merged.safetensors"
    report = lorakit.merge_file(base, [lorakit.LoraSpec(str(lora))], out, progress=False)
    assert report.loras[0].format == "lycoris" and report.loras[0].arch == "wan"
    _agrees(load_file(out), model.state_dict(), original, f"lycoris {algo}")


def test_diffsynth_peft_default_names_on_wan(tmp_path: Path) -> None:
    """DiffSynth-Studio's way: PEFT's inject_adapter_in_model on a Wan model with the file's own module
    names (as DiffSynth's WanModel), the trainable state dict saved as is
    (``blocks.0.self_attn.q.lora_A.default.weight``: no prefix, no alpha; DiffSynth trains with
    lora_alpha = rank). Reference: W + B @ A in float64."""
    from peft import LoraConfig, inject_adapter_in_model

    from lorakit.io.safetensors import save_file

    base, _ = _base("wan", "wan21_t2v_tiny")
    single = load_file(base)
    native = torch.nn.Module()
    for key, value in sorted(single.items(), key=lambda kv: not kv[0].endswith(".weight")):  # weights first
        *path, leaf = key.split(".")
        owner = native
        for i, part in enumerate(path):
            if not hasattr(owner, part):
                linear = i == len(path) - 1 and leaf == "weight" and value.dim() == 2
                owner.add_module(part, torch.nn.Linear(value.shape[1], value.shape[0]) if linear else torch.nn.Module())
            owner = getattr(owner, part)
        if isinstance(owner, torch.nn.Linear):
            getattr(owner, leaf).data.copy_(value.float())
        else:
            owner.register_parameter(leaf, torch.nn.Parameter(value.float().clone(), requires_grad=False))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q", "k", "v", "o"]), native)
    _random_factors([p for n, p in native.named_parameters() if ".lora_" in n], 5)
    lora_params = {k: v.detach().to(torch.bfloat16) for k, v in native.state_dict().items() if ".lora_" in k}
    assert lora_params and all(k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in lora_params)
    lora = tmp_path / "wan_diffsynth.safetensors"
    save_file(lora_params, lora)
    out = tmp_path / "merged.safetensors"
    lorakit.merge_file(base, [lorakit.LoraSpec(str(lora))], out, progress=False)
    merged = load_file(out)
    changed = 0
    for key, w in single.items():
        module = key.rsplit(".", 1)[0]
        a, b = lora_params.get(f"{module}.lora_A.default.weight"), lora_params.get(f"{module}.lora_B.default.weight")
        if a is None or not key.endswith(".weight"):
            assert torch.equal(bits(merged[key]), bits(w)), key
            continue
        check_float(merged[key], w.double() + b.double() @ a.double(), key)
        changed += 1
    assert changed == 16  # q, k, v, o of self- and cross-attention in 2 blocks


def test_a_14b_lora_on_a_small_wan_names_both(tmp_path: Path) -> None:
    from lorakit.io.safetensors import save_file
    from tests.helpers import cli

    big = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 5120),
           "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(5120, 4)}
    save_file(big, tmp_path / "wan14b.safetensors")
    res = cli("merge", ZOO / "base/wan/wan21_t2v_tiny.safetensors", tmp_path / "wan14b.safetensors",
              "-o", tmp_path / "o.safetensors")
    line = res.output.strip()
    assert res.exit_code == 1 and "\n" not in line
    for needle in ("Wan 2.1 T2V, width 128", "5120 wide: Wan 14B", "blocks.0.self_attn.q.weight (128, 128)"):
        assert needle in line, line
    assert not (tmp_path / "o.safetensors").exists()


def test_a_qwen_lora_on_flux_names_both(tmp_path: Path) -> None:
    from tests.helpers import cli

    res = cli("merge", ZOO / "base/flux/flux1_tiny_dev_bfl.safetensors",
              ZOO / "next/qwen/qwen_image_diffusers_peft.safetensors", "-o", tmp_path / "o.safetensors")
    line = res.output.strip()
    assert res.exit_code == 1 and "this LoRA is for Qwen-Image" in line and "is Flux.1" in line
    assert "img_mlp" in line or "txt_mlp" in line  # a module Flux lacks


def test_an_i2v_lora_on_t2v_names_the_image_keys(tmp_path: Path) -> None:
    from tests.helpers import cli

    base, lora = ZOO / "base/wan/wan21_t2v_tiny.safetensors", ZOO / "next/wan/wan21_i2v_aitoolkit.safetensors"
    res = cli("merge", base, lora, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 1 and ("k_img" in res.output or "img_emb" in res.output)
    res = cli("merge", base, lora, "-o", tmp_path / "o.safetensors", "--allow-unmatched", "--json")
    report = json.loads(res.stdout)
    unmatched = {u["module"] for u in report["loras"][0]["unmatched"]}
    assert res.exit_code == 0 and unmatched and all("img" in m for m in unmatched)
    assert report["tensors_changed"] == 20  # the T2V part applies


def test_inspect_shows_the_expert_a_wan22_lora_is_for(tmp_path: Path) -> None:
    import shutil

    from tests.helpers import cli

    lora = tmp_path / "my_wan22_lora_HIGH.safetensors"
    shutil.copy(ZOO / "next/wan/wan22_a14b_aitoolkit.safetensors", lora)
    res = cli("inspect", lora)
    assert res.exit_code == 0 and "high-noise expert (from the file name)" in res.output
    assert "Wan 2.1 / 2.2" in res.output
