"""Model families: which architecture a base file is (``detect``), which one a LoRA was made for
(``lora_family``), and the components and key maps of each (one record per family, ``registry``)."""

from __future__ import annotations

import re

from ..errors import ArchitectureMismatch
from ..formats import looks_like_lora
from .registry import BY_ID, FAMILIES
from .spec import KINDS, Alias, BaseSpec, Block, Component, Convention, Family, Kind, Shapes, Split, Target

__all__ = ["detect", "lora_family", "claim", "family_name", "BaseSpec", "Component", "Target", "Split", "Block", "Alias",
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
    and the family with the most matching keys wins; between tied families the one with the most
    keys none of the others matches wins (none, or a tie again, is undetermined: the base decides)."""
    v = metadata.get("ss_base_model_version", "")
    spec = metadata.get("modelspec.architecture", "")
    for fam in FAMILIES:
        if v and v in fam.metadata:
            return fam.id, f"metadata ss_base_model_version={v}"
    for fam in FAMILIES:
        if spec and any(spec.startswith(p) for p in fam.modelspec):
            return fam.id, f"metadata modelspec.architecture={spec}"
    hits: dict[str, list[str]] = {}
    for fam in FAMILIES:
        rx = fam.signals()
        found = [k for k in keys if any(r.search(k) for r in rx)]
        if found:
            hits[fam.id] = found
    if not hits:
        return None, "undetermined"
    most = max(len(h) for h in hits.values())
    top = [fid for fid, h in hits.items() if len(h) == most]
    if len(top) > 1:
        # names several families share count for each; among those tied, the keys a signal of only
        # one of them matches decide
        own = {}
        for fid in top:
            others = {sig for o in top if o != fid for sig in BY_ID[o].lora_signals}
            rx = [re.compile(sig) for sig in BY_ID[fid].lora_signals if sig not in others]
            own[fid] = [k for k in keys if any(r.search(k) for r in rx)]
        best = max(len(v) for v in own.values())
        winners = [fid for fid in top if len(own[fid]) == best]
        if best == 0 or len(winners) > 1:
            names = [family_name(fid) for fid in top]
            return None, f"{', '.join(names[:-1])} or {names[-1]}: names they share, {most} keys"
        return winners[0], f"key {own[winners[0]][0]}"
    return top[0], f"key {hits[top[0]][0]}"


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
