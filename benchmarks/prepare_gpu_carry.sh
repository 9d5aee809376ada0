#!/usr/bin/env bash
# Run here (with internet to the package registry) before benchmarks/gpu_check.sh goes to the device
# machine, which has no internet and may have no ../shared: puts the pure-python / abi3 wheels the
# tests need, the zoo without its SDXL files (carry holds 64 MiB; the SDXL cases are skipped there,
# named) and the manifests, under benchmarks/_work (ignored by git), to pass as `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=benchmarks/_work
mkdir -p "$WORK/wheels"
python3 -m pip download -q -d "$WORK/wheels" --only-binary=:all: safetensors click pytest pluggy iniconfig packaging \
  "setuptools>=64"
rm -rf "$WORK/zoo" "$WORK/manifests"
mkdir -p "$WORK/zoo"
(cd ../shared/zoo && find . -type f ! -path './fingerprints/*' ! -path './broken/*' ! -name 'sdxl*' -print0 \
  | xargs -0 cp --parents -t "$OLDPWD/$WORK/zoo")
cp -r ../shared/manifests "$WORK/manifests"
du -sh "$WORK"
echo "carry: [\"$WORK\"]"
