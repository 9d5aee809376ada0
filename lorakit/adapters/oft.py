"""Diag-OFT: a block-diagonal rotation R = (I + Q)(I - Q)^-1, Q = B - B^T, applied to W's rows.

``alpha`` is a norm constraint on Q (not a scale). Strength s blends the rotation towards
the identity once, R_s = I + s (R - I), as LyCORIS' own merge does; ComfyUI multiplies by s
twice (s^2 (R - I)), so the two agree at s = 1 and lorakit follows the trainer elsewhere.
``rescale`` (LyCORIS rescaled OFT) multiplies the rotated rows, as the trainer does.
"""

from __future__ import annotations

import torch

from .base import Adapter


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I - Q)^-1 with Q = B - B^T, Q scaled to norm ``constraint`` when it is larger."""
    eye = torch.eye(blocks.shape[-1])
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    return (eye + q) @ torch.linalg.inv(eye - q)


class Rotation(Adapter):
    """Shared by OFT and BOFT: the strength acts inside the rotation, and ``rescale`` scales rows."""

    divisible = False  # rotates the weight
    required = frozenset({"oft_blocks"})
    optional = frozenset({"rescale"})

    def rotation(self) -> torch.Tensor:
        return cayley(self.factors["oft_blocks"].float(), self.alpha() or 0.0)

    def rotate(self, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_(self, w: torch.Tensor, strength: float) -> None:
        if self.dora_scale is not None:
            super().apply_(w, strength)
            return
        w.add_(self._delta(w, strength))

    def full_delta(self, w: torch.Tensor) -> torch.Tensor:
        return self._delta(w, 1.0)

    def _delta(self, w: torch.Tensor, strength: float) -> torch.Tensor:
        r = self.rotation().to(w.device)
        eye = torch.eye(r.shape[-1], device=w.device)
        rotated = self.rotate(w, eye + strength * (r - eye))
        rescale = self.factors.get("rescale")
        if rescale is not None:
            rotated = rotated * rescale.float().to(w.device).reshape(w.shape[0], *([1] * (w.dim() - 1)))
        return rotated - w


class OFT(Rotation):
    algo = "oft"

    @classmethod
    def matches(cls, roles: dict[str, torch.Tensor]) -> bool:
        return "oft_blocks" in roles and roles["oft_blocks"].dim() == 3  # 4-D blocks are BOFT

    def rotate(self, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        n, b, _ = r.shape
        return torch.einsum("knm,kn...->km...", r, w.reshape(n, b, *w.shape[1:])).reshape(w.shape)

    def check(self, shape: tuple[int, ...]) -> str | None:
        n, b, _ = self.factors["oft_blocks"].shape
        return None if n * b == shape[0] else f"{n} OFT blocks of {b} do not cover the {shape[0]} rows of {shape}"
