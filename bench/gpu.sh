#!/usr/bin/env bash
# One prepared GPU check for bn-diff (H100/H200): run from the repo root, `bash bench/gpu.sh`.
# Needs python3 with torch (CUDA, with Triton for the compiled kernel), numpy, rich, typer,
# pytest and hypothesis importable; nothing is installed here.
# Prints: the device and its TF32 settings; the CUDA tests; bn-diff run vs plain forward on the
# ResNet-50-style network at batch 64 (eval and train, eager pass and compiled kernel side by side,
# 5 rounds after a warm-up) with peak CUDA memory per fresh process and the one-time compile cost;
# a cProfile of one compiled run. Each step has its own timeout; the whole stays under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
mkdir -p bench/out

timeout 20 python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|", torch.cuda.get_device_name())
print("torch.backends.cudnn.allow_tf32       =", torch.backends.cudnn.allow_tf32)
print("torch.backends.cuda.matmul.allow_tf32 =", torch.backends.cuda.matmul.allow_tf32)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("no triton:", e)
PY

timeout 150 python3 -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_kernels.py \
    tests/test_fused.py tests/test_fused_host.py tests/test_health_cuda.py tests/test_health_screen.py \
    tests/test_channel_table.py tests/test_tf32.py tests/test_no_mutation.py \
    tests/test_health_batch_host.py tests/test_sample0.py tests/test_kernels_direct.py \
    2>&1 | tail -15 || echo "pytest: exit $?"

timeout 240 python3 bench/bench_run.py --device cuda --models resnet50 --batches 64 --pairs 5 \
    --kernels eager compiled --no-compile-cost --markdown bench/out/gpu.md \
    || echo "bench_run: exit $? (timeout or error; partial output above)"

BN_DIFF_KERNEL=compiled timeout 50 python3 bench/gpu_profile.py cuda 64 2>&1 | head -60 \
    || echo "gpu_profile: exit $?"
