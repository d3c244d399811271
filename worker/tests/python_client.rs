//! Runs the independent Python clients against a real server: grpcio
//! (`tests/python/grpc_client_test.py`) and OpenAI's SDK (`tests/python/openai_client_test.py`).
//! Skipped with a printed reason when their packages are missing, except under CI.

mod common;
mod serving;

use std::path::PathBuf;
use std::process::Command;

fn python_has(modules: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success())
}

fn root() -> PathBuf {
    common::manifest_dir().join("..")
}

/// Runs a Python test script with ARGS; its unittest report must say OK.
fn run_python(script: &str, args: &[&str], what: &str) {
    let out = Command::new("python3")
        .arg(root().join("tests/python").join(script))
        .args(args)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed {what}:\n{log}");
    assert!(log.contains("OK"), "{log}");
}

#[test]
fn python_grpcio_client_passes() {
    if !python_has("grpc, grpc_tools, grpc_health, grpc_reflection") {
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
        let golden = common::shakespeare_dir().join("golden.json");
        let golden = golden.to_string_lossy();
        run_python(
            "grpc_client_test.py",
            &[&server.grpc, &server.metrics, &golden],
            &format!("at tp {tp}"),
        );
    }
}

#[test]
fn python_openai_sdk_passes() {
    if !python_has("openai") {
        assert!(std::env::var_os("CI").is_none(), "CI must install openai (see .ci/run)");
        eprintln!("SKIPPED: python3 with the openai package is not installed");
        return;
    }
    let server = serving::start(&["--max-prompt-bytes", "4096"]);
    let dir = common::shakespeare_dir();
    let (golden, hamlet) = (dir.join("golden.json"), dir.join("hamlet_eval_ids.json"));
    run_python(
        "openai_client_test.py",
        &[&server.http, &golden.to_string_lossy(), &hamlet.to_string_lossy()],
        "",
    );
}
