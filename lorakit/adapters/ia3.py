"""(IA)^3: a learned per-channel scaling, W' = W * (1 + s * w), along the output rows, or along
the input columns when ``on_input`` is set (LyCORIS' definition)."""

from __future__ import annotations

import torch

from .base import Adapter


class IA3(Adapter):
    divisible = False  # reads the weight (or replaces it)
    algo = "ia3"
    required = frozenset({"ia3_weight"})
    optional = frozenset({"on_input"})

    def _on_input(self) -> bool:
        flag = self.factors.get("on_input")
        return bool(flag is not None and bool(flag.reshape(-1)[0]))

    def full_delta(self, w: torch.Tensor) -> torch.Tensor:
        v = self.factors["ia3_weight"].float().to(w.device).reshape(-1)
        if self._on_input():
            return w * v.reshape(1, -1, *([1] * (w.dim() - 2)))
        return w * v.reshape(-1, *([1] * (w.dim() - 1)))

    def check(self, shape: tuple[int, ...]) -> str | None:
        n = self.factors["ia3_weight"].numel()
        want = shape[1] if self._on_input() and len(shape) > 1 else shape[0]
        return None if n == want else f"IA3 vector of {n} does not match {'input' if self._on_input() else 'output'} size {want} of {shape}"
