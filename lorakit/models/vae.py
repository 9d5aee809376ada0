"""KL autoencoder in the LDM layout: SD's ``first_stage_model.*`` (4 channels, quant convs) and the
Flux ``ae.safetensors`` (16 channels, no quant convs). Widths and depths come from the weights."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..keys import indices

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class LatentFormat:
    """How sampler latents map to the autoencoder's: z_vae = latent / scale + shift."""

    scale: float
    shift: float = 0.0


SD15_LATENT = LatentFormat(0.18215)
SDXL_LATENT = LatentFormat(0.13025)
FLUX_LATENT = LatentFormat(0.3611, 0.1159)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (t(h).reshape(b, 1, c, hh * ww).transpose(2, 3) for t in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(o)


class _Resample(nn.Module):
    def __init__(self, c: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


def _run_mid(mid: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(x)))


def _levels(shapes: Shapes, side: str) -> nn.ModuleList:
    """``encoder.down.N`` / ``decoder.up.N``: resnet blocks sized from their conv1 shapes, then the
    level's down- or upsampler when the file has one."""
    kind, resample = ("down", "downsample") if side == "encoder" else ("up", "upsample")
    out = nn.ModuleList()
    for i in indices(shapes, rf"{side}\.{kind}\.(\d+)\.block\."):
        p = f"{side}.{kind}.{i}"
        js = indices(shapes, rf"{re.escape(p)}\.block\.(\d+)\.")
        convs = [shapes[f"{p}.block.{j}.conv1.weight"] for j in js]
        level = nn.Module()
        level.block = nn.ModuleList(ResnetBlock(c[1], c[0]) for c in convs)
        if f"{p}.{resample}.conv.weight" in shapes:
            setattr(level, resample, _Resample(convs[-1][0], down=side == "encoder"))
        out.append(level)
    return out


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for blk in level.block:
        h = blk(h)
    for resample in ("downsample", "upsample"):
        if hasattr(level, resample):
            h = getattr(level, resample)(h)
    return h


class Encoder(nn.Module):
    def __init__(self, shapes: Shapes) -> None:
        super().__init__()
        ci = shapes["encoder.conv_in.weight"]
        self.conv_in = nn.Conv2d(ci[1], ci[0], 3, padding=1)
        self.down = _levels(shapes, "encoder")
        c = shapes["encoder.norm_out.weight"][0]
        self.mid = _mid(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, shapes["encoder.conv_out.weight"][0], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
        return self.conv_out(F.silu(self.norm_out(_run_mid(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, shapes: Shapes) -> None:
        super().__init__()
        ci = shapes["decoder.conv_in.weight"]
        self.conv_in = nn.Conv2d(ci[1], ci[0], 3, padding=1)
        self.mid = _mid(ci[0])
        self.up = _levels(shapes, "decoder")
        c = shapes["decoder.norm_out.weight"][0]
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, shapes["decoder.conv_out.weight"][0], 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):  # up.{n-1} runs first: it is the lowest resolution
            h = _run_level(level, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, shapes: Shapes) -> None:
        super().__init__()
        self.encoder, self.decoder = Encoder(shapes), Decoder(shapes)
        if "quant_conv.weight" in shapes:
            q = shapes["quant_conv.weight"]
            self.quant_conv = nn.Conv2d(q[1], q[0], 1)
            p = shapes["post_quant_conv.weight"]
            self.post_quant_conv = nn.Conv2d(p[1], p[0], 1)

    @property
    def latent_channels(self) -> int:
        return self.decoder.conv_in.in_channels

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> the mean of the latent distribution (VAE space)."""
        h = self.encoder(img)
        if hasattr(self, "quant_conv"):
            h = self.quant_conv(h)
        return h[:, : self.latent_channels]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """VAE-space latent -> image in about [-1, 1]."""
        if hasattr(self, "post_quant_conv"):
            z = self.post_quant_conv(z)
        return self.decoder(z)
