#!/usr/bin/env bash
# `make test`: the whole suite, with the tests that wait on package installs more than on
# the CPU in a second pytest beside the rest (BESIDE):
# - tests/integration/test_containers.py: install an engine, build three images, run the
#   compose stack. On 2026-12-07, with a cold cache on a loaded machine, it took 28
#   minutes (engine install about 5, image builds about 23) while dockerd used 5.8
#   CPU-minutes;
# - tests/integration/test_fresh_install.py: `pip install .` into a new venv (156 s wall,
#   36 s CPU, measured by hand on 2026-12-07), then `up` with no Mosquitto.
# Beside the others they cost them a little CPU and take their half hour out of the serial
# total. Their output goes to $LOG and is printed when both are done; either failing
# fails the run.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
FLAGS=${PYTEST_FLAGS:--q --durations=15}
LOG=${CONTAINER_LOG:-.pytest-containers.log}
BESIDE=(tests/integration/test_containers.py tests/integration/test_fresh_install.py)

# shellcheck disable=SC2086
"$BIN/pytest" $FLAGS -p no:cacheprovider "${BESIDE[@]}" >"$LOG" 2>&1 &
containers=$!
trap 'kill $containers 2>/dev/null' INT TERM

# shellcheck disable=SC2086
"$BIN/pytest" $FLAGS "${BESIDE[@]/#/--ignore=}" "$@"
rest=$?

wait $containers
container_rc=$?
echo
echo "=== ${BESIDE[*]} (run beside the rest; exit $container_rc) ==="
cat "$LOG"
if [ $rest -ne 0 ]; then exit $rest; fi
# 5: no tests collected / all deselected is not a failure of the suite
if [ $container_rc -ne 0 ] && [ $container_rc -ne 5 ]; then exit $container_rc; fi
exit 0
