"""Planning: LoRA files x base checkpoint -> per-tensor operations plus a full report.

Every key of every LoRA ends in exactly one bucket: matched (consumed by an adapter that
applies to a base tensor), skipped (its component is not in BASE, or ``model_only``) or
unmatched (its component is in BASE but it addresses nothing there, or does not fit). One LoRA
is planned in three steps: its keys are grouped by module (``group_keys``), each module is
resolved against the base's key maps (``resolve``), and the resolved modules become ops
(``emit``). ``plan_loras`` is the loop merge and patch share.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field

import torch

from . import formats
from .adapters import select
from .adapters.base import Adapter
from .adapters.lora import LoRA
from .adapters.rows import OutputRows
from .arch import BaseSpec, Component, Split, Target, claim, family_name
from .codecs import patchable
from .errors import ArchitectureMismatch, DuplicateModuleError, NonFiniteError, UnmatchedKeysError, UsageError
from .lora import LoraFile, load_lora
from .reports import LoraReport, Matched, PlanReport, Skipped, Unmatched

Shapes = dict[str, tuple[int, ...]]
Dtypes = dict[str, torch.dtype]
NEAREST_FOR = 5  # unmatched modules that get "nearest base names" hints


MAX_STRENGTH = 1e12  # far past any useful strength; keeps strength x alpha/rank finite in fp32


def strength_value(value: object, what: str) -> float:
    """A strength as a float: a finite number (or numeric string) within +-MAX_STRENGTH; anything
    else is one ``UsageError`` line naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UsageError(f"{what}: strength {str(value)[:40]!r} is not a number")
    try:
        v = float(value)
    except (ValueError, OverflowError):
        raise UsageError(f"{what}: invalid strength {str(value)[:40]!r} (use a number such as 1.0)") from None
    if not math.isfinite(v) or abs(v) > MAX_STRENGTH:
        raise UsageError(f"{what}: strength {str(value)[:40]!r} is not a finite number within +-{MAX_STRENGTH:g}")
    return v


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA on the command line: ``PATH[:MODEL_STRENGTH[:CLIP_STRENGTH]]``. Strengths are finite
    numbers within +-MAX_STRENGTH (checked here, for the CLI, workflows and the library alike)."""

    path: str
    model_strength: float = 1.0
    clip_strength: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path or "\0" in self.path:
            raise UsageError(f"a LoRA path must be a non-empty string, not {str(self.path)[:60]!r}")
        object.__setattr__(self, "model_strength", strength_value(self.model_strength, self.path))
        if self.clip_strength is not None:
            object.__setattr__(self, "clip_strength", strength_value(self.clip_strength, self.path))

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
        return self.adapter.scale_at(self.strength)


@dataclass
class Plan:
    base_path: str
    spec: BaseSpec
    loras: list[LoraReport] = field(default_factory=list)
    ops: dict[str, list[Op]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def report(self) -> PlanReport:
        return PlanReport(**self.report_fields())

    def report_fields(self) -> dict:
        return dict(base=self.base_path, base_arch=self.spec.arch, base_arch_name=self.spec.name,
                    components=[c.label for c in self.spec.components], loras=self.loras, notes=self.notes)


# a ':'-field that ends a path, not a strength: it holds a folder separator or a model-file suffix
PATH_ENDINGS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def _path_like(field: str) -> bool:
    return "/" in field or "\\" in field or field.lower().endswith(PATH_ENDINGS)


def parse_lora_arg(arg: str) -> LoraSpec:
    """``PATH[:M[:C]]``. A path that exists wins (names with ':' work); else the last one or two
    ':'-fields are strengths and must be numbers (``C:\\loras\\x.safetensors:0.5`` is a path and a
    strength); a field that ends a path (a folder separator or a model-file suffix) is part of
    the path."""
    if os.path.exists(arg) or ":" not in arg:
        return LoraSpec(arg)
    parts = arg.split(":")
    nums: list[str] = []
    while len(parts) > 1 and len(nums) < 2 and not _path_like(parts[-1]):
        nums.insert(0, parts.pop())
    path = ":".join(parts)
    if not nums:
        return LoraSpec(path)
    if len(parts) > 1 and not _path_like(parts[-1]) and not os.path.exists(path):
        raise UsageError(f"too many strengths in {arg!r} (give PATH, PATH:MODEL or PATH:MODEL:CLIP)")
    values = []
    for text in nums:
        try:
            values.append(strength_value(text, arg))
        except UsageError:
            raise UsageError(f"invalid strength {text!r} in {arg!r} (use 1.0, or MODEL:CLIP)") from None
    return LoraSpec(path, values[0], values[1] if len(values) > 1 else None)


def _view_shape(shape: tuple[int, ...], target: Target) -> tuple[int, ...]:
    if target.rows:
        shape = (target.rows[1] - target.rows[0],) + tuple(shape[1:])
    if target.transform == "transpose":
        shape = tuple(reversed(shape))
    return tuple(shape)


def _nearest(spec: BaseSpec, module: str) -> list[str]:
    hit = claim(module, (spec.arch,))
    prefix = hit[1] if hit else ""
    pool = {a: alias.target for c in spec.components for a, alias in c.aliases.items() if a.startswith(prefix)}
    names = difflib.get_close_matches(module, list(pool), n=2, cutoff=0.6)
    return [f"{n} -> {pool[n].describe()}" for n in names]


def _fits(adapter: Adapter, shape: tuple[int, ...]) -> str | None:
    """Why the adapter's change cannot land on a target of ``shape`` (None: it can). Factors that
    do not even combine with each other say so instead of raising."""
    try:
        return adapter.check(shape)
    except (RuntimeError, ValueError, IndexError) as e:
        return f"the factors do not combine ({str(e).splitlines()[0][:120]})"


def check_compatible(lora: LoraFile, spec: BaseSpec, base_name: str) -> str | None:
    """Refuse a LoRA made for another family, naming both and a module BASE lacks; returns a note
    when the family its names suggested is wrong after all (every module is BASE's own: names
    several families share)."""
    if not spec.family.own_loras or lora.arch is None or lora.arch == spec.family.id:
        return None
    made_for = family_name(lora.arch)
    modules = sorted({formats.split_key(k, lambda m: spec.lookup(m) is not None)[0] for k in lora.tensors})
    missing = [m for m in modules if spec.lookup(m) is None]
    if modules and not missing:
        return (f"{lora.name}: its names suggested {made_for} ({lora.arch_source}), but all of its "
                f"{len(modules)} modules are {spec.name}'s: applied as a {spec.name} LoRA")
    raise ArchitectureMismatch(
        f"{lora.path}: this LoRA is for {made_for} ({lora.arch_source}), but BASE {base_name} is {spec.name} "
        f"({missing[0]} has no tensor there); use a {spec.name} LoRA or a {made_for} base")


def _lora_width(lora: LoraFile) -> int | None:
    """The width a LoRA was trained at: the most common row count of its up factors (attention
    projections are width x width)."""
    rows = [int(t.shape[0]) for k, t in lora.tensors.items() if formats.split_key(k, lambda m: False)[1] == "up"
            and t.dim() >= 2]
    return max(set(rows), key=rows.count) if rows else None


# -- one LoRA in three steps ---------------------------------------------------------------------

def group_keys(lora: LoraFile, spec: BaseSpec) -> tuple[dict[str, dict[str, str]], list[Unmatched]]:
    """module -> {role: key}; a second spelling of one factor of a module is reported, not used."""
    groups: dict[str, dict[str, str]] = {}
    duplicates: list[Unmatched] = []
    for key in lora.tensors:
        module, role = formats.split_key(key, lambda m: spec.lookup(m) is not None)
        slot = groups.setdefault(module, {})
        if role in slot:
            duplicates.append(Unmatched(module, [key], f"second '{role}' tensor for this module"))
            continue
        slot[role] = key
    return groups, duplicates


@dataclass
class Resolved:
    """A module that applies: its component, and per base tensor it writes (one, or each part of a
    ``Split``) the target, the adapter giving that tensor's change and the bias target."""

    module: str
    roles: dict[str, str]
    component: Component
    parts: list[tuple[Target, Adapter, Target | None]]
    adapter: Adapter  # the module's own adapter (reports)
    unused: list[str]
    described: str  # what it writes, for reports


