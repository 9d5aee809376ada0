"""Typed reports of plan, merge and patch; ``to_json()`` is what ``--json`` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Matched:
    module: str
    keys: list[str]
    algorithm: str
    component: str
    target: str
    strength: float
    rank: int | None
    alpha: float | None
    strength_kind: str = "model"  # which strength drives it (not printed: ``strength`` is its value)

    def to_json(self) -> dict:
        return {"module": self.module, "keys": self.keys, "algorithm": self.algorithm, "component": self.component,
                "target": self.target, "strength": self.strength, "rank": self.rank, "alpha": self.alpha}


@dataclass
class Skipped:
    component: str
    reason: str
    keys: list[str]


@dataclass
class Unmatched:
    module: str
    keys: list[str]
    reason: str
    nearest: list[str] | None = None  # the closest base names, for the first few

    def to_json(self) -> dict:
        d = {"module": self.module, "keys": self.keys, "reason": self.reason}
        if self.nearest is not None:
            d["nearest"] = self.nearest
        return d


@dataclass
class LoraReport:
    """One LoRA against one base: every key of the file is in exactly one of matched (consumed by
    an adapter), skipped (its component is not in BASE, or ``--model-only``) or unmatched."""

    file: str
    sha256: str
    format: str
    arch: str | None
    arch_source: str
    model_strength: float
    clip_strength: float
    tensors: int
    matched: list[Matched] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    arch_name: str = "unknown"
    width: int | None = None  # rows of its up factors, most often (the model width it was made for)

    @property
    def counts(self) -> dict[str, int]:
        return {"matched": sum(len(m.keys) for m in self.matched), "skipped": sum(len(s.keys) for s in self.skipped),
                "unmatched": sum(len(u.keys) for u in self.unmatched)}

    @property
    def skipped_components(self) -> list[str]:
        return sorted(s.component for s in self.skipped)

    def to_json(self) -> dict:
        return {
            "file": self.file, "sha256": self.sha256, "format": self.format, "arch": self.arch,
            "arch_name": self.arch_name, "arch_source": self.arch_source, "width": self.width, "model_strength": self.model_strength,
            "clip_strength": self.clip_strength, "tensors": self.tensors, "counts": self.counts,
            "skipped_components": self.skipped_components, "matched": [m.to_json() for m in self.matched],
            "skipped": [asdict(s) for s in self.skipped], "unmatched": [u.to_json() for u in self.unmatched],
            "notes": self.notes,
        }


@dataclass
class PlanReport:
    base: str
    base_arch: str
    base_arch_name: str
    components: list[str]
    loras: list[LoraReport]
    notes: list[str]

    @property
    def applied_modules(self) -> int:
        return sum(len(r.matched) for r in self.loras)

    def to_json(self) -> dict:
        return {"base": self.base, "base_arch": self.base_arch, "base_arch_name": self.base_arch_name,
                "components": self.components, "loras": [r.to_json() for r in self.loras], "notes": self.notes}


@dataclass
class DryRunReport(PlanReport):
    would_fail: bool = False

    def to_json(self) -> dict:
        return {**super().to_json(), "dry_run": True, "would_fail": self.would_fail}


@dataclass
class MergeReport(PlanReport):
    out: str = ""
    tensors_changed: int = 0
    rounding: str = "nearest"
    seed: int = 0
    device: str = "cpu"
    fp8_tensors_changed: int = 0
    fp8_saturated: dict[str, int] = field(default_factory=dict)
    nonfinite_written: dict[str, int] = field(default_factory=dict)  # only with --allow-nonfinite
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {**super().to_json(), "out": self.out, "tensors_changed": self.tensors_changed,
                "rounding": self.rounding, "seed": self.seed, "device": self.device,
                "fp8_tensors_changed": self.fp8_tensors_changed, "fp8_saturated": self.fp8_saturated,
                "nonfinite_written": self.nonfinite_written, "seconds": self.seconds}


@dataclass
class PatchReport(PlanReport):
    tensors_changed: int = 0
    backup: str = "auto"
    rounding: str = "nearest"
    seed: int = 0
    fp8_saturated: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**super().to_json(), "tensors_changed": self.tensors_changed, "backup": self.backup,
                "rounding": self.rounding, "seed": self.seed, "fp8_saturated": self.fp8_saturated}


@dataclass
class ConvertReport:
    """``lorakit convert``: what was read, what was written, and the ``--check`` verdict."""

    lora: str
    out: str
    to: str
    base: str
    base_arch: str
    base_arch_name: str
    format: str
    modules_in: int
    modules_out: int
    keys_out: int
    fused: int  # output modules stacked from several source modules
    split: int  # output modules that are row parts of a source module
    dropped: list[str] = field(default_factory=list)  # keys left out (--allow-unmatched)
    notes: list[str] = field(default_factory=list)
    dtype: str = "keep"
    seconds: float = 0.0
    check: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)
