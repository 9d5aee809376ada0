"""Z-Image, FLUX.2 and Chroma against diffusers (test extras, offline), and fused LoRAs over split
bases: diffusers' own single-file conversion of the zoo's tiny bases seen through lorakit's view
gives back every tensor; patching the diffusers modules equals merging the single file bit for bit;
diffusers' own ``load_lora_weights`` + ``fuse_lora`` (whose converters read ai-toolkit, musubi,
diffusion-pipe and kohya files) and LyCORIS' / PEFT's own merges agree with lorakit's merge within
1 ulp, on fp32 copies as the zoo's oracles ran."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.arch.diffusers import layout
from lorakit.io.safetensors import save_file
from tests.conftest import ZOO
from tests.golden_compare import check_float
from tests.helpers import bits, cli, differing, one_line

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import diffusers  # noqa: E402  (test extras)
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from diffusers.loaders.lora_pipeline import (  # noqa: E402
    Flux2LoraLoaderMixin, FluxLoraLoaderMixin, QwenImageLoraLoaderMixin, ZImageLoraLoaderMixin)
from diffusers.models.attention_processor import Attention  # noqa: E402

BASES = {  # name -> (zoo folder, diffusers class)
    "z_image_turbo_tiny": ("zimage", diffusers.ZImageTransformer2DModel),
    "flux2_dev_tiny": ("flux2", diffusers.Flux2Transformer2DModel),
    "flux2_klein_tiny": ("flux2", diffusers.Flux2Transformer2DModel),
    "chroma_tiny": ("chroma", diffusers.ChromaTransformer2DModel),
}


def _chroma_converter():
    """diffusers' Chroma converter with its one written-in width (``inner_dim = 3072``) set to the
    tiny base's 64, as the zoo's own check did."""
    src = inspect.getsource(sfu.convert_chroma_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    namespace = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", "inner_dim = 64"), namespace)  # noqa: S102 (diffusers' own source)
    return namespace["convert_chroma_transformer_checkpoint_to_diffusers"]


CONVERTERS = {
    "zimage": sfu.convert_z_image_transformer_checkpoint_to_diffusers,
    "flux2": sfu.convert_flux2_transformer_checkpoint_to_diffusers,
    "chroma": _chroma_converter(),
}


def _base(name: str) -> Path:
    return ZOO / f"base/{BASES[name][0]}/{name}.safetensors"


def diffusers_state(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The diffusers model of a tiny base (its sidecar's config) holding diffusers' conversion of the file."""
    folder, cls = BASES[name]
    single = load_file(_base(name))
    config = json.loads(_base(name).with_suffix(".json").read_text())["config"]
    state = CONVERTERS[folder]({k: v.clone() for k, v in single.items()})
    model = cls(**config).to(next(iter(single.values())).dtype)
    model.load_state_dict(state, strict=True)
    return model, state


