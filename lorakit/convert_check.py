"""``convert --check``: the original LoRA and its conversion merged into BASE, tensor by tensor,
must give the same bits (or, when ``--dtype`` re-rounded the factors, stay within 1 ulp)."""

from __future__ import annotations

from pathlib import Path

import torch

from .codecs import default_rounding
from .engine import own_merge
from .io import open_container
from .merge import plan
from .planner import LoraSpec

ULP_BOUND = 1  # with re-rounded factors: the largest difference, in units of the stored format


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Stored values as integers that count ulps (sign-magnitude folded onto one line)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    v = t.contiguous().view(ints).long()
    top = 1 << (8 * t.element_size() - 1)
    return torch.where(v < 0, -top - v, v)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance, in ulps of their (shared) stored type, between two tensors."""
    if a.numel() == 0:
        return 0
    return int((_ordered(a) - _ordered(b)).abs().max())


def same_merge(base: Path, lora: Path, out: Path, *, exact: bool) -> dict:
    """Merge ``lora`` and ``out`` (strength 1) into ``base`` in memory and compare every touched tensor."""
    # what the original applies (keys it cannot apply are not in OUT either)
    a = plan(base, [LoraSpec(str(lora))], allow_unmatched=True)
    b = plan(base, [LoraSpec(str(out))])
    keys = sorted(set(a.ops) | set(b.ops))
    worst, first, identical = 0, None, 0
    with open_container(base) as f:
        codecs = {k: f.codec(k) for k in keys}
        rounding = default_rounding(list(codecs.values()), None)
        for key in keys:
            raw = f.get(key)
            x = own_merge(key, raw, codecs[key], a.ops.get(key, []), rounding, 0)
            y = own_merge(key, raw, codecs[key], b.ops.get(key, []), rounding, 0)
            d = ulps(x, y)
            identical += d == 0
            if d > worst:
                worst, first = d, key
    bound = 0 if exact else ULP_BOUND
    result = "PASS" if worst <= bound else "FAIL"
    return {"result": result, "base": str(base), "tensors": len(keys), "identical": identical, "max_ulp": worst,
            "bound_ulp": bound, "worst_tensor": first}
