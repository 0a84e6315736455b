#!/usr/bin/env bash
# Wheels of the packages a GPU machine without internet may lack, for benchmarks/run_gpu.sh.
#
#   bash benchmarks/gpu_wheels.sh [python_version]     # on a machine that reaches PyPI; default 3.12
#
# Downloads into .whl/ (ignored by git) the versions this checkout's environment uses, for Linux
# x86-64 and the given CPython: datasets and what it needs beyond the usual scientific stack
# (dill, multiprocess, a pyarrow as new as datasets asks for), pycocotools and evaluate. torch,
# transformers, accelerate, numpy, pandas and the like are expected on the GPU machine already.
# run_gpu.sh installs whatever lies in .whl/ into a private folder before it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version="${1:-3.12}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
packages=()
for name in datasets dill multiprocess pyarrow pycocotools evaluate; do
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