def _gather(lay, tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    out = torch.empty(lay.shapes[key], dtype=tensors[lay.blocks[key][0].key].dtype)
    for b in lay.blocks[key]:
        out[b.rows[0]:b.rows[1]] = tensors[b.key][b.offset:b.offset + b.rows[1] - b.rows[0]]
    return out


@pytest.mark.parametrize("name", sorted(BASES))
def test_diffusers_layout_is_the_single_file(name: str) -> None:
    _, state = diffusers_state(name)
    single = load_file(_base(name))
    lay = layout({k: tuple(v.shape) for k, v in state.items()})
    assert lay is not None and set(lay.shapes) == set(single), set(lay.shapes) ^ set(single)
    assert {b.key for blocks in lay.blocks.values() for b in blocks} == set(state)
    for key in single:
        assert torch.equal(bits(_gather(lay, state, key)), bits(single[key])), key


PATCHES = [("z_image_turbo_tiny", "zimage/z_image_aitoolkit", 0.9), ("z_image_turbo_tiny", "zimage/z_image_musubi", 1.0),
           ("z_image_turbo_tiny", "zimage/z_image_diffusion_pipe", 0.8),
           ("flux2_dev_tiny", "flux2/flux2_dev_diffusers_peft", 1.0), ("flux2_dev_tiny", "flux2/flux2_dev_aitoolkit", 0.7),
           ("flux2_klein_tiny", "flux2/flux2_klein_diffusers_peft", 1.3),
           ("chroma_tiny", "chroma/chroma_kohya", 0.7), ("chroma_tiny", "chroma/chroma_diffusers_peft", 1.0)]


@pytest.mark.parametrize("name, lora, strength", PATCHES, ids=[p[1].split("/")[1] for p in PATCHES])
def test_patching_the_diffusers_model_equals_merging_the_file(name: str, lora: str, strength: float,
                                                              tmp_path: Path) -> None:
    model, _ = diffusers_state(name)
    path = ZOO / f"next/{lora}.safetensors"
    out = tmp_path / "merged.safetensors"
    lorakit.merge_file(_base(name), [lorakit.LoraSpec(str(path), strength)], out, progress=False)
    merged = load_file(out)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with lorakit.patch(model, [f"{path}:{strength}"]):
        patched = model.state_dict()
        lay = layout({k: tuple(v.shape) for k, v in patched.items()})
        assert len(differing(patched, before)) >= 8
        for key in merged:
            assert torch.equal(bits(_gather(lay, patched, key)), bits(merged[key])), key
    assert differing(model.state_dict(), before) == []


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


HOLDERS = {"zimage": type("ZImageHolder", (_Holder, ZImageLoraLoaderMixin), {}),
           "flux2": type("Flux2Holder", (_Holder, Flux2LoraLoaderMixin), {}),
           "chroma": type("ChromaHolder", (_Holder, FluxLoraLoaderMixin), {"text_encoder": None})}


def _agrees(base: Path, merged: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
            original: dict[str, torch.Tensor], what: str, at_least: int = 8) -> None:
    """lorakit's merge (single-file names, stored dtype) within 1 ulp of a producer's fp32 merge of
    the same diffusers model on every tensor the producer changed; every other tensor as BASE's."""
    lay = layout({k: tuple(v.shape) for k, v in original.items()})
    by_real = {b.key: (key, b.rows) for key, blocks in lay.blocks.items() for b in blocks}
    changed = [k for k in original if not torch.equal(reference[k], original[k])]
    assert len(changed) >= at_least, f"{what}: the producer's merge changed too little"
    for dkey in changed:
        key, (r0, r1) = by_real[dkey]
        check_float(merged[key][r0:r1].reshape(reference[dkey].shape), reference[dkey].double(), f"{what}: {dkey}")
    touched = {by_real[k][0] for k in changed}
    for key, value in load_file(base).items():
        if key not in touched:
            assert torch.equal(bits(merged[key]), bits(value)), f"{what}: {key} changed"


# (base, LoRA, strength): formats diffusers' own loaders read. Not diffusion-pipe's fused
# ``attention.qkv`` / ``out`` file: diffusers 0.42.1 drops those keys ("unexpected keys"), so only
# its feed-forward would compare; its case is checked against the formula (cases-next.json)
ORACLE = [
    ("z_image_turbo_tiny", "zimage/z_image_aitoolkit", 1.0),
    ("z_image_turbo_tiny", "zimage/z_image_musubi", 0.8),
    ("flux2_dev_tiny", "flux2/flux2_dev_aitoolkit", 0.75),
    ("flux2_dev_tiny", "flux2/flux2_dev_diffusers_peft", 1.0),
    ("flux2_klein_tiny", "flux2/flux2_klein_diffusers_peft", 1.3),
    ("chroma_tiny", "chroma/chroma_diffusers_peft", 1.0),
]


@pytest.mark.parametrize("name, lora, strength", ORACLE, ids=[o[1].split("/")[1] for o in ORACLE])
def test_diffusers_fuse_agrees_with_the_merge(name: str, lora: str, strength: float, tmp_path: Path) -> None:
    model, state = diffusers_state(name)
    model = model.float()
    original = {k: v.float() for k, v in state.items()}
    holder = HOLDERS[BASES[name][0]](model)
    holder.load_lora_weights(str(ZOO / f"next/{lora}.safetensors"), adapter_name="oracle")
    holder.fuse_lora(components=["transformer"], lora_scale=strength)
    holder.unload_lora_weights()
    out = tmp_path / "merged.safetensors"
    lorakit.merge_file(_base(name), [lorakit.LoraSpec(str(ZOO / f"next/{lora}.safetensors"), strength)], out,
                       progress=False)
    _agrees(_base(name), load_file(out), model.state_dict(), original, lora)


def _random_factors(params, seed: int) -> None:
    """Producers zero-initialise one factor; seeded noise in every factor makes the merge change weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


LYCORIS = [("z_image_turbo_tiny", ["ZImageTransformerBlock"], "lokr", {"factor": 4}),
           ("z_image_turbo_tiny", ["ZImageTransformerBlock"], "loha", {}),
           ("flux2_klein_tiny", ["Flux2TransformerBlock", "Flux2SingleTransformerBlock"], "lokr", {"factor": 4}),
           ("chroma_tiny", ["ChromaTransformerBlock", "ChromaSingleTransformerBlock"], "locon", {})]


@pytest.mark.parametrize("name, blocks, algo, extra", LYCORIS, ids=[f"{n.split('_')[0]}-{a}" for n, _, a, _ in LYCORIS])
def test_lycoris_on_the_diffusers_model(name: str, blocks: list[str], algo: str, extra: dict, tmp_path: Path) -> None:
    """SimpleTuner's / LyCORIS' way: lycoris-lora (a test extra) on the diffusers model writes
    ``lycoris_layers_N_attention_to_q`` / ``lycoris_single_transformer_blocks_N_attn_to_qkv_mlp_proj``
    names; its own ``merge_to`` is the reference (alpha = rank, where LyCORIS' merge and ComfyUI's agree)."""
    from lycoris import LycorisNetwork, create_lycoris

    model, state = diffusers_state(name)
    model = model.float()
    original = {k: v.float() for k, v in state.items()}
    LycorisNetwork.apply_preset({"target_module": blocks})
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=4.0, algo=algo, **extra)
    net.apply_to()
    _random_factors(net.parameters(), 13)
    lora = tmp_path / f"lycoris_{algo}.safetensors"
    net.save_weights(str(lora), torch.float32, {})
    net.merge_to(1.0)
    out = tmp_path / "merged.safetensors"
    report = lorakit.merge_file(_base(name), [lorakit.LoraSpec(str(lora))], out, progress=False)
    assert report.loras[0].format == "lycoris"
    _agrees(_base(name), load_file(out), model.state_dict(), original, f"lycoris {algo}")


# -- a fused LoRA over a base that stores the parts apart --------------------------------------------

QWEN = ZOO / "base/qwen/qwen_image_tiny.safetensors"


def _fused_qwen() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """diffusers' QwenImageTransformer2DModel of the tiny base with its projections fused
    (``Attention.fuse_projections``: ``attn.to_qkv`` and ``attn.to_added_qkv``), in fp32."""
    side = json.loads(QWEN.with_suffix(".json").read_text())
    model = diffusers.QwenImageTransformer2DModel(**side["config"])
    model.load_state_dict(load_file(QWEN), strict=True)
    model = model.float()
    for module in model.modules():
        if isinstance(module, Attention):
            module.fuse_projections()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _check_split(merged: dict[str, torch.Tensor], fused: dict[str, torch.Tensor], what: str) -> int:
    """Each fused weight the producer changed, cut into its parts, against lorakit's parts."""
    parts = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
    checked = 0
    for key, w in fused.items():
        block, _, leaf = key.rpartition(".attn.")
        name = leaf.removesuffix(".weight")
        if name not in parts:
            continue
        for i, part in enumerate(parts[name]):
            rows = w.shape[0] // 3
            check_float(merged[f"{block}.attn.{part}.weight"], w[i * rows:(i + 1) * rows].double(), f"{what}: {part}")
            checked += 1
    return checked


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_peft_lora_on_fused_qkv_applies_to_the_split_base(dora: bool, tmp_path: Path) -> None:
    """PEFT (the producer) trains ``to_qkv`` / ``to_added_qkv`` of the fused diffusers model; its own
    merge of the fused weight, cut into q / k / v, is the reference for lorakit's merge into the
    single file, which stores them apart. DoRA's magnitude is per output row, so it divides too."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    model, _ = _fused_qwen()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_qkv", "to_added_qkv"], use_dora=dora)
    inject_adapter_in_model(config, model)
    _random_factors([p for n, p in model.named_parameters() if "lora_" in n], 17)
    if dora:  # a magnitude unlike the weight's own norm, so DoRA visibly rescales
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1.3)
    state = {f"transformer.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    lora = tmp_path / "qwen_fused_qkv.safetensors"
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})}
    save_file(state, lora, metadata=meta)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    fused = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    out = tmp_path / "merged.safetensors"
    report = lorakit.merge_file(QWEN, [lorakit.LoraSpec(str(lora))], out, progress=False)
    assert report.tensors_changed == 12  # q, k, v of the image and text streams in 2 blocks
    assert _check_split(load_file(out), fused, "peft dora" if dora else "peft") == 12


def test_a_lycoris_lokr_on_fused_qkv_applies_to_the_split_base(tmp_path: Path) -> None:
    """LyCORIS' LoKr on the fused projections (SimpleTuner's fused ``to_qkv``): the Kronecker change
    of the whole fused weight, divided by rows; LyCORIS' ``merge_to`` is the reference."""
    from lycoris import LycorisNetwork, create_lycoris

    model, _ = _fused_qwen()
    LycorisNetwork.apply_preset({"target_module": [], "target_name": [".*to_qkv", ".*to_added_qkv"]})
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=4.0, algo="lokr", factor=4)
    net.apply_to()
    _random_factors(net.parameters(), 19)
    lora = tmp_path / "qwen_fused_lokr.safetensors"
    net.save_weights(str(lora), torch.float32, {})
    assert any("to_qkv.lokr_w1" in k for k in load_file(lora))
    net.merge_to(1.0)
    out = tmp_path / "merged.safetensors"
    lorakit.merge_file(QWEN, [lorakit.LoraSpec(str(lora))], out, progress=False)
    assert _check_split(load_file(out), model.state_dict(), "lycoris lokr") == 12


