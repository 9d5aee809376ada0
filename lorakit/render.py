"""Reports for people: what ``lorakit merge`` / ``--dry-run``, ``check`` and ``inspect`` print without
``--json``. Words are the family's ("U-Net", "transformer", "CLIP-L text encoder"), numbers are
counts with their unit, lists are aligned; ``--json`` prints the complete report instead."""

from __future__ import annotations

from .reports import DryRunReport, LoraReport, MergeReport, PlanReport

SHOWN = 10  # unmatched modules listed before "... N more"


def table(rows: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    """``label   value`` lines with the values aligned."""
    width = max((len(a) for a, _ in rows), default=0)
    return [f"{indent}{a.ljust(width)}  {b}".rstrip() for a, b in rows]


def counted(counts: dict, unit: str) -> str:
    """``{"lora": 3, "loha": 1}`` -> ``lora (3 modules), loha (1 module)``."""
    return ", ".join(f"{k} ({n} {unit}{'' if n == 1 else 's'})" for k, n in counts.items()) or "-"


def _strengths(r: LoraReport, report: PlanReport, model_only: bool) -> str:
    has_text = any(m.strength_kind == "clip" for m in r.matched)
    if model_only or not has_text:
        return f"{r.model_strength:g}" + (" (model only)" if model_only else "")
    return f"{r.model_strength:g} (model) / {r.clip_strength:g} (text encoders)"


def plan_text(report: PlanReport, *, model_only: bool = False) -> str:
    dry = isinstance(report, DryRunReport)
    lines = [f"BASE  {report.base}: {report.base_arch_name} ({', '.join(report.components)})"]
    for r in report.loras:
        c = r.counts
        made_for = f"made for {r.arch_name}" if r.arch else (
            "family not recorded in the file" if r.arch_source == "undetermined" else "family undecided")
        lines.append(f"LoRA  {r.file}: {r.format} format, {made_for} ({r.arch_source})")
        rows = [("strength", _strengths(r, report, model_only)),
                ("would apply" if dry else "applied", f"{len(r.matched)} modules ({c['matched']} keys)")]
        rows += [("skipped", f"{len(s.keys)} keys of the {s.component} ({s.reason})") for s in r.skipped]
        if r.unmatched:
            rows.append(("unmatched", f"{c['unmatched']} keys in {len(r.unmatched)} modules"))
        lines += table(rows, "      ")
        for u in r.unmatched[:SHOWN]:
            near = f"; nearest: {u.nearest[0]}" if u.nearest else ""
            lines.append(f"        {u.module} ({len(u.keys)} keys): {u.reason}{near}")
        if len(r.unmatched) > SHOWN:
            lines.append(f"        ... {len(r.unmatched) - SHOWN} more unmatched modules (see --json)")
        lines += [f"      note: {n}" for n in r.notes]
    lines += [f"note: {n}" for n in report.notes]
    if dry:
        lines.append("dry run: nothing written" + ("; a real run would fail (unmatched keys; --allow-unmatched "
                                                   "applies the rest)" if report.would_fail else ""))
    elif isinstance(report, MergeReport):
        if report.applied_modules == 0 and not report.notes:
            lines.append("note: no LoRA module applies to this BASE; OUT equals BASE apart from metadata")
        sat = sum(report.fp8_saturated.values())
        if sat:
            lines.append(f"warning: {sat} fp8 values saturated at the format's limit in "
                         f"{len(report.fp8_saturated)} tensors (the change does not fit the format there)")
        if report.nonfinite_written:
            lines.append(f"warning: wrote {sum(report.nonfinite_written.values())} inf / NaN values in "
                         f"{len(report.nonfinite_written)} tensors (--allow-nonfinite)")
        rounding = f", fp8 rounding {report.rounding} (seed {report.seed})" if report.fp8_tensors_changed else ""
        lines.append(f"wrote {report.out}: {report.tensors_changed} tensors changed{rounding}, {report.seconds:.2f} s")
    return "\n".join(lines)


def check_text(d: dict) -> str:
    c = d["counts"]
    lines = [f"checked {d['merged'] or 'lorakit merge (in memory)'} against {d['base']}",
             f"tensors: {c['ok']} ok, {c['below-resolution']} below dtype resolution, {c['FAIL']} FAIL"]
    for t in [t for t in d["tensors"] if t["status"] == "FAIL"][:SHOWN]:
        lines.append(f"  FAIL {t['key']} ({t['dtype']}): error {t['err']:.3g} vs floor {t['floor']:.3g}: {t['reason']}")
    below = [t for t in d["tensors"] if t["status"] == "below-resolution"]
    if below:
        lines.append(f"  below resolution (nothing to confirm): {', '.join(t['key'] for t in below[:5])}"
                     f"{' …' if len(below) > 5 else ''}")
    for k in d["untouched_changed"][:5]:
        lines.append(f"  FAIL {k}: changed, but no LoRA targets it")
    lines += [f"  FAIL {p}" for p in d["problems"]]
    for k, n in list(d["nonfinite"].items())[:5]:
        lines.append(f"  FAIL {k}: {n} NaN/inf values")
    if d["fp8_saturated"]:
        lines.append(f"  note: {sum(d['fp8_saturated'].values())} fp8 values saturated at the format's limit in "
                     f"{len(d['fp8_saturated'])} tensors")
    m = d["model"]
    if m.get("status") in ("ok", "FAIL", "below-resolution"):
        lines.append(f"model ({m['model']}, fp32): LoRA effect {m['lora_effect']:.3g}, merged vs runtime LoRA "
                     f"{m['merged_vs_runtime']:.3g}, floor {m['floor']:.3g} -> {m['status']}")
    else:
        lines.append(f"model: skipped ({m.get('reason')})")
    verdicts = {"PASS": "PASS", "FAIL": "FAIL",
                "INCONCLUSIVE": "INCONCLUSIVE: every change is below what the stored format can hold, so "
                                "nothing could be confirmed (see `lorakit check --help`)"}
    lines.append(verdicts[d["result"]])
    return "\n".join(lines)


def convert_text(r) -> str:
    lines = [f"LoRA  {r.lora}: {r.format} format, {r.modules_in} modules",
             f"BASE  {r.base}: {r.base_arch_name} (its layout)"]
    lines += [f"note: {n}" for n in r.notes]
    if r.dropped:
        lines.append(f"left out {len(r.dropped)} keys (--allow-unmatched): {', '.join(r.dropped[:3])}"
                     f"{' …' if len(r.dropped) > 3 else ''}")
    forms = [f"{n} {what}" for n, what in ((r.fused, "stacked from split parts"), (r.split, "row parts of fused "
                                                                                          "modules")) if n]
    dtype = "" if r.dtype == "keep" else f", factors in {r.dtype}"
    lines.append(f"wrote {r.out}: {r.to} names, {r.modules_out} modules ({r.keys_out} keys)"
                 f"{'; ' + ', '.join(forms) if forms else ''}{dtype}, {r.seconds:.2f} s")
    c = r.check
    if c is not None:
        same = (f"all {c['tensors']} touched tensors identical" if c["identical"] == c["tensors"] else
                f"{c['identical']} of {c['tensors']} touched tensors identical, at most {c['max_ulp']} ulp apart "
                f"({c['worst_tensor']}; bound {c['bound_ulp']})")
        lines.append(f"check {c['result']}: LoRA and OUT merged into {c['base']}: {same}")
    return "\n".join(lines)


def _provenance(p: object) -> str | None:
    if p is None:
        return None
    try:
        loras = ", ".join(f"{lo['file']} at {lo['model_strength']:g}"
                          + (f" / {lo['clip_strength']:g}" if lo.get("clip_strength") != lo["model_strength"] else "")
                          for lo in p.get("loras", []))
        extra = " (on a lorakit merge)" if p.get("previous") else ""
        return f"{loras or 'no LoRA'} into {p['base']['file']}, lorakit {p.get('version', '?')}{extra}"
    except (AttributeError, KeyError, TypeError):
        return "a lorakit merge (its provenance entry is unreadable)"


def inspect_text(info: dict) -> str:
    kind = "LoRA" if info["kind"] == "lora" else "checkpoint"
    lines = [f"{info['file']}: {kind}, {info['bytes'] / 1e6:.1f} MB, {info['tensors']} tensors"]
    if info["kind"] == "lora":
        made_for = info["arch_name"] if info["arch"] else (
            "not recorded" if info["arch_source"] == "undetermined" else "undecided")
        rows = [("format", info["format"]), ("made for", f"{made_for} ({info['arch_source']})"),
                ("algorithms", counted(info["algorithms"], "module")),
                ("ranks", counted(info["ranks"], "module")), ("alphas", counted(info["alphas"], "module")),
                ("parts", counted(info["components"], "module")), ("dtypes", counted(info["dtypes"], "tensor"))]
        tw = info["trigger_words"]
        if tw:
            rows += [(k.replace("_", " "), ", ".join(v) if isinstance(v, list) else str(v)) for k, v in tw.items()]
        else:
            rows.append(("trigger words", "none recorded in the file's metadata"))
        if info.get("hints"):
            rows.append(("hints", "; ".join(info["hints"])))
    else:
        details = info["details"]
        extra = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in details.items() if k != "prefix")
        prefix = f"keys under {details['prefix']}" if details.get("prefix") else ""
        arch = info["arch_name"] + (f" ({'; '.join(x for x in (prefix, extra) if x)})" if prefix or extra else "")
        rows = [("architecture", arch), ("components", counted(info["components"], "tensor")),
                ("dtypes", counted(info["dtypes"], "tensor") + ("; ComfyUI scaled fp8" if info["scaled_fp8"] else ""))]
        baked = _provenance(info.get("provenance"))
        if baked:
            rows.append(("baked in", baked))
    return "\n".join(lines + table(rows))
