//! A real Prometheus server scrapes a real worker; promtool lints the exposition.
//! Skipped with a printed reason when Prometheus is missing, except under CI.

mod common;
mod serving;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn have(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out.split_once("\r\n\r\n")?.1.to_owned())
}

#[test]
fn prometheus_scrapes_the_worker_and_promtool_accepts_the_names() {
    if !(have("prometheus") && have("promtool")) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install prometheus (see .ci/run)"
        );
        eprintln!("SKIPPED: prometheus and promtool are not installed (apt-get install prometheus)");
        return;
    }
    let server = serving::start(&[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = server.client().await;
        for p in serving::prompts(3) {
            c.generate(serving::greedy(&p, 8)).await.unwrap();
        }
    });
    let text = server.metrics_text();
    for name in [
        "neox_requests_running",
        "neox_requests_waiting",
        "neox_kv_cache_usage_ratio",
        "neox_time_to_first_token_seconds_bucket",
        "neox_time_per_output_token_seconds_bucket",
        "neox_request_duration_seconds_bucket",
        "neox_prompt_tokens_total",
        "neox_generation_tokens_total",
        "neox_requests_total{finish_reason=\"length\"}",
        "neox_batch_size_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: neox\n    static_configs:\n      - targets: ['{}']\n", server.metrics),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let web = format!("127.0.0.1:{port}");
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let result = loop {
        let body = http_get(&web, "/api/v1/query?query=neox_generation_tokens_total").unwrap_or_default();
        if body.contains("\"value\"") {
            break body;
        }
        if t0.elapsed() > Duration::from_secs(40) {
            let _ = prom.kill();
            panic!("Prometheus never scraped the worker: {body}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = prom.kill();
    let _ = prom.wait();
    // 3 requests x 8 tokens.
    assert!(result.contains("\"24\""), "unexpected scrape result: {result}");
}
