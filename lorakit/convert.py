"""``lorakit convert``: a LoRA rewritten in the names another tool loads, meaning the same change.

The LoRA is planned onto a base's layout like a merge (every key consumed or reported, strict),
so each module is known as a change of rows of a base tensor. Each base tensor's changes are then
written under the target naming's name for it (``arch`` conventions, the same tables that read
files): renamed as they are, cut into the target's row parts (a fused ``qkv`` into ``to_q`` /
``to_k`` / ``to_v``: shared down, rows of the up) or stacked into its fused module (split parts
into ``qkv``: downs stacked along the rank, block-diagonal up). Every step is exact
(``adapters.factors``); what a naming cannot express is refused with its reason. Only BASE's
header is read; ``check`` merges the original and the output into BASE and compares the bits.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._version import __version__
from .adapters.factors import Change, algo_name, cut, delta_shape, of, permute, stack, transpose
from .adapters.rows import OutputRows
from .arch import Alias, BaseSpec, Component, Split, Target, detect
from .arch.standin import PLACEHOLDER, add_stand_ins
from .errors import ArchitectureMismatch, ConversionError, OutputError, UnmatchedKeysError, UsageError
from .formats.roles import ROLE_STYLES
from .io import open_container
from .io.safetensors import save_file
from .lora import load_lora
from .outputs import TEMP_SUFFIX, check_output, new_file_mode
from .planner import LoraSpec, Resolved, check_compatible, group_keys, plan_lora, unmatched_error
from .reports import ConvertReport

# --to -> the convention names (``arch.Convention.name``) that spell it, in preference order
TARGETS = {"comfy": ("comfy",), "kohya": ("kohya",), "diffusers": ("peft",)}
DTYPES = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("auto", "split", "fuse")  # --split-fused / --fuse-split force one form
OUT_SUFFIXES = (".safetensors",)


@dataclass
class _Piece:
    """A change on rows ``first:first + change.rows`` of base tensor ``key`` (native row order)."""

    key: str
    first: int
    change: Change
    module: str


@dataclass
class _Written:
    name: str  # the module's name in the target naming
    alias: Alias
    change: Change
    sources: list[str] = field(default_factory=list)


class _Refused(Exception):
    """A module the target naming cannot express: (source modules, reason)."""


def convert_file(lora: str | os.PathLike, out: str | os.PathLike, *, to: str, base: str | os.PathLike | None = None,
                 arch: str | None = None, dtype: str = "keep", layout: str = "auto",
                 check: str | os.PathLike | None = None, force: bool = False,
                 allow_unmatched: bool = False) -> ConvertReport:
    """Write ``lora`` as ``out`` in the naming ``to`` (comfy, kohya, diffusers) for BASE's layout;
    ``check``: a BASE to merge both into and compare (raises nothing: the verdict is in the report)."""
    if to not in TARGETS:
        raise UsageError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if layout not in LAYOUTS:
        raise UsageError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    layout_from = base if base is not None else check
    if layout_from is None:
        raise UsageError(f"{lora}: convert reads the layout from a base checkpoint's header: give --base BASE "
                         "(only its header is read) or --check BASE")
    lora_p, out_p, base_p = Path(lora), Path(out), Path(layout_from)
    inputs = [lora_p, base_p] + ([Path(check)] if check is not None else [])
    check_output(out_p, base=None, others=inputs, force=force, suffixes=OUT_SUFFIXES)
    t0 = time.monotonic()
    with open_container(base_p) as f:
        shapes = f.shapes()
        dtypes = {k: f.dtype(k) for k in shapes}
    spec = detect(shapes, str(base_p))
    if arch is not None and arch not in (spec.arch, spec.family.id):
        raise ArchitectureMismatch(f"{base_p}: BASE is {spec.name} ({spec.arch}), not --arch {arch}")
    src = load_lora(lora_p)
    notes = [n for n in [check_compatible(src, spec, str(base_p))] if n]
    for label in add_stand_ins(spec, shapes, list(src.tensors)):
        notes.append(f"BASE has no {label}: its modules are renamed from their names (shapes as the LoRA's "
                     "factors give them; a file with it would check them)")
    _shape_stand_ins(src, spec, shapes, dtypes)
    resolved: list[Resolved] = []
    entry = plan_lora(src, LoraSpec(str(lora_p)), 0, spec, shapes, dtypes, model_only=False, allow_nonfinite=False,
                      ops={}, keep_zero=True, resolved=resolved)
    if entry.unmatched and not allow_unmatched:
        raise unmatched_error(entry, str(base_p), spec)
    if entry.skipped and not allow_unmatched:
        s = entry.skipped[0]
        raise UnmatchedKeysError(f"{lora_p}: {sum(len(x.keys) for x in entry.skipped)} key(s) would be dropped: "
                                 f"{', '.join(s.keys[:3])} [{s.component}: {s.reason}]; give a BASE with that "
                                 "component, or --allow-unmatched to leave them out", entry)
    written, refused = _rewrite(resolved, spec, shapes, to, layout)
    if refused:
        modules, why = refused[0]
        raise ConversionError(f"{lora_p}: the {to} naming cannot express {', '.join(modules[:3])} ({why}); "
                         f"{len(refused)} module(s) refused, nothing was written")
    cast = DTYPES[dtype]
    try:
        tensors, peft, fused, split = _tensors(written, cast, to)
        metadata = _metadata(src.metadata, peft, src, to=to, spec=spec, dtype=dtype, layout=layout)
    except ConversionError as e:
        raise ConversionError(f"{lora_p}: {e}") from None
    _write(tensors, metadata, out_p)
    report = ConvertReport(lora=str(lora_p), out=str(out_p), to=to, base=str(base_p), base_arch=spec.arch,
                           base_arch_name=spec.name, format=src.family, modules_in=len(entry.matched),
                           modules_out=len(written), keys_out=len(tensors), fused=fused, split=split,
                           dropped=[k for s in entry.skipped for k in s.keys] + [k for u in entry.unmatched
                                                                                for k in u.keys],
                           notes=notes + entry.notes, dtype=dtype, seconds=round(time.monotonic() - t0, 3))
    if check is not None:
        from .convert_check import same_merge

        report.check = same_merge(Path(check), lora_p, out_p, exact=cast is None)
    return report


def _shape_stand_ins(src, spec: BaseSpec, shapes: dict, dtypes: dict) -> None:
    """Each stand-in tensor a module of the LoRA changes gets the shape its factors give."""
    groups, _ = group_keys(src, spec)
    for module, roles in groups.items():
        hit = spec.lookup(module)
        if hit is None or isinstance(hit[1].target, Split) or shapes[hit[1].target.key] != PLACEHOLDER:
            continue
        shape = delta_shape({r: tuple(src.tensors[k].shape) for r, k in roles.items()})
        if shape is not None:
            shapes[hit[1].target.key] = shape
    for key, shape in shapes.items():
        dtypes.setdefault(key, torch.float32)


# -- modules -> changes of base tensors -> the target naming's modules ---------------------------

def _pieces(r: Resolved, shapes: dict[str, tuple[int, ...]]) -> list[_Piece]:
    """The resolved module's change per base tensor, in the base's row order."""
    out = []
    if r.parts and isinstance(r.parts[0][1], OutputRows):
        inner = r.parts[0][1].inner
        whole = of(inner, r.parts[0][1].fused[0])
        for target, part, _ in r.parts:
            c = cut(whole, *part.rows)
            if c is None:
                raise _Refused([r.module], f"its {inner.algo_name} change cannot be cut into the parts "
                                           f"{target.key} is one of")
            out.append(_Piece(target.key, 0, c, r.module))
        return out
    target, adapter, _ = r.parts[0]
    shape = shapes[target.key]
    rows = target.rows[1] - target.rows[0] if target.rows else (shape[1] if target.transform == "transpose"
                                                                 else shape[0])
    c = of(adapter, rows)
    if target.transform == "swap_halves":
        c = permute(c, _swap(rows))
    elif target.transform == "transpose":
        c = transpose(c)
    if c is None:
        raise _Refused([r.module], f"its {adapter.algo_name} change cannot be re-laid out ({target.transform})")
    return [_Piece(target.key, target.rows[0] if target.rows else 0, c, r.module)]


def _swap(rows: int) -> torch.Tensor:
    half = rows // 2
    return torch.cat([torch.arange(half, rows), torch.arange(0, half)])


def _names(comp: Component, to: str) -> dict[str, list[tuple[int, str, Alias]]]:
    """base tensor key -> the target naming's names for (rows of) it: (preference, name, alias)."""
    wanted = TARGETS[to]
    order = {c: i for i, c in enumerate(comp.conventions)}
    out: dict[str, list[tuple[int, str, Alias]]] = {}
    for name, alias in comp.aliases.items():
        if alias.convention.name in wanted and not isinstance(alias.target, Split):
            out.setdefault(alias.target.key, []).append((order[alias.convention], name, alias))
    for v in out.values():
        v.sort(key=lambda t: t[0])
    return out


