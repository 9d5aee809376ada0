"""LyCORIS norm modules: ``w_norm`` / ``b_norm`` are full deltas of a norm layer's weight and bias."""

from __future__ import annotations

import torch

from .base import Adapter


class Norm(Adapter):
    algo = "norm"
    optional = frozenset({"w_norm", "b_norm"})

    @classmethod
    def matches(cls, roles: dict[str, torch.Tensor]) -> bool:
        return "w_norm" in roles or "b_norm" in roles

    def apply_(self, w: torch.Tensor, strength: float) -> None:
        if "w_norm" in self.t:
            w.add_(self.t["w_norm"].float().to(w.device).reshape(w.shape), alpha=strength)

    def check(self, shape: tuple[int, ...]) -> str | None:
        v = self.t.get("w_norm")
        return None if v is None or v.numel() == torch.Size(shape).numel() else f"w_norm {tuple(v.shape)} vs {shape}"

    def bias_delta(self) -> torch.Tensor | None:
        b = self.t.get("b_norm")
        return None if b is None else b.float()
