"""Small building blocks shared by the model modules.

``Linear`` / ``Conv2d`` carry an optional runtime LoRA: ``y = W x + delta(x)``, used by
``lorakit check`` to compare a merged model with the unmerged base plus LoRA branches."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    delta: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y if self.delta is None else y + self.delta(x)


class Conv2d(nn.Conv2d):
    delta: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y if self.delta is None else y + self.delta(x)


def from_state_dict(cls, sd: dict[str, torch.Tensor], **kw) -> nn.Module:
    """``cls(shapes)`` holding exactly the tensors of ``sd``: built on the meta device and assigned,
    so no full-size default initialisation runs (minutes and a full fp32 copy for Flux)."""
    with torch.device("meta"):
        model = cls({k: tuple(v.shape) for k, v in sd.items()}, **kw)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, [cos | sin] (LDM with flip_sin_to_cos, BFL Flux, SDXL size embeddings)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] q/k/v -> [B, L, H*D], softmax(q k^T / sqrt(D)) v."""
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, lq, inner)


class RMSNorm(nn.Module):
    """x / rms(x) * gain, in fp32 (eps 1e-6); the gain is called ``scale`` in BFL Flux, ``weight`` in T5."""

    def __init__(self, dim: int, param: str = "weight") -> None:
        super().__init__()
        self.param = param
        self.register_parameter(param, nn.Parameter(torch.ones(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        gain = getattr(self, self.param)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * gain.to(x.dtype)
