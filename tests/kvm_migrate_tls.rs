//! Runs `examples/kvm-migrate.rs` over mutual TLS: a KVM guest migrated
//! between two processes whose connection is authenticated both ways, and
//! a destination whose certificate comes from another CA, refused before
//! any record crosses. Certificates are made here at test time.
//!
//! The tests need `/dev/kvm` (set `LIVEMIG_NO_KVM=1` only on a machine
//! known to have none).
#![cfg(all(feature = "kvm", feature = "tls"))]

mod common;

use migrate_core::tls::test_pki::{TestCa, TestIdentity};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes the identity's files into a fresh directory under the test's
/// scratch space and returns `--tls-*` arguments naming them.
fn tls_args(id: &TestIdentity, tag: &str) -> Vec<String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kvm-migrate-tls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let [cert, key, ca]: [PathBuf; 3] = id.write_to(&dir, "host").unwrap();
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    vec![
        "--tls-cert".into(),
        s(cert),
        "--tls-key".into(),
        s(key),
        "--tls-ca".into(),
        s(ca),
    ]
}

fn kvm_migrate(args: &[String]) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(common::example("kvm-migrate"));
    cmd.args(["--mem", "64MiB", "--wss", "16MiB"])
        .args(if args.iter().any(|a| a == "--dirty-rate") {
            &[][..]
        } else {
            &["--dirty-rate", "50MB/s"][..]
        })
        .args(["--settle", "100ms", "--json"])
        .args(args);
    common::status_and_stdout(cmd, "kvm-migrate")
}

fn migrates_over_tls(policy: &str) -> serde_json::Value {
    migrates_over_tls_with(policy, &[])
}

fn migrates_over_tls_with(policy: &str, extra: &[&str]) -> serde_json::Value {
    if !common::have_kvm() {
        return serde_json::Value::Null;
    }
    let ca = TestCa::new("kvm-migrate test CA").unwrap();
    let mut args = tls_args(&ca.issue("host").unwrap(), policy);
    args.extend(["--policy".to_string(), policy.to_string()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    let (status, stdout) = kvm_migrate(&args);
    assert!(
        status.success(),
        "kvm-migrate over TLS failed: {status}\n{stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    let k = &v["kvm"];
    assert_eq!(k["memory-verified"], true, "{k}");
    assert_eq!(k["counter-continues"], true, "{k}");
    // kvm-migrate reports memory verified only when the destination's
    // digest equals the source's; the destination did digest.
    assert_eq!(
        k["destination"]["digest"].as_str().map(str::len),
        Some(32),
        "{k}"
    );
    v
}

#[test]
fn kvm_guest_migrates_between_processes_over_mutual_tls() {
    migrates_over_tls("precopy");
}

#[test]
fn kvm_guest_postcopy_migrates_between_processes_over_mutual_tls() {
    migrates_over_tls("postcopy");
}

/// The connection is cut mid-push (at the `batch`-th page batch of the
/// post-copy): the destination dials again over TLS, in the same
/// session, and the migration ends verified with the counter going on.
fn recovers_over_tls(policy: &str, batch: &str, extra: &[&str]) {
    let mut args = vec![
        "--recover-timeout",
        "60s",
        "--test-cut-after-batches",
        batch,
    ];
    args.extend(extra);
    let v = migrates_over_tls_with(policy, &args);
    if v.is_null() {
        return;
    }
    assert_eq!(v["postcopy"]["recoveries"], 1, "{v}");
    assert_eq!(v["kvm"]["destination"]["recoveries"], 1, "{v}");
}

#[test]
fn kvm_guest_postcopy_recovers_from_a_cut_over_mutual_tls() {
    // The 500th of 4,096.
    recovers_over_tls("postcopy", "500", &[]);
}

#[test]
fn kvm_guest_hybrid_recovers_from_a_cut_over_mutual_tls() {
    // No downtime is short enough and the guest dirties its 16 MiB as
    // fast as it can: the hybrid switches to post-copy after its rounds,
    // with the pages dirtied in its last round to push (thousands on an
    // idle host, far fewer on a loaded one). The link goes at the first
    // batch of the push, so one dirtied page is enough on any host.
    recovers_over_tls(
        "hybrid",
        "1",
        &["--downtime-target", "0ms", "--dirty-rate", "0"],
    );
}

/// Both processes are given a certificate the other's CA did not issue:
/// the TLS setup fails, the migration never starts, and the run says why.
#[test]
fn kvm_migrate_refuses_a_peer_from_another_ca() {
    if !common::have_kvm() {
        return;
    }
    let ca = TestCa::new("kvm-migrate test CA").unwrap();
    let other = TestCa::new("another CA").unwrap().issue("host").unwrap();
    // A certificate from `other`, trusting `ca`: each side rejects the
    // other's certificate.
    let foreign = TestIdentity {
        ca_pem: ca.cert_pem(),
        ..other
    };
    let (status, stdout) = kvm_migrate(&tls_args(&foreign, "foreign"));
    assert!(
        !status.success(),
        "a run with untrusted peers succeeded:\n{stdout}"
    );
    assert!(
        !stdout.contains("\"memory-verified\""),
        "no migration result is printed: {stdout}"
    );
}
