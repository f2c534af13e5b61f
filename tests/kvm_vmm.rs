//! Runs `examples/kvm-vmm/`, a VMM with its own vCPU loop, and migrates
//! its guests between two processes: the multiboot test image and a raw
//! boot sector written here byte by byte.
//!
//! The tests need `/dev/kvm` (set `LIVEMIG_NO_KVM=1` only on a machine
//! known to have none) and the example binary: `cargo test` builds it
//! with the other examples; with a target selection that leaves it out
//! (`cargo test --test kvm_vmm`), the test builds it with cargo first.
#![cfg(feature = "kvm")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long one run of the example may take, on any host.
const DEADLINE: Duration = Duration::from_secs(300);

/// The multiboot payload's command line: 512 working-set pages, a report
/// every 4096 iterations, no pacing.
const CMDLINE: &str = "payload.elf wss=512 every=4096 ticks=0";

mod common;
use common::{have_kvm, wait};

/// The example binary (built if missing or stale).
fn vmm() -> PathBuf {
    common::example("kvm-vmm")
}

/// The multiboot test image, built with `payload/build.sh` (binutils).
fn image() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kvm-vmm-payload");
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/backend-kvm/payload/build.sh");
            let status = Command::new("sh")
                .arg(&script)
                .arg(&out)
                .stdout(Stdio::null())
                .status()
                .expect("running payload/build.sh (needs binutils)");
            assert!(status.success(), "payload/build.sh failed: {status}");
            out.join("payload.elf")
        })
        .clone()
}

/// Runs the example with `args` (stderr inherited) and returns its exit
/// status and standard output.
fn run(args: &[&str]) -> (std::process::ExitStatus, String) {
    let child = Command::new(vmm())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting kvm-vmm");
    let out = wait(child, "kvm-vmm");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The `key=value` words of the line of `stdout` that starts with
/// `prefix`.
fn fields(stdout: &str, prefix: &str) -> HashMap<String, String> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{stdout}"));
    line[prefix.len()..]
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn number(f: &HashMap<String, String>, key: &str) -> u64 {
    f.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} is not a number in {f:?}"))
}

/// Checks a `MIGRATED` line of `--migrate`: memory verified with equal
/// digests on both ends, and the destination's first report one step
/// after the source's last.
fn check_migrated(stdout: &str, every: u64) {
    let f = fields(stdout, "MIGRATED ");
    assert_eq!(f["verified"], "true", "{f:?}");
    assert_eq!(f["digest"].len(), 32, "a digest: {f:?}");
    assert_eq!(f["digest"], f["destination-digest"], "{f:?}");
    assert_eq!(number(&f, "every"), every, "{f:?}");
    let (last, first) = (number(&f, "last"), number(&f, "first"));
    assert!(last > 0, "the guest ran on the source: {f:?}");
    assert_eq!(first, last + every, "the counter continues: {f:?}");
    assert_eq!(f["continues"], "yes", "{f:?}");
}

/// Migrates the multiboot image run with `cmdline` in `mem` of memory
/// with `--migrate` and pre-copy, and `extra` flags; checks the result
/// (see [`check_migrated`]) and returns the `MIGRATED` line's fields.
fn migrate_image(cmdline: &str, mem: &str, extra: &[&str]) -> HashMap<String, String> {
    let image = image();
    let mut args = vec!["--image", image.to_str().unwrap(), "--cmdline", cmdline];
    args.extend(["--mem", mem, "--migrate", "--policy", "precopy"]);
    args.extend(extra);
    let (status, stdout) = run(&args);
    assert!(status.success(), "kvm-vmm: {status}\n{stdout}");
    check_migrated(&stdout, 4096);
    fields(&stdout, "MIGRATED ")
}

#[test]
fn multiboot_image_migrates_between_two_processes() {
    if !have_kvm() {
        return;
    }
    migrate_image(CMDLINE, "64MiB", &[]);
}

