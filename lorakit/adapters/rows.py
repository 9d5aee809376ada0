"""One row block of another adapter's change: a module trained fused (``to_qkv``: q, k and v as one
Linear) applied to a base that stores its parts as separate tensors. Each part takes its rows of
the fused change, which for a low-rank adapter is ``up[rows] @ down``, exactly."""

from __future__ import annotations

import torch

from .base import Adapter


class OutputRows(Adapter):
    """Rows ``rows`` of ``inner``'s change of a fused weight of shape ``fused``."""

    def __init__(self, inner: Adapter, rows: tuple[int, int], fused: tuple[int, ...]) -> None:
        super().__init__(inner.factors, inner.default_alpha)
        self.inner, self.rows, self.fused = inner, rows, fused
        a, b = rows
        m = inner.dora_scale
        # DoRA's magnitude per output row divides with the rows (each row's norm is its own)
        self.dora_scale = None if m is None else m.reshape(-1)[a:b].reshape(-1, 1)

    @staticmethod
    def why_not(inner: Adapter, fused: tuple[int, ...]) -> str | None:
        """Why ``inner``'s change cannot be divided between separate tensors (None: it can)."""
        if not inner.divisible:
            return f"a {inner.algo_name} change reads the whole fused weight and cannot be divided between its parts"
        m = inner.dora_scale
        if m is not None and not (m.numel() == fused[0] and (m.dim() == 1 or m.shape[0] == fused[0])):
            return ("DoRA's magnitude here is per input column (normed over the fused q, k and v rows together), "
                    "so it cannot be divided between separately stored parts")
        return None

    @property
    def algo(self) -> str:  # type: ignore[override]
        return self.inner.algo

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def scale(self) -> float:
        return self.inner.scale

    def alpha(self) -> float | None:
        return self.inner.alpha()

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        lr = self.inner.lowrank()
        if lr is None:
            return None
        a, b = self.rows
        return lr[0][a:b], lr[1]

    def full_delta(self, w: torch.Tensor) -> torch.Tensor:
        a, b = self.rows
        whole = self.inner.full_delta(torch.empty(self.fused, dtype=torch.float32, device=w.device))
        return whole[a:b].reshape(w.shape)

    def check(self, shape: tuple[int, ...]) -> str | None:
        a, b = self.rows
        if shape[0] != b - a:
            return f"part has {shape[0]} rows, its share of the fused change has {b - a}"
        return self.inner.check(self.fused)

    def bias_delta(self) -> torch.Tensor | None:
        d = self.inner.bias_delta()
        return None if d is None else d[self.rows[0]:self.rows[1]]

    @property
    def changes_weight(self) -> bool:
        return self.inner.changes_weight
