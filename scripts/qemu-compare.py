#!/usr/bin/env python3
"""Migrates the same guest, with the same workload, under QEMU and under
livemig on this machine, and prints both sides' figures side by side.

The guest is the test payload (crates/backend-kvm/payload): under QEMU it
boots from the multiboot image with `-kernel`, under livemig the
`kvm-migrate` example starts it directly. In both it dirties pages of its
working set at the same rate, paced by its own TSC, and reports its counter
on port 0x10 every 256 steps. QEMU's reports are read from its
`memory_region_ops_write` trace (host-timestamped lines); livemig's VMM
stamps them itself. The guest-seen downtime is the gap between the last
report on the source and the first on the destination, on the host's
clock, on both sides.

Usage:

    scripts/qemu-compare.py                              # 256MiB@200MB/s, pre-copy rows
    scripts/qemu-compare.py --workload idle --runs 1     # one quick run of each row
    scripts/qemu-compare.py --workload 512MiB@400MB/s --mode postcopy
    scripts/qemu-compare.py --matrix --runs 5 --markdown --json target/qemu-compare.json
    scripts/qemu-compare.py --ours 'preempt=--policy postcopy --postcopy-preempt' --mode postcopy
    scripts/qemu-compare.py --only livemig --workload idle --runs 1 --no-build

Workloads (`--workload`, repeatable): `idle` (the guest writes only the
page holding its counter, and reports every millisecond) or
`WSS@RATE` (it writes a working set of WSS at RATE). `--matrix` runs idle,
256MiB@200MB/s and 512MiB@400MB/s under pre-copy, and the two busy ones
under post-copy.

Rows. Pre-copy: QEMU's defaults (one stream), QEMU with multifd on 2 and
4 channels (in QEMU 7.2 the migration thread finds zero pages on both
paths; multifd has no detection of its own), and livemig's pre-copy.
Post-copy: QEMU's postcopy-ram, started with migrate-start-postcopy once
the first pass is over, the same with postcopy-preempt, livemig's
post-copy (`--policy postcopy`, at once) and hybrid (pre-copy rounds,
then post-copy). Every QEMU row runs without a bandwidth cap (QEMU's
default `max-bandwidth` is 128 MiB/s) and with a 300 ms downtime limit,
which is also livemig's default target. `--ours NAME=ARGS` adds a livemig
row with extra kvm-migrate arguments; it is a post-copy row if ARGS name
`--policy postcopy` or `hybrid`.

Ratios are livemig's median over QEMU's, for the total time and the
guest-seen downtime: against QEMU's defaults and against QEMU at its best,
the lowest median of its pre-copy rows for that figure (the row is named).
A livemig run counts only if its memory verified (digests equal on both
sides) and its counter continued; a QEMU run only if its counter
continued. A row with a failed run is marked FAILED and the script exits
with status 1. Each run is logged on stderr as it ends; `--json FILE`
keeps every run's figures, the medians and the ratios.

Needs qemu-system-x86_64 (Debian: qemu-system-x86), binutils, /dev/kvm
and, for post-copy, userfaultfd (root). Python 3 standard library only.
"""
import argparse
import fcntl
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KVM_MIGRATE = os.path.join(ROOT, "target/release/examples/kvm-migrate")
REPORT_EVERY = 256
PAGE = 4096
# The idle guest reports every millisecond: REPORT_EVERY steps a ms, all
# on the counter's page.
IDLE_STEPS_PER_SEC = REPORT_EVERY * 1000
DOWNTIME_LIMIT_MS = 300
GOAL_RATIO = 0.5
UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "kb": 1e3, "mb": 1e6, "gb": 1e9,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
MATRIX = ["idle", "256MiB@200MB/s", "512MiB@400MB/s"]
MATRIX_POSTCOPY = ["256MiB@200MB/s", "512MiB@400MB/s"]


def size(text):
    """Bytes (or bytes a second) from `1GiB`, `200MB/s`, `4096`."""
    m = re.fullmatch(r"([0-9.]+)\s*([a-zA-Z]*?)(/s)?", text.strip())
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text}")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


