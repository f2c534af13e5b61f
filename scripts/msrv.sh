#!/usr/bin/env bash
# Checks the workspace against its declared minimum Rust version
# (`rust-version` in Cargo.toml).
#
# If rustup has that toolchain, the workspace is built with it. Otherwise
# (a machine with one toolchain and no network), the check falls back to
# the lockfile: every resolved dependency that declares a `rust-version`
# must declare one no newer than ours, so the declared MSRV is at least
# what the locked dependencies need. The fallback does not prove that our
# own code avoids newer language features; the toolchain build does.
set -euo pipefail
cd "$(dirname "$0")/.."

msrv=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
echo "declared rust-version: $msrv"

if command -v rustup >/dev/null && rustup toolchain list | grep -q "^$msrv"; then
    echo "building with toolchain $msrv"
    cargo "+$msrv" check --workspace --all-targets --locked
    exit 0
fi

echo "toolchain $msrv not installed: checking the locked dependencies' rust-version"
cargo metadata --format-version 1 --locked | python3 -c '
import json, sys
msrv = sys.argv[1]
def key(v):
    return tuple(int(x) for x in v.split("."))[:3] + (0,) * (3 - len(v.split(".")))
meta = json.load(sys.stdin)
ours = {p["id"] for p in meta["packages"] if p["source"] is None}
worst = []
for p in meta["packages"]:
    rv = p.get("rust_version")
    if p["id"] in ours:
        if rv != msrv:
            worst.append(p["name"] + " declares " + str(rv) + ", the workspace " + msrv)
        continue
    if rv and key(rv) > key(msrv):
        worst.append(p["name"] + " " + p["version"] + " needs " + rv)
if worst:
    print("MSRV check failed:\n  " + "\n  ".join(worst))
    sys.exit(1)
needed = max((p["rust_version"] for p in meta["packages"]
              if p.get("rust_version") and p["id"] not in ours), key=key)
print(f"ok: the newest rust-version among locked dependencies is {needed}, ours is {msrv}")
' "$msrv"
