"""File-to-file merge benchmark: full-size synthetic checkpoint vs ``cp`` of the same file.

    python benchmarks/merge_file.py --arch sdxl     # ~6.9 GB fp16, rank-32 LoRA on every attn/ff/proj + both TEs
    python benchmarks/merge_file.py --arch flux     # ~23.8 GB bf16, rank-32 LoRA on all 304 block Linears
    python benchmarks/merge_file.py --arch wan14b   # ~28.6 GB bf16 Wan 2.1 T2V 14B, every attention / FFN Linear
    python benchmarks/merge_file.py --arch qwen-image --dtype fp8   # ~20.4 GB, fp8 e4m3fn matrices
    python benchmarks/merge_file.py --arch flux2-dev --dtype fp8    # ~32 GB FLUX.2 dev, every block Linear, fp8
    python benchmarks/merge_file.py --arch z-image                  # ~12.3 GB bf16 Z-Image, every block Linear

Shapes come from the real manifests (../shared/manifests). Data is random (a random block tiled
over the file, so writing 24 GB does not take an hour of RNG). One run reports, for the same
file: ``cp`` wall time (of a second cp right after an untimed one, see ``main``), ``cp`` + ``sync`` wall time (the merge fsyncs its output), a page-cache
bypassing copy (``dd bs=64M iflag=direct oflag=direct conv=fsync``: what the disk itself does
for a copy), the merge's wall time and peak RSS (from wait4), and the ratios. Page caches are dropped before each timed
step when the machine allows it (root + /proc/sys/vm/drop_caches), and the report says whether.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lorakit.io.safetensors import DTYPES, TensorInfo, build_header, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT.parent / "shared" / "manifests"
SETS = {
    "sdxl": ("sdxl_base_1.0.json", "F16"),
    "flux": ("flux1-dev.json", "BF16"),
    "wan14b": ("wan2.1_t2v_14b.json", "BF16"),
    "qwen-image": ("qwen_image.json", "BF16"),
    "flux2-dev": ("flux2_dev.json", "BF16"),
    "z-image": ("z_image_turbo.json", "BF16"),
}
SDXL_UNET = re.compile(r"model\.diffusion_model\.(.*(?:transformer_blocks\.\d+\.(?:attn[12]\.to_(?:q|k|v|out\.0)|ff\.net\.(?:0\.proj|2))"
                       r"|\w+\.1\.proj_(?:in|out)))\.weight$")
TE1 = re.compile(r"conditioner\.embedders\.0\.transformer\.(text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]))\.weight$")
TE2 = re.compile(r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
TE2_NAMES = {"attn.out_proj.weight": ["self_attn_out_proj"], "mlp.c_fc.weight": ["mlp_fc1"], "mlp.c_proj.weight": ["mlp_fc2"],
             "attn.in_proj_weight": ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj"]}
FLUX = re.compile(r"((?:double|single)_blocks\.\d+\.(?:img_attn\.qkv|img_attn\.proj|txt_attn\.qkv|txt_attn\.proj|img_mlp\.[02]|"
                  r"txt_mlp\.[02]|img_mod\.lin|txt_mod\.lin|linear1|linear2|modulation\.lin))\.weight$")
# the DiT sets: every block Linear a LoRA trainer targets, kohya-named (lora_unet_ + native name)
DIT = {
    "flux": FLUX,
    "wan14b": re.compile(r"(blocks\.\d+\.(?:(?:self_attn|cross_attn)\.(?:q|k|v|o)|ffn\.[02]))\.weight$"),
    "qwen-image": re.compile(r"(transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                             r"add_v_proj|to_add_out)|(?:img|txt)_mlp\.net\.(?:0\.proj|2)|(?:img|txt)_mod\.1))\.weight$"),
    "flux2-dev": re.compile(r"((?:double|single)_blocks\.\d+\.(?:img_attn\.qkv|img_attn\.proj|txt_attn\.qkv|txt_attn\.proj|"
                            r"img_mlp\.[02]|txt_mlp\.[02]|linear1|linear2))\.weight$"),
    "z-image": re.compile(r"((?:layers|noise_refiner|context_refiner)\.\d+\.(?:attention\.(?:qkv|out)|feed_forward\.w[123]|"
                          r"adaLN_modulation\.0))\.weight$"),
}


def lora_modules(arch: str, manifest: dict) -> dict[str, tuple[int, int]]:
    """kohya module name -> (out, in) for the benchmark's target set."""
    mods: dict[str, tuple[int, int]] = {}
    for key, (shape, _) in manifest.items():
        if arch in DIT:
            if (m := DIT[arch].match(key)):
                mods["lora_unet_" + m.group(1).replace(".", "_")] = (shape[0], shape[1])
            continue
        if (m := SDXL_UNET.match(key)) and len(shape) >= 2:
            mods["lora_unet_" + m.group(1).replace(".", "_")] = (shape[0], shape[1])
        elif (m := TE1.match(key)):
            mods["lora_te1_" + m.group(1).replace(".", "_")] = (shape[0], shape[1])
        elif (m := TE2.match(key)):
            layer, child = m.groups()
            rows = shape[0] // len(TE2_NAMES[child])
            for n in TE2_NAMES[child]:
                mods[f"lora_te2_text_model_encoder_layers_{layer}_{n}"] = (rows, shape[1])
    return mods


