#!/usr/bin/env bash
# Run HERE (a machine with a package index), in the repository root, before the device call:
# downloads into .whl/ the wheels that bench/gpu_check.sh installs on the GPU machine, which
# reaches no index (Python 3.12 there, with torch, safetensors, transformers, numba, click,
# jinja2, pyyaml and tqdm already installed; an older huggingface_hub; no mergekit).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
# mergekit and what its merge path imports that the GPU image lacks (it has accelerate, peft,
# sentencepiece, protobuf, scipy), and pycountry (our recipe checks): each pinned, one version each
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  mergekit==0.1.5 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 \
  typing-inspection==0.4.2 immutables==0.21 pycountry==24.6.1
du -sh .whl
