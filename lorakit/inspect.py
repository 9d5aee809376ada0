"""``lorakit inspect``: what a LoRA is (format, arch, algorithms, ranks, trigger words) or what a checkpoint holds."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from . import formats
from .adapters import select
from .arch import claim, detect, family_name
from .formats import peft_alpha
from .errors import ArchitectureMismatch
from .io import open_container
from .lora import load_lora

# a file is a LoRA when most keys carry an adapter suffix
LORA_FRACTION = 0.5
TE_PREFIXES = {"lora_te_": "te1", "lora_te1_": "te1", "text_encoder.": "te1", "lora_te2_": "te2",
               "text_encoder_2.": "te2", "lora_te3_": "te3"}


def _is_lora(keys: list[str]) -> bool:
    roles = [formats.split_key(k, lambda m: False)[1] for k in keys]
    adapter_roles = [r for r in roles if r not in ("unknown", "ia3_weight", "set")]
    return bool(keys) and len(adapter_roles) >= LORA_FRACTION * len(keys)


def trigger_words(metadata: dict[str, str], limit: int = 10) -> dict:
    """Trigger phrase, most frequent training tags and output name, from the trainers' metadata."""
    out: dict = {}
    if metadata.get("modelspec.trigger_phrase"):
        out["trigger_phrase"] = metadata["modelspec.trigger_phrase"]
    tags: Counter = Counter()
    try:
        freq = json.loads(metadata.get("ss_tag_frequency", "{}"))
        for per_dir in freq.values():
            for tag, n in per_dir.items():
                tags[tag.strip()] += int(n)
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        pass
    if tags:
        out["top_tags"] = [t for t, _ in tags.most_common(limit)]
    try:  # kohya dataset folders are named "<repeats>_<trigger>"
        dirs = json.loads(metadata.get("ss_dataset_dirs", "{}"))
        names = [m.group(1) for d in dirs if (m := re.match(r"\d+_(.+)$", Path(d).name))]
        if names:
            out["dataset_folders"] = names
    except (json.JSONDecodeError, TypeError):
        pass
    if metadata.get("ss_output_name"):
        out["output_name"] = metadata["ss_output_name"]
    return out


# Wan 2.2 A14B LoRAs come as HIGH / LOW pairs; the weights cannot tell which expert one is for
EXPERT = re.compile(r"(?i)(?:^|[^a-z])(high|low)(?:[^a-z]|noise|$)")


def expert_hints(path: str, metadata: dict[str, str]) -> list[str]:
    """Which Wan 2.2 A14B expert (high- or low-noise) a file's name or metadata says it is for."""
    hints = []
    m = EXPERT.search(Path(path).stem)
    if m:
        hints.append(f"{m.group(1).lower()}-noise expert (from the file name)")
    for k, v in metadata.items():
        m = EXPERT.search(v) if isinstance(v, str) and len(v) < 200 else None
        if m and "noise" in (k + v).lower():
            hints.append(f"{m.group(1).lower()}-noise expert (metadata {k})")
    return hints


def describe(path: str) -> dict:
    with open_container(path) as f:
        keys, size = f.keys(), os.path.getsize(path)
        dtypes = Counter(str(f.dtype(k)).replace("torch.", "") for k in keys)
        shapes = f.shapes()
        metadata = dict(f.metadata)
        scaled = bool(f.layouts)
    if _is_lora(keys):
        return _describe_lora(path, size)
    try:
        spec = detect(shapes, path)
    except ArchitectureMismatch:
        spec = None
    return {
        "kind": "checkpoint", "file": path, "bytes": size, "tensors": len(keys), "dtypes": dict(dtypes),
        "arch": spec.arch if spec else None, "arch_name": spec.name if spec else "unknown",
        "details": spec.details if spec else {},
        "components": {c.label: sum(1 for k in keys if k.startswith(c.prefix)) for c in spec.components} if spec else {},
        "scaled_fp8": scaled, "metadata_keys": sorted(metadata), "provenance": _provenance(metadata),
    }


def _provenance(metadata: dict[str, str]) -> object:
    """The ``lorakit`` entry a merge leaves in its output (None when the file has none)."""
    raw = metadata.get("lorakit")
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw


def _describe_lora(path: str, size: int) -> dict:
    lora = load_lora(path)
    groups: dict[str, dict[str, str]] = {}
    for key in lora.tensors:
        module, role = formats.split_key(key, lambda m: False)
        groups.setdefault(module, {})[role] = key
    shapes = {k: tuple(t.shape) for k, t in lora.tensors.items()}
    algos: Counter = Counter()
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    parts: Counter = Counter()
    words: Counter = Counter()
    per_module = {}
    for module, roles in groups.items():
        invalid = formats.factor_problems(roles, shapes)
        rank = int(shapes[roles["down"]][0]) if "down" in roles and shapes[roles["down"]] else 1
        alpha = peft_alpha(lora.peft, module, rank)
        adapter = None if invalid else select({r: lora.tensors[k] for r, k in roles.items()}, alpha)[0]
        algo = "invalid" if invalid else (adapter.algo_name if adapter else "unknown")
        algos[algo] += 1
        if adapter is not None and adapter.rank is not None:
            ranks[adapter.rank] += 1
        if adapter is not None and adapter.alpha() is not None:
            alphas[adapter.alpha()] += 1
        owner = claim(module, (lora.arch,))
        comp = owner[0] if owner else None
        part = next((v for p, v in TE_PREFIXES.items() if module.startswith(p)), "unet" if comp == "denoiser" else comp)
        parts[part or "unknown"] += 1
        words[owner[2] if owner else "unknown"] += 1
        per_module[module] = algo
    return {
        "kind": "lora", "file": path, "bytes": size, "tensors": len(lora.tensors), "sha256": lora.sha256,
        "format": lora.family, "arch": lora.arch, "arch_name": family_name(lora.arch),
        "arch_source": lora.arch_source, "algorithms": dict(algos), "ranks": {str(k): v for k, v in ranks.items()},
        "alphas": {f"{k:g}": v for k, v in alphas.items()}, "parts": dict(parts), "components": dict(words),
        "dtypes": dict(Counter(str(t.dtype).replace("torch.", "") for t in lora.tensors.values())),
        "trigger_words": trigger_words(lora.metadata), "modules": per_module, "hints": expert_hints(path, lora.metadata),
        "metadata": {k: v for k, v in lora.metadata.items() if k.startswith(("ss_base", "ss_network", "modelspec."))},
    }
