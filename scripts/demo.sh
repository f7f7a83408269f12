#!/usr/bin/env bash
# Set up (first run only) and repair the bundled badnets sample end to end:
# `dynedit edit` from ONE corrupted input and its clean twin, then `dynedit verify`
# gates the result with ONNX Runtime (exit 0 and PASSED when the gates hold).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DYNEDIT_VENV:-.venv}"
say() { echo "demo: $*" >&2; }
if [ ! -x "$venv/bin/dynedit" ]; then
  start=$SECONDS
  say "first run: creating the virtualenv $venv and installing the pinned packages (torch is about 5 GB with its CUDA libraries; see README, Quick start, for the time this took here)"
  python3 -m venv "$venv"
  # pip's own progress (Collecting / Downloading / Installing) goes to stderr, stdout stays the demo's
  "$venv/bin/python" -m pip install --progress-bar on -c constraints.txt -e . 1>&2
  say "set up in $((SECONDS - start)) s"
fi
say "repairing sample_models/badnets from one pair (dynedit edit), then gating it (dynedit verify)"
out="${DYNEDIT_OUT:-out}"
mkdir -p "$out"
s=sample_models/badnets
"$venv/bin/dynedit" edit "$s/model.onnx" --pairs "$s/pairs.npz" --stats "$s/stats.npz" --val "$s/val.npz" \
  -o "$out/badnets.fixed.onnx" --report "$out/badnets.report.json"
"$venv/bin/dynedit" verify "$s/model.onnx" "$out/badnets.fixed.onnx" \
  --clean "$s/clean_test.npz" --corrupt "$s/corrupt_test.npz" --target 0 --max-acc-drop 0.005 --max-asr 0.015
