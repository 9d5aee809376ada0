"""``lorakit check``: did the LoRA land, and is the merged model what the LoRA defines?

Three levels (../shared/docs/sampler.md §5):

* **tensors** — for every tensor the LoRAs touch: the stored change (merged − base, fp32) against
  the reference change (lorakit's fp32 math), ``err = ‖Δstored − Δref‖ / ‖Δref‖``, judged against the
  dtype's rounding floor ``u/√3 · ‖W'‖ / ‖Δref‖`` (u = unit roundoff; ×√3 for stochastic fp8). Above
  3 × floor (+1e-6) is a failure; a floor above 0.3 means the change is below what the dtype can hold
  and is reported as such, not as a failure. Tensors nothing targets must be bit-identical.
* **model** — the denoiser (U-Net or Flux transformer, lorakit's own model code, fp32) on fixed
  random inputs: merged weights against base weights plus runtime LoRA branches
  (``y = W x + s·up(down x)``, a full-delta branch for other adapters). The difference must stay
  within 2 × the best a stored merge can do (lorakit's own merge rounded to the dtype) + 1e-5, and the
  LoRA's effect must be visible above that floor.
* **numbers** — NaN / inf and fp8 values at the format's limit in the merged tensors.

Without ``--merged`` the merge is lorakit's own, done in memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .codecs import Codec, default_rounding, saturated
from .checkmodel import model_level
from .engine import own_merge, reference
from .io import Container, open_container
from .merge import plan
from .arch import detect
from .errors import ArchitectureMismatch
from .formats import looks_like_lora
from .planner import LoraSpec, Op, Plan
from .progress import Progress

BELOW_RESOLUTION = 0.3
EXIT_CODES = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}


@dataclass
class TensorCheck:
    key: str
    dtype: str
    err: float
    floor: float
    status: str  # ok | below-resolution | FAIL
    reason: str = ""


@dataclass
class CheckReport:
    base: str
    merged: str | None
    tensors: list[TensorCheck] = field(default_factory=list)
    untouched_changed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)
    saturated: dict[str, int] = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Nothing failed (see ``result`` for whether anything was confirmed)."""
        model_ok = self.model.get("status", "skipped") != "FAIL"
        return (model_ok and not self.problems and not self.untouched_changed and not self.nonfinite
                and all(t.status != "FAIL" for t in self.tensors))

    @property
    def result(self) -> str:
        """PASS: nothing failed and some change was confirmed; FAIL: something failed; INCONCLUSIVE:
        nothing failed, but every change is below what the stored format can hold."""
        if not self.passed:
            return "FAIL"
        confirmed = any(t.status == "ok" for t in self.tensors) or self.model.get("status") == "ok"
        return "PASS" if confirmed else "INCONCLUSIVE"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.result]

    def to_json(self) -> dict:
        return {"result": self.result, "base": self.base, "merged": self.merged,
                "tensors": [t.__dict__ for t in self.tensors],
                "counts": {s: sum(t.status == s for t in self.tensors) for s in ("ok", "below-resolution", "FAIL")},
                "untouched_changed": self.untouched_changed, "problems": self.problems, "nonfinite": self.nonfinite,
                "fp8_saturated": self.saturated, "model": self.model, "notes": self.notes}


def _floor(codec: Codec, new: torch.Tensor, delta_norm: float, rounding: str) -> float:
    u = codec.unit_roundoff
    if codec.coarse and rounding == "stochastic":
        u *= math.sqrt(3.0)
    return u / math.sqrt(3.0) * float(new.norm()) / max(delta_norm, 1e-30)


def check(base: str | os.PathLike, loras: list[LoraSpec], *, merged: str | os.PathLike | None = None,
          model_only: bool = False, rounding: str | None = None, seed: int = 0, model_check: bool = True,
          device: str = "cpu", progress: bool | None = None) -> CheckReport:
    """Check ``merged`` (or lorakit's in-memory merge) of ``loras`` into ``base``; see the module doc."""
    the_plan = plan(base, loras, model_only=model_only, allow_unmatched=True, allow_nonfinite=True)
    if merged is not None:
        _same_kind(the_plan, merged)
    report = CheckReport(str(base), None if merged is None else str(merged))
    for entry in the_plan.loras:
        if entry.unmatched:
            keys = [k for u in entry.unmatched for k in u.keys]
            report.problems.append(f"{entry.file}: {len(keys)} key(s) address nothing in BASE "
                                   f"(first: {', '.join(keys[:3])}) — such a LoRA does not fully land")
        if not entry.matched:
            report.problems.append(f"{entry.file}: no key of this LoRA applies to BASE")
    src = open_container(base)
    out = open_container(merged) if merged is not None else None
    try:
        mode = default_rounding([src.codec(k) for k in the_plan.ops], rounding)
        bar = Progress(len(the_plan.ops), "checking", enabled=progress, unit="tensors")
        try:
            _tensor_level(src, out, the_plan.ops, report, mode, seed, bar)
        finally:
            bar.close()
        if out is not None:
            _untouched(src, out, set(the_plan.ops), report)
        if model_check and out is not None and report.problems:
            report.model = {"status": "skipped", "reason": "the merged file does not hold every tensor of BASE"}
        elif model_check:
            report.model = model_level(src, out, the_plan, mode, seed, torch.device(device))
        else:
            report.model = {"status": "skipped", "reason": "--no-model"}
    finally:
        src.close()
        if out is not None:
            out.close()
    return report


