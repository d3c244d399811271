//! The operator binary as a process, against an API server reached over https as every real
//! cluster's is: it speaks TLS (a crypto provider is built in; without one rustls panics on the
//! first connection), says why it cannot watch when the server does not answer, and stops
//! promptly on SIGTERM even though its first list never completed.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn speaks_tls_to_an_https_api_server_says_why_it_cannot_watch_and_stops_on_sigterm() {
    let api = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = api.local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("neox-operator-process-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: t\nclusters:\n- name: t\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\ncontexts:\n- name: t\n  context: {{cluster: t, user: t}}\nusers:\n- name: t\n  user: {{token: not-a-secret}}\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_neox-operator"))
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--leader-election",
            "false",
            "--log-format",
            "text",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info,kube=warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    for out in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
    }

    // The first bytes on the wire are a TLS handshake record (0x16, version 3.x).
    api.set_nonblocking(true).unwrap();
    let mut conn = None;
    wait_until("the operator to connect", Duration::from_secs(20), || {
        conn = api.accept().ok().map(|(c, _)| c);
        conn.is_some()
    });
    let mut conn = conn.unwrap();
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 3];
    conn.read_exact(&mut hello).unwrap();
    assert_eq!((hello[0], hello[1]), (0x16, 0x03), "not a TLS handshake: {hello:?}");
    drop(conn);

    // The handshake fails (nothing answers it): the log says why nothing is reconciled.
    wait_until("a warning that the watch fails", Duration::from_secs(20), || {
        log.lock().unwrap().contains("watching the cluster")
    });
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("still running 15 s after SIGTERM:\n{}", log.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = log.lock().unwrap().clone();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("not-a-secret"), "the token was logged:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
