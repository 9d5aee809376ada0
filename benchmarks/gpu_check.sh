#!/usr/bin/env bash
# The GPU checks, as one script for the device machine (one GPU, no internet), about 6 minutes:
#   1. the `cuda` tests (kernel bit-exactness incl. bf16 factors, full-size shapes, every golden
#      case through `merge --device cuda`, the patch API on CUDA tensors);
#   2. benchmarks/patch_gpu.py (whole-model patch vs copy roofline and peer-style paths; hot swap);
#   3. benchmarks/sample_gpu.py (SD1.5 / Flux.1-dev denoising it/s with random weights).
# Results land in $OUT (or benchmarks/_work/gpu): pytest.txt, patch_gpu.{md,json}, sample_gpu.{txt,json}.
#
# Offline setup: run benchmarks/prepare_gpu_carry.sh here first (wheels, zoo and manifests into
# benchmarks/_work, about 90 MB), and pass benchmarks/_work as `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-benchmarks/_work/gpu}
mkdir -p "$RESULTS"
WORK=benchmarks/_work
[ -d ../shared/zoo ] || export LORAKIT_ZOO=$PWD/$WORK/zoo
[ -d ../shared/manifests ] || export LORAKIT_MANIFESTS=$PWD/$WORK/manifests
if [ -d "$WORK/wheels" ]; then
  python -m pip install -q --no-index --find-links "$WORK/wheels" safetensors click pytest "setuptools>=64" 2>&1 | tail -2
fi
# the same package layout as everywhere else (lorakit.kernels = kernels/, pyproject's package-dir)
python -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
python -c "import lorakit.kernels" || { echo "lorakit did not install"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$RESULTS/device.txt"

timeout 150 python -m pytest -q -m cuda tests/test_kernels_cuda.py -x -p no:cacheprovider 2>&1 | tail -25 \
  | tee "$RESULTS/pytest.txt"
timeout 240 python benchmarks/patch_gpu.py --reps 3 --json "$RESULTS/patch_gpu.json" 2>&1 | tee "$RESULTS/patch_gpu.md"
timeout 120 python benchmarks/sample_gpu.py --diffusers --json "$RESULTS/sample_gpu.json" 2>&1 \
  | tee "$RESULTS/sample_gpu.txt"
