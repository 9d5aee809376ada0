"""lorakit's model code against diffusers / transformers (test-only extras, offline) on the zoo's tiny
models with the real key names: outputs agree to <= 1e-5 relative in fp32.

Direction: lorakit reads the single-file layout; diffusers' own converters (LDM -> diffusers) or the
zoo's diffusers copies of the same weights feed the reference models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.models.flux import Flux, FluxConfig, pack
from lorakit.models.layers import timestep_embedding
from lorakit.models.text import CLIPText, OpenCLIPText, T5Encoder
from lorakit.models.unet import UNet
from lorakit.models.vae import AutoencoderKL
from tests.helpers import autoencoder_shapes

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import diffusers  # noqa: E402  (test extras: a missing one is an error, not a skip)
import transformers  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

TOL = 1e-5
SIDECARS = {"sd15": "diffusers/sd15_peft_lora_with_metadata.json", "sdxl": "diffusers/sdxl_diffusers_dreambooth.json"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def single_file(zoo: Path, arch: str) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(zoo / f"base/{arch}/{arch}_tiny_single_file.safetensors").items()}


def sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def side(zoo: Path, arch: str) -> dict:
    return json.loads((zoo / SIDECARS[arch]).read_text())["base_model"]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_unet(zoo: Path, arch: str) -> None:
    sd = single_file(zoo, arch)
    ours = UNet(shapes(sub(sd, "model.diffusion_model.")))
    ours.load_state_dict(sub(sd, "model.diffusion_model."), strict=True)
    cfg = side(zoo, arch)["unet_config"]
    ref = diffusers.UNet2DConditionModel(**cfg)
    ref.load_state_dict(sfu.convert_ldm_unet_checkpoint(sd, dict(ref.config)), strict=True)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999.0, 321.0])
    ctx = torch.randn(2, 7, cfg["cross_attention_dim"], generator=g)
    with torch.no_grad():
        if arch == "sdxl":  # y as ComfyUI builds it: pooled, then the six size / crop embeddings
            pooled = torch.randn(2, 64, generator=g)
            ids = torch.tensor([[16.0, 16, 0, 0, 16, 16], [32.0, 24, 4, 0, 32, 24]])
            y = torch.cat([pooled, timestep_embedding(ids.reshape(-1), cfg["addition_time_embed_dim"]).reshape(2, -1)], 1)
            out = ours(x, t, ctx, y)
            expect = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        else:
            out, expect = ours(x, t, ctx), ref(x, t, ctx).sample
    assert rel(out, expect) <= TOL


def test_flux(zoo: Path) -> None:
    sd = {k: v.float() for k, v in load_file(zoo / "base/flux/flux1_tiny_dev_bfl.safetensors").items()}
    ref = diffusers.FluxTransformer2DModel.from_pretrained(zoo / "base/flux/diffusers/transformer",
                                                           torch_dtype=torch.float32)
    cfg = FluxConfig.from_state_dict(shapes(sd))
    assert cfg.axes == tuple(ref.config.axes_dims_rope) and cfg.heads == ref.config.num_attention_heads
    ours = Flux(shapes(sd), cfg)
    ours.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(0)
    img, ids = pack(torch.randn(1, 16, 8, 8, generator=g))
    txt, y = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    tids, t, gd = torch.zeros(1, 5, 3), torch.tensor([0.7]), torch.tensor([3.5])
    with torch.no_grad():
        out = ours(img, ids, txt, tids, t, y, gd)
        expect = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=ids[0],
                     txt_ids=tids[0], guidance=gd).sample
    assert rel(out, expect) <= TOL


def _ids(g: torch.Generator, eos: int, lengths: list[int], n: int = 12) -> torch.Tensor:
    """Token ids with one EOS per row; it is the row's largest id, as in CLIP's real vocabulary
    (transformers pools at argmax(ids) for this legacy config)."""
    ids = torch.randint(3, eos, (len(lengths), n), generator=g)
    for row, length in enumerate(lengths):
        ids[row, length] = eos
    return ids


def test_clip_l(zoo: Path) -> None:
    sd = sub({k: v.float() for k, v in load_file(zoo / "base/flux/clip_l_tiny.safetensors").items()}, "text_model.")
    ref = transformers.CLIPTextModel.from_pretrained(zoo / "base/flux/diffusers/text_encoder", torch_dtype=torch.float32)
    eos = ref.config.vocab_size - 1
    ours = CLIPText(shapes(sd), heads=ref.config.num_attention_heads, eos_id=eos)
    ours.load_state_dict({k: v for k, v in sd.items() if k != "embeddings.position_ids"}, strict=True)
    ids = _ids(torch.Generator().manual_seed(1), eos, [7, 11])
    with torch.no_grad():
        o, r = ours(ids), ref(ids, output_hidden_states=True)
    assert rel(o.last, r.last_hidden_state) <= TOL
    assert rel(o.penultimate, r.hidden_states[-2]) <= TOL
    assert rel(o.pooled, r.pooler_output) <= TOL


def test_openclip_bigg(zoo: Path) -> None:
    sd = single_file(zoo, "sdxl")
    prefix = "conditioner.embedders.1.model."
    te = sub(sd, prefix)
    cfg = transformers.CLIPTextConfig(**side(zoo, "sdxl")["text_encoder_2_config"])
    ours = OpenCLIPText(shapes(te), heads=cfg.num_attention_heads)
    ours.load_state_dict({k: v for k, v in te.items() if k != "logit_scale"}, strict=True)
    ref = transformers.CLIPTextModelWithProjection(cfg)
    conv = sfu.convert_open_clip_checkpoint(ref, sd, prefix="conditioner.embedders.1.model.")
    ref.load_state_dict({k: v for k, v in conv.items() if k in ref.state_dict()}, strict=False)
    assert set(ref.state_dict()) <= set(conv) | {"text_model.embeddings.position_ids"}
    ids = _ids(torch.Generator().manual_seed(2), cfg.vocab_size - 1, [5, 9])
    with torch.no_grad():
        o = ours(ids)
        r = ref(ids, output_hidden_states=True)
    assert rel(o.penultimate, r.hidden_states[-2]) <= TOL
    assert rel(o.pooled, r.text_embeds) <= TOL


def test_t5(zoo: Path) -> None:
    sd = {k: v.float() for k, v in load_file(zoo / "base/flux/t5xxl_tiny.safetensors").items()}
    ours = T5Encoder(shapes(sd))
    ours.load_state_dict(sd, strict=True)
    ref = transformers.T5EncoderModel.from_pretrained(zoo / "base/flux/diffusers/text_encoder_2", torch_dtype=torch.float32)
    ids = torch.randint(2, 1000, (2, 300), generator=torch.Generator().manual_seed(3))  # past max_distance 128
    with torch.no_grad():
        assert rel(ours(ids), ref(ids).last_hidden_state) <= TOL


def test_sd_vae(zoo: Path) -> None:
    sd = single_file(zoo, "sd15")
    vae_sd = sub(sd, "first_stage_model.")
    ours = AutoencoderKL(shapes(vae_sd))
    ours.load_state_dict(vae_sd, strict=True)
    chans = [vae_sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(len(ours.encoder.down))]
    ref = diffusers.AutoencoderKL(block_out_channels=chans, down_block_types=["DownEncoderBlock2D"] * len(chans),
                                  up_block_types=["UpDecoderBlock2D"] * len(chans), latent_channels=4,
                                  layers_per_block=len(ours.encoder.down[0].block))
    ref.load_state_dict(sfu.convert_ldm_vae_checkpoint(sd, dict(ref.config)), strict=True)
    g = torch.Generator().manual_seed(4)
    img, z = torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    with torch.no_grad():
        assert rel(ours.decode(z), ref.decode(z).sample) <= TOL
        assert rel(ours.encode(img), ref.encode(img).latent_dist.mean) <= TOL


def test_flux_ae_layout() -> None:
    """The 16-channel, quant-conv-free autoencoder (Flux ae.safetensors layout): lorakit's module with
    random weights, converted by diffusers into its AutoencoderKL."""
    ref = diffusers.AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=16, layers_per_block=1,
                                  use_quant_conv=False, use_post_quant_conv=False)
    ours = AutoencoderKL(autoencoder_shapes(32, 64))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    conv = sfu.convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ours.state_dict().items()},
                                          dict(ref.config))
    ref.load_state_dict(conv, strict=True)
    z, img = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 3, 16, 16, generator=g)
    with torch.no_grad():
        assert rel(ours.decode(z), ref.decode(z).sample) <= TOL
        assert rel(ours.encode(img), ref.encode(img).latent_dist.mean) <= TOL


REAL_LAYOUTS = [("sd15_v1-5-pruned-emaonly.json", "model.diffusion_model.", UNet),
                ("sdxl_base_1.0.json", "model.diffusion_model.", UNet),
                ("sd15_v1-5-pruned-emaonly.json", "cond_stage_model.transformer.text_model.", CLIPText),
                ("sdxl_base_1.0.json", "conditioner.embedders.0.transformer.text_model.", CLIPText),
                ("sdxl_base_1.0.json", "conditioner.embedders.1.model.", OpenCLIPText),
                ("sd15_v1-5-pruned-emaonly.json", "first_stage_model.", AutoencoderKL),
                ("sdxl_base_1.0.json", "first_stage_model.", AutoencoderKL),
                ("flux1-dev.json", "", Flux), ("flux_ae.json", "", AutoencoderKL),
                ("clip_l.json", "text_model.", CLIPText), ("t5xxl.json", "", T5Encoder)]


@pytest.mark.parametrize("manifest, prefix, cls", REAL_LAYOUTS, ids=[f"{m}:{c.__name__}" for m, _, c in REAL_LAYOUTS])
def test_real_file_layouts(manifests: Path, manifest: str, prefix: str, cls) -> None:
    """Built (on the meta device) from the real files' key -> shape lists, each module has exactly
    their parameters with their shapes (less the stored non-parameters the loader drops)."""
    from lorakit.sampler.pipeline import DROP

    m = json.loads((manifests / manifest).read_text())
    shapes = {k[len(prefix):]: tuple(v[0]) for k, v in m.items() if k.startswith(prefix) and not k.endswith(DROP)}
    with torch.device("meta"):
        model = cls(shapes)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
