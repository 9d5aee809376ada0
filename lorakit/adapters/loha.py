"""LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha/rank, optional Tucker cores t1/t2 for convs."""

from __future__ import annotations

import torch

from .base import Adapter


def _factor(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        return a.float() @ b.float()
    # Tucker (LyCORIS use_tucker): t [r, r, *kernel], b [r, in], a [r, out] -> [out, in, *kernel]
    return torch.einsum("ij...,jr,ip->pr...", t.float(), b.float(), a.float())


class LoHa(Adapter):
    algo = "loha"
    required = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    optional = frozenset({"hada_t1", "hada_t2"})

    @property
    def rank(self) -> int:
        return int(self.factors["hada_w1_b"].shape[0])

    @property
    def scale(self) -> float:
        return self.alpha_over_rank()

    def full_delta(self, w: torch.Tensor) -> torch.Tensor:
        t = self.factors
        d = _factor(t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1")) * _factor(t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t2"))
        return d.to(w.device).reshape(w.shape)

    def check(self, shape: tuple[int, ...]) -> str | None:
        n = torch.Size(shape).numel()
        t = self.factors
        got = _factor(t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1")).numel()
        return None if got == n else f"LoHa product has {got} elements, target {shape} has {n}"
