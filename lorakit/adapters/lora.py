"""LoRA / LoCon: W += (alpha/rank) * up @ down, conv factors flattened, optional Tucker mid."""

from __future__ import annotations

import torch

from .base import Adapter, numel


class LoRA(Adapter):
    required = frozenset({"up", "down"})
    optional = frozenset({"mid", "up_bias"})

    split_parts = 1  # > 1 for kohya split_qkv files (see detect_split)

    @property
    def rank(self) -> int:
        return int(self.factors["down"].shape[0]) // self.split_parts

    def detect_split(self, splits: tuple[int, ...]) -> bool:
        """kohya ``split_qkv``: q/k/v(/mlp) LoRAs of rank r saved fused, down = cat (rank n*r), up
        block-diagonal. Its alpha is per part, so the scale is alpha/r, not alpha/(n*r)."""
        up, down = self.factors["up"], self.factors["down"]
        n = len(splits)
        if "mid" in self.factors or up.dim() != 2 or down.shape[0] % n or sum(splits) != up.shape[0]:
            return False
        r = down.shape[0] // n
        row = 0
        for i, size in enumerate(splits):
            block = up[row : row + size]
            if bool(block[:, : i * r].any()) or bool(block[:, (i + 1) * r :].any()):
                return False
            row += size
        if not bool(up.any()):
            return False
        self.split_parts = n
        return True

    @property
    def scale(self) -> float:
        return self.alpha_over_rank()

    @property
    def algo(self) -> str:  # type: ignore[override]  # lora, locon or locon-tucker: read from the factors
        if "mid" in self.factors:
            return "locon-tucker"
        down = self.factors["down"]
        return "locon" if down.dim() > 2 and any(k != 1 for k in down.shape[2:]) else "lora"

    def down(self) -> torch.Tensor:
        down = self.factors["down"].float()
        mid = self.factors.get("mid")
        if mid is None:
            return down
        # Tucker: down [r, in, 1, ...] and mid [r, r, *kernel] -> [r, in, *kernel]; the kernel has
        # mid.ndim - 2 dimensions (Conv1d / Conv2d / Conv3d)
        return torch.einsum("ab...,bc->ac...", mid.float(), down.reshape(down.shape[0], -1))

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factors["up"].float(), self.down()

    def check(self, shape: tuple[int, ...]) -> str | None:
        up, down = self.factors["up"], self.factors["down"]
        mid = self.factors.get("mid")
        r = down.shape[0]
        if up.dim() < 2 or up.shape[1] != r or numel(tuple(up.shape[2:])) != 1:
            return f"up {tuple(up.shape)} does not match down {tuple(down.shape)} (rank {r})"
        if up.shape[0] != shape[0]:
            return f"up has {up.shape[0]} rows, target has {shape[0]}"
        inner = numel(tuple(shape[1:]))
        if mid is not None:
            if mid.dim() < 3 or mid.shape[:2] != (r, r) or len(shape) != mid.dim() or tuple(mid.shape[2:]) != tuple(shape[2:]):
                return f"lora_mid {tuple(mid.shape)} does not fit target {shape}"
            inner = shape[1]
        got = numel(tuple(down.shape[1:]))
        if got != inner or (down.dim() > 2 and len(shape) == down.dim() and mid is None
                            and tuple(down.shape[1:]) != tuple(shape[1:])):
            return f"down {tuple(down.shape)} does not fit target {shape}"
        return None

    def bias_delta(self) -> torch.Tensor | None:
        """BFL wrappers' ``lora_B.bias`` and / or a ``diff_b`` (each a patch of its own in ComfyUI)."""
        parts = [self.factors[r].float() for r in ("up_bias", "diff_b") if r in self.factors]
        return sum(parts[1:], parts[0]) if parts else None
