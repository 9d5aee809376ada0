"""What several test modules share: bit views, the CLI runner, the zoo's golden cases and the
command line each stands for, and small fixtures built in code."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from lorakit.cli import main
from lorakit.ops import Segment, Update
from tests.conftest import ZOO

INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
W_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of each element, flattened (for bit-for-bit comparisons and counts)."""
    return t.contiguous().reshape(-1).view(INT_OF_SIZE[t.element_size()])


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose bits differ."""
    return [k for k in a if not torch.equal(bits(a[k]), bits(b[k]))]


def cli(*args: object, **kw):
    """Run the command line in-process, exceptions propagating (a traceback is a test failure)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def load_cases(name: str) -> list[dict]:
    """The golden cases of ``../shared/zoo/<name>``; a missing zoo is an error, never zero tests."""
    path = ZOO / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the shared zoo is required (set LORAKIT_ZOO to its folder)")
    return json.loads(path.read_text())["cases"]


def case_command(case: dict, zoo: Path, out: Path, *, seed_delta: int = 0, extra: tuple = ()) -> list[str]:
    """The ``lorakit merge`` command line a golden case stands for (../shared/zoo/README.md)."""
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


# -- workflows ---------------------------------------------------------------------------------------

def sd15_models_folder(root: Path) -> Path:
    """A ComfyUI models/ folder with the zoo's SD1.5 base (checkpoints/base.safetensors) and kohya
    LoRA (loras/lora.safetensors), as copies."""
    import shutil

    (root / "checkpoints").mkdir(parents=True)
    (root / "loras").mkdir()
    shutil.copy(ZOO / "base/sd15/sd15_tiny_single_file.safetensors", root / "checkpoints/base.safetensors")
    shutil.copy(ZOO / "kohya/sd15_kohya_lora.safetensors", root / "loras/lora.safetensors")
    return root


def lora_graph(lora_name: str, strength: object) -> dict:
    """An API-format graph: checkpoint -> LoraLoader (node 10) -> KSampler."""
    return {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "base.safetensors"}},
            "10": {"class_type": "LoraLoader", "inputs": {"lora_name": lora_name, "strength_model": strength,
                                                         "strength_clip": 1.0, "model": ["4", 0], "clip": ["4", 1]}},
            "3": {"class_type": "KSampler", "inputs": {"model": ["10", 0]}}}


# -- kernel fixtures ---------------------------------------------------------------------------------

def grid(g: torch.Generator, *shape: int, dtype=torch.float16, q: int = 64) -> torch.Tensor:
    """Factors on a coarse grid: every partial sum of up @ down is exact in fp32."""
    return (torch.randint(-32, 33, shape, generator=g).float() / q).to(dtype)


def kernel_model(g: torch.Generator, wdtype: torch.dtype, fdtype: torch.dtype, factors=grid) -> list[Update]:
    """Three weights of a small model: a linear with two LoRAs, a fused qkv with one LoRA per
    row slice plus one on the whole, a 3x3 conv (4-D); scaled fp8 on the linear."""
    from lorakit import codecs

    lin = (torch.randn(70, 150, generator=g) * 0.3).to(wdtype)
    qkv = (torch.randn(96, 40, generator=g) * 0.3).to(wdtype)
    conv = (torch.randn(24, 8, 3, 3, generator=g) * 0.3).to(wdtype)
    f = lambda *s: factors(g, *s, dtype=fdtype)  # noqa: E731
    return [
        Update(lin, [Segment(f(70, 8), f(8, 150), 0.37), Segment(f(70, 20), f(20, 150), -1.3)], key="lin",
               codec=codecs.scaled(wdtype, 0.75) if wdtype in FP8 else None),
        Update(qkv, [Segment(f(32, 4), f(4, 40), 1.0, (0, 32)), Segment(f(32, 4), f(4, 40), 0.5, (64, 96)),
                     Segment(f(96, 16), f(16, 40), 0.25)], key="qkv"),
        Update(conv, [Segment(f(24, 4, 1, 1), f(4, 8, 3, 3), 2.0)], key="conv"),
    ]


def float64_reference(u: Update) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact result (float64) and the magnitude |W| + sum |s| |up| @ |down| that bounds
    the fp32 accumulation error."""
    from lorakit.ops import as_matrix

    w = u.w.double().reshape(u.w.shape[0], -1) * (u.codec.scale or 1.0)
    exact, mag = w.clone(), w.abs()
    for g in u.segments:
        r0, r1 = g.span(u.w.shape[0])
        up, down = as_matrix(g.up).double(), as_matrix(g.down).double()
        exact[r0:r1] += g.scale * (up @ down)
        mag[r0:r1] += abs(g.scale) * (up.abs() @ down.abs())
    return exact, mag


def autoencoder_shapes(c0: int, c1: int) -> dict[str, tuple[int, ...]]:
    """LDM key shapes of a 2-level autoencoder, 1 block per encoder level, 16 latent channels."""
    return {"encoder.conv_in.weight": (c0, 3, 3, 3), "encoder.norm_out.weight": (c1,),
            "encoder.conv_out.weight": (32, c1, 3, 3), "decoder.conv_in.weight": (c1, 16, 3, 3),
            "decoder.norm_out.weight": (c0,), "decoder.conv_out.weight": (3, c0, 3, 3),
            "encoder.down.0.block.0.conv1.weight": (c0, c0, 3, 3), "encoder.down.0.downsample.conv.weight": (c0, c0, 3, 3),
            "encoder.down.1.block.0.conv1.weight": (c1, c0, 3, 3),
            "decoder.up.1.block.0.conv1.weight": (c1, c1, 3, 3), "decoder.up.1.block.1.conv1.weight": (c1, c1, 3, 3),
            "decoder.up.1.upsample.conv.weight": (c1, c1, 3, 3),
            "decoder.up.0.block.0.conv1.weight": (c0, c1, 3, 3), "decoder.up.0.block.1.conv1.weight": (c0, c0, 3, 3)}


REPR_MARKS = ("{'", "['", "Traceback", "torch.float", "PosixPath(")  # Python internals leaking into a message


def one_line(res, *needles: str, code: int | None = None) -> str:
    """A failed command: one ``lorakit: error:`` line naming every needle, no Python internals."""
    assert res.exit_code != 0 and (code is None or res.exit_code == code), (res.exit_code, res.output)
    line = res.output.strip()
    assert line.startswith("lorakit: error:") and "\n" not in line, line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert not any(m in line for m in REPR_MARKS[2:]), line
    return line