def stored_dtype(shape: list[int], manifest_dtype: str, dtype: str, fp8: bool) -> str:
    """Floats in ``dtype``; with ``fp8``, every matrix / kernel in e4m3fn (as the released fp8 files)."""
    if manifest_dtype not in ("F16", "BF16", "F32"):
        return manifest_dtype
    return "F8_E4M3" if fp8 and len(shape) >= 2 else dtype


def write_base(path: Path, manifest: dict, dtype: str, fp8: bool = False) -> int:
    """Stream a checkpoint with the manifest's keys; floats in ``dtype`` (matrices fp8 with ``fp8``);
    returns bytes."""
    infos, off = [], 0
    for key in sorted(manifest):
        shape, mdt = manifest[key]
        dt = stored_dtype(shape, mdt, dtype, fp8)
        n = 1
        for d in shape:
            n *= d
        infos.append(TensorInfo(key, dt, tuple(shape), off, off + n * DTYPES[dt][1]))
        off += n * DTYPES[dt][1]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(16 << 20, generator=g) * 0.02
    blocks = {dt: noise.to(DTYPES[dt][0]).view(torch.uint8).numpy().tobytes() for dt in {i.dtype for i in infos}
              if DTYPES[dt][0].is_floating_point}
    with open(path, "wb") as fh:
        fh.write(build_header(infos, {"format": "pt"}))
        for i in infos:
            block = blocks.get(i.dtype, bytes(16 << 20))
            left = i.nbytes
            while left:
                n = min(left, len(block))
                fh.write(block[:n])
                left -= n
    return path.stat().st_size


def _factor(n: int) -> int:
    return next(f for f in (8, 4, 2, 1) if n % f == 0)