@dataclass
class Workload:
    """What the guest does: its working set and how fast it writes it."""
    name: str
    wss: int            # bytes
    steps_per_sec: float  # pages written a second (each step writes one)

    @property
    def dirty_rate(self):
        """The rate in bytes a second, as kvm-migrate takes it."""
        return self.steps_per_sec * PAGE

    def settle_ms(self, floor_ms):
        """Long enough for the guest to have written its whole working set."""
        fill_ms = 1000 * (self.wss // PAGE) / self.steps_per_sec
        return max(floor_ms, int(1.5 * fill_ms))


def workload(text):
    """`idle` or `WSS@RATE`."""
    if text == "idle":
        return Workload("idle", PAGE, IDLE_STEPS_PER_SEC)
    wss, sep, rate = text.partition("@")
    if not sep:
        raise argparse.ArgumentTypeError(f"not a workload (idle or WSS@RATE): {text}")
    w, r = size(wss), size(rate)
    if w < PAGE or r <= 0:
        raise argparse.ArgumentTypeError(f"working set below a page or no rate: {text}")
    return Workload(text, w, r / PAGE)


@dataclass
class Row:
    """One way of migrating: a QEMU configuration or kvm-migrate arguments."""
    name: str
    side: str                 # "qemu" or "livemig"
    mode: str                 # "precopy" or "postcopy"
    caps: dict = field(default_factory=dict)     # QEMU: capabilities, both sides
    params: dict = field(default_factory=dict)   # QEMU: parameters, both sides
    args: list = field(default_factory=list)     # livemig: kvm-migrate arguments


def default_rows():
    """The rows the issue asks for, in the order they are printed."""
    return [
        Row("QEMU defaults", "qemu", "precopy"),
        Row("QEMU multifd 2", "qemu", "precopy", {"multifd": True}, {"multifd-channels": 2}),
        Row("QEMU multifd 4", "qemu", "precopy", {"multifd": True}, {"multifd-channels": 4}),
        Row("livemig precopy", "livemig", "precopy", args=["--policy", "precopy"]),
        Row("QEMU postcopy-ram", "qemu", "postcopy", {"postcopy-ram": True}),
        Row("QEMU postcopy-preempt", "qemu", "postcopy",
            {"postcopy-ram": True, "postcopy-preempt": True}),
        Row("livemig postcopy", "livemig", "postcopy", args=["--policy", "postcopy"]),
        Row("livemig hybrid", "livemig", "postcopy", args=["--policy", "hybrid"]),
    ]


def ours_row(text):
    """`NAME=ARGS` from --ours: a livemig row with extra kvm-migrate arguments."""
    name, sep, args = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"not NAME=ARGS: {text}")
    args = shlex.split(args)
    policy = args[args.index("--policy") + 1] if "--policy" in args[:-1] else "precopy"
    mode = "postcopy" if policy in ("postcopy", "hybrid") else "precopy"
    return Row(f"livemig {name}", "livemig", mode, args=args)


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
    """A QMP connection to one QEMU process."""

    def __init__(self, path, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        """Runs a command and returns its answer (events are skipped)."""
        self.file.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError(f"{name}: QEMU closed its monitor")
            reply = json.loads(line)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")

    def close(self):
        self.sock.close()


def reports(trace):
    """(host time, counter) of each report in a QEMU trace file."""
    out = []
    pat = re.compile(r"@(\d+\.\d+):memory_region_ops_write .* addr 0x10 value 0x([0-9a-f]+) size 4")
    try:
        with open(trace) as f:
            for line in f:
                m = pat.search(line)
                if m:
                    out.append((float(m.group(1)), int(m.group(2), 16)))
    except FileNotFoundError:
        pass
    return out


def free_port():
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout):
    """Polls `check` until it is true; fails with `what` after `timeout` s."""
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def start_qemu(ctx, w, side, incoming):
    """Starts one QEMU process running the payload; returns the process."""
    ticks = int(ctx.tsc_hz * REPORT_EVERY / w.steps_per_sec)
    args = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
            "-m", f"{ctx.mem >> 20}M", "-smp", "1", "-display", "none", "-serial", "none",
            "-monitor", "none", "-nodefaults", "-msg", "timestamp=on",
            "-kernel", ctx.image, "-append",
            f"wss={w.wss // PAGE} every={REPORT_EVERY} ticks={ticks}",
            "-qmp", f"unix:{ctx.tmp}/{side}.qmp,server=on,wait=off",
            "-trace", f"memory_region_ops_write,file={ctx.tmp}/{side}.trace"]
    if incoming:
        args += ["-incoming", "defer"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def configure_qemu(row, src, dst):
    """Sets the row's capabilities and parameters on both sides."""
    for q in (src, dst):
        caps = [{"capability": c, "state": v} for c, v in row.caps.items()]
        if row.mode == "postcopy" and q is dst:
            caps.append({"capability": "postcopy-blocktime", "state": True})
        if caps:
            q.cmd("migrate-set-capabilities", capabilities=caps)
        if row.params:
            q.cmd("migrate-set-parameters", **row.params)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40,
                                         "downtime-limit": DOWNTIME_LIMIT_MS})


