#!/usr/bin/env bash
# Issue 11's GPU suite in one device call, after tools/gpu/prepare.sh here:
#   run(command="bash tools/gpu/run.sh", carry=[".whl", ".ref"], timeout_s=540)
# It installs the carried wheels beside the image's torch, then runs
# `livecam bench --engine musetalk --gpu-suite --json` with MuseTalk's own loop beside it
# (full-size random weights, fp16; 3.5-4 min on an H200). The report comes back as
# $OUT/suite.json, the log as $OUT/suite.log. Arguments go to the bench, so a dry run here, in
# a venv with only the image's packages and wheels for its Python (prepare.sh), is
#   PYTHON=VENV/bin/python WHEELS=DIR OUT=/tmp/gpu bash tools/gpu/run.sh --tiny --torch-device cpu
set -uo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
out=${OUT:-/tmp/livecam-gpu}
site=/tmp/livecam-site
mkdir -p "$out"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" "${WHEELS:-.whl}"/*.whl || exit 1
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
"$python" -c 'import torch, diffusers, transformers as t
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__,
      "transformers", t.__version__)' | tee "$out/versions.txt"
timeout 480 "$python" -m livecam bench --engine musetalk --gpu-suite --json \
  --reference .ref/MuseTalk "$@" >"$out/suite.json" 2>"$out/suite.log"
rc=$?
tail -c 3000 "$out/suite.log"
cat "$out/suite.json"
exit $rc
