"""Planning: LoRA files x base checkpoint -> per-tensor operations plus a full report.

Every key of every LoRA ends in exactly one bucket: matched (consumed by an adapter that
applies to a base tensor), skipped (its component is not in BASE, or ``model_only``), or
unmatched (its component is in BASE but it addresses nothing there, or does not fit).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field

import torch

from . import formats
from .adapters import select
from .adapters.base import Adapter
from .adapters.lora import LoRA
from .arch import ARCH_NAMES, COMPONENTS, BaseSpec, Target
from .errors import ArchitectureMismatch, NonFiniteError, UnmatchedKeysError
from .lora import LoraFile


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA on the command line: ``PATH[:MODEL_STRENGTH[:CLIP_STRENGTH]]``."""

    path: str
    model_strength: float = 1.0
    clip_strength: float | None = None

    @property
    def clip(self) -> float:
        return self.model_strength if self.clip_strength is None else self.clip_strength

    def strength_for(self, kind: str) -> float:
        """The strength that drives a part of kind ``kind`` ("model" or "clip")."""
        return self.model_strength if kind == "model" else self.clip


@dataclass
class Op:
    """One change to one base tensor: ``part`` is "weight" (adapter.apply_) or "bias"."""

    target: Target
    adapter: Adapter
    strength: float
    part: str
    lora_index: int
    module: str
    strength_kind: str = "model"  # which strength drives it: "model" or "clip"

    @property
    def scale(self) -> float:
        """The factor on the adapter's change: strength x the adapter's own scale (alpha / rank)."""
        return self.strength * self.adapter.scale