def _fans(comp: Component, to: str) -> list[tuple[str, Alias]]:
    return [(name, a) for name, a in comp.aliases.items() if a.convention.name in TARGETS[to]
            and isinstance(a.target, Split)]


def _rewrite(resolved: list[Resolved], spec: BaseSpec, shapes: dict, to: str,
             layout: str) -> tuple[list[_Written], list[tuple[list[str], str]]]:
    by_key: dict[tuple[str, str], list[_Piece]] = {}
    comps: dict[str, Component] = {}
    refused: list[tuple[list[str], str]] = []
    for r in resolved:
        try:
            pieces = _pieces(r, shapes)
        except _Refused as e:
            refused.append(e.args)
            continue
        comps[r.component.id] = r.component
        for p in pieces:
            by_key.setdefault((r.component.id, p.key), []).append(p)
    written: list[_Written] = []
    for cid, comp in comps.items():
        names = _names(comp, to)
        if not names:
            refused.append(([p.module for (c, _), ps in by_key.items() if c == cid for p in ps],
                            f"it has no names for the {comp.label}"))
            continue
        keys = {k: ps for (c, k), ps in by_key.items() if c == cid}
        if layout == "fuse":
            for name, alias in _fans(comp, to):
                parts = [t.key for t in alias.target.parts]
                if all(k in keys for k in parts):
                    try:
                        written.append(_fan(name, alias, [keys.pop(k) for k in parts], shapes))
                    except _Refused as e:
                        refused.append(e.args)
        for key, pieces in keys.items():
            try:
                written += _place(key, pieces, names.get(key, []), shapes, layout, to)
            except _Refused as e:
                refused.append(e.args)
    return written, refused


