//! Runs `examples/kvm-migrate.rs` with page batches spread over several
//! data connections (`--connections`), with and without the post-copy
//! preempt connection, and checks that a count out of range is refused
//! before anything starts. Every migration verifies the destination's
//! memory against the source's and that the guest's counter continues.
//!
//! The tests need `/dev/kvm` (set `LIVEMIG_NO_KVM=1` only on a machine
//! known to have none).
#![cfg(feature = "kvm")]

mod common;

use std::process::Command;

/// Runs kvm-migrate on a small guest with `args`; its exit status and
/// standard output.
fn kvm_migrate(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(common::example("kvm-migrate"));
    cmd.args(["--mem", "64MiB", "--wss", "16MiB", "--dirty-rate", "50MB/s"])
        .args(["--settle", "100ms", "--verify", "full", "--json"])
        .args(args);
    common::status_and_stdout(cmd, "kvm-migrate")
}

fn migrates_with(args: &[&str], connections: u64) {
    if !common::have_kvm() {
        return;
    }
    let (status, stdout) = kvm_migrate(args);
    assert!(
        status.success(),
        "kvm-migrate {args:?} failed: {status}\n{stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    let k = &v["kvm"];
    assert_eq!(k["memory-verified"], true, "{k}");
    assert_eq!(k["counter-continues"], true, "{k}");
    assert_eq!(k["connections"], connections, "{k}");
}

#[test]
fn kvm_guest_precopy_migrates_over_three_data_connections() {
    migrates_with(&["--policy", "precopy", "--connections", "3"], 3);
}

#[test]
fn kvm_guest_postcopy_migrates_over_two_data_connections_and_a_preempt_connection() {
    migrates_with(
        &[
            "--policy",
            "postcopy",
            "--connections",
            "2",
            "--postcopy-preempt",
        ],
        2,
    );
}

#[test]
fn kvm_migrate_refuses_a_connection_count_out_of_range() {
    if !common::have_kvm() {
        return;
    }
    for n in ["0", "65"] {
        let (status, stdout) = kvm_migrate(&["--connections", n]);
        assert!(!status.success(), "--connections {n} was taken:\n{stdout}");
        assert!(
            stdout.trim().is_empty(),
            "--connections {n} migrated:\n{stdout}"
        );
    }
}