@dataclass
class Plan:
    base_path: str
    spec: BaseSpec
    loras: list[dict]
    ops: dict[str, list[Op]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def report(self) -> dict:
        return {"base": self.base_path, "base_arch": self.spec.arch, "base_arch_name": self.spec.name,
                "components": [c.label for c in self.spec.components], "loras": self.loras, "notes": self.notes}


# base archs whose LoRAs must be made for the same family; stand-alone text encoders take any
FAMILY_BASES = {"sd15", "sdxl", "flux"}


def parse_lora_arg(arg: str) -> LoraSpec:
    """``PATH[:M[:C]]`` parsed from the right, so paths with ':' (C:\\...) still work."""
    parts = arg.split(":")
    nums: list[float] = []
    while len(parts) > 1 and len(nums) < 2:
        try:
            value = float(parts[-1])
        except ValueError:
            break
        if not math.isfinite(value):
            break
        nums.insert(0, value)
        parts.pop()
    path = ":".join(parts)
    if not nums:
        return LoraSpec(path)
    return LoraSpec(path, nums[0], nums[1] if len(nums) > 1 else None)


def _peft_alpha(lora: LoraFile, module: str, rank: int) -> float | None:
    comp, _, rel = module.partition(".")
    cfg = lora.peft.get(comp)
    if not cfg:
        return None
    alpha = cfg.get("lora_alpha")
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", rel):
            alpha = value
            break
    if alpha is None:
        return None
    if cfg.get("use_rslora"):
        return float(alpha) * math.sqrt(rank)  # so that alpha/rank == lora_alpha/sqrt(r)
    return float(alpha)


def _view_shape(shape: tuple[int, ...], target: Target) -> tuple[int, ...]:
    if target.rows:
        shape = (target.rows[1] - target.rows[0],) + tuple(shape[1:])
    if target.transform == "transpose":
        shape = tuple(reversed(shape))
    return tuple(shape)


def _nearest(spec: BaseSpec, module: str) -> list[str]:
    prefix = next((p for p, _ in formats.COMPONENT_PREFIXES if module.startswith(p)), "")
    pool = [(a, t) for c in spec.components for a, t in c.aliases.items() if a.startswith(prefix)]
    names = difflib.get_close_matches(module, [a for a, _ in pool], n=2, cutoff=0.6)
    lookup = dict(pool)
    return [f"{n} -> {lookup[n].describe()}" for n in names]


def check_compatible(lora: LoraFile, spec: BaseSpec, base_name: str) -> None:
    if spec.arch in FAMILY_BASES and lora.arch is not None and lora.arch != spec.arch:
        raise ArchitectureMismatch(
            f"{lora.path}: this LoRA is for {ARCH_NAMES[lora.arch]} ({lora.arch_source}), "
            f"but BASE {base_name} is {spec.name}; use a {spec.name} LoRA or a {ARCH_NAMES[lora.arch]} base")


def plan_lora(lora: LoraFile, ls: LoraSpec, index: int, spec: BaseSpec, shapes: dict[str, tuple[int, ...]],
              *, model_only: bool, allow_nonfinite: bool, ops: dict[str, list[Op]], keep_zero: bool = False) -> dict:
    """Map one LoRA onto the base; append its ops; return its report entry.

    Ops at strength 0 are left out unless ``keep_zero`` (a patch handle may raise them later)."""
    groups: dict[str, dict[str, str]] = {}
    unmatched: list[dict] = []
    for key in lora.tensors:
        module, role = formats.split_key(key, lambda m: spec.lookup(m) is not None)
        slot = groups.setdefault(module, {})
        if role in slot:  # two spellings of one factor: keep the first, report the other
            unmatched.append({"module": module, "keys": [key], "reason": f"second '{role}' tensor for this module"})
            continue
        slot[role] = key
    matched, skipped, notes = [], {}, []
    for module, roles in groups.items():
        keys = sorted(roles.values())
        hit = spec.lookup(module)
        if hit is None:
            cid = formats.component_of(module, lora.arch or (spec.arch if spec.arch in FAMILY_BASES else None))
            if cid is not None and spec.component(cid) is None:
                skipped.setdefault(COMPONENTS[cid][0], ("component not in BASE", []))[1].extend(keys)
            else:
                where = "" if cid is None else f" of the {COMPONENTS.get(cid, (cid,))[0]}"
                unmatched.append({"module": module, "keys": keys, "reason": f"no tensor{where} in BASE has this name"})
            continue
        comp, target = hit
        if model_only and comp.strength_kind == "clip":
            skipped.setdefault(comp.label, ("--model-only", []))[1].extend(keys)
            continue
        tensors = {r: lora.tensors[k] for r, k in roles.items()}
        rank = int(tensors["down"].shape[0]) if "down" in tensors else 1
        adapter, unused, adapter_notes = select(tensors, _peft_alpha(lora, module, rank))
        notes += [f"{module}: {n}" for n in adapter_notes]
        if adapter is None:
            unmatched.append({"module": module, "keys": keys, "reason": "tensor names of no known adapter: "
                              + ", ".join(sorted(roles))})
            continue
        if target.splits and target.rows is None and isinstance(adapter, LoRA) and adapter.detect_split(target.splits):
            notes.append(f"{module}: kohya split_qkv layout ({len(target.splits)} parts of rank {adapter.rank}); "
                         "scale alpha/rank per part")
        view = _view_shape(shapes[target.key], target)
        reason = adapter.check(view) if adapter.changes_weight else None
        bias_target, bias = None, adapter.bias_delta()
        if reason is None and bias is not None:
            bkey = target.bias_key()
            if bkey is None or bkey not in shapes:
                reason = f"carries a bias change but BASE has no bias for {target.key}"
            else:
                bias_target = Target(bkey, target.rows, "swap_halves" if target.transform == "swap_halves" else None)
                bview = _view_shape(shapes[bkey], bias_target)
                if tuple(bias.shape) != bview:
                    reason = f"bias change {tuple(bias.shape)} does not match {bkey} {bview}"
        if reason is not None:
            unmatched.append({"module": module, "keys": keys, "reason": f"shape mismatch with {target.describe()} "
                              f"{tuple(shapes[target.key])}: {reason}"})
            continue
        if not allow_nonfinite:
            bad = [roles[r] for r, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            if bad:
                raise NonFiniteError(f"{lora.path}: NaN or inf in {', '.join(bad[:3])}"
                                     f"{' (+%d more)' % (len(bad) - 3) if len(bad) > 3 else ''}; "
                                     "refusing to merge (use --allow-nonfinite to merge anyway)")
        strength = ls.strength_for(comp.strength_kind)
        used = [k for r, k in roles.items() if r not in unused]
        if unused:
            unmatched.append({"module": module, "keys": sorted(roles[r] for r in unused),
                              "reason": f"not used by the {adapter.algo_name} adapter"})
        matched.append({"module": module, "keys": sorted(used), "algorithm": adapter.algo_name,
                        "component": comp.label, "target": target.describe(), "strength": strength,
                        "rank": adapter.rank, "alpha": adapter.alpha()})
        if strength != 0.0 or keep_zero:
            kind = comp.strength_kind
            if adapter.changes_weight:
                ops.setdefault(target.key, []).append(Op(target, adapter, strength, "weight", index, module, kind))
            if bias_target is not None:
                ops.setdefault(bias_target.key, []).append(Op(bias_target, adapter, strength, "bias", index, module,
                                                              kind))
    for u in unmatched[:5]:
        u["nearest"] = _nearest(spec, u["module"])
    n_matched = sum(len(m["keys"]) for m in matched)
    n_skipped = sum(len(v) for _, v in skipped.values())
    n_unmatched = sum(len(u["keys"]) for u in unmatched)
    assert n_matched + n_skipped + n_unmatched == len(lora.tensors), "every LoRA key lands in exactly one bucket"
    return {
        "file": lora.path, "sha256": lora.sha256, "format": lora.family, "arch": lora.arch,
        "arch_source": lora.arch_source, "model_strength": ls.model_strength, "clip_strength": ls.clip,
        "tensors": len(lora.tensors),
        "counts": {"matched": n_matched, "skipped": n_skipped, "unmatched": n_unmatched},
        "skipped_components": sorted(skipped),
        "matched": matched,
        "skipped": [{"component": c, "reason": why, "keys": sorted(v)} for c, (why, v) in sorted(skipped.items())],
        "unmatched": unmatched,
        "notes": notes,
    }


def unmatched_error(report: dict, base_name: str, spec: BaseSpec) -> UnmatchedKeysError:
    u = report["unmatched"]
    keys = [k for e in u for k in e["keys"]]
    first = u[0]
    near = f"; nearest: {'; '.join(first['nearest'])}" if first.get("nearest") else ""
    if not report["matched"] and all(e["reason"].startswith("shape mismatch") for e in u):
        near += "; every module has the wrong shape: the LoRA was made for a model of another size"
    msg = (f"{report['file']}: {len(keys)} key(s) address no tensor of BASE {base_name} ({spec.name}): "
           f"{', '.join(keys[:3])}{' (+%d more)' % (len(keys) - 3) if len(keys) > 3 else ''} "
           f"[{first['reason']}]{near}. Nothing was written; --allow-unmatched applies the rest, "
           f"--dry-run --json lists them all")
    return UnmatchedKeysError(msg, report)
