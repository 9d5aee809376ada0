"""The one primitive behind every merge path, and its rounding spec.

``lowrank_update_(W, up, down, scale, rows=..., rounding=..., seed=..., key=...)`` does
``W[rows] += scale * (up @ down)`` in place with fp32 accumulation and rounds the result into
W's dtype once. Backends are chosen from a table (device, dtype); this module holds the torch
reference, which is the spec every other backend must match bit for bit.
"""

from __future__ import annotations

import torch

from .rounding import FP8, is_fp8, round_into

__all__ = ["lowrank_update_", "round_into", "is_fp8", "FP8", "as_matrix"]

# rows per chunk when rounding large tensors, so fp8 temporaries stay small
ROUND_CHUNK_ELEMENTS = 1 << 22


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw] conv weights and [out, in] linears both as a 2-D [out, -1] view."""
    return w.reshape(w.shape[0], -1)


def _fp32_update_(w32: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float) -> None:
    # one GEMM with beta = 1: no full-size delta temporary, one pass over W
    m = as_matrix(w32)
    m.addmm_(up.reshape(up.shape[0], -1).float(), down.reshape(down.shape[0], -1).float(), alpha=scale)
    if m.untyped_storage().data_ptr() != w32.untyped_storage().data_ptr():  # reshape had to copy
        w32.copy_(m.reshape(w32.shape))


def lowrank_update_(
    W: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    scale: float,
    *,
    rows: tuple[int, int] | None = None,
    rounding: str = "nearest",
    seed: int = 0,
    key: str = "",
    weight_scale: float | None = None,
) -> torch.Tensor:
    """``W[rows] += scale * (up @ down)`` in place; returns W.

    fp32 accumulation; the fp32 result is rounded into W's dtype (see ``ops.rounding``).
    ``weight_scale`` is the per-tensor scale of a scaled-fp8 W (effective weight W * s).
    Conv weights are treated as [out, in*kh*kw]; ``up``/``down`` may be 2-D or conv-shaped.
    """
    view = W if rows is None else W.narrow(0, rows[0], rows[1] - rows[0])
    if W.dtype == torch.float32 and weight_scale is None:
        _fp32_update_(view, up, down, scale)
        return W
    orig = view.float()
    if weight_scale is not None:
        orig = orig * weight_scale
    new = orig.clone()
    _fp32_update_(new, up, down, scale)
    offset = 0 if rows is None else rows[0] * (W.numel() // max(W.shape[0], 1))
    round_into(view, new, orig, rounding=rounding, seed=seed, key=key, index_offset=offset, scale=weight_scale)
    return W
