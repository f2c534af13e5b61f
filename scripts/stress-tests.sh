#!/usr/bin/env sh
# Runs the whole workspace test suite N times in a row (default 10) with a
# busy loop competing for the CPU, and stops at the first failure.
#   scripts/stress-tests.sh [N]
# Prints one line a run and a final count.
set -u
n=${1:-10}
cd "$(dirname "$0")/.." || exit 2
cargo test --release --workspace --no-run -q || exit 2
sh -c 'while :; do :; done' &
hog=$!
trap 'kill $hog 2>/dev/null' EXIT INT TERM
passed=0
i=1
while [ "$i" -le "$n" ]; do
    start=$(date +%s)
    if cargo test --release --workspace -q >"target/stress-run-$i.log" 2>&1; then
        passed=$((passed + 1))
        echo "run $i: passed in $(( $(date +%s) - start )) s"
    else
        echo "run $i: FAILED (target/stress-run-$i.log)"
        grep -E "^test .* FAILED|panicked" "target/stress-run-$i.log" | head -5
        break
    fi
    i=$((i + 1))
done
echo "$passed of $n runs passed beside a busy loop"
[ "$passed" -eq "$n" ]