def write_lora(path: Path, mods: dict[str, tuple[int, int]], rank: int, algo: str = "lora") -> None:
    """A kohya/LyCORIS-named file of the given algorithm over ``mods``."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).half()

    t: dict[str, torch.Tensor] = {}
    for name, (out, inn) in mods.items():
        t[name + ".alpha"] = torch.tensor(float(rank), dtype=torch.float16)
        if algo in ("lora", "dora"):
            t[name + ".lora_down.weight"], t[name + ".lora_up.weight"] = rnd(rank, inn), rnd(out, rank)
            if algo == "dora":
                t[name + ".dora_scale"] = (torch.rand(out, 1, generator=g) + 0.5).half()
        elif algo == "loha":
            for i in (1, 2):
                t[f"{name}.hada_w{i}_a"], t[f"{name}.hada_w{i}_b"] = rnd(out, rank), rnd(rank, inn)
        elif algo == "lokr":
            f = min(_factor(out), _factor(inn))
            t[name + ".lokr_w1"] = rnd(f, f)
            t[name + ".lokr_w2_a"], t[name + ".lokr_w2_b"] = rnd(out // f, rank), rnd(rank, inn // f)
    save_file(t, path, {"ss_network_dim": str(rank), "ss_network_module": "lycoris.kohya" if algo != "lora" else "networks.lora"})


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(SETS), default="sdxl")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--dtype", choices=["keep", "fp8"], default="keep",
                    help="fp8: store every matrix as float8_e4m3fn (as the released fp8 files)")
    ap.add_argument("--algo", choices=["lora", "loha", "lokr", "dora"], default="lora",
                    help="adapter algorithm of the synthetic LoRA")
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "_work")
    ap.add_argument("--manifests", type=Path, default=MANIFESTS)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--repeat", type=int, default=3, help="alternating cp / merge runs (medians reported)")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the synthetic base and LoRA")
    ap.add_argument("--baseline", type=Path, help="another lorakit source tree (e.g. a git worktree of an older "
                    "commit): its merge is timed too, alternating with this tree's, on the same files")
    args = ap.parse_args()
    fname, dtype = SETS[args.arch]
    manifest = json.loads((args.manifests / fname).read_text())
    fp8 = args.dtype == "fp8"
    total = sum(torch.Size(s).numel() * DTYPES[stored_dtype(s, d, dtype, fp8)][1] for s, d in manifest.values())
    tag = args.arch + ("_fp8" if fp8 else "")
    base, copy, out, lora = (args.workdir / f"{tag}_{n}" for n in ("base.safetensors", "copy.safetensors",
                                                                  "merged.safetensors", f"{args.algo}.safetensors"))
    reused = args.keep and base.exists()
    need = (1 if reused else 2) * total + (1 << 30)  # one output (or copy) at a time beside the base
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        what = "output" if reused else "base + output"
        raise SystemExit(f"not enough disk in {args.workdir}: need {need / 1e9:.1f} GB ({what}), have {free / 1e9:.1f} GB")
    try:
        mods = lora_modules(args.arch, manifest)
        if not reused:
            print(f"writing {total / 1e9:.1f} GB synthetic {args.arch} checkpoint ({'fp8' if fp8 else dtype}) ...", flush=True)
            write_base(base, manifest, dtype, fp8)
        if not (args.keep and lora.exists()):
            write_lora(lora, mods, args.rank, args.algo)
        size = base.stat().st_size
        cmd = [sys.executable, "-m", "lorakit", "merge", str(base), f"{lora}:1.0", "-o", str(out), "--no-progress"]
        dd = ["dd", f"if={base}", f"of={copy}", "bs=64M", "iflag=direct", "oflag=direct", "conv=fsync", "status=none"]
        firsts, cps, syncs, dds, merges, rsss, olds, old_rsss = [], [], [], [], [], [], [], []
        old_env = None if args.baseline is None else dict(os.environ, PYTHONPATH=str(args.baseline.resolve()))
        dropped = True
        for _ in range(args.repeat):  # alternate, so a drifting disk hits all sides alike
            # cp twice: on a VM with free-page reporting (this dev VM) the first cp's page cache
            # costs a host fault per fresh page and took 3-4x as long; the second reuses memory
            # just freed and runs at the disk's pace. The ratio uses the second (the faster cp).
            dropped &= drop_caches()
            firsts.append(timed(["cp", str(base), str(copy)])[0])
            copy.unlink()
            dropped &= drop_caches()
            cp_wall, _ = timed(["cp", str(base), str(copy)])
            sync_t0 = time.perf_counter()
            subprocess.run(["sync", "-f", str(copy)], check=True)
            cps.append(cp_wall)
            syncs.append(cp_wall + time.perf_counter() - sync_t0)
            copy.unlink()  # free the disk before the next copy / the merge writes its output
            dropped &= drop_caches()
            dds.append(timed(dd)[0])
            copy.unlink()
            dropped &= drop_caches()
            merge_wall, rss = timed(cmd, cwd=ROOT)
            merges.append(merge_wall)
            rsss.append(rss)
            out.unlink()
            if old_env is not None:
                dropped &= drop_caches()
                old_wall, old_rss = timed(cmd, env=old_env, cwd=args.baseline)
                olds.append(old_wall)
                old_rsss.append(old_rss)
                out.unlink()
        med = statistics.median
        res = {
            "arch": args.arch, "dtype": "F8_E4M3 matrices" if fp8 else dtype, "file_bytes": size, "algo": args.algo, "lora_modules": len(mods),
            "rank": args.rank,
            "runs": args.repeat, "cp_s": round(med(cps), 2), "cp_plus_sync_s": round(med(syncs), 2),
            "merge_s": round(med(merges), 2), "merge_over_cp": round(med(merges) / med(cps), 3),
            "merge_over_cp_sync": round(med(merges) / med(syncs), 3), "dd_direct_s": round(med(dds), 2),
            "merge_over_dd_direct": round(med(merges) / med(dds), 3), "peak_rss_gb": round(max(rsss) / 1e9, 3),
            "all_cp_s": [round(x, 2) for x in cps], "all_first_cp_s": [round(x, 2) for x in firsts],
            "all_dd_direct_s": [round(x, 2) for x in dds],
            "all_merge_s": [round(x, 2) for x in merges],
            "page_cache_dropped": dropped,
            "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
            "torch": torch.__version__,
        }
        if olds:
            res.update({"baseline": str(args.baseline), "baseline_merge_s": round(med(olds), 2),
                        "all_baseline_merge_s": [round(x, 2) for x in olds],
                        "baseline_peak_rss_gb": round(max(old_rsss) / 1e9, 3),
                        "merge_over_baseline": round(med(merges) / med(olds), 3)})
        print(json.dumps(res, indent=1))
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
    finally:
        for p in (copy, out) if args.keep else (base, copy, out, lora):
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
