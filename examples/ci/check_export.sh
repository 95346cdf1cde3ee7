#!/usr/bin/env bash
# Export the model, then gate the export on its BatchNorm layers (the step bn-diff-check.yml runs).
#   bash examples/ci/check_export.sh [OUT_DIR]       (PYTHON=... to pick the interpreter)
# Exit 0: every BN layer (or conv holding a folded BN) agrees with the eager model; 1: a layer
# fails (named in the log, the JUnit file and, under GitHub Actions, an ::error annotation).
set -euo pipefail
out="${1:-out}"
py="${PYTHON:-python}"
"$py" examples/ci/export_model.py "$out"
"$py" -m bn_diff check "$out/model.onnx" \
  --against "$out/model.pt" --arch models:resnet_tiny --pythonpath examples \
  --input "$out/input.pt" \
  --junit "$out/bn-diff-junit.xml" --json "$out/bn-diff.json"