def drive_qemu_migration(row, src):
    """Migrates, switching to post-copy after the first pass on a post-copy
    row; returns the source's final query-migrate."""
    started_postcopy = False
    deadline = time.time() + 300
    while time.time() < deadline:
        info = src.cmd("query-migrate")
        status = info.get("status")
        if status in ("failed", "cancelled"):
            return info
        # QEMU 7.2 says "completed" a moment before it computes the total
        # time and the downtime: until then they read 0.
        if status == "completed" and info.get("total-time"):
            return info
        passes = info.get("ram", {}).get("dirty-sync-count", 0)
        if row.mode == "postcopy" and not started_postcopy and passes >= 2:
            src.cmd("migrate-start-postcopy")
            started_postcopy = True
        time.sleep(0.01)
    raise RuntimeError("QEMU migration did not end in 300 s")


def qemu_run(ctx, row, w):
    """One QEMU migration of the payload; its figures."""
    for f in os.listdir(ctx.tmp):
        os.unlink(os.path.join(ctx.tmp, f))
    port = free_port()
    settle = w.settle_ms(ctx.settle_ms) / 1000
    procs, qmps = [], []
    try:
        procs.append(start_qemu(ctx, w, "dst", True))
        procs.append(start_qemu(ctx, w, "src", False))
        dst, src = Qmp(f"{ctx.tmp}/dst.qmp"), Qmp(f"{ctx.tmp}/src.qmp")
        qmps += [dst, src]
        configure_qemu(row, src, dst)
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        wait_for("the source guest's first report",
                 lambda: reports(f"{ctx.tmp}/src.trace"), 60)
        time.sleep(settle)
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = drive_qemu_migration(row, src)
        if info.get("status") != "completed":
            raise RuntimeError(f"QEMU migration {info.get('status')}: "
                               f"{info.get('error-desc', info)}")
        wait_for("the destination guest's first report",
                 lambda: reports(f"{ctx.tmp}/dst.trace"), 60)
        time.sleep(ctx.after_ms / 1000)
        dst_info = dst.cmd("query-migrate")
        for q in (src, dst):
            try:
                q.cmd("quit")
            except (OSError, RuntimeError, ValueError):
                pass
    finally:
        for q in qmps:
            q.close()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    s, d = reports(f"{ctx.tmp}/src.trace"), reports(f"{ctx.tmp}/dst.trace")
    # The source's last report before it stopped, the destination's first.
    last, first = s[-1], d[0]
    ram = info["ram"]
    out = {
        "downtime-ms": info["downtime"],
        "guest-downtime-ms": (first[0] - last[0]) * 1e3,
        "total-ms": info["total-time"],
        "transferred-bytes": ram["transferred"],
        "rounds": ram.get("dirty-sync-count"),
        "continues": first[1] == (last[1] + REPORT_EVERY) & 0xFFFFFFFF,
        "memory-verified": None,
        "setup-ms": info.get("setup-time"),
        "ram": ram,
    }
    if row.mode == "postcopy":
        out["postcopy-requests"] = ram.get("postcopy-requests")
        out["blocktime-ms"] = dst_info.get("postcopy-blocktime")
    return out


