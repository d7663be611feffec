#!/usr/bin/env bash
# Mutation run over livecam's core modules with mutmut (configured in pyproject.toml,
# [tool.mutmut]); not part of CI. Each mutant runs only the selected tests that reach the
# mutated function. Results stay in mutants/ (`mutmut show NAME` prints a mutant's diff).
#
#   tools/mutation.sh                 # ring clock scheduler runner store weights latents features
#   tools/mutation.sh ring scheduler  # some of them
#   control: its tests start daemons; add tests/test_control.py to the selection first
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(dirname "${PYTHON:-.venv/bin/python}")
"$bin/python" -c 'import mutmut' 2>/dev/null || "$bin/python" -m pip install -q -e '.[mutation]'
unset PYTHONPATH  # the mutated copy in mutants/ must be the one imported

declare -A module=(
  [ring]=livecam.audio.ring [clock]=livecam.audio.clock
  [scheduler]=livecam.pipeline.scheduler [runner]=livecam.pipeline.runner
  [store]=livecam.avatar.store [weights]=livecam.musetalk.weights
  [latents]=livecam.musetalk.avatar_latents [features]=livecam.musetalk.features
  [control]=livecam.control
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(ring clock scheduler runner store weights latents features)
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
print(f"{\"module\":36} {\"mutants\":>7} {\"killed\":>7} {\"survived\":>8} {\"other\":>6}  killed %")
for mod, c in sorted(counts.items()):
    n, k, s = sum(c.values()), c["killed"], c["survived"]
    print(f"{mod:36} {n:7} {k:7} {s:8} {n - k - s:6}  {100 * k / n:6.1f}")
'
