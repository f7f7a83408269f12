#!/usr/bin/env bash
# The CUDA checks, in one run on a lent GPU machine (the `device` tool; docs/results.md, "GPU").
# That machine has its own python3 with torch, onnx and onnxruntime, no registry: the two
# pure-Python packages it lacks travel as wheels in .whl/ (docs/results.md, "GPU", says how they are fetched).
# Logs go to $OUT (or ./out): the CUDA tests, the speed benchmark on cuda, the test suite.
set -u
OUT="${OUT:-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="/tmp/site:$PWD" || exit 3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, onnx, onnxruntime, onnx2torch; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$OUT/gpu.txt"
step() { local limit=$1; shift; echo "== $* (at most ${limit}s)"; local t=$SECONDS
         timeout "$limit" "$@"; echo "== exit $? after $((SECONDS - t)) s"; }
step "${T_CUDA:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
step "${T_R18:-150}" python3 benchmarks/bench_speed.py --models resnet18 --device cuda --fit-methods adam lm \
  2>&1 | tee "$OUT/speed_resnet18.log"
step "${T_R50:-150}" python3 benchmarks/bench_speed.py --models resnet50 --device cuda --check-candidates 3 \
  2>&1 | tee "$OUT/speed_resnet50.log"
step "${T_SUITE:-200}" python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 180 -k "not ray" \
  --ignore=tests/test_engine_ray.py 2>&1 | tee "$OUT/suite.log"