def ours_run(ctx, row, w):
    """One kvm-migrate run; its figures."""
    settle = w.settle_ms(ctx.settle_ms)
    cmd = [KVM_MIGRATE, "--mem", str(ctx.mem), "--wss", str(w.wss),
           "--dirty-rate", str(int(w.dirty_rate)), "--pacing", "guest",
           "--verify", ctx.verify, "--settle", f"{settle}ms", "--json"] + row.args
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    try:
        j = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"kvm-migrate exited {p.returncode}: {p.stderr.strip()[-500:]}")
    k = j["kvm"]
    out = {
        "downtime-ms": j["downtime-ms"],
        "guest-downtime-ms": k["guest-observed-downtime-ms"],
        "total-ms": j["total-time-ms"],
        "transferred-bytes": j["transferred"],
        "rounds": j["dirty-sync-count"],
        "continues": k["counter-continues"],
        "memory-verified": k["memory-verified"],
    }
    # Where the downtime went, and each round's pages and time (sent,
    # zero, delta-ms), to explain the figures.
    out["downtime-parts"] = j.get("downtime-parts")
    out["switch-reason"] = j.get("switch-reason")
    out["round-log"] = [{k: rd.get(k) for k in ("round", "sent", "zero", "delta-ms", "dirtied")}
                        for rd in j.get("rounds", [])]
    pc = j.get("postcopy")
    if pc:
        out["postcopy-requests"] = pc.get("requests")
        out["fault-p50-ms"] = pc.get("fault-latency-p50-ms")
        out["fault-p99-ms"] = pc.get("fault-latency-p99-ms")
        out["vcpu-stall-ms"] = pc.get("vcpu-stall-ms")
    if p.returncode != 0:
        out["error"] = f"kvm-migrate exited {p.returncode}: {p.stderr.strip()[-300:]}"
    return out


def one_run(ctx, row, w):
    """One run of a row, never raising: a failed run says why."""
    t0 = time.time()
    try:
        r = (qemu_run if row.side == "qemu" else ours_run)(ctx, row, w)
    except Exception as e:  # a failed run is reported, the matrix goes on
        r = {"error": f"{type(e).__name__}: {e}"}
    r["ok"] = ("error" not in r and r.get("continues") is True
               and r.get("memory-verified") is not False)
    r["wall-s"] = round(time.time() - t0, 2)
    return r


def plan(a, rows):
    """The (workload, rows) cells to run, in order."""
    cells = []
    if a.matrix:
        pre = [workload(t) for t in MATRIX]
        post = [workload(t) for t in MATRIX_POSTCOPY]
    else:
        ws = a.workload or [workload("256MiB@200MB/s")]
        pre = ws if a.mode in ("precopy", "both") else []
        post = ws if a.mode in ("postcopy", "both") else []
    for w in pre:
        cells.append((w, "precopy", [r for r in rows if r.mode == "precopy"]))
    for w in post:
        cells.append((w, "postcopy", [r for r in rows if r.mode == "postcopy"]))
    return cells


def run_cells(ctx, cells, runs, log):
    """Runs every cell `runs` times, rows interleaved within each pass so
    that a change in the host's load falls on every row alike."""
    results = []
    for w, mode, rows in cells:
        for n in range(runs):
            for row in rows:
                r = one_run(ctx, row, w)
                r.update(workload=w.name, mode=mode, row=row.name, run=n + 1)
                results.append(r)
                log(r)
    return results


def spread(values, whole=False):
    """`median (min–max)` of a list of numbers, or `-`; and the median."""
    values = [v for v in values if v is not None]
    if not values:
        return "-", None
    med = statistics.median(values)
    digits = 0 if whole or abs(med) >= 100 else 1 if abs(med) >= 10 else 2 if abs(med) >= 1 else 3
    text = f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"
    return text, med


def summarize(results, cells):
    """Per workload and row: medians and spreads of each figure."""
    out = []
    for w, mode, rows in cells:
        for row in rows:
            rs = [r for r in results if r["workload"] == w.name and r["row"] == row.name
                  and r["mode"] == mode]
            ok = [r for r in rs if r["ok"]]
            s = {"workload": w.name, "mode": mode, "row": row.name, "side": row.side,
                 "runs": len(rs), "ok-runs": len(ok), "failed": len(ok) < len(rs),
                 "errors": sorted({r.get("error", "did not verify or continue")
                                   for r in rs if not r["ok"]})}
            for key in ("total-ms", "guest-downtime-ms", "downtime-ms", "rounds",
                        "postcopy-requests", "fault-p50-ms", "fault-p99-ms",
                        "vcpu-stall-ms", "blocktime-ms"):
                whole = key in ("rounds", "postcopy-requests")
                s[key], s[key + "-median"] = spread([r.get(key) for r in ok], whole)
            s["sent-MiB"], _ = spread([r["transferred-bytes"] / 2**20 for r in ok])
            s["gap-ms"], _ = spread([r["guest-downtime-ms"] - r["downtime-ms"] for r in ok])
            out.append(s)
    return out


