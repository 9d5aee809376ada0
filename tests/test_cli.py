"""The command line as a user runs it: the installed entry point, the demo, inspect, LORA:M:C parsing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lorakit.cli import main
from lorakit.inspect import trigger_words
from lorakit.planner import parse_lora_arg
from tests.conftest import ZOO


def test_demo_runs_from_a_fresh_process() -> None:
    res = subprocess.run([sys.executable, "-m", "lorakit", "demo"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "PASS" in res.stdout and "pixel_art" in res.stdout


@pytest.mark.parametrize("arg, expect", [
    ("a.safetensors", ("a.safetensors", 1.0, None)),
    ("a.safetensors:0.7", ("a.safetensors", 0.7, None)),
    ("a.safetensors:0.7:0.3", ("a.safetensors", 0.7, 0.3)),
    ("C:\\loras\\x.safetensors:-0.5:1", ("C:\\loras\\x.safetensors", -0.5, 1.0)),
    ("dir:with:colons/x.safetensors", ("dir:with:colons/x.safetensors", 1.0, None)),
])
def test_parse_lora_arg(arg: str, expect: tuple) -> None:
    s = parse_lora_arg(arg)
    assert (s.path, s.model_strength, s.clip_strength) == expect


def test_inspect_lora_and_checkpoint() -> None:
    res = CliRunner().invoke(main, ["inspect", str(ZOO / "kohya/flux_kohya_lora_te.safetensors"), "--json"])
    info = json.loads(res.stdout)
    assert info["kind"] == "lora" and info["arch"] == "flux" and info["format"] == "kohya"
    assert info["parts"] == {"te1": 12, "te3": 14, "unet": 26} and info["ranks"] == {"4": 52}
    assert set(info["modules"].values()) == {"lora"}
    res = CliRunner().invoke(main, ["inspect", str(ZOO / "lycoris/sd15_lycoris_loha_subset.safetensors"), "--json"])
    assert set(json.loads(res.stdout)["algorithms"]) == {"loha"}
    res = CliRunner().invoke(main, ["inspect", str(ZOO / "base/flux/flux1_tiny_dev_fp8_e4m3fn_scaled.safetensors")])
    assert res.exit_code == 0 and "Flux.1" in res.output and "scaled fp8" in res.output


def test_trigger_words_from_metadata() -> None:
    meta = {"ss_tag_frequency": json.dumps({"10_pixel_art": {"pixel_art": 9, "retro": 3}, "5_x": {"retro": 1}}),
            "ss_dataset_dirs": json.dumps({"10_pixel_art": {"n_repeats": 10}}),
            "modelspec.trigger_phrase": "pixel_art style", "ss_output_name": "px"}
    tw = trigger_words(meta)
    assert tw == {"trigger_phrase": "pixel_art style", "top_tags": ["pixel_art", "retro"],
                  "dataset_folders": ["pixel_art"], "output_name": "px"}


def test_bad_invocations_exit_non_zero() -> None:
    assert CliRunner().invoke(main, ["merge", str(ZOO / "base/sd15/sd15_tiny_single_file.safetensors")]).exit_code != 0
    res = CliRunner().invoke(main, ["merge", "x.safetensors", "y.safetensors"])
    assert res.exit_code == 2 and "-o" in res.output
