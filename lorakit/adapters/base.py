"""What every adapter algorithm provides, and the application step they all share."""

from __future__ import annotations

import math

import torch

from ..ops import as_matrix, lowrank_update_

DORA_EPS = torch.finfo(torch.float32).eps


class Adapter:
    """One LoRA module's weight change for one target, in fp32.

    ``factors`` maps roles to the file's tensors. Subclasses set ``algo``, ``required`` / ``optional``
    roles and implement ``lowrank()``
    (``(up, down)`` when the change is a product of two factors) or ``full_delta(w)``.
    ``scale`` is alpha/rank (1 when the file defines none). A ``dora_scale`` role turns any
    adapter into its DoRA form (weight-decomposed, see ``apply_``).
    """

    algo = "?"
    # the change, computed for a whole fused module, can be cut into row blocks without reading the
    # weight (what a fused LoRA over a base storing its parts apart needs; see ``rows.OutputRows``)
    divisible = True
    required: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    # roles every algorithm may carry besides its own factors: alpha, DoRA's magnitude, and a full
    # change of the module's bias (lightx2v files pair a LoRA on the weight with a diff_b, which
    # ComfyUI applies as a patch of its own)
    common = frozenset({"alpha", "dora_scale", "diff_b"})

    def __init__(self, factors: dict[str, torch.Tensor], default_alpha: float | None = None) -> None:
        self.factors = factors  # role -> tensor, as the file stores them
        self.default_alpha = default_alpha
        self.dora_scale = factors.get("dora_scale")

    @classmethod
    def matches(cls, roles: dict[str, torch.Tensor]) -> bool:
        return bool(cls.required) and cls.required <= roles.keys()

    # -- what subclasses provide ---------------------------------------------------------
    @property
    def rank(self) -> int | None:
        return None

    @property
    def scale(self) -> float:
        return 1.0

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def full_delta(self, w: torch.Tensor) -> torch.Tensor:
        up, down = self.lowrank()  # type: ignore[misc]
        return (as_matrix(up).float().to(w.device) @ as_matrix(down).float().to(w.device)).reshape(w.shape)

    def check(self, shape: tuple[int, ...]) -> str | None:
        """Why this adapter cannot apply to a target of ``shape`` (None when it can)."""
        return None

    def bias_delta(self) -> torch.Tensor | None:
        """The change of the module's bias (strength applies, alpha does not), or None."""
        b = self.factors.get("diff_b")
        return None if b is None else b.float()

    @property
    def changes_weight(self) -> bool:
        """False for modules that only carry a bias change (their weight need not be touched)."""
        return True

    # -- shared --------------------------------------------------------------------------
    def alpha(self) -> float | None:
        a = self.factors.get("alpha")
        if a is not None:
            return float(a.float().item())
        return self.default_alpha

    def alpha_over_rank(self) -> float:
        a, r = self.alpha(), self.rank
        if a is None or r is None or a == 0:  # kohya: absent or 0 alpha means alpha = rank
            return 1.0
        return a / r

    def scale_at(self, strength: float) -> float:
        """The factor on this adapter's change at ``strength``: strength x alpha/rank."""
        return strength * self.scale

    @property
    def algo_name(self) -> str:
        return f"{self.algo}+dora" if self.dora_scale is not None else self.algo

    def apply_(self, w: torch.Tensor, strength: float) -> None:
        """w (fp32 view of the target, in place) += the change at ``strength``."""
        if self.dora_scale is not None:
            self._apply_dora_(w, strength)
            return
        lr = self.lowrank()
        if lr is not None:
            lowrank_update_(w, lr[0].to(w.device), lr[1].to(w.device), self.scale_at(strength))
        else:
            w.add_(self.full_delta(w), alpha=self.scale_at(strength))

    def _apply_dora_(self, w: torch.Tensor, strength: float) -> None:
        # DoRA as trained (LyCORIS, PEFT, the paper): W' = m * (W + dW) / ||W + dW||, the norm
        # along the magnitude vector's axis; strength s blends W + s * (W' - W).
        m = self.dora_scale.float().to(w.device)
        wc = w + self.full_delta(w) * self.scale
        flat = wc.reshape(wc.shape[0], -1)
        if m.numel() == w.shape[0] and (m.dim() == 1 or m.shape[0] == w.shape[0]):
            norm = flat.norm(dim=1, keepdim=True) + DORA_EPS
            new = (flat * (m.reshape(-1, 1) / norm)).reshape(w.shape)
        else:
            norm = flat.norm(dim=0, keepdim=True) + DORA_EPS
            new = (flat * (m.reshape(1, -1) / norm)).reshape(w.shape)
        if strength == 1.0:
            w.copy_(new)
        else:
            w.add_(new - w, alpha=strength)


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