def ratios(summary):
    """livemig's medians over QEMU's, per workload: pre-copy against QEMU's
    defaults and its best row per figure; post-copy against each QEMU row."""
    out = []
    for wname, mode in dict.fromkeys((s["workload"], s["mode"]) for s in summary):
        cell = [s for s in summary if s["workload"] == wname and s["mode"] == mode]
        qemu = [s for s in cell if s["side"] == "qemu" and s["ok-runs"]]
        ours = [s for s in cell if s["side"] == "livemig"]
        if mode == "precopy":
            against = [("QEMU defaults", {k: s for s in qemu if s["row"] == "QEMU defaults"
                                          for k in ("total-ms", "guest-downtime-ms")})]
            against.append(("QEMU best", {
                k: min(qemu, key=lambda s: s[k + "-median"]) for k in
                ("total-ms", "guest-downtime-ms")} if qemu else {}))
        else:
            against = [(s["row"], {"total-ms": s, "guest-downtime-ms": s}) for s in qemu]
        for o in ours:
            for label, best in against:
                rec = {"workload": wname, "mode": mode, "ours": o["row"], "against": label}
                for k in ("total-ms", "guest-downtime-ms"):
                    q = best.get(k)
                    if q is None or not o["ok-runs"] or o["failed"]:
                        rec[k] = None
                        continue
                    rec[k] = o[k + "-median"] / q[k + "-median"]
                    rec[k + "-qemu-row"] = q["row"]
                out.append(rec)
    return out


def render(headers, rows, markdown):
    """A table as markdown or as aligned plain text."""
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip()
    return "\n".join([fmt(headers)] + [fmt(r) for r in rows])


def result_tables(summary, rats, markdown):
    """The tables to print: pre-copy, post-copy, ratios."""
    out = []
    pre = [s for s in summary if s["mode"] == "precopy"]
    post = [s for s in summary if s["mode"] == "postcopy"]
    status = lambda s: f"{s['ok-runs']}/{s['runs']}" + (" FAILED" if s["failed"] else "")
    if pre:
        out.append(render(
            ["workload", "row", "runs ok", "total ms", "guest-seen downtime ms",
             "reported downtime ms", "guest-seen − reported ms", "sent MiB", "rounds"],
            [[s["workload"], s["row"], status(s), s["total-ms"], s["guest-downtime-ms"],
              s["downtime-ms"], s["gap-ms"], s["sent-MiB"], s["rounds"]] for s in pre],
            markdown))
    if post:
        out.append(render(
            ["workload", "row", "runs ok", "total ms", "guest-seen downtime ms",
             "reported downtime ms", "faults", "fault p50 ms", "fault p99 ms",
             "vCPU blocked ms"],
            [[s["workload"], s["row"], status(s), s["total-ms"], s["guest-downtime-ms"],
              s["downtime-ms"], s["postcopy-requests"], s["fault-p50-ms"],
              s["fault-p99-ms"],
              s["blocktime-ms"] if s["side"] == "qemu" else s["vcpu-stall-ms"]]
             for s in post], markdown))
    if rats:
        def cell(r, k):
            if r[k] is None:
                return "-"
            mark = "met" if r[k] <= GOAL_RATIO else "not met"
            return f"{r[k]:.2f} ({mark})"
        out.append(render(
            ["workload", "livemig row", "against", "total time ratio",
             "guest-seen downtime ratio", "QEMU row (total / downtime)"],
            [[r["workload"], r["ours"], r["against"], cell(r, "total-ms"),
              cell(r, "guest-downtime-ms"),
              f"{r.get('total-ms-qemu-row', '-')} / {r.get('guest-downtime-ms-qemu-row', '-')}"]
             for r in rats], markdown))
    return out