def _same_kind(the_plan: Plan, merged: str | os.PathLike) -> None:
    """MERGED must be a checkpoint of BASE's family (not the LoRA, not another model)."""
    with open_container(merged) as f:
        shapes = f.shapes()
    if looks_like_lora(list(shapes)):
        raise ArchitectureMismatch(f"{merged}: --merged is a LoRA, not a merged checkpoint; give the file the merge "
                                   "wrote")
    spec = detect(shapes, str(merged))
    if spec.arch != the_plan.spec.arch:
        raise ArchitectureMismatch(f"{merged}: --merged is {spec.name}, but BASE {the_plan.base_path} is "
                                   f"{the_plan.spec.name}; give the merge of this BASE")


def _tensor_level(src: Container, out: Container | None, ops: dict[str, list[Op]], report: CheckReport,
                  rounding: str, seed: int, bar: Progress) -> None:
    """Per-tensor checks, one tensor in memory at a time."""
    base_shapes = src.shapes()
    out_shapes = out.shapes() if out is not None else {}
    for key, key_ops in ops.items():
        bar.advance(1)
        w32, codec, base_raw = src.decode(key)
        ref = reference(w32, key_ops)
        d_ref = ref - w32
        if out is None:  # lorakit's own merge, in memory
            raw = own_merge(key, base_raw, codec, key_ops, rounding, seed)
            stored = codec.decode(raw)
        else:
            if key not in out_shapes:
                report.problems.append(f"{out.name}: tensor {key} is missing")
                continue
            if out_shapes[key] != base_shapes[key]:
                report.problems.append(f"{out.name}: {key} has shape {out_shapes[key]}, BASE {base_shapes[key]}")
                continue
            stored, codec, raw = out.decode(key)
        sat = saturated(codec, ref, w32)
        if sat:
            report.saturated[key] = sat
        d_stored = stored - w32
        dn = float(d_ref.norm())
        err = float((d_stored - d_ref).norm()) / max(dn, 1e-30) if dn > 0 else float(d_stored.norm() > 0)
        floor = _floor(codec, ref, dn, rounding)
        if err > 3 * floor + 1e-6:
            why = "no change stored" if float(d_stored.norm()) == 0 else (
                f"stored change is {float(d_stored.norm()) / max(dn, 1e-30):.3g}x the reference size, "
                f"cosine {float(F.cosine_similarity(d_stored.reshape(1, -1), d_ref.reshape(1, -1))):.3f}")
            if sat > 0:
                why += f"; {sat} values clipped at the fp8 limit (the change does not fit the format)"
            status = "FAIL"
        elif floor > BELOW_RESOLUTION:
            status, why = "below-resolution", f"the change is below {raw.dtype} resolution"
        else:
            status, why = "ok", ""
        report.tensors.append(TensorCheck(key, str(raw.dtype).replace("torch.", ""), err, floor, status, why))
        bad = int((~torch.isfinite(stored)).sum())
        if bad:
            report.nonfinite[key] = bad


def _untouched(src: Container, out: Container, touched: set[str], report: CheckReport) -> None:
    missing = [k for k in src.keys() if k not in out]
    extra = [k for k in out.keys() if k not in src]
    if missing:
        report.problems.append(f"{out.name}: {len(missing)} tensor(s) of BASE missing (first: {missing[0]})")
    if extra:
        report.problems.append(f"{out.name}: {len(extra)} tensor(s) not in BASE (first: {extra[0]})")
    for k in src.keys():
        if k in touched or k not in out:
            continue
        a, b = src.get(k), out.get(k)
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(_bits(a), _bits(b)):
            report.untouched_changed.append(k)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)
