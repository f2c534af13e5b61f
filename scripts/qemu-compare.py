#!/usr/bin/env python3
"""Migrates the same guest, with the same workload, under QEMU and under
livemig on this machine, and prints both sides' figures in one table.

The guest is the test payload (crates/backend-kvm/payload): under QEMU it
boots from the multiboot image with `-kernel`, under livemig the
`kvm-migrate` example starts it directly. In both it dirties pages of its
working set at the same rate, paced by its own TSC, and reports its counter
on port 0x10. QEMU's reports are read from its `memory_region_ops_write`
trace (host-timestamped lines); livemig's VMM stamps them itself. The
guest-observed downtime is the gap between the last report on the source
and the first on the destination, on the host's clock, in both cases.

    scripts/qemu-compare.py --mem 1GiB --wss 256MiB --dirty-rate 200MB/s --runs 3

Needs qemu-system-x86_64 (Debian: qemu-system-x86), binutils and /dev/kvm.
Both sides get no bandwidth cap and a 300 ms downtime target (QEMU's
downtime-limit; livemig's pre-copy default).
"""
import argparse
import fcntl
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_EVERY = 256
UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "kib": 1 << 10, "mib": 1 << 20,
         "gib": 1 << 30, "kb": 1e3, "mb": 1e6, "gb": 1e9, "b": 1}


def size(text):
    m = re.fullmatch(r"([0-9.]+)\s*([a-zA-Z]*?)(/s)?", text.strip())
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text}")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def tsc_khz():
    """The TSC frequency KVM gives a new vCPU (KVM_GET_TSC_KHZ)."""
    kvm = os.open("/dev/kvm", os.O_RDWR)
    try:
        vm = fcntl.ioctl(kvm, 0xAE01, 0)          # KVM_CREATE_VM
        try:
            vcpu = fcntl.ioctl(vm, 0xAE41, 0)     # KVM_CREATE_VCPU
            try:
                return fcntl.ioctl(vcpu, 0xAEA3, 0)  # KVM_GET_TSC_KHZ
            finally:
                os.close(vcpu)
        finally:
            os.close(vm)
    finally:
        os.close(kvm)


class Qmp:
    def __init__(self, path, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.file.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")


def reports(trace):
    """(host time, counter) of each report in a QEMU trace file."""
    out = []
    pat = re.compile(r"@(\d+\.\d+):memory_region_ops_write .* addr 0x10 value 0x([0-9a-f]+) size 4")
    with open(trace) as f:
        for line in f:
            m = pat.search(line)
            if m:
                out.append((float(m.group(1)), int(m.group(2), 16)))
    return out


def qemu_run(a, image, ticks, tmp, n):
    base = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
            "-m", f"{a.mem >> 20}M", "-smp", "1", "-display", "none", "-serial", "none",
            "-monitor", "none", "-nodefaults", "-msg", "timestamp=on"]
    cmdline = f"wss={a.wss // 4096} every={REPORT_EVERY} ticks={ticks}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    try:
        for side in ("dst", "src"):
            args = base + ["-qmp", f"unix:{tmp}/{side}{n}.qmp,server=on,wait=off",
                           "-trace", f"memory_region_ops_write,file={tmp}/{side}{n}.trace"]
            if side == "dst":
                args += ["-kernel", image, "-append", cmdline,
                         "-incoming", f"tcp:127.0.0.1:{port}"]
            else:
                args += ["-kernel", image, "-append", cmdline]
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
        dst, src = Qmp(f"{tmp}/dst{n}.qmp"), Qmp(f"{tmp}/src{n}.qmp")
        # Wait for the guest to run, then let it settle.
        deadline = time.time() + 120
        while not reports(f"{tmp}/src{n}.trace") and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(a.settle_ms / 1000)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40,
                                             "downtime-limit": 300})
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            info = src.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        time.sleep(a.settle_ms / 1000)
        for q in (src, dst):
            try:
                q.cmd("quit")
            except (OSError, RuntimeError, ValueError):
                pass
    finally:
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    if info.get("status") != "completed":
        raise RuntimeError(f"QEMU migration {info.get('status')}: {info}")
    s, d = reports(f"{tmp}/src{n}.trace"), reports(f"{tmp}/dst{n}.trace")
    if not s or not d:
        raise RuntimeError("no reports from the source or the destination guest")
    # The source's last report before it stopped, the destination's first.
    last, first = s[-1], d[0]
    ram = info["ram"]
    return {
        "downtime-ms": info["downtime"],
        "guest-downtime-ms": (first[0] - last[0]) * 1e3,
        "total-ms": info["total-time"],
        "transferred-bytes": ram["transferred"],
        "rounds": ram.get("dirty-sync-count"),
        "continues": first[1] == (last[1] + REPORT_EVERY) & 0xFFFFFFFF,
        "memory-verified": None,
    }