def test_a_change_that_reads_the_fused_weight_is_refused_on_a_split_base(tmp_path: Path) -> None:
    lora = tmp_path / "ia3_fused.safetensors"
    save_file({"lycoris_transformer_blocks_0_attn_to_qkv.weight": torch.ones(192)}, lora)
    res = cli("merge", QWEN, lora, "-o", tmp_path / "o.safetensors")
    one_line(res, "transformer_blocks.0.attn.to_q.weight", "cannot be divided between its parts")


# -- one module twice in one file ----------------------------------------------------------------------

ZIMAGE = ZOO / "base/zimage/z_image_turbo_tiny.safetensors"


def _anime_z(tmp_path: Path, tamper: bool) -> tuple[Path, Path]:
    """An "Anime-Z"-style file (kohya names, ``.lora.down`` / ``.lora.up`` factors) carrying each
    attention twice: split ``to_q`` / ``to_k`` / ``to_v`` and a fused ``qkv`` whose factors stack
    them (down = [down_q; down_k; down_v], up block-diagonal: the same change), plus the split-only file."""
    g = torch.Generator().manual_seed(23)
    split, both = {}, {}
    for layer in range(2):
        downs, ups = [], []
        for p in "qkv":
            name = f"lora_unet_layers_{layer}_attention_to_{p}"
            down, up = torch.randn(4, 64, generator=g) * 0.05, torch.randn(64, 4, generator=g) * 0.05
            split.update({f"{name}.lora.down.weight": down, f"{name}.lora.up.weight": up,
                          f"{name}.alpha": torch.tensor(2.0)})
            downs.append(down)
            ups.append(up)
        fused_up = torch.block_diag(*ups)
        if tamper:
            fused_up[0, 0] += 0.5
        both.update({f"lora_unet_layers_{layer}_attention_qkv.lora.down.weight": torch.cat(downs),
                     f"lora_unet_layers_{layer}_attention_qkv.lora.up.weight": fused_up,
                     f"lora_unet_layers_{layer}_attention_qkv.alpha": torch.tensor(2.0)})
    both.update(split)
    paths = tmp_path / "split.safetensors", tmp_path / "both.safetensors"
    save_file(split, paths[0])
    save_file(both, paths[1])
    return paths


