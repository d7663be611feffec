#!/usr/bin/env bash
# Issue 10's GPU figure in one device call, after tools/gpu/prepare.sh here:
#   run(command="bash tools/gpu/serve.sh", carry=[".whl", ".ref"], timeout_s=420)
# (right after run.sh's call, within the 30 s the machine stays warm, to save a start).
# `livecam serve --engine musetalk --random-weights` (full-size random weights, fp16, one
# replica on the GPU, every batch shape captured before the first stream), then for each N in
# STREAMS (default 4 6 8 10 12) N live 25-fps streams of `livecam bench --remote`, 4 to a
# client process, SOAK seconds (default 20) each: how many streams the GPU holds, every frame
# made there. Reports: $OUT/streams.json (summary), $OUT/streams-N.json, $OUT/serve.log (the
# pool's status line every 5 s: batches/s, streams and frames a batch, ms a batch).
# COMPILE=1: the server compiles its decoders (LIVECAM_TORCH_COMPILE=1, about a minute more at
# start); REPLICAS=2: two generator replicas share the GPU (one's kernels run while the other
# is on the CPU). Their reports are named streams-compiled*.json, streams-r2*.json (and
# serve-compiled.log ...). A dry run here,
# in a venv with only the image's packages and a set made with PY_VERSION=3.11:
#   PYTHON=VENV/bin/python WHEELS=DIR OUT=/tmp/gpu TINY=1 STREAMS="1 2" SOAK=8 bash tools/gpu/serve.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
out=${OUT:-/tmp/livecam-gpu}
wheels=${WHEELS:-.whl}
site=/tmp/livecam-site
port=${PORT:-8765}
tag=""
if [ "${COMPILE:-0}" = 1 ]; then tag=-compiled; export LIVECAM_TORCH_COMPILE=1; fi
replicas=${REPLICAS:-1}
if [ "$replicas" != 1 ]; then tag="$tag-r$replicas"; fi
mkdir -p "$out" "$site"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" "$wheels"/*.whl || exit 1
xz -dc "$wheels/ray-serve.tar.xz" | tar -x -C "$site" || exit 1
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 PATH="$site/bin:$PATH"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1

token=$(mktemp -u /tmp/livecam-token.XXXXXX)
setsid "$python" -m livecam serve --engine musetalk --random-weights ${TINY:+--tiny} \
  --replicas "$replicas" --token-file "$token" --port "$port" --status-every 5 \
  >"$out/serve$tag.log" 2>&1 &
server=$!
stop_server() { kill -INT -- "-$server" 2>/dev/null; wait "$server"; }
trap stop_server EXIT
for _ in $(seq 300); do
  grep -q "at ws://" "$out/serve$tag.log" && break
  kill -0 "$server" 2>/dev/null || { tail -c 3000 "$out/serve$tag.log"; exit 1; }
  sleep 1
done
grep -q "at ws://" "$out/serve$tag.log" || { echo "the server did not start"; exit 1; }
echo "server up after ${SECONDS}s"

for n in ${STREAMS:-4 6 8 10 12}; do
  pids=()
  for ((first = 0; first < n; first += 4)); do
    k=$((n - first < 4 ? n - first : 4))
    timeout 300 "$python" -m livecam bench --remote "ws://127.0.0.1:$port" --token-file "$token" \
      --streams "$k" --soak "${SOAK:-20}" --fps 25 --json >"/tmp/livecam-bench-$n-$first.json" \
      2>"/tmp/livecam-bench-$n-$first.log" &
    pids+=($!)
  done
  wait "${pids[@]}"
  for log in /tmp/livecam-bench-"$n"-*.log; do
    [ -s "${log%.log}.json" ] || { echo "== $log"; tail -c 1500 "$log"; }
  done
  "$python" tools/gpu/merge_streams.py "$n" /tmp/livecam-bench-"$n"-*.json >"$out/streams$tag-$n.json"
done
"$python" tools/gpu/merge_streams.py --summary "$out"/streams"$tag"-[0-9]*.json |
  tee "$out/streams$tag.json"
