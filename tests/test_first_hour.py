"""The first hour of a new user, row by row (issue "The first hour"): every command run as the user
ran it, every message saying what went wrong, every report in the family's words."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.io.safetensors import save_file
from tests.conftest import ZOO
from tests.helpers import REPR_MARKS, cli, lora_graph, one_line, sd15_models_folder

SD15 = ZOO / "base/sd15/sd15_tiny_single_file.safetensors"
KOHYA = ZOO / "kohya/sd15_kohya_lora.safetensors"
FLUX = ZOO / "base/flux/flux1_tiny_dev_bfl.safetensors"
FLUX_TE_LORA = ZOO / "kohya/flux_kohya_lora_te.safetensors"
SCALED = ZOO / "base/flux/flux1_tiny_dev_fp8_e4m3fn_scaled.safetensors"


def human(res) -> str:
    assert res.exit_code == 0, res.output
    assert not any(m in res.output for m in REPR_MARKS), res.output
    return res.output


@pytest.mark.parametrize("suffix, field", [(":1,0", "1,0"), (":abc", "abc"), (":nan", "nan"), (":inf", "inf"),
                                           (":", ""), (":1:2:3", None)])
def test_strength_typos(tmp_path: Path, suffix: str, field: str | None) -> None:
    lora = tmp_path / "lora.safetensors"
    shutil.copy(KOHYA, lora)
    res = cli("merge", SD15, f"{lora}{suffix}", "-o", tmp_path / "o.safetensors")
    if field is None:
        one_line(res, "too many strengths", code=2)
    else:
        one_line(res, f"invalid strength '{field}' in '{lora}{suffix}' (use 1.0, or MODEL:CLIP)", code=2)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_path_that_exists_wins(tmp_path: Path) -> None:
    odd = tmp_path / "lora.safetensors:0.5"
    shutil.copy(KOHYA, odd)
    res = cli("merge", SD15, odd, "-o", tmp_path / "o.safetensors", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["loras"][0]["model_strength"] == 1.0


def test_out_with_a_trailing_slash_is_a_folder(tmp_path: Path) -> None:
    res = cli("merge", SD15, KOHYA, "-o", f"{tmp_path / 'newdir'}/")
    assert res.exit_code == 0, res.output
    assert [p.name for p in (tmp_path / "newdir").iterdir()] == ["sd15_tiny_single_file_lorakit.safetensors"]
    res = cli("merge", SD15, KOHYA, "-o", f"{tmp_path / 'no' / 'such'}/")
    one_line(res, "does not exist")
    assert not (tmp_path / "no").exists()
    one_line(cli("merge", SD15, KOHYA, "-o", tmp_path / "baked"), "writes .safetensors / .sft files")
    assert not (tmp_path / "baked").exists()


def test_a_failed_merge_removes_the_folder_it_made(tmp_path: Path) -> None:
    res = cli("merge", SD15, ZOO / "kohya/flux_kohya_lora_te_garbage.safetensors", "-o", f"{tmp_path / 'made'}/")
    assert res.exit_code != 0 and not (tmp_path / "made").exists()


def test_workflow_out_folder_is_made(tmp_path: Path) -> None:
    models = sd15_models_folder(tmp_path / "models")
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(lora_graph("lora.safetensors", 1.0)))
    res = cli("merge", "--workflow", wf, "--models-dir", models, "-o", f"{tmp_path / 'baked'}/")
    assert res.exit_code == 0, res.output
    assert [p.name for p in (tmp_path / "baked").iterdir()] == ["base_lorakit.safetensors"]


def test_sample_on_a_tiny_text_encoder_says_why(tmp_path: Path) -> None:
    tokenizers = ZOO.parent / "tokenizers"
    res = cli("sample", SD15, "--prompt", "a castle", "--steps", "1", "--width", "64", "--tokenizers", tokenizers,
              "-o", tmp_path / "x.png")
    one_line(res, "token embeddings", "tokenizer needs 49408")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, needle", [(["--steps", "0"], "--steps"), (["--cfg", "nan"], "--cfg"),
                                          (["--width", "100"], "--width")])
def test_sample_bad_numbers(tmp_path: Path, args: list[str], needle: str) -> None:
    one_line(cli("sample", SD15, "--prompt", "x", *args, "-o", tmp_path / "x.png"), needle)


@pytest.mark.parametrize("merged, needle", [(FLUX, "--merged is Flux.1, but BASE"), (KOHYA, "--merged is a LoRA")])
def test_check_against_the_wrong_file(merged: Path, needle: str) -> None:
    one_line(cli("check", SD15, KOHYA, "--merged", merged), needle)


def test_a_signal_during_an_import_lands_after_it(tmp_path: Path, monkeypatch) -> None:
    """torch aborts when Ctrl-C lands inside its C++ initialisation: a signal during an import is
    sent again until it lands outside one."""
    from lorakit.interrupts import outside_imports

    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, outside_imports(got.append))
    try:
        (tmp_path / "slow_module.py").write_text(
            "import os, signal, time\nos.kill(os.getpid(), signal.SIGUSR1)\nfor _ in range(20):\n"
            "    time.sleep(0.01)\nSEEN = list(RECORD)\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        import builtins
        monkeypatch.setattr(builtins, "RECORD", got, raising=False)
        import slow_module  # noqa: F401  (its body runs 0.2 s with the signal pending)
        assert slow_module.SEEN == []  # nothing fired inside the import
        deadline = time.monotonic() + 2
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        sys.modules.pop("slow_module", None)


@pytest.mark.parametrize("delay", [0.15, 0.35, 0.7])
def test_ctrl_c_at_any_moment_of_the_start(tmp_path: Path, delay: float) -> None:
    """SIGINT while the command line and torch are still importing, or once the merge runs."""
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "merge", str(SD15), str(KOHYA), "-o",
                             str(tmp_path / "o.safetensors")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # the merge finished before the signal: nothing to check
        return
    assert proc.returncode == 130, err
    assert err.strip() == "lorakit: error: interrupted; nothing was written", err
    assert [p for p in tmp_path.iterdir() if p.name != "o.safetensors"] == []


@pytest.mark.parametrize("content, needle", [
    (b"\x80\x02}q\x00(X\x05\x00\x00\x00state", "Python pickle"),
    (b"PK\x03\x04" + b"\0" * 64, "zip archive"),
    (json.dumps({"nodes": [], "links": []}).encode(), "this is JSON, not safetensors (a ComfyUI workflow? use --workflow)"),
])
def test_a_non_safetensors_lora_is_named(tmp_path: Path, content: bytes, needle: str) -> None:
    lora = tmp_path / "thing.ckpt"
    lora.write_bytes(content)
    one_line(cli("merge", SD15, lora, "-o", tmp_path / "o.safetensors"), str(lora), needle)


def test_base_and_lora_swapped(tmp_path: Path) -> None:
    one_line(cli("merge", KOHYA, SD15, "-o", tmp_path / "o.safetensors"), "is a LoRA, not a checkpoint",
             "swapped")
    one_line(cli("merge", SD15, SD15, "-o", tmp_path / "o.safetensors"), "is a checkpoint (SD1.5), not a LoRA")


def test_dry_run_exits_as_the_real_run_would(tmp_path: Path) -> None:
    garbage = ZOO / "kohya/flux_kohya_lora_te_garbage.safetensors"
    res = cli("merge", FLUX, garbage, "--dry-run")
    assert res.exit_code == 1 and "a real run would fail" in res.output
    res = cli("merge", FLUX, garbage, "--dry-run", "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["would_fail"] is True
    assert cli("merge", FLUX, garbage, "--dry-run", "--allow-unmatched").exit_code == 0
    res = cli("merge", SD15, ZOO / "kohya/sdxl_kohya_lora.safetensors", "--dry-run", "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc["error"]["type"] == "ArchitectureMismatch" and "SDXL" in doc["error"]["message"]


def test_json_errors_are_json(tmp_path: Path) -> None:
    res = cli("merge", SD15, tmp_path / "missing.safetensors", "-o", tmp_path / "o.safetensors", "--json")
    assert res.exit_code == 1 and "not found" in json.loads(res.stdout)["error"]["message"]
    res = cli("inspect", tmp_path / "missing.safetensors", "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["error"]["type"] == "FileFormatError"


def test_one_definition_of_saturated(tmp_path: Path) -> None:
    """merge's warning and check's note count the same elements of a scaled-fp8 merge."""
    lora = f"{ZOO / 'flux/flux_bfl_noprefix.safetensors'}:4.0"
    out = tmp_path / "o.safetensors"
    res = cli("merge", SCALED, lora, "-o", out, "--json", "--rounding", "nearest")
    assert res.exit_code == 0, res.output
    merged = json.loads(res.stdout)["fp8_saturated"]
    res = cli("check", SCALED, lora, "--merged", out, "--json", "--no-model", "--rounding", "nearest")
    checked = json.loads(res.stdout)["fp8_saturated"]
    assert merged and merged == checked


def test_reports_in_the_familys_words(tmp_path: Path) -> None:
    text = human(cli("merge", SD15, f"{KOHYA}:0.8:0.5", "-o", tmp_path / "o.safetensors"))
    assert "SD1.5 (U-Net, CLIP-L text encoder, VAE)" in text
    assert "0.8 (model) / 0.5 (text encoders)" in text
    assert "rounding" not in text  # fp16: there is no rounding choice to report
    text = human(cli("merge", FLUX, f"{FLUX_TE_LORA}:0.8", "--model-only", "-o", tmp_path / "f.safetensors"))
    assert "0.8 (model only)" in text and "text encoders" not in text
    assert "Flux.1 (transformer)" in text
    assert "skipped" in text and "CLIP-L text encoder" in text and "T5-XXL text encoder" in text
    text = human(cli("merge", ZOO / "base/flux/flux1_tiny_dev_fp8_e4m3fn.safetensors", FLUX_TE_LORA, "--model-only",
                     "-o", tmp_path / "g.safetensors"))
    assert "fp8 rounding stochastic (seed 0)" in text


def test_inspect_reads_like_a_page(tmp_path: Path) -> None:
    text = human(cli("inspect", SD15))
    assert "SD1.5 (keys under model.diffusion_model.)" in text and "VAE (" in text
    text = human(cli("inspect", FLUX_TE_LORA))
    assert "CLIP-L text encoder (12 modules)" in text and "T5-XXL text encoder (14 modules)" in text
    assert "4 (52 modules)" in text
    peft = human(cli("inspect", ZOO / "diffusers/sd15_peft_lora_with_metadata_subset.safetensors"))
    alphas = next(line for line in peft.splitlines() if line.strip().startswith("alphas"))
    assert "-" not in alphas.split()[1:], alphas  # the alphas from lora_adapter_metadata
    assert cli("merge", SD15, f"{KOHYA}:0.8:0.5", "-o", tmp_path / "m.safetensors").exit_code == 0
    text = human(cli("inspect", tmp_path / "m.safetensors"))
    assert "baked in" in text and "sd15_kohya_lora.safetensors at 0.8 / 0.5" in text


@pytest.mark.parametrize("command, out, needle", [("merge", "out.ckpt", ".safetensors"), ("sample", "castle.jpg", ".png")])
def test_out_suffix_says_what_is_written(tmp_path: Path, command: str, out: str, needle: str) -> None:
    args = [SD15, KOHYA] if command == "merge" else [SD15, "--prompt", "x"]
    one_line(cli(command, *args, "-o", tmp_path / out), needle)


def test_check_shows_progress_when_asked() -> None:
    res = cli("check", SD15, KOHYA, "--no-model", "--progress")
    assert res.exit_code == 0 and "checking" in res.output


def test_overflow_names_a_tensor_and_leaves_nothing(tmp_path: Path) -> None:
    t = load_file(str(KOHYA))
    t = {k: (torch.tensor(1e9) if k.endswith(".alpha") else v) for k, v in t.items()}  # alpha/rank 2.5e8: fp16 overflows
    big = tmp_path / "big.safetensors"
    save_file(t, big)
    one_line(cli("merge", SD15, big, "-o", tmp_path / "o.safetensors"), "inf / NaN values into")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.safetensors"]
    assert os.path.getsize(big) > 0 and torch.equal(load_file(str(big))[next(iter(t))], next(iter(t.values())))
