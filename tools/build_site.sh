#!/usr/bin/env bash
# Packs into .site/ (at the repository's root, git-ignored) the Python packages that the GPU machine's
# image lacks: deepspeed, bitsandbytes, datasets, pydantic and their small dependencies, unpacked for
# CPython 3.12 on x86-64 Linux. The image has torch 2.11 (CUDA 13), triton 3.6, timm, accelerate,
# transformers, numpy, pyarrow, pandas, safetensors, huggingface_hub, tqdm, matplotlib and pytest.
#
#   bash tools/build_site.sh
#   # then, on the GPU machine, with .site carried there:
#   export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
#
# Wheels only (nothing compiles here): bitsandbytes keeps only its CUDA 13.0 and CPU libraries;
# deepspeed ships as source, and its wheel holds no compiled code (its ops build on first use).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
for ignored in /.site/ /.whl/; do
  grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done
rm -rf .whl .site
mkdir -p .whl .site
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl bitsandbytes==0.50.2 datasets==5.2.0 hjson pydantic pydantic-core annotated-types typing-inspection \
  dill multiprocess
python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
for wheel in .whl/*.whl; do
  python3 -m zipfile -e "$wheel" .site
done
find .site/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cpu*' -delete
rm -rf .whl
du -sh .site
