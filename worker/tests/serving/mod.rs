//! Starting `neox-worker serve` on ephemeral ports and talking to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use neox_proto::neox::v1 as pb;
use pb::text_generation_client::TextGenerationClient;
use tonic::transport::Channel;

pub struct Server {
    pub child: Child,
    pub grpc: String,
    pub metrics: String,
    /// The OpenAI-compatible HTTP API's host:port.
    pub http: String,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A runtime for a test's client calls.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts `neox-worker serve ARGS` and waits until it serves.
pub fn start(args: &[&str]) -> Server {
    start_env(args, &[])
}

pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Server {
    let mut cmd = super::common::worker();
    cmd.arg("serve")
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut line = String::new();
    let mut next_line = |line: &mut String| {
        line.clear();
        if err.read_line(line).unwrap() == 0 {
            panic!("server exited before serving: {}", log.lock().unwrap());
        }
        log.lock().unwrap().push_str(line);
    };
    let (grpc, metrics) = loop {
        next_line(&mut line);
        if let Some(rest) = line.trim().strip_prefix("neox-worker: serving gRPC on ") {
            let (g, m) = rest.split_once(" (metrics on http://").unwrap();
            break (g.to_owned(), m.trim_end_matches("/metrics)").to_owned());
        }
    };
    let http = loop {
        next_line(&mut line);
        if let Some(rest) = line
            .trim()
            .strip_prefix("neox-worker: serving the OpenAI-compatible HTTP API on http://")
        {
            break rest.trim_end_matches("/v1").to_owned();
        }
    };
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = String::new();
        while err.read_line(&mut buf).unwrap_or(0) > 0 {
            sink.lock().unwrap().push_str(&buf);
            buf.clear();
        }
    });
    Server {
        child,
        grpc,
        metrics,
        http,
        stderr: log,
    }
}

impl Server {
    pub async fn client(&self) -> TextGenerationClient<Channel> {
        TextGenerationClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    /// Value of a metric line (`name{labels}`) from /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.metrics_text();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(' '))
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
    }

    pub fn metrics_text(&self) -> String {
        http_request(&self.metrics, "GET", "/metrics", &[], "").body
    }

    /// A request to the OpenAI-compatible HTTP API.
    pub fn http(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> HttpReply {
        http_request(&self.http, method, path, headers, body)
    }

    /// Waits until no KV block is in use (cached prefixes aside): a stream's last message
    /// arrives before the engine has retired its sequence.
    pub fn wait_kv_freed(&self) {
        self.wait_metrics(Duration::from_secs(10), "no KV in use", |s| {
            s.metric("neox_kv_cache_usage_ratio") == 0.0
        });
    }

    /// Waits until `cond` holds on the server's stderr so far, which it returns.
    pub fn wait_log(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let log = self.stderr.lock().unwrap().clone();
            if cond(&log) {
                return log;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until `cond` holds on the metrics, or panics after `limit`.
    pub fn wait_metrics(&self, limit: Duration, what: &str, cond: impl Fn(&Server) -> bool) {
        let t0 = Instant::now();
        while !cond(self) {
            assert!(t0.elapsed() < limit, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

pub fn greedy(prompt: &str, n: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        parameters: Some(pb::GenerationParameters {
            max_new_tokens: n,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A request that samples (seeded) with every filter and penalty, reporting logprobs.
pub fn sampled(prompt: &str, seed: u64) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.into(),
        parameters: Some(pb::GenerationParameters {
            max_new_tokens: 20,
            ignore_eos: true,
            temperature: Some(0.8),
            top_k: 40,
            top_p: Some(0.9),
            typical_p: Some(0.95),
            repetition_penalty: Some(1.2),
            presence_penalty: 0.3,
            seed: Some(seed),
            logprobs: true,
            top_n_tokens: 3,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs a stream to its end: (token ids, concatenated text, finish reason).
pub async fn stream_all(
    c: &mut TextGenerationClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<(Vec<u32>, String, i32), tonic::Status> {
    let mut s = c.generate_stream(req).await?.into_inner();
    let (mut ids, mut text, mut fin) = (Vec::new(), String::new(), 0);
    while let Some(m) = s.message().await? {
        if let Some(t) = m.token {
            ids.push(t.id);
        }
        text.push_str(&m.text_delta);
        if let Some(f) = m.finish_reason {
            fin = f;
        }
    }
    Ok((ids, text, fin))
}

/// Prompts of different lengths from the demo model's held-out text.
pub fn prompts(n: usize) -> Vec<String> {
    let base = [
        "ROMEO:\n",
        "To be, or not to be",
        "KING LEAR:\nBlow, winds,",
        "HAMLET:\nWhat a piece of work is a man",
        "First Citizen:\nBefore we proceed any further, hear me speak.",
        "O",
        "JULIET:\nO Romeo, Romeo!",
        "MACBETH:\nIs this a dagger which I see before me,",
    ];
    (0..n)
        .map(|i| format!("{}{}", base[i % base.len()], " my lord".repeat(i / base.len())))
        .collect()
}

/// An HTTP response, read to the end of the connection.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// A stream's `data:` payloads, in order.
    pub fn sse_data(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_owned)
            .collect()
    }
}

/// HTTP/1.0, so the body (a stream's too) ends with the connection and is never chunked.
pub fn http_request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> HttpReply {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n",
        body.len()
    )
    .unwrap();
    for (k, v) in headers {
        write!(s, "{k}: {v}\r\n").unwrap();
    }
    write!(s, "\r\n{body}").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpReply {
        status,
        headers,
        body: body.to_owned(),
    }
}