def _place(key: str, pieces: list[_Piece], names: list[tuple[int, str, Alias]], shapes: dict, layout: str,
           to: str) -> list[_Written]:
    """The target naming's modules for one base tensor's changes."""
    sources = sorted({p.module for p in pieces})
    total = shapes[key][0] if shapes[key] else 1
    plain = [(n, a) for _, n, a in names if a.target.transform is None]
    wholes = [(n, a) for n, a in plain if a.target.rows is None]
    parts = _cover([(n, a) for n, a in plain if a.target.rows is not None])
    shaped = [(n, a) for _, n, a in names if a.target.transform is not None and a.target.rows is None]
    covered = bool(parts) and all(_covers(parts, p.first, p.first + p.change.rows) for p in pieces)
    if layout == "auto":  # the form of the naming's preferred convention for this tensor
        layout = "split" if names and names[0][2].target.rows is not None else "fuse"
    want_rows = covered and (layout == "split" or not wholes)
    if want_rows:
        out = []
        for name, alias in parts:
            a, b = alias.target.rows
            inside = [_inside(p, a, b) for p in pieces]
            inside = [x for x in inside if x is not None]
            if inside:
                out.append(_Written(name, alias, _stacked(inside, b - a, sources), sources))
        return out
    if wholes:
        name, alias = wholes[0]
        return [_Written(name, alias, _stacked([(p.first, p.change) for p in pieces], total, sources), sources)]
    if shaped:
        name, alias = shaped[0]
        c = _stacked([(p.first, p.change) for p in pieces], total, sources)
        c = permute(c, _swap(total)) if alias.target.transform == "swap_halves" else transpose(c)
        if c is None:
            raise _Refused(sources, f"the change cannot be re-laid out for {name} ({alias.target.transform})")
        return [_Written(name, alias, c, sources)]
    raise _Refused(sources, f"it has no name for {key}" + (" rows " + ", ".join(
        f"{p.first}:{p.first + p.change.rows}" for p in pieces) if parts else ""))