def test_fused_and_split_copies_of_one_change_apply_once(tmp_path: Path) -> None:
    split, both = _anime_z(tmp_path, tamper=False)
    res = cli("merge", ZIMAGE, both, "-o", tmp_path / "both_out.safetensors", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)["loras"][0]
    assert {s["reason"] for s in report["skipped"]} == {
        "the same change as the file's other spelling of those rows (applied once)"}
    assert sum(len(s["keys"]) for s in report["skipped"]) == 6  # the two fused qkv modules
    assert cli("merge", ZIMAGE, split, "-o", tmp_path / "split_out.safetensors").exit_code == 0
    a, b = load_file(tmp_path / "both_out.safetensors"), load_file(tmp_path / "split_out.safetensors")
    assert differing(a, b) == [] and differing(a, load_file(ZIMAGE)) == ["layers.0.attention.qkv.weight",
                                                                         "layers.1.attention.qkv.weight"]


def test_fused_and_split_copies_that_differ_are_refused(tmp_path: Path) -> None:
    _, both = _anime_z(tmp_path, tamper=True)
    one_line(cli("merge", ZIMAGE, both, "-o", tmp_path / "o.safetensors"), "both change rows 0:64 of",
             "a file must carry one form of a module")
    assert not (tmp_path / "o.safetensors").exists()


