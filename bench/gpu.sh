#!/usr/bin/env bash
# One prepared GPU check for bn-diff (H100/H200): run from the repo root, `bash bench/gpu.sh`.
# Needs python3 with torch (CUDA), numpy, rich, typer importable; nothing is installed here.
# Prints: the device and its TF32 settings; bn-diff run vs plain forward on the ResNet-50-style
# network at batch 64 (eval and train, 5 alternating pairs after a warm-up) with peak CUDA
# memory per fresh process; the run-wide TF32 note; a fused-vs-reference agreement check on
# CUDA. Designed to finish well under 4 minutes (each step has its own timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
mkdir -p bench/out

timeout 60 python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|", torch.cuda.get_device_name())
print("torch.backends.cudnn.allow_tf32       =", torch.backends.cudnn.allow_tf32)
print("torch.backends.cuda.matmul.allow_tf32 =", torch.backends.cuda.matmul.allow_tf32)
PY

timeout 170 python3 bench/bench_run.py --device cuda --models resnet50 --batches 64 --pairs 5 \
    --markdown bench/out/gpu.md || echo "bench_run: exit $? (timeout or error; partial output above)"

timeout 60 python3 - <<'PY'
import torch
import torch.nn.functional as F
import bn_diff
from bn_diff.fused import fused_check
from bn_diff.pipeline import make_tolerance, reference_check

# the run-wide note, as `bn-diff run` reports it on CUDA
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).cuda().eval()
report = bn_diff.run(net, torch.randn(4, 3, 32, 32, device="cuda"))
for f in report.findings:
    if f.id == "tf32_convolutions":
        print(f"{f.severity} {f.id}: {f.message}" + (f" — {f.fix}" if f.fix else ""))

# fused path vs reference path on CUDA: same verdict (one faulty channel, one faulty element)
F64 = torch.float64
g = torch.Generator(device="cuda").manual_seed(0)
for train in (False, True):
    x = torch.randn(16, 64, 28, 28, device="cuda", generator=g) * 0.5 + 0.1
    c = 64
    gamma, beta = torch.rand(c, dtype=F64, device="cuda") + 0.5, torch.rand(c, dtype=F64, device="cuda") - 0.5
    rm, rv = torch.zeros(c, dtype=F64, device="cuda") + 0.1, torch.ones(c, dtype=F64, device="cuda") * 0.3
    y = F.batch_norm(x, rm.float(), rv.float(), gamma.float(), beta.float(), train, 0.0, 1e-5)
    y[:, 3] += 1e-3
    y[5, 7, 2, 2] -= 0.25
    tol = make_tolerance(None, None)
    fast = fused_check(x, y, gamma, beta, rm, rv, train, 1e-5, tol)
    mom, allow, cmp = reference_check(x, y, gamma, beta, rm, rv, train, 1e-5, tol)
    same = torch.equal(fast.comparison.channel_mismatched, cmp.channel_mismatched)
    print(f"{'train' if train else 'eval'}: fused == reference counts: {same} "
          f"(mismatched {fast.comparison.mismatched} vs {cmp.mismatched}; max |Δ| "
          f"{fast.comparison.max_abs_diff:.6g} at {fast.comparison.max_abs_index} vs "
          f"{cmp.max_abs_diff:.6g} at {cmp.max_abs_index}; channels via reference path: "
          f"{fast.exact_channels})")
PY