def _cover(parts: list[tuple[str, Alias]]) -> list[tuple[str, Alias]]:
    """Row-part names that do not overlap (the finest first), in row order."""
    chosen: list[tuple[str, Alias]] = []
    for n, a in sorted(parts, key=lambda t: (t[1].target.rows[1] - t[1].target.rows[0], t[1].target.rows[0])):
        lo, hi = a.target.rows
        if all(hi <= c.target.rows[0] or lo >= c.target.rows[1] for _, c in chosen):
            chosen.append((n, a))
    return sorted(chosen, key=lambda t: t[1].target.rows[0])


def _covers(parts: list[tuple[str, Alias]], lo: int, hi: int) -> bool:
    """Rows lo:hi lie within the union of the parts' rows."""
    row = lo
    for _, a in parts:  # in row order, not overlapping
        a0, a1 = a.target.rows
        if a0 <= row < a1:
            row = a1
    return row >= hi


def _inside(p: _Piece, a: int, b: int) -> tuple[int, Change] | None:
    """The piece's change on base rows a:b, placed relative to a (None: no overlap)."""
    lo, hi = max(a, p.first), min(b, p.first + p.change.rows)
    if lo >= hi:
        return None
    c = cut(p.change, lo - p.first, hi - p.first)
    if c is None:
        raise _Refused([p.module], f"its {algo_name(p.change.algo)} change cannot be cut at rows {lo}:{hi}")
    return lo - a, c


def _stacked(parts: list[tuple[int, Change]], rows: int, sources: list[str]) -> Change:
    if len(parts) == 1 and parts[0][0] == 0 and parts[0][1].rows == rows:
        return parts[0][1]
    c, why = stack(sorted(parts, key=lambda t: t[0]), rows)
    if c is None:
        raise _Refused(sources, why)
    return c


def _fan(name: str, alias: Alias, groups: list[list[_Piece]], shapes: dict) -> _Written:
    """Separately stored parts fused under one name (--fuse-split)."""
    stacked, row, sources = [], 0, []
    for target, pieces in zip(alias.target.parts, groups):
        rows = shapes[target.key][0]
        srcs = sorted({p.module for p in pieces})
        sources += srcs
        stacked.append((row, _stacked([(p.first, p.change) for p in pieces], rows, srcs)))
        row += rows
    return _Written(name, alias, _stacked(stacked, row, sources), sources)


# -- writing -------------------------------------------------------------------------------------

def _tensors(written: list[_Written], cast: torch.dtype | None,
             to: str) -> tuple[dict[str, torch.Tensor], dict, int, int]:
    """Output tensors, the PEFT configuration per component prefix, and counts of fused / split modules."""
    tensors: dict[str, torch.Tensor] = {}
    peft: dict[str, dict[str, tuple[int | None, float | None, bool]]] = {}
    fused = split = 0
    for w in written:
        conv, c = w.alias.convention, w.change
        style = ROLE_STYLES[conv.roles]
        fallback = ROLE_STYLES["kohya"] if conv.roles == "kohya" else {}
        factors = dict(c.factors)
        if "up_bias" in factors and "up_bias" not in style:  # the same bias change, as kohya names it
            bias = factors.pop("up_bias").float()
            factors["diff_b"] = bias + factors["diff_b"].float() if "diff_b" in factors else bias
        for role, t in factors.items():
            suffix = style.get(role, fallback.get(role))
            if suffix is None:
                raise ConversionError(f"{', '.join(w.sources[:3])}: the {to} format has no {algo_name(c.algo)} "
                                 f"'{role}' factor; nothing was written"
                                 + (" (PEFT stores LoRA and DoRA only: use --to kohya or --to comfy)"
                                    if to == "diffusers" else ""))
            if role == "dora_scale" and conv.roles == "peft":
                t = t.reshape(-1)  # PEFT's magnitude vector is one number per output row
            if cast is not None and t.is_floating_point():
                t = t.to(cast)
            tensors[w.name + suffix] = t.contiguous()
        if conv.alpha == "tensor" and c.alpha is not None:
            a = torch.tensor(c.alpha, dtype=torch.float32)
            tensors[w.name + ".alpha"] = a if float(a) == c.alpha else torch.tensor(c.alpha, dtype=torch.float64)
        elif conv.alpha == "metadata":
            comp = conv.prefix.rstrip(".")
            peft.setdefault(comp, {})[w.alias.module] = (c.rank, c.alpha, "dora_scale" in c.factors)
        elif conv.alpha == "none" and c.scale != 1.0:
            raise ConversionError(f"{', '.join(w.sources[:3])}: the {to} naming keeps no alpha and this module's "
                             f"alpha / rank is {c.scale:g}; nothing was written")
        if len(w.sources) > 1:
            fused += 1
        elif w.alias.target.rows is not None:
            split += 1
    return tensors, peft, fused, split


