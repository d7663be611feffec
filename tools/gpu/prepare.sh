#!/usr/bin/env bash
# Readies this checkout for issue 11's GPU suite on a lent device machine, which reaches no
# package index: the wheels its image lacks go to .whl/, MuseTalk's code (the reference loop
# imports it unchanged) to .ref/MuseTalk/. Both stay out of git. Run here, from anywhere:
#   tools/gpu/prepare.sh MUSETALK_GIT_DIR   (a clone of github.com/TMElyralab/MuseTalk)
# then on the device: bash tools/gpu/run.sh, carrying .whl and .ref (see run.sh). The wheels
# are for the device's Python 3.12; WHEELS=DIR PY_VERSION=3.11 fetches a set for a dry run.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
musetalk=${1:?usage: tools/gpu/prepare.sh MUSETALK_GIT_DIR}

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.ref/; do
  grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"
done

# The image (device KINDS.md) has torch, transformers, numpy, opencv, typer, rich, pillow and
# huggingface_hub; the suite's imports need these beside them (the versions tested here).
wheels=${WHEELS:-.whl}
rm -rf "$wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$wheels" \
  diffusers==0.42.1 importlib_metadata==10.2.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 \
  sounddevice==0.5.6 websockets==17.4

rm -rf .ref/MuseTalk && mkdir -p .ref/MuseTalk
git --git-dir="$musetalk" archive HEAD musetalk scripts/realtime_inference.py LICENSE |
  tar -x -C .ref/MuseTalk
echo "MuseTalk $(git --git-dir="$musetalk" rev-parse --short HEAD) in .ref/MuseTalk;" \
  "$(du -sh "$wheels" .ref | awk '{print $1}' | paste -sd+) to carry (64 MiB at most)"
