"""lorakit check: passes on correct merges of the zoo, fails on broken ones (a dropped layer, a wrong
alpha, the wrong qkv slice, an untouched tensor changed, NaN), reports sub-resolution LoRAs apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers import cli

GOOD = {
    "sd15_kohya": ("base/sd15/sd15_tiny_single_file.safetensors", "kohya/sd15_kohya_lora.safetensors:0.7:0.3"),
    "sdxl_kohya": ("base/sdxl/sdxl_tiny_single_file.safetensors", "kohya/sdxl_kohya_lora_subset.safetensors:1.0"),
    "sd15_loha": ("base/sd15/sd15_tiny_single_file.safetensors", "lycoris/sd15_lycoris_loha_subset.safetensors:0.8:0.5"),
    "flux_aitoolkit": ("base/flux/flux1_tiny_dev_bfl.safetensors", "flux/flux_aitoolkit_lora.safetensors:0.7"),
    "flux_scaled_fp8_bfl": ("base/flux/flux1_tiny_dev_fp8_e4m3fn_scaled.safetensors",
                            "flux/flux_bfl_noprefix.safetensors:1.0"),
}


def merge(zoo: Path, base: str, lora: str, out: Path, *extra: str) -> None:
    res = cli("merge", str(zoo / base), f"{zoo}/{lora}", "-o", str(out), *extra)
    assert res.exit_code == 0, res.output


def run_check(zoo: Path, base: str, lora: str, merged: Path | None = None) -> tuple[int, dict]:
    args = ["check", str(zoo / base), f"{zoo}/{lora}", "--json"] + (["--merged", str(merged)] if merged else [])
    res = cli(*args)
    return res.exit_code, json.loads(res.output)


def rewrite(src: Path, dst: Path, change) -> None:
    """Copy a merged file with ``change(tensors)`` applied (a broken merge made on purpose)."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    tensors = load_file(src)
    change(tensors)
    save_file(tensors, dst, meta)


@pytest.mark.parametrize("base, lora", list(GOOD.values()), ids=list(GOOD))
def test_correct_merges_pass(zoo: Path, tmp_path: Path, base: str, lora: str) -> None:
    out = tmp_path / "merged.safetensors"
    merge(zoo, base, lora, out)
    code, rep = run_check(zoo, base, lora, out)
    assert code == 0 and rep["result"] == "PASS", rep["problems"]
    assert rep["counts"]["FAIL"] == 0 and rep["counts"]["ok"] > 0
    model = rep["model"]
    if "fp8" in base:  # fp8 rounding noise can hide a rank-4 LoRA's effect on the output: said, not failed
        assert model["status"] in ("ok", "below-resolution")
    else:
        assert model["status"] == "ok" and model["lora_effect"] > 3 * model["floor"]


def test_in_memory_check_passes(zoo: Path) -> None:
    code, rep = run_check(zoo, *GOOD["sd15_kohya"])
    assert code == 0 and rep["merged"] is None and rep["model"]["status"] == "ok"


def test_dropped_layer_fails(zoo: Path, tmp_path: Path) -> None:
    base, lora = GOOD["sd15_kohya"]
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    merge(zoo, base, lora, good)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    original = load_file(zoo / base)[key]
    rewrite(good, bad, lambda t: t.__setitem__(key, original.clone()))
    code, rep = run_check(zoo, base, lora, bad)
    assert code == 1 and rep["result"] == "FAIL"
    failed = {t["key"]: t for t in rep["tensors"] if t["status"] == "FAIL"}
    assert list(failed) == [key] and failed[key]["reason"] == "no change stored"
    assert rep["model"]["status"] == "FAIL"