def machine():
    """What the figures were measured on."""
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "qemu": qemu, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def uptime():
    """The load as `uptime` prints it."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def build():
    """Builds the payload image and kvm-migrate; returns the image's path."""
    image = subprocess.run(["sh", os.path.join(ROOT, "crates/backend-kvm/payload/build.sh")],
                           check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(["cargo", "build", "--release", "--example", "kvm-migrate"], cwd=ROOT,
                   check=True)
    return image


def log_run(r):
    """One line per run on stderr, as the matrix goes."""
    if "error" in r and "total-ms" not in r:
        print(f"{r['workload']:>15} {r['row']:<24} {r['run']:>2}  FAILED {r['error']}",
              file=sys.stderr)
        return
    v = {None: "-", True: "yes", False: "NO"}[r["memory-verified"]]
    print(f"{r['workload']:>15} {r['row']:<24} {r['run']:>2}  total {r['total-ms']:7.0f} ms"
          f"  guest-seen {r['guest-downtime-ms']:7.1f} ms  reported {r['downtime-ms']:7.1f} ms"
          f"  sent {r['transferred-bytes'] / 2**20:7.1f} MiB  continues {r['continues']}"
          f"  verified {v}{'' if r['ok'] else '  FAILED ' + r.get('error', '')}",
          file=sys.stderr, flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--mem", type=size, default=size("1GiB"), help="guest memory (1GiB)")
    p.add_argument("--workload", type=workload, action="append",
                   help="idle or WSS@RATE, repeatable (default 256MiB@200MB/s)")
    p.add_argument("--mode", choices=["precopy", "postcopy", "both"], default="precopy")
    p.add_argument("--matrix", action="store_true",
                   help="every workload: pre-copy on all three, post-copy on the busy two")
    p.add_argument("--ours", type=ours_row, action="append", default=[],
                   metavar="NAME=ARGS", help="a livemig row with extra kvm-migrate arguments")
    p.add_argument("--only", action="append", default=[], metavar="ROW",
                   help="run only rows whose name contains this (repeatable)")
    p.add_argument("--runs", type=int, default=5, help="runs per row and workload (5)")
    p.add_argument("--settle-ms", type=int, default=1000,
                   help="least time the guest runs before migrating (longer if its "
                        "working set takes longer to write once)")
    p.add_argument("--after-ms", type=int, default=500,
                   help="time the destination guest runs before QEMU is stopped")
    p.add_argument("--verify", choices=["full", "sent"], default="sent",
                   help="kvm-migrate's --verify")
    p.add_argument("--markdown", action="store_true", help="print markdown tables")
    p.add_argument("--json", metavar="FILE", help="write every run and the summary here")
    p.add_argument("--no-build", action="store_true", help="do not run cargo build")
    a = p.parse_args()
    if a.runs < 1:
        p.error("--runs must be at least 1")
    return a


@dataclass
class Context:
    """What every run needs."""
    mem: int
    image: str
    tmp: str
    tsc_hz: int
    settle_ms: int
    after_ms: int
    verify: str


def main():
    a = parse_args()
    rows = default_rows() + a.ours
    if a.only:
        rows = [r for r in rows if any(o.lower() in r.name.lower() for o in a.only)]
    if a.no_build:
        image = os.path.join(ROOT, "target/payload/payload.elf")
    else:
        image = build()
    cells = plan(a, rows)
    info = machine()
    info["uptime-start"] = uptime()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(a.mem, image, tmp, tsc_khz() * 1000, a.settle_ms, a.after_ms, a.verify)
        results = run_cells(ctx, cells, a.runs, log_run)
    info["elapsed-s"] = round(time.time() - t0, 1)
    info["uptime-end"] = uptime()
    summary = summarize(results, cells)
    rats = ratios(summary)
    print(f"{info['date']}; {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}; "
          f"{info['qemu']}")
    print(f"guest {a.mem >> 20} MiB, 1 vCPU, TSC-paced; {a.runs} runs per row; livemig "
          f"--verify {a.verify}; QEMU: no bandwidth cap, downtime-limit {DOWNTIME_LIMIT_MS} ms")
    print(f"load at start: {info['uptime-start']}")
    print(f"load at end:   {info['uptime-end']}")
    print(f"the whole run took {info['elapsed-s']:.0f} s\n")
    print("\n\n".join(result_tables(summary, rats, a.markdown)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "mem": a.mem, "runs-per-row": a.runs,
                       "results": results, "summary": summary, "ratios": rats}, f, indent=1)
    sys.exit(1 if any(s["failed"] or not s["ok-runs"] for s in summary) else 0)


if __name__ == "__main__":
    main()
