#!/usr/bin/env bash
# The Python packages bench/gpu.sh needs on a GPU machine that has torch, transformers and accelerate but cannot reach a
# package index: fetched here as wheels for that machine's Python (3.12, x86-64 Linux) into bench/wheels/ (git-ignored),
# at the versions this checkout's virtual environment runs, so the GPU measures the code the tests ran.
#
#   bash bench/fetch_wheels.sh          # needs make install first (it reads the versions from .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}

# What the bench imports beyond the machine's torch/transformers/accelerate image, and what those need in turn
# (open_clip_torch only for CLIP's BPE merges file; its own dependencies are not needed).
packages=(diffusers peft pydantic pydantic_core annotated_types typing_inspection typing_extensions open_clip_torch)
pins=()
for package in "${packages[@]}"; do
    pins+=("$package==$("$PY" -c "import importlib.metadata as m; print(m.version('$package'))")")
done
rm -rf bench/wheels
mkdir -p bench/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d bench/wheels "${pins[@]}"
ls -s --block-size=K bench/wheels
echo "bench/wheels: $(du -sh bench/wheels | cut -f1) (the working tree that travels to the device is limited to 64 MiB)"
