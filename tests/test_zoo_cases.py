"""Every golden case of ../shared/zoo/cases.json, run through the CLI exactly as the case states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.golden_compare import digests, verify
from tests.helpers import case_command, cli, load_cases

CASES = load_cases("cases.json")
# the newer families' cases (../shared/zoo/cases-next.json), for the families lorakit reads
NEXT_FAMILIES = ("next_wan", "next_qwen", "next_zimage", "next_flux2", "next_chroma")
NEXT = [c for c in load_cases("cases-next.json") if c["id"].startswith(NEXT_FAMILIES)]


@pytest.mark.parametrize("case", CASES + NEXT, ids=[c["id"] for c in CASES + NEXT])
def test_case(case: dict, zoo: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "merged.safetensors"
    res = cli(*case_command(case, zoo, out))
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
        res = cli(*case_command(case, zoo, dry_dir / "x.safetensors", extra=("--dry-run", "--json")))
        assert res.exit_code == 0, res.output
        assert list(dry_dir.iterdir()) == []
        doc = json.loads(res.stdout)
        text = json.dumps(doc)
        for s in case["summary"]:
            for name in s["unmatched_keys"] + s["matched_sample"]:
                assert name in text, f"dry-run JSON does not mention {name}"
    if "determinism" in checks:
        again = out_dir / "again.safetensors"
        assert cli(*case_command(case, zoo, again)).exit_code == 0
        assert again.read_bytes() == out.read_bytes()
    if "seed_changes_output" in checks:
        other = out_dir / "other.safetensors"
        assert cli(*case_command(case, zoo, other, seed_delta=1)).exit_code == 0
        assert other.read_bytes() != out.read_bytes()
        verify(case, zoo, other)


DIGESTS = json.loads((Path(__file__).parent / "golden" / "zoo_merge_digests.json").read_text())


@pytest.mark.parametrize("case_id", sorted(DIGESTS))
def test_output_bytes_unchanged(case_id: str, zoo: Path, tmp_path: Path) -> None:
    """Every zoo merge writes the same tensor bytes and metadata as when the digests were taken
    (tests/golden/zoo_merge_digests.json; regenerate only for an intended change of results)."""
    case = next(c for c in CASES if c["id"] == case_id)
    out = tmp_path / "merged.safetensors"
    assert cli(*case_command(case, zoo, out)).exit_code == 0
    assert digests(out) == DIGESTS[case_id]