def _peft_config(peft: dict[str, dict[str, tuple[int | None, float | None, bool]]]) -> dict[str, object]:
    """diffusers' ``lora_adapter_metadata``: per component prefix, the LoraConfig fields that give every
    module its rank and alpha (the most common as ``r`` / ``lora_alpha``, the rest as patterns)."""
    flat: dict[str, object] = {}
    for comp, modules in sorted(peft.items()):
        ranks = Counter(r for r, _, _ in modules.values())
        alphas = Counter((a if a is not None else r) for r, a, _ in modules.values())
        r0, a0 = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
        flat[f"{comp}.r"] = r0
        flat[f"{comp}.lora_alpha"] = a0
        flat[f"{comp}.rank_pattern"] = {_literal(m): r for m, (r, _, _) in sorted(modules.items()) if r != r0}
        flat[f"{comp}.alpha_pattern"] = {_literal(m): (a if a is not None else r)
                                         for m, (r, a, _) in sorted(modules.items()) if (a if a is not None else r) != a0}
        flat[f"{comp}.target_modules"] = sorted(modules)
        dora = {d for _, _, d in modules.values()}
        if len(dora) > 1:  # PEFT's use_dora is one switch per component, and DoRA re-norms every module
            raise ConversionError(f"{comp}: some modules are DoRA and some are not; diffusers' format gives a component "
                             "one use_dora switch, so this LoRA cannot be written for it exactly")
        flat[f"{comp}.use_dora"] = dora.pop()
    return flat


def _literal(module: str) -> str:
    """A PEFT pattern (a regular expression, matched at a name boundary) for exactly this module."""
    return module.replace(".", r"\.")


def _metadata(source: dict[str, str], peft: dict, src, **conversion: object) -> dict[str, str]:
    meta = {k: v for k, v in source.items() if k not in ("lora_adapter_metadata", "lorakit")}
    if peft:
        meta["lora_adapter_metadata"] = json.dumps(_peft_config(peft))
    entry = {"version": __version__,
             "converted": {"from": {"file": Path(src.path).name, "sha256": src.sha256, "format": src.family},
                           "to": conversion["to"], "base_arch": conversion["spec"].arch,
                           "dtype": conversion["dtype"], "layout": conversion["layout"]}}
    previous = source.get("lorakit")
    if previous:
        try:
            entry["previous"] = json.loads(previous)
        except json.JSONDecodeError:
            entry["previous"] = previous
    meta["lorakit"] = json.dumps(entry, separators=(",", ":"))
    return meta


def _write(tensors: dict[str, torch.Tensor], metadata: dict[str, str], out: Path) -> None:
    """OUT through a temporary file beside it (fsync, rename): never half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=TEMP_SUFFIX, dir=out.parent)
    try:
        os.fchmod(fd, new_file_mode(None))
        os.close(fd)
        save_file(tensors, tmp, metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise OutputError(f"{out}: write failed ({e.strerror or e}); the partial file was removed") from None
        raise
