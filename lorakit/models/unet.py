"""SD1.x / SDXL U-Net in the LDM single-file layout (``model.diffusion_model.*`` without the prefix).

Everything is read from the state dict: widths, blocks, attention depth, conv vs linear
``proj_in``, context width, SDXL's ``label_emb`` (the ``y`` vector). Heads are the one thing the
weights do not say: SD1.x uses 8 heads, SDXL 64-channel heads (``UNetConfig.from_state_dict``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..keys import indices
from .layers import Conv2d, Linear, attention, group_norm, timestep_embedding

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int
    in_channels: int
    out_channels: int
    adm_channels: int  # width of SDXL's y (0: SD1.x)
    context_dim: int
    num_heads: int = 8  # used when head_channels is 0
    head_channels: int = 0

    @classmethod
    def from_state_dict(cls, shapes: Shapes) -> UNetConfig:
        ci = shapes["input_blocks.0.0.weight"]
        adm = shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else 0
        ctx = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), 0)
        return cls(ci[0], ci[1], shapes["out.2.weight"][0], adm, ctx, 8, 64 if adm else 0)

    def heads(self, channels: int) -> int:
        return max(1, channels // self.head_channels) if self.head_channels else self.num_heads


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(cin), nn.SiLU(), Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb, cout))
        self.out_layers = nn.Sequential(group_norm(cout), nn.SiLU(), nn.Dropout(0.0), Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None].to(x.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context, dim, bias=False)
        self.to_v = Linear(context, dim, bias=False)
        self.to_out = nn.Sequential(Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        c = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(c), self.to_v(c), self.heads))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, context: int, heads: int, ff_inner: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = nn.Sequential()
        self.ff.add_module("net", nn.Sequential(GEGLU(dim, ff_inner), nn.Dropout(0.0), Linear(ff_inner, dim)))
        self.attn2 = CrossAttention(dim, context, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, context: int, heads: int, depth: int, ff_inner: int, linear: bool) -> None:
        super().__init__()
        self.linear = linear
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = Linear(channels, channels) if linear else Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, context, heads, ff_inner) for _ in range(depth))
        self.proj_out = Linear(channels, channels) if linear else Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = y.reshape(b, c, h * w).transpose(1, 2)
        if self.linear:
            y = self.proj_in(y)
        for blk in self.transformer_blocks:
            y = blk(y, context)
        if self.linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, c, h, w)
        if not self.linear:
            y = self.proj_out(y)
        return y + x


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Step(nn.Sequential):
    """One LDM block: its layers get (x), (x, emb) or (x, context) as they need."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _layer(shapes: Shapes, prefix: str, cfg: UNetConfig, emb: int) -> nn.Module:
    if f"{prefix}.in_layers.2.weight" in shapes:
        w = shapes[f"{prefix}.in_layers.2.weight"]
        return ResBlock(w[1], w[0], emb)
    if f"{prefix}.proj_in.weight" in shapes:
        p = shapes[f"{prefix}.proj_in.weight"]
        depth = len(indices(shapes, re.escape(prefix) + r"\.transformer_blocks\.(\d+)\."))
        ctx = shapes[f"{prefix}.transformer_blocks.0.attn2.to_k.weight"][1]
        ff = shapes[f"{prefix}.transformer_blocks.0.ff.net.2.weight"][1]
        return SpatialTransformer(p[0], ctx, cfg.heads(p[0]), depth, ff, len(p) == 2)
    if f"{prefix}.op.weight" in shapes:
        return Downsample(shapes[f"{prefix}.op.weight"][0])
    if f"{prefix}.conv.weight" in shapes:
        return Upsample(shapes[f"{prefix}.conv.weight"][0])
    raise ValueError(f"unknown U-Net layer {prefix}")


def _step(shapes: Shapes, prefix: str, cfg: UNetConfig, emb: int) -> Step:
    return Step(*[_layer(shapes, f"{prefix}.{j}", cfg, emb) for j in indices(shapes, re.escape(prefix) + r"\.(\d+)\.")])


class UNet(nn.Module):
    def __init__(self, shapes: Shapes, cfg: UNetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or UNetConfig.from_state_dict(shapes)
        mc, emb = cfg.model_channels, shapes["time_embed.0.weight"][0]
        self.time_embed = nn.Sequential(Linear(mc, emb), nn.SiLU(), Linear(emb, emb))
        if cfg.adm_channels:
            self.label_emb = nn.Sequential(nn.Sequential(Linear(cfg.adm_channels, emb), nn.SiLU(), Linear(emb, emb)))
        blocks = indices(shapes, r"input_blocks\.(\d+)\.")
        self.input_blocks = nn.ModuleList([Step(Conv2d(cfg.in_channels, mc, 3, padding=1))] +
                                          [_step(shapes, f"input_blocks.{i}", cfg, emb) for i in blocks[1:]])
        self.middle_block = _step(shapes, "middle_block", cfg, emb)
        self.output_blocks = nn.ModuleList(_step(shapes, f"output_blocks.{i}", cfg, emb)
                                           for i in indices(shapes, r"output_blocks\.(\d+)\."))
        out_ch = shapes["out.0.weight"][0]
        self.out = nn.Sequential(group_norm(out_ch), nn.SiLU(), Conv2d(out_ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction for latent ``x`` at timestep ``t`` (0..999) given ``context``
        (and SDXL's ``y``)."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        if self.cfg.adm_channels:
            if y is None:
                raise ValueError("this U-Net (SDXL) needs the y vector")
            emb = emb + self.label_emb(y.to(x.dtype))
        hs, h = [], x
        for blk in self.input_blocks:
            h = blk(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)
