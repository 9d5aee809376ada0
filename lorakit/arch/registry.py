"""The families lorakit knows, in one table. Adding a family: a record in its own module, listed here."""

from __future__ import annotations

from .flux import FLUX1
from .sd import SD15, SDXL
from .spec import Family
from .text import CLIP_L_FILE, T5XXL_FILE

FAMILIES: tuple[Family, ...] = (SD15, SDXL, FLUX1, CLIP_L_FILE, T5XXL_FILE)
BY_ID = {f.id: f for f in FAMILIES}