def test_wrong_alpha_fails(zoo: Path, tmp_path: Path) -> None:
    """A merge that used twice the alpha (a tool ignoring the .alpha keys does this for alpha = r/2)."""
    base, lora = GOOD["sd15_kohya"]
    path = lora.split(":")[0]
    factors = load_file(zoo / path)
    with safe_open(str(zoo / path), "pt") as f:
        meta = f.metadata()
    doubled = {k: (v * 2 if k.endswith(".alpha") else v) for k, v in factors.items()}
    wrong_lora = tmp_path / "wrong_alpha.safetensors"
    save_file(doubled, wrong_lora, meta)
    bad = tmp_path / "bad.safetensors"
    res = cli("merge", str(zoo / base), f"{wrong_lora}:0.7:0.3", "-o", str(bad))
    assert res.exit_code == 0, res.output
    code, rep = run_check(zoo, base, lora, bad)
    assert code == 1
    assert rep["counts"]["FAIL"] == rep["counts"]["ok"] + rep["counts"]["FAIL"] > 100
    assert all("2x the reference size" in t["reason"] for t in rep["tensors"] if t["status"] == "FAIL")
    assert rep["model"]["status"] == "FAIL"


def test_wrong_qkv_slice_fails(zoo: Path, tmp_path: Path) -> None:
    """The q LoRA landed on the k rows and vice versa in one fused qkv."""
    base, lora = GOOD["flux_aitoolkit"]
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    merge(zoo, base, lora, good)
    key = "double_blocks.0.img_attn.qkv.weight"
    w0 = load_file(zoo / base)[key]

    def swap(t: dict) -> None:
        h = w0.shape[0] // 3
        delta = t[key].float() - w0.float()
        delta[:h], delta[h:2 * h] = delta[h:2 * h].clone(), delta[:h].clone()
        t[key] = (w0.float() + delta).to(w0.dtype)

    rewrite(good, bad, swap)
    code, rep = run_check(zoo, base, lora, bad)
    assert code == 1
    assert [t["key"] for t in rep["tensors"] if t["status"] == "FAIL"] == [key]
    assert rep["model"]["status"] == "FAIL"


def test_untouched_change_and_nan_fail(zoo: Path, tmp_path: Path) -> None:
    base, lora = GOOD["flux_aitoolkit"]
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    merge(zoo, base, lora, good)
    touched = [t["key"] for t in run_check(zoo, base, lora, good)[1]["tensors"]]
    untouched = next(k for k in load_file(good) if k not in touched and k.endswith(".weight"))

    def damage(t: dict) -> None:
        t[untouched] = t[untouched] * 1.05  # a visible change in bf16
        t[touched[0]][0, 0] = float("nan")

    rewrite(good, bad, damage)
    code, rep = run_check(zoo, base, lora, bad)
    assert code == 1
    assert rep["untouched_changed"] == [untouched]
    assert rep["nonfinite"] == {touched[0]: 1}


def test_fp8_saturation_is_named(zoo: Path) -> None:
    """Scaled fp8 already spans +-448: a strong LoRA clips, and check says so."""
    base, lora = "base/flux/flux1_tiny_dev_fp8_e4m3fn_scaled.safetensors", "flux/flux_bfl_noprefix.safetensors:4.0"
    code, rep = run_check(zoo, base, lora)
    assert code == 1 and rep["fp8_saturated"]
    assert all("clipped at the fp8 limit" in t["reason"] for t in rep["tensors"] if t["status"] == "FAIL")


def test_below_resolution_is_inconclusive_not_failed(zoo: Path, tmp_path: Path) -> None:
    """A weak LoRA merged into fp8 with round-to-nearest vanishes: nothing failed, but nothing can
    be confirmed either: INCONCLUSIVE, with its own exit status (3), not PASS."""
    base, lora = "base/flux/flux1_tiny_dev_fp8_e4m3fn.safetensors", "flux/flux_aitoolkit_lora.safetensors:0.05"
    out = tmp_path / "merged.safetensors"
    merge(zoo, base, lora, out, "--rounding", "nearest")
    res = cli("check", str(zoo / base), f"{zoo}/{lora}", "--merged", str(out), "--rounding", "nearest")
    assert res.exit_code == 3, res.output
    assert "below dtype resolution" in res.output and "INCONCLUSIVE" in res.output
    assert " 0 ok" in res.output and " 0 FAIL" in res.output
    assert torch.cuda.is_available() or "model (Flux, fp32)" in res.output
