"""BOFT (butterfly OFT): m stages of block-diagonal rotations, each between butterfly permutations
of W's rows, as LyCORIS defines it (functional/boft.py); ``oft_blocks`` is [m, blocks, b, b].

``alpha`` is the same norm constraint as OFT's. Strength s mixes every stage towards the identity
once (I + s (R - I)), as for OFT; ComfyUI additionally scales the final change by s.
"""

from __future__ import annotations

import torch

from .oft import Rotation


def butterfly(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Apply the m stages of ``r`` [m, n, b, b] to the rows of ``w``."""
    m, n, b, _ = r.shape
    rows, rest = w.shape[0], tuple(w.shape[1:])
    x = w
    for i in range(m):
        k = (2 ** i) * (b // 2)
        x = x.reshape(-1, 2, k, *rest).transpose(1, 2).reshape(n, b, *rest)  # rows (c g k) -> (c k g)
        x = torch.einsum("nij,nj...->ni...", r[i], x)
        x = x.reshape(-1, k, 2, *rest).transpose(1, 2).reshape(rows, *rest)  # back: (c k g) -> (c g k)
    return x


class BOFT(Rotation):
    algo = "boft"

    @classmethod
    def matches(cls, roles: dict[str, torch.Tensor]) -> bool:
        return "oft_blocks" in roles and roles["oft_blocks"].dim() == 4

    def rotate(self, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return butterfly(w, r)

    def check(self, shape: tuple[int, ...]) -> str | None:
        m, n, b, _ = self.factors["oft_blocks"].shape
        if n * b != shape[0] or b % 2 or any((n * b) % (2 ** (i + 1) * (b // 2)) for i in range(m)):
            return f"BOFT blocks [{m}, {n}, {b}, {b}] do not fit the {shape[0]} rows of {shape}"
        return None
