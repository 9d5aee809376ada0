"""Model families: which architecture a base file is (``detect``), which one a LoRA was made for
(``lora_family``), and the components and key maps of each (one record per family, ``registry``)."""

from __future__ import annotations

import re

from ..errors import ArchitectureMismatch
from ..formats import looks_like_lora
from .registry import BY_ID, FAMILIES
from .spec import KINDS, Alias, BaseSpec, Block, Component, Convention, Family, Kind, Shapes, Target

__all__ = ["detect", "lora_family", "claim", "family_name", "BaseSpec", "Component", "Target", "Block", "Alias",
           "Convention", "Family", "Kind", "FAMILIES", "KINDS"]


def family_name(fid: str | None) -> str:
    """A family's name for reports ("unknown" for None)."""
    return BY_ID[fid].name if fid in BY_ID else "unknown"


def detect(shapes: Shapes, name: str = "BASE") -> BaseSpec:
    """The family of a checkpoint from its key -> shape map, and its components' key maps.

    Every family's signature is tried at each prefix of its main slot; of those that match, the
    one naming the most keys wins (a look-alike needs one more signature key, never an edit of
    the record it resembles)."""
    keys = set(shapes)
    hits: list[tuple[int, int, Family, str]] = []
    for order, fam in enumerate(FAMILIES):
        prefix = next((p for p in fam.slots[0].prefixes if fam.signature.matches(keys, p)), None)
        if prefix is not None:
            hits.append((len(fam.signature.all_of), -order, fam, prefix))
    if not hits:
        if looks_like_lora(list(shapes)):
            raise ArchitectureMismatch(f"{name}: is a LoRA, not a checkpoint: BASE and LORA swapped? "
                                       "(lorakit merge BASE LORA -o OUT)")
        known = ", ".join(f.name.replace("stand-alone ", "") for f in FAMILIES)
        sample = ", ".join(sorted(shapes)[:3])
        raise ArchitectureMismatch(f"{name}: not a checkpoint lorakit knows ({known}); first keys: {sample}")
    _, _, fam, prefix = max(hits)
    key_list = list(shapes)
    components = [fam.slots[0].component(shapes, prefix)]
    for slot in fam.slots[1:]:
        p = slot.present(key_list)
        if p is not None:
            components.append(slot.component(shapes, p))
    details = {"prefix": prefix, **(fam.details(shapes, prefix) if fam.details else {})}
    return BaseSpec(fam, components, details, fam.variant(shapes, prefix) if fam.variant else None)


def lora_family(keys: list[str], metadata: dict[str, str]) -> tuple[str | None, str]:
    """(family id or None, how it was decided) for a LoRA file.

    Metadata that names a family decides; else every family's signals are counted over the keys
    and the family with the most matching keys wins (a tie is undetermined: the base decides)."""
    v = metadata.get("ss_base_model_version", "")
    spec = metadata.get("modelspec.architecture", "")
    for fam in FAMILIES:
        if v and v in fam.metadata:
            return fam.id, f"metadata ss_base_model_version={v}"
    for fam in FAMILIES:
        if spec and any(spec.startswith(p) for p in fam.modelspec):
            return fam.id, f"metadata modelspec.architecture={spec}"
    scores = []
    for fam in FAMILIES:
        rx = [re.compile(s) for s in fam.lora_signals]
        hits = [k for k in keys if any(r.search(k) for r in rx)]
        if hits:
            scores.append((len(hits), fam.id, hits[0]))
    if not scores:
        return None, "undetermined"
    scores.sort(key=lambda s: -s[0])
    if len(scores) > 1 and scores[0][0] == scores[1][0]:
        return None, f"undetermined ({scores[0][1]} and {scores[1][1]} match {scores[0][0]} keys each)"
    _, fid, first = scores[0]
    return fid, f"key {first}"


def claim(module: str, prefer: tuple[str | None, ...] = ()) -> tuple[str, str, str] | None:
    """(component kind id, the name prefix that decided, the family's word for the component) of
    a LoRA module name no table matched: the families in ``prefer`` first, then all in registry
    order; the longest claim wins."""
    order = [BY_ID[f] for f in prefer if f in BY_ID] + list(FAMILIES)
    for fam in order:
        best = None
        for slot in fam.slots:
            for c in slot.name_claims():
                if c and module.startswith(c) and (best is None or len(c) > len(best[1])):
                    best = (slot.kind.id, c, slot.word)
        if best is not None:
            return best
    return None
