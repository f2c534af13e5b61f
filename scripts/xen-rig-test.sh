#!/bin/sh
# Runs the Xen integration test: builds xen-migrate, boots Xen 4.17 with a
# dom0 and a PV and a PVH domU inside QEMU with ../shared/xen-rig (or $XEN_RIG), and
# runs tests/xen-rig/run in dom0 against each domU. The serial log and the
# results land in $WORK (default /tmp/xen-rig-work); the payload's output
# is copied to docs/xen-rig/ as the record of the run.
#
#   scripts/xen-rig-test.sh            # about 3-5 minutes on 2 cores
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
rig=${XEN_RIG:-$root/../shared/xen-rig}
work=${WORK:-/tmp/xen-rig-work}
cargo build --release --example xen-migrate --manifest-path "$root/Cargo.toml"
payload=$(mktemp -d)
cp "$root/tests/xen-rig/run" "$root/target/release/examples/xen-migrate" "$payload/"
[ -n "${POLICIES:-}" ] && echo "$POLICIES" > "$payload/policies"
export PAYLOAD="$payload" WORK="$work"
export DOMU_TYPES=${DOMU_TYPES:-pv pvh} MIGRATE_MODES=${MIGRATE_MODES-pipe} DO_SAVE=${DO_SAVE:-0}
# PV log-dirty needs a hypervisor with shadow paging (the rig rebuilds one).
export XEN_SHADOW=${XEN_SHADOW:-1}
# Post-copy needs memory paging too: build that hypervisor once.
if [ "$XEN_SHADOW" = 1 ]; then
    [ -f "$work/boot/xen-shadow" ] || "$rig/run.sh" prepare
    sh "$root/scripts/xen-rig-paging.sh"
fi
"$rig/run.sh"
res=$(readlink -f "$work/results-latest")
mkdir -p "$root/docs/xen-rig"
for f in "$res"/*payload.txt "$res"/*migrate-pipe.txt; do
    [ -f "$f" ] && cp "$f" "$root/docs/xen-rig/"
done
cp "$res/rig.log" "$root/docs/xen-rig/rig-summary.log"
echo "results: $res (payload output copied to docs/xen-rig/)"
