#!/usr/bin/env bash
# Wheels of the packages a GPU machine without internet may lack or have too old, for run_gpu.sh.
#
#   bash benchmarks/gpu_wheels.sh [python_version] [extra_package ...]    # where PyPI is reachable
#
# Downloads into .whl/ (ignored by git), for Linux x86-64 and CPython python_version (default 3.12),
# the versions this checkout's environment uses of: transformers and regex (GPU images often carry an older
# one than setup.cfg asks for), datasets with dill and multiprocess, pycocotools and evaluate, plus
# any extra packages named (pyarrow, say, if the GPU machine's is older than datasets asks for: 55 MB).
# torch, accelerate, huggingface_hub, tokenizers, safetensors, numpy, pandas and pyarrow are expected
# there already. run_gpu.sh installs whatever lies in .whl/ into a private folder before it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${1:-3.12}"
shift || true
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
packages=()
for name in transformers regex datasets dill multiprocess pycocotools evaluate "$@"; do
    version="$("$python" -c "import importlib.metadata as m; print(m.version('$name'))")"
    packages+=("$name==$version")
done
echo "downloading for CPython $python_version, Linux x86-64: ${packages[*]}"
rm -rf .whl
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${packages[@]}"
ls -l .whl
du -sh .whl
