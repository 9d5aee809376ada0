"""Hostile input, probe by probe: one line on stderr, a non-zero exit, nothing in OUT's folder, and
every input unchanged (sha256 and mtime) — and the library raises only LorakitError."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
import lorakit.merge
from lorakit.errors import LorakitError, UsageError
from lorakit.io.safetensors import SafetensorsFile, save_file
from lorakit.planner import LoraSpec, parse_lora_arg
from tests.conftest import ZOO
from tests.helpers import cli, lora_graph, sd15_models_folder

SD15 = ZOO / "base/sd15/sd15_tiny_single_file.safetensors"
KOHYA = ZOO / "kohya/sd15_kohya_lora.safetensors"
ALPHA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"


def state(*paths: Path) -> dict:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


def one_line_failure(res, folder: Path, *needles: str, code: int | None = None) -> str:
    assert res.exit_code != 0 and (code is None or res.exit_code == code), (res.exit_code, res.output)
    line = res.output.strip()
    assert line.startswith("lorakit: error:") and "\n" not in line and "Traceback" not in line, line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert not [p for p in folder.iterdir() if not p.name.startswith("input")], list(folder.iterdir())
    return line


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder holding copies of the inputs (named input*) where OUT is written."""
    shutil.copy(SD15, tmp_path / "input_base.safetensors")
    shutil.copy(KOHYA, tmp_path / "input_lora.safetensors")
    return tmp_path


def inputs(work: Path) -> tuple[Path, Path]:
    return work / "input_base.safetensors", work / "input_lora.safetensors"


# -- inputs are read-only, by identity ------------------------------------------------------------

def test_out_is_the_lora_refused_even_with_force(work: Path) -> None:
    base, lora = inputs(work)
    before = state(base, lora)
    res = cli("merge", base, lora, "-o", lora, "--force")
    one_line_failure(res, work, "OUT is the input", str(lora))
    assert state(base, lora) == before


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_out_linked_to_an_input_refused(work: Path, link: str) -> None:
    base, lora = inputs(work)
    before = state(base, lora)
    for target, needle in ((lora, "OUT is the input"), (base, "OUT is BASE")):
        out = work / "input_link.safetensors"
        (out.symlink_to if link == "symlink" else out.hardlink_to)(target)
        one_line_failure(cli("merge", base, lora, "-o", out, "--force"), work, needle)
        out.unlink()
    assert state(base, lora) == before


def test_in_place_is_for_base_only(work: Path) -> None:
    base, lora = inputs(work)
    lora_before = state(lora)
    one_line_failure(cli("merge", base, lora, "-o", lora, "--in-place"), work, "OUT is the input")
    assert cli("merge", base, lora, "-o", base, "--in-place").exit_code == 0
    assert state(lora) == lora_before
    assert not [p for p in work.iterdir() if p.name.endswith(".lorakit-tmp")]


def test_sample_never_overwrites_an_input(work: Path) -> None:
    base, lora = inputs(work)
    before = state(base, lora)
    res = cli("sample", base, "--prompt", "x", "-o", base, "--force")
    one_line_failure(res, work, "OUT is the input")
    assert state(base, lora) == before


# -- numbers are finite, everywhere -----------------------------------------------------------------

@pytest.mark.parametrize("arg", ["a.safetensors:nan", "a.safetensors:inf", "a.safetensors:1,0", "a.safetensors:abc",
                                 "a.safetensors:", "a.safetensors:1:2:3", "a.safetensors:1e300"])
def test_bad_strengths_on_the_command_line(arg: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_lora_arg(arg)
    assert arg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e300, True, None, [1.0], "0.5x"])
def test_bad_strengths_in_the_library(value: object) -> None:
    with pytest.raises(UsageError, match="strength"):
        LoraSpec("a.safetensors", value)  # type: ignore[arg-type]
    if value is not None:  # a CLIP strength of None means "the model strength"
        with pytest.raises(UsageError, match="strength"):
            LoraSpec("a.safetensors", 1.0, value)  # type: ignore[arg-type]


