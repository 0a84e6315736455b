#!/usr/bin/env bash
# The GPU checks and benchmarks in one go, at most 10 minutes (each part has its own time limit):
#
#   bash benchmarks/run_gpu.sh [results_dir]        # default results_dir: benchmarks/results
#
# 1. tests/test_cuda.py: the model on the GPU computes what it computes on the CPU (decoder training
#    step in float32 against float64 on the CPU, bf16 autocast, the encoder, chunked inference);
# 2. bench_model.py --device cuda: the decoder training step from cached embeddings at 8 images x
#    64 boxes (the decoder before the speed work and the current one, float32 and bf16 autocast),
#    and ViT-T / ViT-S encoder images/s in batches of 16 (what building the embedding cache runs);
# 3. bench_train.py: Trainer steps from the embedding cache, 16 images x up to 16 boxes per step,
#    float32 and bf16, with and without a ViT-S teacher (when datasets and pycocotools import).
#
# Writes model_cuda.json, train_cuda.json and the logs into results_dir; each part's log says where
# it failed, and the exit status is non-zero if any part did. On a machine without internet, bring
# the packages it lacks as wheels in .whl/ (benchmarks/gpu_wheels.sh makes them where PyPI is
# reachable): they are installed into a private folder first. PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
results="$(mkdir -p "${1:-benchmarks/results}" && cd "${1:-benchmarks/results}" && pwd)"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d)"
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch sees no CUDA GPU here: nothing to run" >&2
    exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    | tee "$results/gpu_nvidia_smi.txt"
# the versions this run uses (the wheels' where they were brought), for the logs
"$python" - <<'PY' | tee "$results/gpu_versions.txt"
import importlib.metadata as metadata
for name in ("torch", "transformers", "regex", "accelerate", "datasets", "pyarrow", "huggingface_hub", "tokenizers", "safetensors",
             "pycocotools", "evaluate", "numpy"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} missing")
PY

status=0
run() {  # run NAME SECONDS COMMAND...: the command's output to the screen and to NAME.log
    local name="$1" seconds="$2"
    shift 2
    echo "== $name" >&2
    timeout "$seconds" "$@" 2>&1 | tee "$results/gpu_$name.log"
    local code="${PIPESTATUS[0]}"
    [ "$code" -eq 0 ] || { echo "== $name failed (exit $code)" >&2; status=1; }
}

run tests 150 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py
run bench_model 240 "$python" benchmarks/bench_model.py --device cuda --sections decoder_train encoder \
    --variants vitt vits --images 8 --queries 64 --rounds 5 --no_compile --patience 30 --output "$results/model_cuda.json"
if "$python" -c "import datasets, pycocotools, evaluate" 2>/dev/null; then
    run bench_train 180 "$python" benchmarks/bench_train.py --variants vitt --modes cache --precisions fp32 bf16 \
        --batch_images 16 --max_objects 16 --steps 4 --quickstart_dir /nonexistent --output "$results/train_cuda.json"
else
    echo "== bench_train skipped: datasets, pycocotools or evaluate does not import here (benchmarks/gpu_wheels.sh)" >&2
    status=1
fi
exit "$status"
