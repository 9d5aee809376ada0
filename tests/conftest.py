import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ZOO = Path(os.environ.get("LORAKIT_ZOO", ROOT.parent / "shared" / "zoo"))
MANIFESTS = Path(os.environ.get("LORAKIT_MANIFESTS", ROOT.parent / "shared" / "manifests"))


def pytest_configure(config):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the diffusers / transformers oracles read local files only
    if not torch.cuda.is_available():
        # the Triton kernels run on CPU tensors through the interpreter (tests/test_kernels.py);
        # it must be set before triton compiles anything
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def zoo() -> Path:
    assert (ZOO / "cases.json").is_file(), f"the shared zoo is required at {ZOO} (set LORAKIT_ZOO)"
    return ZOO


@pytest.fixture(scope="session")
def manifests() -> Path:
    assert MANIFESTS.is_dir(), f"the shared manifests are required at {MANIFESTS} (set LORAKIT_MANIFESTS)"
    return MANIFESTS
