//! What the tests that run example binaries share: finding (or building)
//! an example, and waiting for a process with a deadline.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one run of an example may take, on any host.
pub const DEADLINE: Duration = Duration::from_secs(300);

/// Whether this machine has KVM (it must, unless it declares it has
/// none with `LIVEMIG_NO_KVM=1`).
pub fn have_kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("LIVEMIG_NO_KVM").as_deref() == Ok("1") {
        eprintln!("LIVEMIG_NO_KVM=1: this machine declares it has no KVM; test not run");
        return false;
    }
    panic!("/dev/kvm not found (set LIVEMIG_NO_KVM=1 only on a machine known to have no KVM)");
}

/// The example binary `name`, `target/<profile>/examples/NAME` next to
/// this test's `target/<profile>/deps`. `cargo test` builds it before
/// running any test; if it is missing or older than the sources it is
/// built from (a target selection that left it out), it is built with
/// cargo here, once per test binary.
pub fn example(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut built_here = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    {
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in target/<profile>/deps");
        let bin = profile_dir.join("examples").join(name);
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let sources = [
            root.join(format!("examples/{name}.rs")),
            root.join(format!("examples/{name}")),
            root.join("Cargo.toml"),
            root.join("src"),
            root.join("crates/migrate-core/src"),
            root.join("crates/migrate-core/Cargo.toml"),
            root.join("crates/backend-kvm/src"),
            root.join("crates/backend-kvm/Cargo.toml"),
            root.join("crates/backend-sim/src"),
        ];
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        let newest = sources.iter().filter_map(|p| newest_source(p)).max();
        let fresh = matches!((built, newest), (Some(b), Some(n)) if b >= n);
        if !fresh && !built_here.iter().any(|n| n == name) {
            let mut cargo = Command::new(env!("CARGO"));
            cargo.current_dir(root).args(["build", "--example", name]);
            // `--release` builds land in target/release, the others in
            // target/debug.
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cargo.arg("--release");
            }
            let status = cargo.status().expect("running cargo");
            assert!(status.success(), "cargo build --example {name}: {status}");
            built_here.push(name.to_owned());
        }
        assert!(bin.exists(), "{} not built", bin.display());
        bin
    }
}

/// The latest modification time of the Rust sources and manifests at
/// `path` (a file, or a directory searched through).
pub fn newest_source(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                || p.extension().is_some_and(|x| x == "rs")
                || p.file_name().is_some_and(|n| n == "Cargo.toml")
        })
        .filter_map(|p| newest_source(&p))
        .max()
}

/// Waits for `child` at most [`DEADLINE`]; kills it past that.
pub fn wait(mut child: Child, what: &str) -> Output {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the VMM") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: reader.join().expect("reading the VMM's output"),
        stderr: Vec::new(),
    }
}

/// Runs `cmd` with its standard output captured, within [`DEADLINE`]:
/// its exit status and standard output.
pub fn status_and_stdout(mut cmd: Command, what: &str) -> (ExitStatus, String) {
    let child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let out = wait(child, what);
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