def resolve(lora: LoraFile, module: str, roles: dict[str, str], spec: BaseSpec, shapes: Shapes, dtypes: Dtypes, *,
            model_only: bool, report: LoraReport, skipped: dict[tuple[str, str], list[str]]) -> Resolved | None:
    """Find the module's target and adapter and check they fit; what does not lands in the report."""
    keys = sorted(roles.values())
    hit = spec.lookup(module)
    if hit is None:
        prefer = (lora.arch, spec.arch if spec.family.own_loras else None)
        owner = claim(module, prefer)
        cid = owner[0] if owner else None
        if cid is not None and spec.component(cid) is None:
            skipped.setdefault((owner[2], "component not in BASE"), []).extend(keys)
        else:
            present = spec.component(cid) if cid is not None else None
            where = "" if present is None else f" of the {present.label}"
            report.unmatched.append(Unmatched(module, keys, f"no tensor{where} in BASE has this name"))
        return None
    comp, alias = hit
    targets = list(alias.target.parts) if isinstance(alias.target, Split) else [alias.target]
    if model_only and comp.strength_kind == "clip":
        skipped.setdefault((comp.label, "--model-only"), []).extend(keys)
        return None
    stored = next((t for t in targets if not patchable(dtypes[t.key])), None)
    if stored is not None:
        report.unmatched.append(Unmatched(module, keys, f"{stored.key} is stored as {dtypes[stored.key]}; LoRAs "
                                                        "change floating-point tensors only"))
        return None
    problems = formats.factor_problems(roles, {k: tuple(lora.tensors[k].shape) for k in roles.values()})
    if problems:
        report.unmatched.append(Unmatched(module, keys, "invalid factor " + "; ".join(problems)))
        return None
    tensors = {r: lora.tensors[k] for r, k in roles.items()}
    rank = int(tensors["down"].shape[0]) if "down" in tensors else 1
    adapter, unused, adapter_notes = select(tensors, formats.peft_alpha(lora.peft, module, rank))
    report.notes += [f"{module}: {n}" for n in adapter_notes]
    if adapter is None:
        report.unmatched.append(Unmatched(module, keys, "tensor names of no known adapter: " + ", ".join(sorted(roles))))
        return None
    described = alias.target.describe()
    views = [_view_shape(shapes[t.key], t) for t in targets]
    if isinstance(alias.target, Split):
        reason = _split_problem(adapter, views)
        parts = [] if reason else _divide(adapter, targets, views)
    else:
        target = targets[0]
        if target.splits and target.rows is None and isinstance(adapter, LoRA) and not lora.converted \
                and adapter.detect_split(target.splits):
            report.notes.append(f"{module}: kohya split_qkv layout ({len(target.splits)} parts of rank "
                                f"{adapter.rank}); scale alpha/rank per part")
        reason = _fits(adapter, views[0]) if adapter.changes_weight else None
        parts = [(target, adapter)]
    placed = []
    for target, part_adapter in parts:
        if reason is not None:
            break
        bias_target, reason = _bias_target(part_adapter, target, shapes, dtypes)
        placed.append((target, part_adapter, bias_target))
    if reason is not None:
        shape = " + ".join(str(tuple(shapes[t.key])) for t in targets)
        report.unmatched.append(Unmatched(module, keys, f"shape mismatch with {described} {shape}: {reason}"))
        return None
    return Resolved(module, roles, comp, placed, adapter, unused, described)


