//! The autoscaling signal end to end: a real worker under load, a real Prometheus scraping
//! it with the labels a PodMonitor gives, and the operator's own query and HPA rule reading
//! it. Skipped with a printed reason when Prometheus is missing, except under CI.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use neox_operator::autoscale;
use neox_operator::crd::{AutoscalingSpec, NeoXDeployment, NeoXDeploymentSpec};
use neox_operator::prometheus::Prometheus;
use neox_tests::{binary, free_port, Killed};

fn have_prometheus() -> bool {
    Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn requests_in_flight_in_prometheus_drive_the_scale_decision() {
    if !have_prometheus() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install prometheus (see .ci/run)"
        );
        eprintln!("SKIPPED: prometheus is not installed (apt-get install prometheus)");
        return;
    }
    // One sequence at a time, so load turns into a queue.
    let (grpc, metrics) = (free_port(), free_port());
    let mut worker = Command::new(binary("neox-worker"))
        .args([
            "serve",
            "--max-batch-size",
            "1",
            "--max-waiting-requests",
            "64",
            "--http-addr",
            "off",
        ])
        .args([
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(worker.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("serving gRPC"), "{line}");
    let _worker = Killed(worker);

    // Prometheus labels the target as a PodMonitor would: namespace and pod of rank 0.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: neox\n    static_configs:\n      - targets: ['127.0.0.1:{metrics}']\n        labels: {{namespace: serving, pod: llm-0-0}}\n"
        ),
    )
    .unwrap();
    let web = free_port();
    let _prom = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{web}");

    let spec: NeoXDeploymentSpec = serde_json::from_value(serde_json::json!({
        "model": {"builtin": "shakespeare"}, "tensorParallelSize": 1, "replicas": 1,
        "autoscaling": {"minReplicas": 1, "maxReplicas": 8, "target": 2.0, "scaleDownStabilizationSeconds": 0},
    }))
    .unwrap();
    let mut d = NeoXDeployment::new("llm", spec);
    d.metadata.namespace = Some("serving".into());
    let a: AutoscalingSpec = d.spec.autoscaling.clone().unwrap();
    let (promql, per_group) = autoscale::query_for(&d, &a);
    assert!(per_group);

    // Prometheus first has to scrape the idle worker (its first scrape takes a few seconds).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let prom = Prometheus::new(None, None);
    let t0 = Instant::now();
    while !matches!(rt.block_on(prom.query(&url, &promql)), Ok(Some(_))) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "Prometheus never scraped the worker"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The TTFT signal of an idle deployment: nothing in flight and no first token in the
    // window reads as 0 seconds (the bare quantile is NaN, which would hold the groups
    // forever).
    let mut ttft_spec = a.clone();
    ttft_spec.metric = Some(neox_operator::crd::ScalingMetric::TtftP90);
    let (ttft, _) = autoscale::query_for(&d, &ttft_spec);
    let idle = wait_for_value(&rt, &url, &ttft, "the idle TTFT", |_| true);
    assert_eq!(idle, 0.0, "{ttft}");
    assert_eq!(autoscale::recommend(3, idle, &ttft_spec), 1, "idle groups scale in");
    // Nine long requests in flight at a time: one runs, eight wait (about 30 s of load).
    let _load = Killed(
        Command::new(binary("neox"))
            .args(["--addr", &format!("http://127.0.0.1:{grpc}"), "bench", "--json"])
            .args([
                "--concurrency",
                "9",
                "--requests",
                "27",
                "--max-new-tokens",
                "500",
                "--ignore-eos",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The default signal, requests in flight: one running and eight waiting.
    let value = wait_for_value(&rt, &url, &promql, "the requests in flight", |v| v >= 8.0);
    assert!(value <= 9.0, "{value} in flight of 9 sent");
    // One group with `value` in flight against a target of 2 per group: scale out.
    let desired = autoscale::recommend(1, value, &a);
    assert_eq!(desired, ((value / 2.0).ceil() as i32).min(8));
    // The queue alone: all but the one running.
    let mut queue_spec = a.clone();
    queue_spec.metric = Some(neox_operator::crd::ScalingMetric::QueueDepth);
    let (queue, per_group) = autoscale::query_for(&d, &queue_spec);
    assert!(per_group);
    let waiting = wait_for_value(&rt, &url, &queue, "the queue", |v| v >= 4.0);
    assert!(waiting < 9.0, "{waiting} waiting with one of 9 running");
    // Queued requests wait seconds for their first token: the same TTFT query now sees them.
    let busy = wait_for_value(&rt, &url, &ttft, "TTFT under load", |v| v > 0.0);
    assert!(busy.is_finite());
}

/// Queries until the answer passes `ok` (a minute at most).
fn wait_for_value(rt: &tokio::runtime::Runtime, url: &str, promql: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let (prom, t0) = (Prometheus::new(None, None), Instant::now());
    loop {
        let got = rt.block_on(prom.query(url, promql));
        if let Ok(Some(v)) = got {
            if ok(v) {
                return v;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "Prometheus never saw {what}: last answer {got:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
