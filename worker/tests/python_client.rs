//! Runs the independent Python grpcio client (`tests/python/grpc_client_test.py`) against a
//! real server. Skipped with a printed reason when grpcio is missing, except under CI.

mod common;
mod serving;

use std::path::PathBuf;
use std::process::Command;

fn python_ready() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools, grpc_health, grpc_reflection"])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn python_grpcio_client_passes() {
    if !python_ready() {
        assert!(std::env::var_os("CI").is_none(), "CI must install grpcio (see .ci/run)");
        eprintln!(
            "SKIPPED: python3 with grpcio, grpcio-tools, grpcio-reflection, grpcio-health-checking is not installed"
        );
        return;
    }
    // At TP=2 with speculative decoding: the client's HF goldens hold with drafts verified
    // across ranks.
    for (tp, speculative) in [("1", "0"), ("2", "4")] {
        let server = serving::start(&[
            "--max-prompt-bytes",
            "4096",
            "--tp",
            tp,
            "--speculative-tokens",
            speculative,
        ]);
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new("python3")
            .arg(root.join("tests/python/grpc_client_test.py"))
            .args([&server.grpc, &server.metrics])
            .arg(common::shakespeare_dir().join("golden.json"))
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "python client failed at tp {tp}:\n{log}");
        assert!(log.contains("OK"), "{log}");
    }
}
