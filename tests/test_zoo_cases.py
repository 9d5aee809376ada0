"""Every golden case of ../shared/zoo/cases.json, run through the CLI exactly as the case states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from lorakit.cli import main
from tests.conftest import ZOO
from tests.golden_compare import check_float, check_fp8, check_stochastic_stats

CASES = json.loads((ZOO / "cases.json").read_text())["cases"] if (ZOO / "cases.json").is_file() else []


def command(case: dict, zoo: Path, out: Path, *, seed_delta: int = 0, extra: tuple = ()) -> list[str]:
    args = ["merge", str(zoo / case["base"])]
    for lo in case["loras"]:
        args.append(f"{zoo / lo['path']}:{lo['model_strength']}:{lo['clip_strength']}")
    args += ["-o", str(out)]
    f = case["flags"]
    if f.get("model_only"):
        args.append("--model-only")
    if f.get("rounding"):
        args += ["--rounding", f["rounding"]]
    if f.get("seed") is not None or seed_delta:
        args += ["--seed", str((f.get("seed") or 0) + seed_delta)]
    if f.get("allow_unmatched"):
        args.append("--allow-unmatched")
    return args + list(extra)


def run(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def verify(case: dict, zoo: Path, out: Path) -> None:
    base, base_meta = read(zoo / case["base"])
    got, meta = read(out)
    assert list(got) == list(base) or set(got) == set(base), "OUT must have exactly BASE's keys"
    assert set(got) == set(base)
    assert "lorakit" in meta and {k: v for k, v in meta.items() if k != "lorakit"} == base_meta
    expected, _ = read(zoo / case["expect"]["output"])
    mode = case["flags"].get("rounding") or "stochastic"
    stats = []
    for key, b in base.items():
        o = got[key]
        assert o.shape == b.shape and o.dtype == b.dtype, key
        if key not in expected:
            assert torch.equal(bits(o), bits(b)), f"{key}: untouched tensor changed"
            continue
        e = expected[key]
        if o.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            stats.append(check_fp8(o, b, e, mode, key))
        else:
            check_float(o, e, key)
    if mode == "stochastic" and any(stats):
        check_stochastic_stats(stats)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_case(case: dict, zoo: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "merged.safetensors"
    res = run(command(case, zoo, out))
    if case["expect"]["exit"] == "failure":
        assert res.exit_code != 0, res.output
        assert list(out_dir.iterdir()) == [], "a failed merge must leave nothing in OUT's folder"
        assert "Traceback" not in res.output
        return
    assert res.exit_code == 0, res.output
    verify(case, zoo, out)
    checks = case.get("checks", [])
    if "dry_run" in checks:
        dry_dir = tmp_path / "dry"
        dry_dir.mkdir()
        res = run(command(case, zoo, dry_dir / "x.safetensors", extra=("--dry-run", "--json")))
        assert res.exit_code == 0, res.output
        assert list(dry_dir.iterdir()) == []
        doc = json.loads(res.stdout)
        text = json.dumps(doc)
        for s in case["summary"]:
            for name in s["unmatched_keys"] + s["matched_sample"]:
                assert name in text, f"dry-run JSON does not mention {name}"
    if "determinism" in checks:
        again = out_dir / "again.safetensors"
        assert run(command(case, zoo, again)).exit_code == 0
        assert again.read_bytes() == out.read_bytes()
    if "seed_changes_output" in checks:
        other = out_dir / "other.safetensors"
        assert run(command(case, zoo, other, seed_delta=1)).exit_code == 0
        assert other.read_bytes() != out.read_bytes()
        verify(case, zoo, other)
