"""Bad input: one-line error naming file/key/reason, non-zero exit, nothing written, BASE untouched."""

from __future__ import annotations

import errno
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit.merge
from lorakit.io.safetensors import save_file
from tests.conftest import ZOO
from tests.helpers import cli

SD15 = ZOO / "base/sd15/sd15_tiny_single_file.safetensors"
KOHYA = ZOO / "kohya/sd15_kohya_lora.safetensors"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def assert_clean_failure(res, folder: Path, *needles: str) -> None:
    assert res.exit_code != 0
    line = res.output.strip()
    assert line.startswith("lorakit: error:") and "\n" not in line and "Traceback" not in line, line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert [p.name for p in folder.iterdir() if p.suffix != ".keep"] == []


def _lora_from_kohya(tmp: Path, name: str, edit) -> Path:
    t = load_file(str(KOHYA))
    edit(t)
    p = tmp / name
    save_file(t, p)
    return p


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_missing_lora_file(outdir: Path) -> None:
    res = cli("merge", SD15, outdir / "nope.safetensors", "-o", outdir / "o.safetensors")
    assert_clean_failure(res, outdir, "nope.safetensors", "not found")


def test_missing_base(outdir: Path) -> None:
    res = cli("merge", outdir / "base.safetensors", KOHYA, "-o", outdir / "o.safetensors")
    assert_clean_failure(res, outdir, "base.safetensors")


def test_arch_mismatch_names_both(outdir: Path) -> None:
    res = cli("merge", SD15, ZOO / "kohya/sdxl_kohya_lora.safetensors", "-o", outdir / "o.safetensors")
    assert_clean_failure(res, outdir, "SDXL", "SD1.5")
    flux = ZOO / "base/flux/flux1_tiny_dev_bfl.safetensors"
    res = cli("merge", flux, KOHYA, "-o", outdir / "o.safetensors")
    assert_clean_failure(res, outdir, "SD1.5", "Flux.1")


def test_shape_mismatch_is_unmatched(tmp_path: Path, outdir: Path) -> None:
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"

    def edit(t):
        t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1], dtype=t[key].dtype)
    lora = _lora_from_kohya(tmp_path, "wrong_shape.safetensors", edit)
    res = cli("merge", SD15, lora, "-o", outdir / "o.safetensors")
    assert_clean_failure(res, outdir, "wrong_shape.safetensors", "attn1_to_q", "shape mismatch")
    ok = cli("merge", SD15, lora, "-o", outdir / "o.safetensors", "--allow-unmatched", "--json")
    assert ok.exit_code == 0
    assert (outdir / "o.safetensors").is_file()


def test_nonfinite_refused_unless_allowed(tmp_path: Path, outdir: Path) -> None:
    key = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"

    def edit(t):
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")
    lora = _lora_from_kohya(tmp_path, "nan.safetensors", edit)
    res = cli("merge", SD15, lora, "-o", outdir / "o.safetensors")
    assert_clean_failure(res, outdir, "nan.safetensors", key, "--allow-nonfinite")
    assert cli("merge", SD15, lora, "-o", outdir / "o.safetensors", "--allow-nonfinite").exit_code == 0


def test_existing_out_and_out_is_base(tmp_path: Path, outdir: Path) -> None:
    out = outdir / "o.safetensors"
    out.write_bytes(b"precious")
    res = cli("merge", SD15, KOHYA, "-o", out)
    assert res.exit_code != 0 and "--force" in res.output and out.read_bytes() == b"precious"
    assert cli("merge", SD15, KOHYA, "-o", out, "--force").exit_code == 0
    base = tmp_path / "base.safetensors"
    shutil.copy(SD15, base)
    before = sha(base)
    res = cli("merge", base, KOHYA, "-o", base)
    assert res.exit_code != 0 and "--in-place" in res.output and sha(base) == before
    assert cli("merge", base, KOHYA, "-o", base, "--in-place").exit_code == 0
    assert sha(base) != before
    merged, reference = load_file(str(base)), load_file(str(out))
    assert all(torch.equal(merged[k], reference[k]) for k in reference)


def test_output_folder_problems(tmp_path: Path) -> None:
    res = cli("merge", SD15, KOHYA, "-o", tmp_path / "no" / "such" / "o.safetensors")
    assert res.exit_code != 0 and "does not exist" in res.output
    f = tmp_path / "file"
    f.write_text("x")
    res = cli("merge", SD15, KOHYA, "-o", f / "o.safetensors")
    assert res.exit_code != 0 and "lorakit: error:" in res.output


