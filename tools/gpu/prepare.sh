#!/usr/bin/env bash
# Readies this checkout for the GPU runs on a lent device machine, which reaches no package
# index: the wheels its image lacks (and Ray Serve, packed) go to .whl/, MuseTalk's code (the
# reference loop imports it unchanged) to .ref/MuseTalk/. Both stay out of git (44 MB). Run
# here, from anywhere, where pip works (a few minutes: xz packs Ray):
#   tools/gpu/prepare.sh MUSETALK_GIT_DIR   (a clone of github.com/TMElyralab/MuseTalk)
# then on the device: bash tools/gpu/run.sh (issue 11) or tools/gpu/serve.sh (issue 10). The
# wheels are for the device's Python 3.12; WHEELS=DIR PY_VERSION=3.11 makes a set for a dry run.
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

# Ray Serve for issue 10's run (serve.sh): its 80 MB wheel and its needs the image lacks,
# installed for the device's Python, without what Serve never loads (Java, RLlib, Tune,
# Train, Data, LLM, the dashboard's web client) and debug symbols, as one xz tarball (33 MB).
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --target "$site/lib" \
  --python-version "${PY_VERSION:-3.12}" --implementation cp --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -r tools/gpu/serve-requirements.txt
(cd "$site/lib/ray" && rm -rf jars rllib tune train llm data dashboard/client/build &&
  find . -name '*.map' -delete)
find "$site/lib" \( -name '*.so' -o -path '*/ray/core/src/ray/*' \) -type f \
  -exec strip --strip-unneeded {} + 2>/dev/null || true
tar -C "$site/lib" -cf - . | xz -9e -T0 >"$wheels/ray-serve.tar.xz"

rm -rf .ref/MuseTalk && mkdir -p .ref/MuseTalk
git --git-dir="$musetalk" archive HEAD musetalk scripts/realtime_inference.py LICENSE |
  tar -x -C .ref/MuseTalk
echo "MuseTalk $(git --git-dir="$musetalk" rev-parse --short HEAD) in .ref/MuseTalk;" \
  "$(du -sh "$wheels" .ref | awk '{print $1}' | paste -sd+) to carry (64 MiB at most)"
