"""How much of a LoRA's change survives fp8 storage, per rounding mode.

A Flux-size layer (3072 x 3072, bf16-like weights), a rank-16 LoRA scaled so that
||dW|| / ||W|| is 0.2 % ... 5 %, merged through lorakit's rounding spec into e4m3fn and e5m2 with
``nearest`` and ``stochastic`` rounding. Reported per cell: cosine between the stored change
(out - base, dequantised) and the exact fp32 change, and the gain: the projection of the stored
change on the exact one (1.00 = the LoRA acts at full strength on average; nearest rounding drops
deltas below half an fp8 step, which users see as "weak LoRAs"; stochastic rounding is unbiased,
so its gain stays near 1 while its cosine shows the added noise).

    python benchmarks/fp8_accuracy.py [--size 3072] [--rank 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lorakit.ops import lowrank_update_  # noqa: E402

RATIOS = [0.002, 0.005, 0.01, 0.02, 0.05]
DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=3072)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    n, r = args.size, args.rank
    w = torch.randn(n, n, generator=g) * 0.02
    up, down = torch.randn(n, r, generator=g), torch.randn(r, n, generator=g)
    unit = up @ down
    print(f"layer {n}x{n}, rank {r}; cosine(stored change, exact change) / gain (projection of the stored change "
          "on the exact one: 1.00 = full strength)")
    print("| ‖ΔW‖/‖W‖ | " + " | ".join(f"{d} {m}" for d in DTYPES for m in ("nearest", "stochastic")) + " |")
    print("|---|" + "---|" * (2 * len(DTYPES)))
    for ratio in RATIOS:
        scale = ratio * float(w.norm()) / float(unit.norm())
        cells = []
        for dt in DTYPES.values():
            base = w.to(dt)
            exact = unit * scale  # the change the LoRA asks for, relative to the stored base
            for mode in ("nearest", "stochastic"):
                out = lowrank_update_(base.clone(), up, down, scale, rounding=mode, seed=1, key="bench")
                stored = out.float() - base.float()
                cos = float(torch.nn.functional.cosine_similarity(stored.reshape(1, -1), exact.reshape(1, -1)))
                gain = float((stored * exact).sum() / (exact * exact).sum())
                cells.append(f"{cos:.2f} / {gain:.2f}")
        print(f"| {ratio:.1%} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