def test_numeric_strings_and_ints_are_numbers() -> None:
    assert LoraSpec("a.safetensors", "0.5", 2).model_strength == 0.5  # type: ignore[arg-type]


def test_cli_bad_strength_is_one_line(work: Path) -> None:
    base, lora = inputs(work)
    one_line_failure(cli("merge", base, f"{lora}:nan", "-o", work / "o.safetensors"), work, "invalid strength 'nan'",
                     code=2)


@pytest.fixture
def models(work: Path) -> Path:
    return sd15_models_folder(work / "input_models")


def _bake(work: Path, models: Path, graph: dict):
    wf = work / "input_wf.json"
    wf.write_text(json.dumps(graph))
    out = work / "baked"
    out.mkdir()
    return cli("merge", "--workflow", wf, "--models-dir", models, "-o", out), out


@pytest.mark.parametrize("strength", ["nan", "inf", None, [0.5], 1e300, True, "-Infinity"])
def test_workflow_strengths_must_be_finite(work: Path, models: Path, strength: object) -> None:
    before = state(*models.rglob("*.safetensors"))
    res, out = _bake(work, models, lora_graph("lora.safetensors", strength))
    one_line_failure(res, out, "node 10 (LoraLoader) strength_model")
    assert state(*models.rglob("*.safetensors")) == before


def test_workflow_numeric_string_strength_works(work: Path, models: Path) -> None:
    res, out = _bake(work, models, lora_graph("lora.safetensors", "0.5"))
    assert res.exit_code == 0, res.output
    assert len(list(out.iterdir())) == 1


@pytest.mark.parametrize("name, needle", [
    ("../../outside/evil.safetensors", "leaves the models folder"),
    ("..\\..\\outside\\evil.safetensors", "leaves the models folder"),
    ("/etc/passwd", "absolute path"),
    ("C:\\Windows\\evil.safetensors", "absolute path"),
    ("lora.safetensors\0.txt", "NUL"),
])
def test_workflow_names_stay_in_the_models_folder(work: Path, models: Path, name: str, needle: str) -> None:
    outside = work / "outside"
    outside.mkdir()
    shutil.copy(KOHYA, outside / "evil.safetensors")
    res, out = _bake(work, models, lora_graph(name, 1.0))
    one_line_failure(res, out, "node 10 (LoraLoader)", needle)


# -- signals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signals_remove_the_temporary_file(work: Path, monkeypatch, sig: int) -> None:
    """The signal arrives while a tensor is being patched (the temporary file is half written)."""
    base, lora = inputs(work)
    before = state(base, lora)
    real = lorakit.merge._patch_raw
    calls = {"n": 0}

    def patch_then_signal(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), sig)
        return real(*a, **k)
    monkeypatch.setattr(lorakit.merge, "_patch_raw", patch_then_signal)
    res = cli("merge", base, lora, "-o", work / "o.safetensors")
    one_line_failure(res, work, "nothing was written", code=128 + sig)
    assert state(base, lora) == before


# -- headers are validated before they are trusted ------------------------------------------------------

def _raw_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


HOSTILE_HEADERS = {
    "deep_nesting": b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nested_shape": json.dumps({"w": {"dtype": "F32", "shape": [[2], [2]], "data_offsets": [0, 16]}}).encode(),
    "nested_offsets": json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [[0], [8]]}}).encode(),
    "bool_shape": json.dumps({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}).encode(),
    "float_offsets": json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}).encode(),
    "huge_shape": json.dumps({"w": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 4]}}).encode(),
    "dtype_list": json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode(),
    "nested_metadata": json.dumps({"__metadata__": {"a": {"b": "c"}}}).encode(),
    "duplicate_key": b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                     b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
    "missing_field": json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode(),
    "negative_offset": json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}).encode(),
    "not_utf8": b'{"w\xff": 1}',
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_headers_as_lora_and_as_base(work: Path, case: str) -> None:
    bad = _raw_file(work / "input_bad.safetensors", HOSTILE_HEADERS[case], b"\0" * 16)
    base, lora = inputs(work)
    before = state(base, lora, bad)
    one_line_failure(cli("merge", base, bad, "-o", work / "o.safetensors"), work, str(bad))
    one_line_failure(cli("merge", bad, lora, "-o", work / "o.safetensors"), work, str(bad))
    one_line_failure(cli("inspect", bad), work, str(bad))
    with pytest.raises(LorakitError, match=str(bad)):
        lorakit.load_lora(bad)
    assert state(base, lora, bad) == before