def _split_problem(adapter: Adapter, views: list[tuple[int, ...]]) -> str | None:
    """Why a fused module's change cannot be divided between the parts of ``views`` (None: it can)."""
    if len({v[1:] for v in views}) != 1:
        return "its parts differ in input size"
    fused = (sum(v[0] for v in views),) + views[0][1:]
    return OutputRows.why_not(adapter, fused) or (_fits(adapter, fused) if adapter.changes_weight else None)


def _divide(adapter: Adapter, targets: list[Target], views: list[tuple[int, ...]]) -> list[tuple[Target, Adapter]]:
    fused = (sum(v[0] for v in views),) + views[0][1:]
    out, row = [], 0
    for target, view in zip(targets, views):
        out.append((target, OutputRows(adapter, (row, row + view[0]), fused)))
        row += view[0]
    return out


def _bias_target(adapter: Adapter, target: Target, shapes: Shapes, dtypes: Dtypes) -> tuple[Target | None, str | None]:
    """(where the adapter's bias change goes, or why it cannot); (None, None) without one."""
    bias = adapter.bias_delta()
    if bias is None:
        return None, None
    bkey = target.bias_key()
    if bkey is None or bkey not in shapes or not patchable(dtypes[bkey]):
        return None, f"carries a bias change but BASE has no floating-point bias for {target.key}"
    bias_target = Target(bkey, target.rows, "swap_halves" if target.transform == "swap_halves" else None)
    bview = _view_shape(shapes[bkey], bias_target)
    if tuple(bias.shape) != bview:
        return None, f"bias change {tuple(bias.shape)} does not match {bkey} {bview}"
    return bias_target, None


