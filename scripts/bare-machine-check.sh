#!/usr/bin/env bash
# `make test` on a machine where no Redis or PostgreSQL server answers, proved on this one:
# the suite runs once as usual, then again in a network namespace of its own, where the
# machine's servers on 127.0.0.1:6379 and :5432 cannot be reached (the tests start and stop
# their own, tests/servers.py; one that touched the machine's would fail there). Writes the
# timings to docs/benchmarks/setup.md. Needs root for the namespace (unshare --net).
#
# `make demo` (embedded mode, no broker) runs in the namespace too.
#
#   bash scripts/bare-machine-check.sh                        # the whole suite, twice
#   PYTEST_ARGS="tests/service tests/workers" bash scripts/bare-machine-check.sh   # a part
#   RUNS=bare bash scripts/bare-machine-check.sh              # only without the servers
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTEST_ARGS="${PYTEST_ARGS:-}"
export SCORERECON_REQUIRE_SUITES="${SCORERECON_REQUIRE_SUITES-redis postgres}"  # never skipped
out=docs/benchmarks/setup.md
logs=$(mktemp -d)
# Everything that needs the network first: the namespace has none.
make setup test-servers orthanc bart dicom3tools chromium realdata >"$logs/setup.log" 2>&1

closed() {  # both ports refuse connections
  .venv/bin/python - <<'PY'
import socket, sys
for port in (6379, 5432):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        sys.exit(f"port {port} answers")
    except OSError:
        pass
PY
}

rows=()
wheres=("system Redis and PostgreSQL running" "no server reachable (own network namespace)")
[[ ${RUNS:-both} == bare ]] && wheres=("${wheres[1]}")
for where in "${wheres[@]}"; do
  start=$(date +%s)
  if [[ $where == no* ]]; then
    cmd='ip link set lo up && closed && make test'
    status=0
    unshare --net bash -c "$(declare -f closed); $cmd" >"$logs/run.log" 2>&1 || status=$?
  else
    status=0
    make test >"$logs/run.log" 2>&1 || status=$?
  fi
  seconds=$(( $(date +%s) - start ))
  summary=$(grep -E "[0-9]+ (passed|failed)" "$logs/run.log" | tail -1 | sed 's/=//g' | xargs)
  echo "$where: exit $status after ${seconds} s: $summary"
  rows+=("| $where | $status | $seconds | $summary |")
  cp "$logs/run.log" "$logs/run-$status-$seconds.log"
done

start=$(date +%s)
status=0
unshare --net bash -c "$(declare -f closed); ip link set lo up && closed && make demo" \
  >"$logs/demo.log" 2>&1 || status=$?
seconds=$(( $(date +%s) - start ))
echo "make demo, no server reachable: exit $status after ${seconds} s"
demo="| \`make demo\`, no server reachable (own network namespace) | $status | $seconds | $(ls out | wc -l) files in out/ |"

{
  echo "# Setup: \`make test\` with and without the machine's Redis and PostgreSQL"
  echo
  echo "Measured by \`scripts/bare-machine-check.sh\` on $(uname -m), $(getconf _NPROCESSORS_ONLN) cores ($(date +%F))."
  echo "The tests start their own Redis and PostgreSQL on free loopback ports"
  echo "(\`tests/servers.py\`) and stop them by pid; the second run is in a network namespace"
  echo "of its own, where nothing answers on 127.0.0.1:6379 or :5432, so a test that used"
  echo "the machine's servers would fail there. Tests run: \`${PYTEST_ARGS:-the whole suite}\`."
  echo
  echo "| run | exit status | seconds | result |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo "$demo"
} >"$out"
echo "wrote $out (logs in $logs)"
