#!/bin/sh
# A control experiment on the Xen rig: boots it like xen-rig-test.sh, but
# the payload (tests/xen-rig/create-stress) only creates and destroys a
# paused copy of each running domU COUNT times, with no migration and no
# program of ours, and reports whether the domU survived.
#
#   COUNT=30 DOMU_TYPES=pvh scripts/xen-rig-stress.sh
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
rig=${XEN_RIG:-$root/../shared/xen-rig}
work=${WORK:-/tmp/xen-rig-work}
payload=$(mktemp -d)
cp "$root/tests/xen-rig/create-stress" "$payload/run"
echo "${COUNT:-30}" > "$payload/count"
export PAYLOAD="$payload" WORK="$work"
export DOMU_TYPES=${DOMU_TYPES:-pvh} MIGRATE_MODES= DO_SAVE=0 XEN_SHADOW=${XEN_SHADOW:-1}
if [ "$XEN_SHADOW" = 1 ]; then
    [ -f "$work/boot/xen-shadow" ] || "$rig/run.sh" prepare
    sh "$root/scripts/xen-rig-paging.sh"
fi
"$rig/run.sh"
res=$(readlink -f "$work/results-latest")
grep -h "RESULT stress" "$res"/*payload.txt
echo "results: $res"