def ours_run(a):
    exe = os.path.join(ROOT, "target/release/examples/kvm-migrate")
    out = subprocess.run([exe, "--mem", str(a.mem), "--wss", str(a.wss),
                          "--dirty-rate", str(a.dirty_rate), "--pacing", "guest",
                          "--verify", a.verify, "--settle", f"{a.settle_ms}ms", "--json"],
                         check=True, capture_output=True, text=True).stdout
    j = json.loads(out)
    k = j["kvm"]
    return {
        "downtime-ms": j["downtime"],
        "guest-downtime-ms": k["guest-observed-downtime-ms"],
        "total-ms": j["total-time"],
        "transferred-bytes": j["transferred"],
        "rounds": j["dirty-sync-count"],
        "continues": k["counter-continues"],
        "memory-verified": k["memory-verified"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mem", type=size, default=size("1GiB"))
    p.add_argument("--wss", type=size, default=size("256MiB"))
    p.add_argument("--dirty-rate", type=size, default=size("200MB/s"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--settle-ms", type=int, default=1000)
    p.add_argument("--verify", choices=["full", "sent"], default="sent")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    image = subprocess.run(["sh", os.path.join(ROOT, "crates/backend-kvm/payload/build.sh")],
                           check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(["cargo", "build", "--release", "--example", "kvm-migrate"], cwd=ROOT,
                   check=True)
    ticks = int(tsc_khz() * 1000 * REPORT_EVERY / (a.dirty_rate / 4096))
    results = {"qemu": [], "livemig": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(a.runs):
            results["qemu"].append(qemu_run(a, image, ticks, tmp, n))
            results["livemig"].append(ours_run(a))
    if a.json:
        print(json.dumps(results, indent=1))
        return
    qemu_version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    print(f"guest: {a.mem >> 20} MiB, working set {a.wss >> 20} MiB dirtied at "
          f"{a.dirty_rate / 1e6:.0f} MB/s (TSC-paced); {a.runs} runs each; {qemu_version}")
    print(f"{'':9} {'run':>3} {'downtime ms':>12} {'guest-seen ms':>14} {'total ms':>9} "
          f"{'sent MiB':>9} {'rounds':>6} {'continues':>9} {'verified':>8}")
    for who, rs in results.items():
        for i, r in enumerate(rs):
            v = {None: "-", True: "yes", False: "NO"}[r["memory-verified"]]
            print(f"{who:9} {i + 1:>3} {r['downtime-ms']:>12.1f} {r['guest-downtime-ms']:>14.1f} "
                  f"{r['total-ms']:>9.0f} {r['transferred-bytes'] / 2**20:>9.1f} "
                  f"{r['rounds']:>6} {str(r['continues']).lower():>9} {v:>8}")
    med = {w: statistics.median(r["guest-downtime-ms"] for r in rs) for w, rs in results.items()}
    tot = {w: statistics.median(r["total-ms"] for r in rs) for w, rs in results.items()}
    print(f"median guest-seen downtime: livemig {med['livemig']:.1f} ms, QEMU {med['qemu']:.1f} ms "
          f"(ratio {med['livemig'] / med['qemu']:.2f}); median total time: livemig "
          f"{tot['livemig']:.0f} ms, QEMU {tot['qemu']:.0f} ms (ratio "
          f"{tot['livemig'] / tot['qemu']:.2f})")
    ok = all(r["continues"] for rs in results.values() for r in rs)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
