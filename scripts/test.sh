#!/usr/bin/env bash
# The whole test suite, as `make test` (and so CI) runs it, in three lanes at once:
#
#   lane 1: tests/e2e and tests/unit, in the default lab (or $TUG_LAB's);
#   lane 2: tests/faults without pre-copy's and hybrid's cases, in lab "faultsa";
#   lane 3: the fault matrix's pre-copy and hybrid cases, in lab "faultsb".
#
# Lab instances share nothing (names, subnets, paths, cgroups: see the
# README's "The lab"), and the fault harness touches only its own instance's
# processes, so the lanes cannot disturb each other. Most of a test's time is
# spent waiting (on CRIU, on the deadlines the faults make run out), so the
# lanes finish in about the time of the longest. Each lane's output is
# printed whole; the exit code is non-zero if any lane failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTEST=.venv/bin/pytest
mkdir -p build
rm -f build/fault-matrix.json  # the lanes merge their outcomes into it

lane() {  # lane NAME LAB PYTEST-ARGS...: run in the background, log to build/test-NAME.log
    local name=$1 lab=$2
    shift 2
    TUG_LAB=$lab "$PYTEST" -q -ra -p no:cacheprovider "$@" >"build/test-$name.log" 2>&1 &
    pids+=("$!")
    names+=("$name")
}

pids=()
names=()
echo "tests: lane 1 = tests/e2e + tests/unit (lab ${TUG_LAB:-default}); lanes 2, 3 = tests/faults (labs faultsa, faultsb; logs build/test-faults*.log)"
lane faults-a faultsa tests/faults -k "not (precopy or hybrid)"
lane faults-b faultsb tests/faults -k "precopy or hybrid"
# Ctrl-C or a CI timeout stops every lane (each rolls back and downs its lab as usual).
trap 'kill -INT "${pids[@]}" 2>/dev/null; wait; exit 130' INT TERM

"$PYTEST" -q -ra tests/e2e tests/unit
rcs=("$?")
for pid in "${pids[@]}"; do
    wait "$pid"
    rcs+=("$?")
done
trap - INT TERM

failed=0
for i in "${!names[@]}"; do
    echo
    echo "==== lane $((i + 2)): ${names[$i]} ===="
    cat "build/test-${names[$i]}.log"
done
echo
echo "tests: lane 1 (e2e + unit) exit ${rcs[0]}; lane 2 (${names[0]}) exit ${rcs[1]}; lane 3 (${names[1]}) exit ${rcs[2]}"
for rc in "${rcs[@]}"; do
    [ "$rc" -eq 0 ] || failed=1
done
exit "$failed"