# -- bad input -------------------------------------------------------------------------------------

def test_a_flux2_lora_on_flux1_and_the_reverse_name_both(tmp_path: Path) -> None:
    flux1 = ZOO / "base/flux/flux1_tiny_dev_bfl.safetensors"
    res = cli("merge", flux1, ZOO / "next/flux2/flux2_dev_diffusers_peft.safetensors", "-o", tmp_path / "o.safetensors")
    line = res.output.strip()
    assert res.exit_code == 1 and "\n" not in line and "this LoRA is for FLUX.2" in line and "is Flux.1" in line
    res = cli("merge", ZOO / "base/flux2/flux2_klein_tiny.safetensors", ZOO / "flux/flux_bfl_noprefix.safetensors",
              "-o", tmp_path / "o.safetensors")
    line = res.output.strip()
    assert res.exit_code == 1 and "\n" not in line and "this LoRA is for Flux.1" in line and "FLUX.2 klein" in line
    assert "img_mod" in line or "modulation" in line  # a module FLUX.2 lacks
    assert not (tmp_path / "o.safetensors").exists()


def _wide_lora(tmp_path: Path, module: str, width: int) -> Path:
    path = tmp_path / f"wide_{width}.safetensors"
    save_file({f"{module}.lora_down.weight": torch.zeros(4, width), f"{module}.lora_up.weight": torch.zeros(width, 4)},
              path)
    return path


