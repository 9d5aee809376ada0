"""Text encoders in the single-file layouts: CLIP-L (HF ``text_model.*``), OpenCLIP bigG (SDXL
``conditioner.embedders.1.model.*``, fused ``in_proj``) and the T5 v1.1 encoder (``encoder.*``).

Widths, depths and vocabulary come from the weights; head counts do not (CLIP: width / 64 unless
given; T5: from the relative-attention table)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..keys import count
from .layers import Linear, RMSNorm

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class ClipOutput:
    last: torch.Tensor  # after the final LayerNorm
    penultimate: torch.Tensor  # hidden state of layer -2, no final LayerNorm
    pooled: torch.Tensor  # final LayerNorm state at the EOS token (times text_projection for bigG)


def _causal(n: int, device: torch.device) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), device=device).triu(1)


def _run_causal(layers: nn.ModuleList, x: torch.Tensor, final_norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(final-norm output, hidden state before the last layer) of a causal text transformer."""
    mask = _causal(x.shape[1], x.device)
    before_last = x
    for layer in layers:
        before_last = x
        x = layer(x, mask)
    return final_norm(x), before_last if len(layers) > 1 else x


def _mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    b, n, d = q.shape
    q, k, v = (t.reshape(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, d)


class _ClipMLP(nn.Module):
    def __init__(self, dim: int, inner: int, act: str, names: tuple[str, str]) -> None:
        super().__init__()
        self.names, self.act = names, act
        self.add_module(names[0], Linear(dim, inner))
        self.add_module(names[1], Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = getattr(self, self.names[0])(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return getattr(self, self.names[1])(h)


class _HFLayer(nn.Module):
    def __init__(self, dim: int, inner: int, heads: int, act: str) -> None:
        super().__init__()
        self.heads = heads
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.Module()
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            self.self_attn.add_module(p, Linear(dim, dim))
        self.mlp = _ClipMLP(dim, inner, act, ("fc1", "fc2"))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.layer_norm1(x)
        a = self.self_attn
        x = x + a.out_proj(_mha(a.q_proj(h), a.k_proj(h), a.v_proj(h), self.heads, mask))
        return x + self.mlp(self.layer_norm2(x))


class CLIPText(nn.Module):
    """HF CLIPTextModel layout (``text_model.`` level optional in the given names)."""

    def __init__(self, shapes: Shapes, *, heads: int | None = None, act: str = "quick_gelu", eos_id: int = 49407) -> None:
        super().__init__()
        vocab, dim = shapes["embeddings.token_embedding.weight"]
        inner = shapes["encoder.layers.0.mlp.fc1.weight"][0]
        self.eos_id = eos_id
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(vocab, dim)
        self.embeddings.position_embedding = nn.Embedding(shapes["embeddings.position_embedding.weight"][0], dim)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_HFLayer(dim, inner, heads or max(1, dim // 64), act)
                                            for _ in range(count(shapes, r"encoder\.layers\.(\d+)\.")))
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> ClipOutput:
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding.weight[: ids.shape[1]]
        last, penultimate = _run_causal(self.encoder.layers, x, self.final_layer_norm)
        eos = (ids == self.eos_id).int().argmax(dim=1)
        return ClipOutput(last, penultimate, last[torch.arange(ids.shape[0]), eos])


class _OpenClipBlock(nn.Module):
    def __init__(self, dim: int, inner: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.attn.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.attn.out_proj = Linear(dim, dim)
        self.mlp = _ClipMLP(dim, inner, "gelu", ("c_fc", "c_proj"))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        q, k, v = F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        x = x + self.attn.out_proj(_mha(q, k, v, self.heads, mask))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPText(nn.Module):
    """OpenCLIP ViT-bigG text tower as SDXL stores it; pooled = ln_final(last)[argmax ids] @ text_projection."""

    def __init__(self, shapes: Shapes, *, heads: int | None = None) -> None:
        super().__init__()
        vocab, dim = shapes["token_embedding.weight"]
        inner = shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]
        self.token_embedding = nn.Embedding(vocab, dim)
        self.positional_embedding = nn.Parameter(torch.empty(shapes["positional_embedding"]))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            _OpenClipBlock(dim, inner, heads or max(1, dim // 64))
            for _ in range(count(shapes, r"transformer\.resblocks\.(\d+)\.")))
        self.ln_final = nn.LayerNorm(dim)
        self.text_projection = nn.Parameter(torch.empty(shapes["text_projection"]))

    def forward(self, ids: torch.Tensor) -> ClipOutput:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        last, penultimate = _run_causal(self.transformer.resblocks, x, self.ln_final)
        return ClipOutput(last, penultimate, last[torch.arange(ids.shape[0]), ids.argmax(dim=1)] @ self.text_projection)


class _T5Attention(nn.Module):
    def __init__(self, dim: int, inner: int, heads: int, buckets: int | None) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = Linear(dim, inner, bias=False), Linear(dim, inner, bias=False), Linear(dim, inner, bias=False)
        self.o = Linear(inner, dim, bias=False)
        if buckets:
            self.relative_attention_bias = nn.Embedding(buckets, heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        scores = q.float() @ k.float().transpose(-1, -2) + bias  # T5: no 1/sqrt(d)
        out = (scores.softmax(-1).to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.o(out)


class _T5Block(nn.Module):
    def __init__(self, dim: int, inner: int, ff: int, heads: int, buckets: int | None) -> None:
        super().__init__()
        attn = nn.Module()
        attn.SelfAttention = _T5Attention(dim, inner, heads, buckets)
        attn.layer_norm = RMSNorm(dim)
        mlp = nn.Module()
        mlp.DenseReluDense = nn.Module()
        mlp.DenseReluDense.wi_0 = Linear(dim, ff, bias=False)
        mlp.DenseReluDense.wi_1 = Linear(dim, ff, bias=False)
        mlp.DenseReluDense.wo = Linear(ff, dim, bias=False)
        mlp.layer_norm = RMSNorm(dim)
        self.layer = nn.ModuleList([attn, mlp])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attn, mlp = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias)
        h = mlp.layer_norm(x)
        d = mlp.DenseReluDense
        return x + d.wo(F.gelu(d.wi_0(h), approximate="tanh") * d.wi_1(h))


def _buckets(n: int, num: int, max_distance: int = 128) -> torch.Tensor:
    """T5's bidirectional relative-position buckets for an n x n attention."""
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    num //= 2
    out = (rel > 0).long() * num
    rel = rel.abs()
    exact = num // 2
    large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (num - exact)).long()
    return out + torch.where(rel < exact, rel, large.clamp(max=num - 1))


class T5Encoder(nn.Module):
    """T5 v1.1 encoder (gated GELU, RMSNorm, relative position buckets), t5xxl file layout."""

    def __init__(self, shapes: Shapes) -> None:
        super().__init__()
        vocab, dim = shapes["shared.weight"]
        buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        ff = shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]
        self.shared = nn.Embedding(vocab, dim)
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList(_T5Block(dim, inner, ff, heads, buckets if i == 0 else None)
                                           for i in range(count(shapes, r"encoder\.block\.(\d+)\.")))
        self.encoder.final_layer_norm = RMSNorm(dim)
        self.buckets = buckets

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.shared(ids)
        n = ids.shape[1]
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = table(_buckets(n, self.buckets).to(ids.device)).permute(2, 0, 1)[None].float()
        for blk in self.encoder.block:
            x = blk(x, bias)
        return self.encoder.final_layer_norm(x)