def test_disk_full_removes_temp(monkeypatch, outdir: Path) -> None:
    before = sha(SD15)
    calls = {"n": 0}
    real = lorakit.merge.os.pwrite

    def full(fd, data, offset):  # the disk fills up in the middle of the first write
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data[: max(1, len(data) // 2)], offset)
    monkeypatch.setattr(lorakit.merge.os, "pwrite", full)
    res = cli("merge", SD15, KOHYA, "-o", outdir / "o.safetensors")
    assert_clean_failure(res, outdir, "disk full")
    assert sha(SD15) == before


def test_ctrl_c_leaves_nothing(monkeypatch, outdir: Path) -> None:
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(lorakit.merge, "_patch_raw", interrupt)
    res = cli("merge", SD15, KOHYA, "-o", outdir / "o.safetensors")
    assert res.exit_code == 130 and "interrupted" in res.output
    assert list(outdir.iterdir()) == []


def test_strict_message_names_keys_and_nearest(outdir: Path) -> None:
    base = ZOO / "base/flux/flux1_tiny_dev_bfl.safetensors"
    res = cli("merge", base, ZOO / "kohya/flux_kohya_lora_te_garbage.safetensors", "-o", outdir / "o.safetensors")
    assert_clean_failure(res, outdir, "lora_unet_double_blocks_1_img_attn_prj", "3 key(s)",
                         "nearest: lora_unet_double_blocks_1_img_attn_proj -> double_blocks.1.img_attn.proj.weight")


def test_model_only_on_text_encoder_base_says_so(outdir: Path) -> None:
    res = cli("merge", ZOO / "base/flux/clip_l_tiny.safetensors", ZOO / "kohya/flux_kohya_lora_te.safetensors",
              "-o", outdir / "o.safetensors", "--model-only")
    assert res.exit_code == 0 and "--model-only on a text-encoder BASE" in res.output
    a, b = load_file(str(outdir / "o.safetensors")), load_file(str(ZOO / "base/flux/clip_l_tiny.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_kohya_split_qkv_uses_per_part_rank(tmp_path: Path, outdir: Path) -> None:
    """A split_qkv file (q/k/v of rank r fused: down = cat, up block-diagonal) merges exactly like
    the same q/k/v LoRAs given separately (diffusers names)."""
    base = ZOO / "base/flux/flux1_tiny_dev_bfl.safetensors"
    g = torch.Generator().manual_seed(0)
    h, r, alpha = 64, 2, 3.0
    downs = [torch.randn(r, h, generator=g) for _ in range(3)]
    ups = [torch.randn(h, r, generator=g) for _ in range(3)]
    fused_up = torch.zeros(3 * h, 3 * r)
    for i in range(3):
        fused_up[i * h:(i + 1) * h, i * r:(i + 1) * r] = ups[i]
    split = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.cat(downs),
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": fused_up,
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(alpha)}
    separate = {}
    for i, n in enumerate(("to_q", "to_k", "to_v")):
        separate[f"lora_transformer_transformer_blocks_0_attn_{n}.lora_down.weight"] = downs[i]
        separate[f"lora_transformer_transformer_blocks_0_attn_{n}.lora_up.weight"] = ups[i]
        separate[f"lora_transformer_transformer_blocks_0_attn_{n}.alpha"] = torch.tensor(alpha)
    save_file(split, tmp_path / "split.safetensors")
    save_file(separate, tmp_path / "separate.safetensors")
    res = cli("merge", base, tmp_path / "split.safetensors", "-o", outdir / "a.safetensors")
    assert res.exit_code == 0 and "split_qkv" in res.output
    assert cli("merge", base, tmp_path / "separate.safetensors", "-o", outdir / "b.safetensors").exit_code == 0
    a, b = load_file(str(outdir / "a.safetensors")), load_file(str(outdir / "b.safetensors"))
    key = "double_blocks.0.img_attn.qkv.weight"
    diff = (a[key].float() - b[key].float()).abs().max()
    assert float(diff) <= float(a[key].float().abs().max()) * 2 ** -7  # same result within 1 bf16 ulp
    assert not torch.equal(a[key], load_file(str(base))[key])


def test_flux_lora_for_another_hidden_size(tmp_path: Path, outdir: Path) -> None:
    base = ZOO / "base/flux/flux1_tiny_dev_bfl.safetensors"
    lora = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(4, 3072),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(3072, 4)}
    save_file(lora, tmp_path / "big.safetensors", {"ss_base_model_version": "flux1"})
    res = cli("merge", base, tmp_path / "big.safetensors", "-o", outdir / "o.safetensors")
    assert_clean_failure(res, outdir, "shape mismatch", "another size", "double_blocks.0.img_attn.proj.weight")


def test_fp8_saturation_is_counted(tmp_path: Path, outdir: Path) -> None:
    base = ZOO / "base/flux/flux1_tiny_dev_fp8_e4m3fn.safetensors"
    lora = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.full((1, 64), 30.0),
            "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.full((64, 1), 30.0)}
    save_file(lora, tmp_path / "huge.safetensors")
    res = cli("merge", base, tmp_path / "huge.safetensors", "-o", outdir / "o.safetensors", "--rounding", "nearest")
    assert res.exit_code == 0 and "saturated" in res.output
    out = load_file(str(outdir / "o.safetensors"))["double_blocks.0.img_attn.proj.weight"].float()
    assert float(out.max()) == 448.0


def test_out_gets_normal_permissions(outdir: Path) -> None:
    assert cli("merge", SD15, KOHYA, "-o", outdir / "o.safetensors").exit_code == 0
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert (outdir / "o.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message; this machine has a GPU")
def test_device_cuda_without_gpu_fails_cleanly(outdir: Path) -> None:
    res = cli("merge", SD15, KOHYA, "-o", outdir / "o.safetensors", "--device", "cuda")
    assert_clean_failure(res, outdir, "--device cuda", "no CUDA device")