def test_a_klein_4b_lora_on_another_klein_names_both_widths(tmp_path: Path) -> None:
    lora = _wide_lora(tmp_path, "lora_unet_double_blocks_0_img_attn_proj", 3072)
    res = cli("merge", ZOO / "base/flux2/flux2_klein_tiny.safetensors", lora, "-o", tmp_path / "o.safetensors")
    line = res.output.strip()
    assert res.exit_code == 1 and "\n" not in line
    for needle in ("FLUX.2 klein, width 64", "3072 wide", "FLUX.2 klein 4B", "double_blocks.0.img_attn.proj.weight"):
        assert needle in line, line


def test_a_lora_with_modulations_is_refused_on_chroma(tmp_path: Path) -> None:
    """A Flux.1 LoRA that trains the per-block modulations: Chroma has none of them. Another family's
    LoRA stays refused with --allow-unmatched (its other names may address the wrong weights)."""
    for extra in ((), ("--allow-unmatched",)):
        res = cli("merge", ZOO / "base/chroma/chroma_tiny.safetensors", ZOO / "flux/flux_bfl_noprefix.safetensors",
                  "-o", tmp_path / "o.safetensors", *extra)
        one_line(res, "this LoRA is for Flux.1", "is Chroma", "img_mod.lin has no tensor there")
        assert not (tmp_path / "o.safetensors").exists()


def test_a_z_image_lora_on_lumina2_names_both(tmp_path: Path) -> None:
    """A Lumina-Image 2.0 layout (grouped-query qkv, another width), made from the tiny Z-Image's keys."""
    shapes = {k: tuple(v.shape) for k, v in load_file(ZIMAGE).items()}
    lumina = {}
    for key, shape in shapes.items():
        shape = tuple(48 if d == 64 else d for d in shape)
        if key.endswith("attention.qkv.weight"):
            shape = (48 + 2 * 24, 48)  # 4 query heads, 2 key / value heads of 12
        lumina[key] = torch.zeros(shape, dtype=torch.bfloat16)
    base = tmp_path / "lumina2_tiny.safetensors"
    save_file(lumina, base)
    lora = _wide_lora(tmp_path, "diffusion_model.layers.0.attention.to_k", 3840)
    res = cli("merge", base, lora, "-o", tmp_path / "o.safetensors")
    line = res.output.strip()
    assert res.exit_code == 1 and "\n" not in line
    for needle in ("Lumina-Image 2.0, width 48", "3840 wide: Z-Image", "layers.0.attention.qkv.weight"):
        assert needle in line, line


# -- fp8 and scaled fp8 bases of the new families ----------------------------------------------------

STRENGTH = 6.0  # changes well above fp8's resolution, so `check` can confirm them
FP8_CASES = [(ZIMAGE, ZOO / "next/zimage/z_image_aitoolkit.safetensors", False),
             (ZOO / "base/flux2/flux2_klein_tiny.safetensors", ZOO / "next/flux2/flux2_klein_diffusers_peft.safetensors",
              True),
             (ZOO / "base/chroma/chroma_tiny.safetensors", ZOO / "next/chroma/chroma_kohya.safetensors", False)]


