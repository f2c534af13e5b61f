#!/usr/bin/env python3
"""Runs two or more builds of the kvm-migrate example back to back on one
workload, interleaved run by run (so that a busy host weighs on each
build alike), and prints each build's medians and spreads as a Markdown
table.

    scripts/kvm-migrate-ab.py --bin before=/tmp/kvm-migrate-old \\
        --bin after=target/release/examples/kvm-migrate \\
        --workload 512MiB@400MB/s --connections 1 2 4 --runs 5

Each run is the livemig row of scripts/qemu-compare.py: `--pacing guest`,
`--verify sent`, `--settle` long enough for the guest to have written its
working set, `--json`; extra kvm-migrate arguments follow `--`. The table
gives total time, guest-seen and reported downtime, the downtime the
policy predicted at the switch-over, the final copy's pages and its time
a page, and the rounds (the final copy included). `--jsonl FILE` keeps
every run's figures.
"""
import argparse
import json
import statistics
import subprocess
import sys

PAGE = 4096


def size(text):
    t = text.replace("/s", "")
    for suffix, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10),
                         ("GB", 10**9), ("MB", 10**6)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def one_run(binary, a, wss, rate, conns, extra):
    settle = max(1000, int(1.5 * 1000 * (wss // PAGE) / (rate / PAGE)))
    cmd = [binary, "--mem", a.mem, "--wss", str(wss), "--dirty-rate", str(rate),
           "--pacing", "guest", "--policy", a.policy, "--verify", "sent",
           "--settle", f"{settle}ms", "--connections", str(conns), "--json"] + extra
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    try:
        j = json.loads(p.stdout)
    except json.JSONDecodeError:
        return {"error": p.stderr.strip()[-300:]}
    final = [r for r in j["rounds"] if r["final-copy"]][-1]
    return {
        "total-ms": j["total-time-ms"],
        "guest-downtime-ms": j["kvm"]["guest-observed-downtime-ms"],
        "downtime-ms": j["downtime-ms"],
        "expected-downtime-ms": j["expected-downtime-ms"],
        "final-ms": j["downtime-parts"]["final-copy-ms"],
        "final-pages": final["sent"],
        "rounds": len(j["rounds"]),
        "round-log": [(r["round"], r["sent"], r["delta-ms"], r["dirtied"]) for r in j["rounds"]],
        "verified": j["kvm"]["memory-verified"] and p.returncode == 0,
    }


def spread(values, digits=1):
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}–{max(values):.{digits}f})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--workload", default="512MiB@400MB/s", help="WSS@RATE")
    p.add_argument("--mem", default="1GiB")
    p.add_argument("--policy", default="precopy")
    p.add_argument("--connections", type=int, nargs="+", default=[1])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--jsonl", help="append every run's figures to this file")
    p.add_argument("extra", nargs="*", help="more kvm-migrate arguments (after --)")
    a = p.parse_args()
    bins = [b.partition("=")[::2] for b in a.bin]
    wss_text, _, rate_text = a.workload.partition("@")
    wss, rate = size(wss_text), size(rate_text)
    out = open(a.jsonl, "a") if a.jsonl else None
    runs = {}
    for i in range(a.runs):
        for c in a.connections:
            for name, path in bins:
                r = one_run(path, a, wss, rate, c, a.extra)
                r.update({"build": name, "connections": c, "run": i + 1})
                runs.setdefault((c, name), []).append(r)
                if out:
                    out.write(json.dumps(r) + "\n")
                    out.flush()
                print(json.dumps(r), file=sys.stderr, flush=True)
    print("| workload | connections | build | runs ok | total ms | guest-seen downtime ms "
          "| reported downtime ms | predicted ms | final pages | final µs a page | rounds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (c, name), rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            print(f"| {a.workload} | {c} | {name} | 0/{len(rs)} | - | - | - | - | - | - | - |")
            continue
        col = lambda k: [r[k] for r in ok]
        per_page = [r["final-ms"] * 1000 / max(1, r["final-pages"]) for r in ok]
        verified = sum(1 for r in ok if r["verified"])
        print(f"| {a.workload} | {c} | {name} | {verified}/{len(rs)} | {spread(col('total-ms'), 0)} "
              f"| {spread(col('guest-downtime-ms'))} | {spread(col('downtime-ms'))} "
              f"| {spread(col('expected-downtime-ms'))} "
              f"| {statistics.median(col('final-pages')):.0f} | {spread(per_page, 2)} "
              f"| {statistics.median(col('rounds')):.0f} ({min(col('rounds'))}–{max(col('rounds'))}) |")


if __name__ == "__main__":
    main()