def emit(r: Resolved, lora: LoraFile, ls: LoraSpec, index: int, *, allow_nonfinite: bool, keep_zero: bool,
         ops: dict[str, list[Op]], report: LoraReport) -> None:
    """The ops of a resolved module (appended to ``ops``) and its report entry."""
    if not allow_nonfinite:
        tensors = {role: lora.tensors[k] for role, k in r.roles.items()}
        bad = [r.roles[role] for role, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteError(f"{lora.path}: NaN or inf in {', '.join(bad[:3])}"
                                 f"{' (+%d more)' % (len(bad) - 3) if len(bad) > 3 else ''}; "
                                 "refusing to merge (use --allow-nonfinite to merge anyway)")
    kind = r.component.strength_kind
    strength = ls.strength_for(kind)
    used = [k for role, k in r.roles.items() if role not in r.unused]
    if r.unused:
        report.unmatched.append(Unmatched(r.module, sorted(r.roles[role] for role in r.unused),
                                          f"not used by the {r.adapter.algo_name} adapter"))
    report.matched.append(Matched(r.module, sorted(used), r.adapter.algo_name, r.component.label, r.described,
                                  strength, r.adapter.rank, r.adapter.alpha(), kind))
    if strength == 0.0 and not keep_zero:
        return
    for target, adapter, bias_target in r.parts:
        if adapter.changes_weight:
            ops.setdefault(target.key, []).append(Op(target, adapter, strength, "weight", index, r.module, kind))
        if bias_target is not None:
            ops.setdefault(bias_target.key, []).append(Op(bias_target, adapter, strength, "bias", index, r.module,
                                                          kind))


def plan_lora(lora: LoraFile, ls: LoraSpec, index: int, spec: BaseSpec, shapes: Shapes, dtypes: Dtypes, *,
              model_only: bool,
              allow_nonfinite: bool, ops: dict[str, list[Op]], keep_zero: bool = False,
              resolved: list[Resolved] | None = None) -> LoraReport:
    """Map one LoRA onto the base; append its ops; return its report.

    Ops at strength 0 are left out unless ``keep_zero`` (a patch handle may raise them later).
    ``resolved`` collects the modules that apply (what ``convert`` rewrites)."""
    report = LoraReport(lora.path, lora.sha256, lora.family, lora.arch, lora.arch_source, ls.model_strength, ls.clip,
                        len(lora.tensors), arch_name=family_name(lora.arch), width=_lora_width(lora))
    groups, report.unmatched = group_keys(lora, spec)
    skipped: dict[tuple[str, str], list[str]] = {}  # (component, reason) -> keys
    for module, roles in groups.items():
        r = resolve(lora, module, roles, spec, shapes, dtypes, model_only=model_only, report=report, skipped=skipped)
        if r is not None:
            emit(r, lora, ls, index, allow_nonfinite=allow_nonfinite, keep_zero=keep_zero, ops=ops, report=report)
            if resolved is not None:
                resolved.append(r)
    _drop_duplicates(lora, index, ops, shapes, report, skipped)
    if resolved is not None:  # what a duplicate left out is left out here too
        applied = {m.module for m in report.matched}
        resolved[:] = [r for r in resolved if r.module in applied]
    report.skipped = [Skipped(c, why, sorted(keys)) for (c, why), keys in sorted(skipped.items())]
    for u in report.unmatched[:NEAREST_FOR]:
        u.nearest = _nearest(spec, u.module)
    if sum(report.counts.values()) != len(lora.tensors):  # a planner bug, never a user error
        raise RuntimeError(f"{lora.path}: planned keys do not add up to the file's {len(lora.tensors)} tensors")
    return report


DUPLICATE_RTOL = 1e-3  # two spellings of one change agree to this (factors rounded alike in fp32 products)


def _rows(op: Op, shapes: Shapes) -> tuple[int, int]:
    return op.target.rows or (0, shapes[op.target.key][0] if shapes[op.target.key] else 1)


def _change(op: Op, rows: tuple[int, int], shapes: Shapes) -> torch.Tensor:
    """The op's scaled weight change on ``rows`` (base rows) of its target."""
    a, b = _rows(op, shapes)
    view = (b - a,) + tuple(shapes[op.target.key][1:])
    delta = op.adapter.full_delta(torch.empty(view)) * op.scale
    return delta[rows[0] - a:rows[1] - a]


def _drop_duplicates(lora: LoraFile, index: int, ops: dict[str, list[Op]], shapes: Shapes, report: LoraReport,
                     skipped: dict[tuple[str, str], list[str]]) -> None:
    """Two modules of one file changing the same rows of a weight: a fused module and its split
    parts (Z-Image files with both ``qkv`` and ``to_q`` / ``to_k`` / ``to_v``), or one module spelt
    twice. When the changes are the same, the finer module applies once and the other is reported
    as skipped (as diffusers reads such files; ComfyUI would add both); when they differ, nothing
    is guessed."""
    dropped: set[str] = set()
    for key, key_ops in ops.items():
        mine = [op for op in key_ops if op.lora_index == index and op.part == "weight"]
        for i, x in enumerate(mine):
            for y in mine[i + 1:]:
                if x.module == y.module or {x.module, y.module} & dropped:
                    continue
                (xa, xb), (ya, yb) = _rows(x, shapes), _rows(y, shapes)
                lo, hi = max(xa, ya), min(xb, yb)
                if lo >= hi:
                    continue
                coarse, fine = (x, y) if xb - xa > yb - ya else (y, x)
                if x.adapter.dora_scale is not None or y.adapter.dora_scale is not None or \
                        type(x.adapter).apply_ is not Adapter.apply_ or type(y.adapter).apply_ is not Adapter.apply_:
                    same = False  # changes that read the weight cannot be compared here
                else:
                    dx, dy = _change(x, (lo, hi), shapes), _change(y, (lo, hi), shapes)
                    same = bool((dx - dy).abs().max() <= DUPLICATE_RTOL * max(float(dx.abs().max()),
                                                                              float(dy.abs().max()), 1e-30))
                if not same:
                    raise DuplicateModuleError(
                        f"{lora.path}: {x.module} and {y.module} both change rows {lo}:{hi} of {key}, differently; "
                        "a file must carry one form of a module (fused or split), not both")
                dropped.add(coarse.module)
    if not dropped:
        return
    for key in list(ops):
        ops[key] = [op for op in ops[key] if not (op.lora_index == index and op.module in dropped)]
        if not ops[key]:
            del ops[key]
    for m in [m for m in report.matched if m.module in dropped]:
        report.matched.remove(m)
        skipped.setdefault((m.component, "the same change as the file's other spelling of those rows (applied once)"),
                           []).extend(m.keys)


def plan_loras(base_name: str, spec: BaseSpec, shapes: Shapes, dtypes: Dtypes, loras: list[LoraSpec], *,
               model_only: bool,
               allow_unmatched: bool, allow_nonfinite: bool, keep_zero: bool = False) -> Plan:
    """Load, check and plan every LoRA in order onto one base (shared by merge and patch); strict
    unless ``allow_unmatched``."""
    result = Plan(base_name, spec)
    if model_only and all(c.strength_kind == "clip" for c in spec.components):
        result.notes.append(f"--model-only on a text-encoder BASE ({spec.name}): nothing applies; OUT equals BASE "
                            "apart from metadata")
    for i, ls in enumerate(loras):
        lora = load_lora(ls.path)
        note = check_compatible(lora, spec, base_name)
        if note:
            result.notes.append(note)
        entry = plan_lora(lora, ls, i, spec, shapes, dtypes, model_only=model_only, allow_nonfinite=allow_nonfinite,
                          ops=result.ops, keep_zero=keep_zero)
        if entry.unmatched and not allow_unmatched:
            raise unmatched_error(entry, base_name, spec)
        result.loras.append(entry)
    return result


def unmatched_error(report: LoraReport, base_name: str, spec: BaseSpec) -> UnmatchedKeysError:
    u = report.unmatched
    keys = [k for e in u for k in e.keys]
    first = u[0]
    near = f"; nearest: {'; '.join(first.nearest)}" if first.nearest else ""
    if not report.matched and all(e.reason.startswith("shape mismatch") for e in u):
        size = f" (its factors are {report.width} wide" + (f": {spec.family.widths[report.width]}"
                                                           if report.width in spec.family.widths else "") + ")"
        near += f"; every module has the wrong shape: the LoRA was made for a model of another size{size}"
    msg = (f"{report.file}: {len(keys)} key(s) address no tensor of BASE {base_name} ({spec.name}): "
           f"{', '.join(keys[:3])}{' (+%d more)' % (len(keys) - 3) if len(keys) > 3 else ''} "
           f"[{first.reason}]{near}. Nothing was written; --allow-unmatched applies the rest, "
           f"--dry-run --json lists them all")
    return UnmatchedKeysError(msg, report)
