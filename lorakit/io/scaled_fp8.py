"""ComfyUI's "scaled fp8" files: each fp8 ``<layer>.weight`` stores W / s, with the per-tensor scale
s in ``<layer>.scale_weight`` (fp32, shape []); the file carries the empty marker tensor ``scaled_fp8``.
The effective weight is ``weight * scale_weight``."""

from __future__ import annotations

from typing import Callable

import torch

from ..ops.rounding import is_fp8

MARKER = "scaled_fp8"
SCALE_SUFFIX = "scale_weight"


def is_scale_entry(key: str) -> bool:
    """The marker or a per-layer scale: bookkeeping of the format, not a weight."""
    return key == MARKER or key.endswith("." + SCALE_SUFFIX)


def weight_scale(key: str, dtype: torch.dtype, get: Callable[[str], torch.Tensor | None]) -> float | None:
    """The scale of fp8 weight ``key`` (``get`` returns a tensor by key, or None), or None."""
    if not key.endswith(".weight") or not is_fp8(dtype):
        return None
    s = get(key[: -len("weight")] + SCALE_SUFFIX)
    return None if s is None else float(s.float().reshape(-1)[0])