/// The destination and the source started separately, as on two hosts:
/// `--listen` and `--to`.
#[test]
fn listen_and_to_migrate_a_guest() {
    if !have_kvm() {
        return;
    }
    let image = image();
    let mut dst = Command::new(vmm())
        .args(["--listen", "127.0.0.1:0", "--mem", "32MiB", "--vcpus", "2"])
        .args(["--first-slot", "40", "--run-for", "0.2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the destination");
    let mut out = BufReader::new(dst.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("kvm-vmm: listening on ")
        .unwrap_or_else(|| panic!("the destination said {line:?}"))
        .to_string();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });

    let (status, src_out) = run(&[
        "--image",
        image.to_str().unwrap(),
        "--cmdline",
        CMDLINE,
        "--mem",
        "32MiB",
        "--vcpus",
        "2",
        "--to",
        &addr,
        "--policy",
        "stop-and-copy",
    ]);
    assert!(status.success(), "source: {status}\n{src_out}");
    let start = Instant::now();
    let dst_status = loop {
        if let Some(s) = dst.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = dst.kill();
            panic!("the destination did not end within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dst_out = reader.join().unwrap();
    assert!(dst_status.success(), "destination: {dst_status}\n{dst_out}");

    let src = fields(&src_out, "MIGRATED ");
    let dst = fields(&dst_out, "kvm-vmm: resumed ");
    assert_eq!(src["verified"], "true", "{src:?}");
    assert_eq!(src["digest"].len(), 32, "{src:?}");
    assert_eq!(src["digest"], dst["digest"], "{src:?} {dst:?}");
    assert_eq!(
        number(&dst, "first"),
        number(&src, "last") + 4096,
        "the counter continues: {src:?} {dst:?}"
    );
}

/// A real-mode boot sector, assembled by hand (loaded at 0000:7c00): it
/// prints "OK" on COM1, polling the line status register for an empty
/// transmitter before each byte, then counts in the dword at 0x500,
/// reporting every count on port 0x10 and printing "OK" again every 64.
///
/// ```text
/// 7c00: fa                cli
/// 7c01: fc                cld
/// 7c02: 31 c0             xor  ax, ax
/// 7c04: 8e d8             mov  ds, ax
/// 7c06: 8e d0             mov  ss, ax
/// 7c08: bc 00 7c          mov  sp, 0x7c00
/// 7c0b: be 35 7c    say:  mov  si, msg
/// 7c0e: ba fd 03    char: mov  dx, 0x3fd     ; line status
/// 7c11: ec          busy: in   al, dx
/// 7c12: a8 20             test al, 0x20      ; transmitter empty?
/// 7c14: 74 fb             jz   busy
/// 7c16: ac                lodsb
/// 7c17: 84 c0             test al, al
/// 7c19: 74 06             jz   count
/// 7c1b: ba f8 03          mov  dx, 0x3f8
/// 7c1e: ee                out  dx, al
/// 7c1f: eb ed             jmp  char
/// 7c21: 66 ff 06 00 05 count: inc dword [0x500]
/// 7c26: 66 a1 00 05       mov  eax, [0x500]
/// 7c2a: ba 10 00          mov  dx, 0x10
/// 7c2d: 66 ef             out  dx, eax       ; progress report
/// 7c2f: a8 3f             test al, 0x3f
/// 7c31: 75 ee             jnz  count
/// 7c33: eb d6             jmp  say
/// 7c35: "OK\n\0"    msg:
/// ```
const BOOT_SECTOR: [u8; 57] = [
    0xfa, 0xfc, 0x31, 0xc0, 0x8e, 0xd8, 0x8e, 0xd0, 0xbc, 0x00, 0x7c, 0xbe, 0x35, 0x7c, 0xba, 0xfd,
    0x03, 0xec, 0xa8, 0x20, 0x74, 0xfb, 0xac, 0x84, 0xc0, 0x74, 0x06, 0xba, 0xf8, 0x03, 0xee, 0xeb,
    0xed, 0x66, 0xff, 0x06, 0x00, 0x05, 0x66, 0xa1, 0x00, 0x05, 0xba, 0x10, 0x00, 0x66, 0xef, 0xa8,
    0x3f, 0x75, 0xee, 0xeb, 0xd6, b'O', b'K', b'\n', 0,
];

#[test]
fn boot_sector_prints_on_the_serial_port_and_migrates() {
    if !have_kvm() {
        return;
    }
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kvm-vmm-boot.bin");
    std::fs::write(&path, BOOT_SECTOR).unwrap();
    let (status, stdout) = run(&[
        "--boot-sector",
        path.to_str().unwrap(),
        "--mem",
        "4MiB",
        "--migrate",
        "--run-for",
        "0.2",
    ]);
    assert!(status.success(), "kvm-vmm: {status}\n{stdout}");
    // The guest greets before its first report, and the source migrates
    // only once it has reported: its "OK" is on stdout, before the result.
    let lines: Vec<&str> = stdout.lines().collect();
    let ok = lines.iter().position(|l| *l == "OK");
    let result = lines.iter().position(|l| l.starts_with("MIGRATED "));
    assert!(
        matches!((ok, result), (Some(o), Some(r)) if o < r),
        "serial output then the result:\n{stdout}"
    );
    // Every count is reported: the destination's first is the next.
    check_migrated(&stdout, 1);
}

/// A boot sector that triple-faults: it enters protected mode with empty
/// GDT and IDT limits and jumps far through selector 8, which faults, and
/// so does the delivery of every fault after it.
///
/// ```text
/// 7c00: fa                cli
/// 7c01: 0f 01 1e 18 7c    lidt [0x7c18]      ; limit 0
/// 7c06: 0f 01 16 18 7c    lgdt [0x7c18]      ; limit 0
/// 7c0b: 0f 20 c0          mov  eax, cr0
/// 7c0e: 0c 01             or   al, 1         ; PE
/// 7c10: 0f 22 c0          mov  cr0, eax
/// 7c13: ea 00 00 08 00    jmp  0x08:0        ; #GP, #DF, shutdown
/// 7c18: 00 00 00 00 00 00 (the descriptor-table pointer)
/// ```
const TRIPLE_FAULT: [u8; 30] = [
    0xfa, 0x0f, 0x01, 0x1e, 0x18, 0x7c, 0x0f, 0x01, 0x16, 0x18, 0x7c, 0x0f, 0x20, 0xc0, 0x0c, 0x01,
    0x0f, 0x22, 0xc0, 0xea, 0x00, 0x00, 0x08, 0x00, 0, 0, 0, 0, 0, 0,
];

#[test]
fn exit_status_tells_a_stopped_guest_from_bad_arguments() {
    if !have_kvm() {
        return;
    }
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kvm-vmm-triple-fault.bin");
    std::fs::write(&path, TRIPLE_FAULT).unwrap();
    // No --run-for limit: the VMM ends because the guest stopped.
    let (status, stdout) = run(&["--boot-sector", path.to_str().unwrap(), "--run-for", "0"]);
    assert_eq!(status.code(), Some(3), "a shutdown exit: {stdout}");

    let (status, _) = run(&["--boot-sector", path.to_str().unwrap(), "--mem", "3MiB"]);
    assert_eq!(status.code(), Some(2), "--mem not a multiple of 2 MiB");
    let (status, _) = run(&["--listen", "127.0.0.1:0", "--image", "x"]);
    assert_eq!(status.code(), Some(2), "--listen with --image");
    // Not a multiboot image: the VM cannot be set up.
    let (status, _) = run(&["--image", path.to_str().unwrap()]);
    assert_eq!(status.code(), Some(4), "a boot sector given as --image");
}

/// `--auto-converge` on this VMM: 2048 pages written over and over
/// against a 16 MB/s cap (half a second to send them, over the 300 ms
/// downtime target, on any host), so pre-copy does not converge and the
/// engine throttles the vCPUs through the VMM's `Vcpus::set_throttle`.
#[test]
fn auto_converge_throttles_the_vcpus_of_this_vmm() {
    if !have_kvm() {
        return;
    }
    let f = migrate_image(
        "payload.elf wss=2048 every=4096 ticks=0",
        "16MiB",
        &["--max-bandwidth", "16MB/s", "--auto-converge"],
    );
    assert!(
        number(&f, "throttle") >= 20,
        "a round ran throttled (20 % first): {f:?}"
    );
}

/// Ctrl-C (SIGINT) while pre-copy runs: the migration is cancelled, the
/// source guest runs on, and the exit status says so (5).
#[test]
fn ctrl_c_cancels_and_the_source_guest_runs_on() {
    if !have_kvm() {
        return;
    }
    let image = image();
    // 64 MiB at 2 MB/s: the first round alone takes half a minute.
    let mut child = Command::new(vmm())
        .args(["--image", image.to_str().unwrap(), "--cmdline", CMDLINE])
        .args(["--mem", "64MiB", "--migrate", "--max-bandwidth", "2MB/s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kvm-vmm");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // The destination takes the connection once the migration starts.
    let start = Instant::now();
    loop {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains("receiving a guest") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("the migration did not start: {e}");
            }
        }
    }
    let interrupted = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(interrupted.success());
    let out = wait(child, "kvm-vmm");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = reader.join().expect("reading stderr");
    assert_eq!(out.status.code(), Some(5), "cancelled: {stdout}\n{stderr}");
    assert!(!stdout.contains("MIGRATED"), "{stdout}");
    assert!(
        stderr.contains("the guest runs on here"),
        "the source guest reported again after the cancel:\n{stderr}"
    );
}
