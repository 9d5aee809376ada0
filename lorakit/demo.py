"""``lorakit demo``: a self-contained job that needs no files from the user.

Builds a small checkpoint with the real SD1.5 single-file key layout (U-Net, CLIP-L), a kohya
LoRA for it (attention + text encoder, alpha 8, rank 4, trigger word in its metadata), merges
it at strength 0.8 / 0.5, inspects both files, checks one layer against an fp64 reference and runs
``lorakit check`` on the result (tensor level: the demo's U-Net is partial, so no model-level run).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import torch

from .check import check
from .inspect import describe
from .render import inspect_text
from .io.safetensors import save_file
from .merge import merge_file
from .planner import LoraSpec

CHANNELS = (32, 64, 96, 96)
ATTN_LEVELS = (0, 1, 2)
CONTEXT = 32
TE_LAYERS = 2
ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


def _attn_shapes(c: int) -> dict[str, tuple[int, ...]]:
    s = {"norm": (c,), "proj_in": (c, c, 1, 1), "proj_out": (c, c, 1, 1)}
    for a in ATTN:
        s[f"transformer_blocks.0.{a}"] = (c, CONTEXT) if a.startswith("attn2.to_") and a[-1] in "kv" else (c, c)
    s["transformer_blocks.0.ff.net.0.proj"] = (8 * c, c)
    s["transformer_blocks.0.ff.net.2"] = (c, 4 * c)
    return s


def sd15_layout() -> dict[str, tuple[int, ...]]:
    """key -> shape of a small SD1.5 single-file checkpoint (real names, small widths)."""
    u = "model.diffusion_model."
    shapes: dict[str, tuple[int, ...]] = {u + "input_blocks.0.0.weight": (CHANNELS[0], 4, 3, 3)}
    k, prev = 1, CHANNELS[0]
    for level, c in enumerate(CHANNELS):
        for _ in range(2):
            shapes[f"{u}input_blocks.{k}.0.in_layers.2.weight"] = (c, prev, 3, 3)
            shapes[f"{u}input_blocks.{k}.0.out_layers.3.weight"] = (c, c, 3, 3)
            if level in ATTN_LEVELS:
                for name, shape in _attn_shapes(c).items():
                    shapes[f"{u}input_blocks.{k}.1.{name}.weight"] = shape
            prev, k = c, k + 1
        if level < len(CHANNELS) - 1:
            shapes[f"{u}input_blocks.{k}.0.op.weight"] = (c, c, 3, 3)
            k += 1
    for name, shape in _attn_shapes(CHANNELS[-1]).items():
        shapes[f"{u}middle_block.1.{name}.weight"] = shape
    t = "cond_stage_model.transformer.text_model."
    for i in range(TE_LAYERS):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            shapes[f"{t}encoder.layers.{i}.{m}.weight"] = (CONTEXT, CONTEXT)
        shapes[f"{t}encoder.layers.{i}.mlp.fc1.weight"] = (2 * CONTEXT, CONTEXT)
        shapes[f"{t}encoder.layers.{i}.mlp.fc2.weight"] = (CONTEXT, 2 * CONTEXT)
    shapes[t + "embeddings.token_embedding.weight"] = (1000, CONTEXT)
    return shapes


def build_files(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(seed)
    base = {k: (torch.randn(s, generator=g) * 0.05).half() for k, s in sd15_layout().items()}
    lora: dict[str, torch.Tensor] = {}
    for key, w in base.items():
        if key.startswith("model.diffusion_model.") and ".transformer_blocks.0.attn" in key:
            name = "lora_unet_" + key[len("model.diffusion_model."): -len(".weight")].replace(".", "_")
        elif ".encoder.layers." in key:
            name = "lora_te_" + key[len("cond_stage_model.transformer."): -len(".weight")].replace(".", "_")
        else:
            continue
        lora[name + ".lora_down.weight"] = (torch.randn(4, w.shape[1], generator=g) * 0.1).half()
        lora[name + ".lora_up.weight"] = (torch.randn(w.shape[0], 4, generator=g) * 0.1).half()
        lora[name + ".alpha"] = torch.tensor(8.0, dtype=torch.float16)
    meta = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora", "ss_network_dim": "4",
            "ss_network_alpha": "8", "ss_output_name": "demo_pixel_art",
            "ss_tag_frequency": json.dumps({"10_pixel_art": {"pixel_art": 20, "retro": 7, "sprite": 5}})}
    base_path, lora_path = folder / "demo_sd15_base.safetensors", folder / "demo_pixel_art_lora.safetensors"
    save_file(base, base_path, {"format": "pt"})
    save_file(lora, lora_path, meta)
    return base_path, lora_path


def run_demo(keep: str | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="lorakit-demo-") as tmp:
        folder = Path(keep) if keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        base_path, lora_path = build_files(folder)
        out = folder / "demo_sd15_merged.safetensors"
        click.echo(f"1. built {base_path.name} (SD1.5 single-file layout) and {lora_path.name} (kohya LoRA) in {folder}")
        click.echo("2. lorakit inspect " + lora_path.name)
        click.echo(inspect_text(describe(str(lora_path))))
        click.echo(f"3. lorakit merge {base_path.name} {lora_path.name}:0.8:0.5 -o {out.name} --force")
        report = merge_file(base_path, [LoraSpec(str(lora_path), 0.8, 0.5)], out, force=True, progress=False)
        r = report.loras[0]
        click.echo(f"   applied {len(r.matched)} modules ({r.counts['matched']} keys), "
                   f"{report.tensors_changed} tensors changed, {report.seconds:.2f} s")
        click.echo("4. check one layer against an fp64 reference")
        worst = _check(base_path, lora_path, out)
        click.echo(f"   max error {worst:.3f} ulp of fp16 (limit 1.0): {'PASS' if worst <= 1.0 else 'FAIL'}")
        click.echo(f"5. lorakit check {base_path.name} {lora_path.name}:0.8:0.5 --merged {out.name} --no-model")
        rep = check(base_path, [LoraSpec(str(lora_path), 0.8, 0.5)], merged=out, model_check=False).to_json()
        c = rep["counts"]
        click.echo(f"   every changed tensor vs its reference change: {c['ok']} ok, {c['FAIL']} FAIL; untouched tensors "
                   f"bit-identical: {'yes' if not rep['untouched_changed'] else 'no'} -> {rep['result']}")
        click.echo("6. lorakit inspect " + out.name)
        click.echo(inspect_text(describe(str(out))))
        return 0 if worst <= 1.0 and rep["result"] == "PASS" else 1


def _check(base_path: Path, lora_path: Path, out: Path) -> float:
    from safetensors.torch import load_file

    base, lora, merged = load_file(str(base_path)), load_file(str(lora_path)), load_file(str(out))
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    up, down = lora[name + ".lora_up.weight"].double(), lora[name + ".lora_down.weight"].double()
    ref = base[key].double() + 0.8 * (8.0 / 4) * (up @ down)
    _, e = torch.frexp(ref.abs())
    ulp = torch.pow(2.0, (torch.clamp(e - 1, min=-14) - 10).double())
    return float(((merged[key].double() - ref).abs() / ulp).max())
