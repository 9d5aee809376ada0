"""Flux.1 transformer in the BFL layout (``double_blocks`` / ``single_blocks``), sizes from the weights.

Hidden size, head width (the q/k norm scale), mlp width, block counts, guidance embedding (dev) are
read from the state dict; the RoPE axes split (16, 56, 56 for 128-wide heads) is the one setting
the weights do not carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..arch.flux import details as flux_details
from .layers import Linear, RMSNorm, timestep_embedding

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class FluxConfig:
    hidden: int
    heads: int
    mlp: int
    depth: int
    depth_single: int
    in_channels: int
    context: int
    vec: int
    guidance: bool
    axes: tuple[int, ...] = (16, 56, 56)
    theta: float = 10000.0

    @classmethod
    def from_state_dict(cls, shapes: Shapes, axes: tuple[int, ...] | None = None) -> FluxConfig:
        sizes = flux_details(shapes, "")  # the family's sizes, read once from the file
        hidden, in_ch = shapes["img_in.weight"]
        head = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        return cls(hidden, hidden // head, sizes["mlp_hidden"], sizes["double_blocks"], sizes["single_blocks"], in_ch,
                   shapes["txt_in.weight"][1], shapes["vector_in.in_layer.weight"][1],
                   "guidance_in.in_layer.weight" in shapes, axes or _axes(head))


def _axes(head: int) -> tuple[int, int, int]:
    """BFL's split of a head into (time, row, column) RoPE axes, 16/56/56 of 128, scaled to other
    widths in even parts (4/6/6 for the zoo's 16-wide heads)."""
    side = (head * 7 // 16) // 2 * 2
    return (head - 2 * side, side, side)


def rope(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / theta ** scale
    out = pos.double()[..., None] * omega
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


class MLPEmbedder(nn.Module):
    def __init__(self, cin: int, hidden: int) -> None:
        super().__init__()
        self.in_layer, self.out_layer = Linear(cin, hidden), Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim, "scale"), RMSNorm(dim, "scale")


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, dim * 3)
        self.norm = QKNorm(dim // heads)
        self.proj = Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.n = 6 if double else 3
        self.lin = Linear(dim, self.n * dim)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)


def _mlp(dim: int, inner: int) -> nn.Sequential:
    return nn.Sequential(Linear(dim, inner), nn.GELU(approximate="tanh"), Linear(inner, dim))


class DoubleBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        for side in ("img", "txt"):
            self.add_module(f"{side}_mod", Modulation(dim, True))
            self.add_module(f"{side}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            self.add_module(f"{side}_attn", SelfAttention(dim, heads))
            self.add_module(f"{side}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            self.add_module(f"{side}_mlp", _mlp(dim, mlp))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        im, tm = self.img_mod(vec), self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv_heads((1 + im[1]) * self.img_norm1(img) + im[0])
        tq, tk, tv = self.txt_attn.qkv_heads((1 + tm[1]) * self.txt_norm1(txt) + tm[0])
        attn = _attend(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe)
        t_attn, i_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + im[2] * self.img_attn.proj(i_attn)
        img = img + im[5] * self.img_mlp((1 + im[4]) * self.img_norm2(img) + im[3])
        txt = txt + tm[2] * self.txt_attn.proj(t_attn)
        txt = txt + tm[5] * self.txt_mlp((1 + tm[4]) * self.txt_norm2(txt) + tm[3])
        return img, txt


class SingleBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.linear1 = Linear(dim, dim * 3 + mlp)
        self.linear2 = Linear(dim + mlp, dim)
        self.norm = QKNorm(dim // heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(dim, False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift), [3 * self.dim, self.linear1.out_features - 3 * self.dim], -1)
        b, n, _ = x.shape
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = _attend(self.norm.query_norm(q), self.norm.key_norm(k), v, pe)
        return x + gate * self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], -1))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear((1 + scale[:, None]) * self.norm_final(x) + shift[:, None])


class Flux(nn.Module):
    def __init__(self, shapes: Shapes, cfg: FluxConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or FluxConfig.from_state_dict(shapes)
        h = cfg.hidden
        self.img_in = Linear(cfg.in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(cfg.vec, h)
        if cfg.guidance:
            self.guidance_in = MLPEmbedder(256, h)
        self.txt_in = Linear(cfg.context, h)
        self.double_blocks = nn.ModuleList(DoubleBlock(h, cfg.heads, cfg.mlp) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleBlock(h, cfg.heads, cfg.mlp) for _ in range(cfg.depth_single))
        self.final_layer = LastLayer(h, cfg.in_channels)

    def positions(self, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([txt_ids, img_ids], dim=1)
        pe = torch.cat([rope(ids[..., i], d, self.cfg.theta) for i, d in enumerate(self.cfg.axes)], dim=-3)
        return pe.unsqueeze(1)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                t: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity for packed latents ``img`` [B, L, 64] at time ``t`` (sigma, 0..1)."""
        dt = img.dtype
        vec = self.time_in(timestep_embedding(t * 1000.0, 256).to(dt))
        if self.cfg.guidance:
            if guidance is None:
                raise ValueError("Flux.1-dev needs a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance * 1000.0, 256).to(dt))
        vec = vec + self.vector_in(y.to(dt))
        x, ctx = self.img_in(img), self.txt_in(txt.to(dt))
        pe = self.positions(img_ids, txt_ids)
        for blk in self.double_blocks:
            x, ctx = blk(x, ctx, vec, pe)
        x = torch.cat([ctx, x], 1)
        for blk in self.single_blocks:
            x = blk(x, vec, pe)
        return self.final_layer(x[:, ctx.shape[1]:], vec)


def pack(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, H, W] -> ([B, H/2*W/2, C*4], ids [B, H/2*W/2, 3] = (0, row, col))."""
    b, c, hh, ww = latent.shape
    x = latent.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (hh // 2) * (ww // 2), c * 4)
    ids = torch.zeros(hh // 2, ww // 2, 3)
    ids[..., 1] = torch.arange(hh // 2)[:, None]
    ids[..., 2] = torch.arange(ww // 2)[None, :]
    return x, ids.reshape(1, -1, 3).expand(b, -1, -1).to(latent.device)


def unpack(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, _, cc = x.shape
    c = cc // 4
    return x.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)
