//! Cross-crate integration tests live in `tests/tests/`; `tests/python/` holds the
//! independent Python gRPC client.
//!
//! Helpers shared by those tests: finding the workspace's binaries.

use std::path::PathBuf;
use std::process::Command;

/// The repository root: from the directory cargo runs the test in (it sets the variable at run
/// time too), else the one it was compiled in. A target directory shared between clones can
/// hold a binary compiled in another clone, whose compile-time path may be gone.
pub fn repo_root() -> PathBuf {
    let crate_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    crate_dir.join("..")
}

/// Path of a workspace binary (`neox-worker`, `neox`), building it if this test run has not.
pub fn binary(name: &str) -> PathBuf {
    // Test executables live in <target>/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir").to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "neox-worker", "--bins"])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building the worker binaries failed");
    }
    assert!(path.exists(), "{} not found", path.display());
    path
}

/// A child process killed (and reaped) when dropped, so a failing test leaves nothing behind.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// POSTs a JSON body over HTTP/1.0 (the reply ends with the connection); returns the status
/// code and the body.
pub fn post_json(addr: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, body.to_owned())
}
