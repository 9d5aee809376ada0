"""GLoRA: dW = (W @ a1) @ a2 + b1 @ b2 (LyCORIS >= 2), or the old b2 @ b1 + (W @ a2) @ a1.

The change depends on W itself (the running weight, after earlier patches), as in ComfyUI.
Old and new layouts are told apart by the factor shapes, with ComfyUI's tie-break.
"""

from __future__ import annotations

import torch

from .base import Adapter


class GLoRA(Adapter):
    divisible = False  # reads the weight (or replaces it)
    algo = "glora"
    required = frozenset({"a1", "a2", "b1", "b2"})

    def _layout(self, shape: tuple[int, ...] | None) -> tuple[bool, int]:
        a1, a2, b1, b2 = (self.factors[k] for k in ("a1", "a2", "b1", "b2"))
        old, rank = False, None
        if b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]:
            old, rank = True, int(a1.shape[0])
        if b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]:
            square = shape is not None and a2.shape[0] == shape[0] and len(shape) >= 2 and shape[0] == shape[1]
            if not (old and square):
                old, rank = False, int(a2.shape[0])
        return old, rank if rank is not None else int(a2.shape[0])

    @property
    def rank(self) -> int:
        return self._layout(None)[1]

    @property
    def scale(self) -> float:
        return self.alpha_over_rank()

    def full_delta(self, w: torch.Tensor) -> torch.Tensor:
        a1, a2, b1, b2 = (self.factors[k].flatten(1).float().to(w.device) for k in ("a1", "a2", "b1", "b2"))
        old, _ = self._layout(tuple(w.shape))
        w2 = w.reshape(w.shape[0], -1)
        if old:
            return (b2 @ b1 + (w2 @ a2) @ a1).reshape(w.shape)
        if w.dim() > 2:
            mixed = torch.einsum("oi...,ij->oj...", torch.einsum("oi...,ij->oj...", w, a1), a2)
            return mixed.reshape(w.shape) + (b1 @ b2).reshape(w.shape)
        return ((w2 @ a1) @ a2 + b1 @ b2).reshape(w.shape)

    def check(self, shape: tuple[int, ...]) -> str | None:
        try:
            self.full_delta(torch.zeros(shape))
        except RuntimeError as e:
            return f"GLoRA factors do not fit target {shape} ({str(e).splitlines()[0]})"
        return None
