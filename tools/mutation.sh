#!/usr/bin/env bash
# Mutation run over livecam's core modules with mutmut (configured in pyproject.toml,
# [tool.mutmut]); not part of CI. Each mutant runs only the selected tests that reach the
# mutated function. Results stay in mutants/ (`mutmut show NAME` prints a mutant's diff).
#
#   tools/mutation.sh                 # ring clock scheduler runner cachefile store weights latents features
#   tools/mutation.sh ring scheduler  # some of them
#   tools/mutation.sh control runner # the control socket (~10 min here) is not in the default
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(dirname "${PYTHON:-.venv/bin/python}")
"$bin/python" -c 'import mutmut' 2>/dev/null || "$bin/python" -m pip install -q -e '.[mutation]'
unset PYTHONPATH  # the mutated copy in mutants/ must be the one imported
# mutmut forks each mutant's run from a process that already ran torch: a forked child's first
# multi-threaded torch op waits forever on the parent's OpenMP team (a false "timeout")
export OMP_NUM_THREADS=1

declare -A module=(
  [ring]=livecam.audio.ring [clock]=livecam.audio.clock
  [scheduler]=livecam.pipeline.scheduler [runner]=livecam.pipeline.runner
  [store]=livecam.avatar.store [weights]=livecam.engines.musetalk.weights
  [latents]=livecam.engines.musetalk.avatar_latents [features]=livecam.features.whisper
  [control]=livecam.control [cachefile]=livecam.cachefile
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(ring clock scheduler runner cachefile store weights latents features)
for name in "${names[@]}"; do
  [ -n "${module[$name]:-}" ] || { echo "unknown module $name: ${!module[*]}" >&2; exit 2; }
done

for name in "${names[@]}"; do
  echo "== $name (${module[$name]})"
  # the survivors and the summary (not the spinner, nor each killed mutant)
  "$bin/mutmut" run "${module[$name]}.*" | tr '\r' '\n' | grep -Ev '^(⠋|⠙|⠹|⠸|⠼|⠴|⠦|⠧|⠇|⠏|🎉|$)' || true
done

# mutants / killed / survived per module
"$bin/mutmut" results --all true | "$bin/python" -c '
import collections, sys
counts = collections.defaultdict(collections.Counter)
for line in sys.stdin:
    name, _, status = line.strip().rpartition(": ")
    if name:
        counts[name.split(".x")[0]][status] += 1
print("%-36s %7s %7s %8s %6s  killed %%" % ("module", "mutants", "killed", "survived", "other"))
for mod, c in sorted(counts.items()):
    n, k, s = sum(c.values()), c["killed"], c["survived"]
    if c["not checked"] == n:  # not run
        continue
    print("%-36s %7d %7d %8d %6d  %6.1f" % (mod, n, k, s, n - k - s, 100 * k / n))
'