@pytest.mark.parametrize("base, lora, scaled", FP8_CASES, ids=["z-image", "flux2-klein-scaled", "chroma"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fp8_bases_follow_the_fp8_rules(base: Path, lora: Path, scaled: bool, rounding: str, tmp_path: Path) -> None:
    """The tiny bases as fp8 e4m3fn files (every matrix; ComfyUI's scaled fp8 with ``scale_weight``
    for one): each changed element is one of the two fp8 neighbours of the exact value (the merge of
    an fp32 copy of the fp8 base), nearest picks the nearer, untouched elements keep their bits, and
    ``lorakit check`` passes the merge."""
    from tests.golden_compare import check_fp8, check_stochastic_stats

    single = load_file(base)
    fp8, exact32 = {}, {}
    for key, w in single.items():
        if w.dim() == 2 and key.endswith(".weight"):
            s = float(w.float().abs().max()) / 224 if scaled else 1.0  # headroom: no change clips
            fp8[key] = (w.float() / s).to(torch.float8_e4m3fn)
            exact32[key] = fp8[key].float() * torch.tensor(s, dtype=torch.float32)
            if scaled:
                fp8[key[:-len("weight")] + "scale_weight"] = torch.tensor(s, dtype=torch.float32)
        else:
            fp8[key] = exact32[key] = w
    if scaled:
        fp8["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    base8, base32 = tmp_path / "base_fp8.safetensors", tmp_path / "base_fp32.safetensors"
    save_file(fp8, base8)
    save_file({k: v.float() for k, v in exact32.items()}, base32)
    out8, out32 = tmp_path / "out_fp8.safetensors", tmp_path / "out_fp32.safetensors"
    assert cli("merge", base8, f"{lora}:{STRENGTH}", "-o", out8, "--rounding", rounding).exit_code == 0
    assert cli("merge", base32, f"{lora}:{STRENGTH}", "-o", out32).exit_code == 0
    got, exact = load_file(out8), load_file(out32)
    stats, changed = [], 0
    for key, w in fp8.items():
        if w.dtype != torch.float8_e4m3fn or not w.numel():
            assert torch.equal(bits(got[key]), bits(w)), key
            continue
        s = float(fp8[key[:-len("weight")] + "scale_weight"]) if scaled else 1.0
        ex = exact[key].double() / s
        stats.append(check_fp8(got[key], w, ex, rounding, key))
        changed += int(not torch.equal(bits(got[key]), bits(w)))
    assert changed >= 8
    if rounding == "stochastic":
        check_stochastic_stats(stats)
    res = cli("check", base8, f"{lora}:{STRENGTH}", "--merged", out8)
    assert res.exit_code == 0 and "PASS" in res.output, res.output


# -- formats written in their producers' exact layout, read by diffusers' own converters ------------

def _kohya_flux2(tmp_path: Path) -> Path:
    """kohya / musubi FLUX.2 names (``lora_unet_double_blocks_N_img_attn_qkv`` with alpha), the layout
    diffusers' ``_convert_kohya_flux2_lora_to_diffusers`` reads."""
    g = torch.Generator().manual_seed(29)
    shapes = {k: tuple(v.shape) for k, v in load_file(_base("flux2_klein_tiny")).items()}
    out = {}
    for key, shape in shapes.items():
        m = key[:-len(".weight")]
        if not key.endswith(".weight") or len(shape) != 2 or not m.startswith(("double_blocks.", "single_blocks.")):
            continue
        name = "lora_unet_" + m.replace(".", "_")
        out[f"{name}.lora_down.weight"] = (torch.randn(4, shape[1], generator=g) * 0.05).to(torch.bfloat16)
        out[f"{name}.lora_up.weight"] = (torch.randn(shape[0], 4, generator=g) * 0.05).to(torch.bfloat16)
        out[f"{name}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "flux2_kohya.safetensors"
    save_file(out, path, metadata={"ss_network_module": "networks.lora_flux2"})
    return path


def _lokr(tmp_path: Path, name: str, modules: list[str], prefix: str) -> Path:
    """ai-toolkit's LoKr layout (``diffusion_model.<module>.lokr_w1`` / ``lokr_w2_a`` / ``lokr_w2_b`` /
    ``alpha``), which diffusers' ``_convert_non_diffusers_*lokr_to_diffusers`` read."""
    g = torch.Generator().manual_seed(31)
    shapes = {k: tuple(v.shape) for k, v in load_file(_base(name)).items()}
    out = {}
    for m in modules:
        rows, cols = shapes[f"{m}.weight"]
        out[f"{prefix}{m}.lokr_w1"] = (torch.randn(4, 4, generator=g) * 0.2).to(torch.bfloat16)
        out[f"{prefix}{m}.lokr_w2_a"] = (torch.randn(rows // 4, 2, generator=g) * 0.2).to(torch.bfloat16)
        out[f"{prefix}{m}.lokr_w2_b"] = (torch.randn(2, cols // 4, generator=g) * 0.2).to(torch.bfloat16)
        out[f"{prefix}{m}.alpha"] = torch.tensor(1.0)
    path = tmp_path / f"{name}_lokr.safetensors"
    save_file(out, path)
    return path


def _by_diffusers(name: str, lora: Path, strength: float, tmp_path: Path) -> None:
    model, state = diffusers_state(name)
    model = model.float()
    original = {k: v.float() for k, v in state.items()}
    holder = HOLDERS[BASES[name][0]](model)
    holder.load_lora_weights(str(lora), adapter_name="oracle")
    holder.fuse_lora(components=["transformer"], lora_scale=strength)
    holder.unload_lora_weights()
    reference = model.state_dict()
    if any(".to_qkv." in k for k in reference):  # diffusers fused the projections for a fused LoKr
        model.unfuse_qkv_projections()
        fused = reference
        reference = {k: v for k, v in model.state_dict().items()}
        for key, w in fused.items():
            if ".attn.to_qkv." in key or ".attn.to_added_qkv." in key:
                names = ("to_q", "to_k", "to_v") if ".to_qkv." in key else ("add_q_proj", "add_k_proj", "add_v_proj")
                for i, part in enumerate(w.chunk(3)):
                    reference[key.replace(key.split(".attn.")[1].split(".")[0], names[i])] = part
    out = tmp_path / "merged.safetensors"
    lorakit.merge_file(_base(name), [lorakit.LoraSpec(str(lora), strength)], out, progress=False)
    _agrees(_base(name), load_file(out), reference, original, lora.name)


def test_kohya_flux2_agrees_with_diffusers(tmp_path: Path) -> None:
    _by_diffusers("flux2_klein_tiny", _kohya_flux2(tmp_path), 0.8, tmp_path)


def test_ai_toolkit_lokr_on_z_image_agrees_with_diffusers(tmp_path: Path) -> None:
    modules = [f"layers.{i}.attention.{p}" for i in range(2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    lora = tmp_path / "z_image_lokr.safetensors"
    # ai-toolkit trains diffusers' module names (split q / k / v: 64 x 64 each here)
    g = torch.Generator().manual_seed(37)
    out = {}
    for m in modules:
        out[f"diffusion_model.{m}.lokr_w1"] = (torch.randn(4, 4, generator=g) * 0.2).to(torch.bfloat16)
        out[f"diffusion_model.{m}.lokr_w2_a"] = (torch.randn(16, 2, generator=g) * 0.2).to(torch.bfloat16)
        out[f"diffusion_model.{m}.lokr_w2_b"] = (torch.randn(2, 16, generator=g) * 0.2).to(torch.bfloat16)
        out[f"diffusion_model.{m}.alpha"] = torch.tensor(1.0)
    save_file(out, lora)
    _by_diffusers("z_image_turbo_tiny", lora, 1.0, tmp_path)


def test_ai_toolkit_bfl_lokr_on_flux2_agrees_with_diffusers(tmp_path: Path) -> None:
    """LoKr on FLUX.2's fused BFL modules (diffusers maps them onto its fused ``to_qkv``)."""
    modules = [f"double_blocks.{i}.{m}" for i in range(2) for m in ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj",
                                                                    "img_mlp.0")] + ["single_blocks.0.linear1"]
    _by_diffusers("flux2_klein_tiny", _lokr(tmp_path, "flux2_klein_tiny", modules, "diffusion_model."), 1.0, tmp_path)
