#!/usr/bin/env bash
# Set up (first run only) and repair the bundled badnets sample end to end:
# `dynedit edit` from ONE corrupted input and its clean twin, then `dynedit verify`
# gates the result with ONNX Runtime (exit 0 and PASSED when the gates hold).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DYNEDIT_VENV:-.venv}"
if [ ! -x "$venv/bin/dynedit" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q -c constraints.txt -e . 2>&1 | grep -v "^WARNING: Location" || true
fi
out="${DYNEDIT_OUT:-out}"
mkdir -p "$out"
s=sample_models/badnets
"$venv/bin/dynedit" edit "$s/model.onnx" --pairs "$s/pairs.npz" --stats "$s/stats.npz" --val "$s/val.npz" \
  -o "$out/badnets.fixed.onnx" --report "$out/badnets.report.json"
"$venv/bin/dynedit" verify "$s/model.onnx" "$out/badnets.fixed.onnx" \
  --clean "$s/clean_test.npz" --corrupt "$s/corrupt_test.npz" --target 0 --max-acc-drop 0.005 --max-asr 0.015
