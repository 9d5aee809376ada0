"""LoKr: dW = kron(w1, w2); each factor full or a low-rank product (w2 optionally Tucker).

Scale alpha/rank applies only when a factor is low-rank (rank = that factor's inner size, w2's
when both are); with both factors full, LyCORIS forces alpha = rank, so the scale is 1.
"""

from __future__ import annotations

import torch

from .base import Adapter


class LoKr(Adapter):
    algo = "lokr"
    optional = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"})

    @classmethod
    def matches(cls, roles: dict[str, torch.Tensor]) -> bool:
        has1 = "lokr_w1" in roles or {"lokr_w1_a", "lokr_w1_b"} <= roles.keys()
        has2 = "lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles.keys()
        return has1 and has2

    @property
    def rank(self) -> int | None:
        if "lokr_w2" not in self.factors:
            return int(self.factors["lokr_w2_b"].shape[0])
        if "lokr_w1" not in self.factors:
            return int(self.factors["lokr_w1_b"].shape[0])
        return None

    @property
    def scale(self) -> float:
        return self.alpha_over_rank() if self.rank is not None else 1.0

    def kron_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.factors
        w1 = t["lokr_w1"].float() if "lokr_w1" in t else t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
        if "lokr_w2" in t:
            w2 = t["lokr_w2"].float()
        elif "lokr_t2" in t:
            w2 = torch.einsum("ij...,jr,ip->pr...", t["lokr_t2"].float(), t["lokr_w2_b"].float(), t["lokr_w2_a"].float())
        else:
            w2 = t["lokr_w2_a"].float() @ t["lokr_w2_b"].float()
        if w2.dim() > 2:  # conv kernels: w1 spans the channels only
            w1 = w1.reshape(tuple(w1.shape) + (1,) * (w2.dim() - 2))
        return w1, w2

    def full_delta(self, w: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.kron_factors()
        return torch.kron(w1, w2).to(w.device).reshape(w.shape)

    def check(self, shape: tuple[int, ...]) -> str | None:
        w1, w2 = self.kron_factors()
        n, got = torch.Size(shape).numel(), w1.numel() * w2.numel()
        if got != n or w1.shape[0] * w2.shape[0] != shape[0]:
            return f"kron({tuple(w1.shape)}, {tuple(w2.shape)}) does not fit target {shape}"
        return None
