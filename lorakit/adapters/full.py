"""Full-weight changes: LyCORIS ``diff`` / ``diff_b`` (and norm modules' ``w_norm`` / ``b_norm``, which
the suffix table reads as the same roles) and replacements (``set_weight``, BFL norm scales)."""

from __future__ import annotations

import torch

from .base import Adapter


class Full(Adapter):
    algo = "full"
    optional = frozenset({"diff"})

    @classmethod
    def matches(cls, roles: dict[str, torch.Tensor]) -> bool:
        # a diff_b alone is a full change of the bias; beside another algorithm's factors it is
        # that algorithm's bias change (a common role)
        return "diff" in roles or ("diff_b" in roles and set(roles) <= cls.common)

    @property
    def changes_weight(self) -> bool:
        return "diff" in self.factors  # a diff_b-only module changes just the bias

    def full_delta(self, w: torch.Tensor) -> torch.Tensor:
        return self.factors["diff"].float().to(w.device).reshape(w.shape)

    def check(self, shape: tuple[int, ...]) -> str | None:
        d = self.factors.get("diff")
        if d is not None and (d.numel() != torch.Size(shape).numel() or d.dim() == 0 or d.shape[0] != shape[0]):
            return f"diff {tuple(d.shape)} does not match target {shape}"
        return None

class Set(Adapter):
    """Replace the tensor with the stored value; strength does not apply (as ComfyUI)."""

    divisible = False  # reads the weight (or replaces it)
    algo = "set"
    required = frozenset({"set"})

    def check(self, shape: tuple[int, ...]) -> str | None:
        v = self.factors["set"]
        if tuple(v.shape) != tuple(shape):
            return f"replacement {tuple(v.shape)} does not match target {shape}"
        return None

    def apply_(self, w: torch.Tensor, strength: float) -> None:
        w.copy_(self.factors["set"].float().to(w.device))
