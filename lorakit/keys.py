"""Small helpers on tensor-key paths: block indices read from the keys present, flattened names."""

from __future__ import annotations

import re
from typing import Iterable


def indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by the first group of ``pattern`` (matched at the start)."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def count(keys: Iterable[str], pattern: str) -> int:
    """1 + the largest index captured by ``pattern`` (0 when none): the number of blocks."""
    found = indices(keys, pattern)
    return found[-1] + 1 if found else 0


def underscored(path: str) -> str:
    return path.replace(".", "_")
