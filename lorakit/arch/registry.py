"""The families lorakit knows, in one table. Adding a family: a record in its own module, listed here."""

from __future__ import annotations

from .flux import FLUX1
from .qwen import QWEN_IMAGE
from .sd import SD15, SDXL
from .spec import Family
from .text import CLIP_L_FILE, T5XXL_FILE
from .wan import WAN

FAMILIES: tuple[Family, ...] = (SD15, SDXL, FLUX1, WAN, QWEN_IMAGE, CLIP_L_FILE, T5XXL_FILE)
BY_ID = {f.id: f for f in FAMILIES}