@pytest.mark.parametrize("shape", [(), (2,)], ids=["no elements", "two elements"])
def test_alpha_must_be_one_number(work: Path, shape: tuple[int, ...]) -> None:
    t = load_file(str(KOHYA))
    t[ALPHA_KEY] = torch.ones(shape if shape else (0,))
    bad = work / "input_alpha.safetensors"
    save_file(t, bad)
    base, _ = inputs(work)
    before = state(base, bad)
    one_line_failure(cli("merge", base, bad, "-o", work / "o.safetensors"), work, ALPHA_KEY, "one number")
    sd = load_file(str(base))
    with pytest.raises(LorakitError, match="one number"):
        lorakit.patch(sd, [str(bad)])
    assert state(base, bad) == before


def test_factor_with_too_few_dimensions(work: Path) -> None:
    t = load_file(str(KOHYA))
    key = ALPHA_KEY.replace(".alpha", ".lora_up.weight")
    t[key] = t[key].reshape(-1)
    bad = work / "input_dims.safetensors"
    save_file(t, bad)
    base, _ = inputs(work)
    res = cli("inspect", bad, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["algorithms"]["invalid"] == 1
    one_line_failure(cli("merge", base, bad, "-o", work / "o.safetensors"), work, key, "needs 2 to 5 dimensions")


def test_out_name_too_long_for_its_temporary_file(work: Path) -> None:
    base, lora = inputs(work)
    out = work / ("x" * 240 + ".safetensors")
    one_line_failure(cli("merge", base, lora, "-o", out), work, "temporary file", "allows 255")


def test_lying_metadata_numbers(work: Path) -> None:
    t = load_file(str(KOHYA))
    for meta in ({"lora_adapter_metadata": "{not json"}, {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": "x"})},
                 {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": float("nan")})},
                 {"lora_adapter_metadata": json.dumps({"unet.alpha_pattern": {"(": 1.0}})}):
        bad = work / "input_meta.safetensors"
        save_file(t, bad, meta)
        with pytest.raises(LorakitError, match="lora_adapter_metadata"):
            lorakit.load_lora(bad)


def test_overflowing_strength_refused_unless_allowed(work: Path) -> None:
    """1e9 is a finite strength, but the fp16 result overflows: refused naming the tensor."""
    base, lora = inputs(work)
    res = cli("merge", base, f"{lora}:1e9", "-o", work / "o.safetensors")
    line = one_line_failure(res, work, "inf / NaN values into", "--allow-nonfinite")
    assert any(k in line for k in load_file(str(base)))  # names the first tensor
    assert cli("merge", base, f"{lora}:1e9", "-o", work / "o.safetensors", "--allow-nonfinite").exit_code == 0
    sd = load_file(str(base))
    original = {k: v.clone() for k, v in sd.items()}
    with pytest.raises(LorakitError, match="restored"):
        lorakit.patch(sd, [f"{lora}:1e9"])
    assert all(torch.equal(sd[k], original[k]) for k in sd)


def test_checkpoint_given_as_the_lora(work: Path) -> None:
    base, _ = inputs(work)
    one_line_failure(cli("merge", base, base, "-o", work / "o.safetensors"), work,
                     "is a checkpoint (SD1.5), not a LoRA")


def test_reading_is_never_writing(work: Path) -> None:
    """inspect, dry runs and check open inputs read-only."""
    base, lora = inputs(work)
    before = state(base, lora)
    assert cli("inspect", base).exit_code == 0 and cli("inspect", lora).exit_code == 0
    assert cli("merge", base, lora, "--dry-run", "--json").exit_code == 0
    assert cli("check", base, lora, "--no-model").exit_code == 0
    with SafetensorsFile(base):
        pass
    assert state(base, lora) == before
