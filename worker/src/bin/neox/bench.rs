//! `neox bench`: a closed-loop load generator. C workers each send requests back to back
//! (streaming, so time to first token and time per output token are measured at the client)
//! until N requests are done, over the gRPC API or the OpenAI-compatible HTTP API.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use neox_proto::neox::v1::text_generation_client::TextGenerationClient;
use tonic::transport::Channel;

use super::openai::OpenAiClient;
use super::{connect, SamplingArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Api {
    /// `neox.v1.TextGeneration/GenerateStream`.
    Grpc,
    /// `POST /v1/completions` with `stream: true` (server-sent events).
    Openai,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::Grpc => "gRPC",
            Api::Openai => "OpenAI",
        }
    }
}

/// A failed request: what the report counts it as, and what it said.
struct Failed {
    kind: String,
    message: String,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Which API to load (`--addr` defaults to its port: 50051 for grpc, 8000 for openai).
    #[arg(long, value_enum, default_value_t = Api::Grpc)]
    pub api: Api,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Requests in total.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    #[arg(long, default_value = "ROMEO:\n")]
    prompt: String,
    /// Append each request's number to the prompt, so prompts share all but their ends (a
    /// system prompt with different questions) rather than being identical.
    #[arg(long)]
    distinct: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Default)]
struct Sample {
    ttft: f64,
    /// Gaps between tokens (gRPC) or between streamed chunks of text (OpenAI; a chunk is a
    /// token unless it ends inside a UTF-8 character).
    tpot: Vec<f64>,
    tokens: usize,
    prompt_tokens: u64,
    cached_prompt_tokens: u64,
}

/// Timing of one streamed request.
struct Clock {
    start: Instant,
    last: Instant,
    arrivals: usize,
}

impl Clock {
    fn start() -> Self {
        let now = Instant::now();
        Clock {
            start: now,
            last: now,
            arrivals: 0,
        }
    }

    /// Something generated arrived: the first sets time to first token, the rest the gaps.
    fn arrived(&mut self, s: &mut Sample) {
        let now = Instant::now();
        if self.arrivals == 0 {
            s.ttft = (now - self.start).as_secs_f64();
        } else {
            s.tpot.push((now - self.last).as_secs_f64());
        }
        self.last = now;
        self.arrivals += 1;
    }
}

/// Where the requests go.
#[derive(Clone)]
enum Target {
    Grpc(TextGenerationClient<Channel>),
    OpenAi(OpenAiClient),
}

impl Target {
    async fn connect(api: Api, addr: &str) -> Result<Self> {
        Ok(match api {
            Api::Grpc => Target::Grpc(connect(addr).await?),
            Api::Openai => Target::OpenAi(OpenAiClient::connect(addr).await?),
        })
    }

    /// One streamed request.
    async fn one(&mut self, prompt: &str, sampling: &SamplingArgs) -> Result<Sample, Failed> {
        let mut s = Sample::default();
        let mut clock = Clock::start();
        match self {
            Target::Grpc(c) => {
                let res: Result<(), tonic::Status> = async {
                    let mut stream = c.generate_stream(sampling.request(prompt)).await?.into_inner();
                    while let Some(m) = stream.message().await? {
                        if let Some(u) = &m.usage {
                            s.prompt_tokens = u64::from(u.prompt_tokens);
                            s.cached_prompt_tokens = u64::from(u.cached_prompt_tokens);
                        }
                        if m.token.is_some() {
                            clock.arrived(&mut s);
                            s.tokens += 1;
                        }
                    }
                    Ok(())
                }
                .await;
                res.map_err(|e| Failed {
                    kind: format!("{:?}", e.code()),
                    message: e.message().to_owned(),
                })?;
            }
            Target::OpenAi(c) => {
                let body = c.completion(prompt, sampling);
                c.stream(&body, |v| {
                    let text = v["choices"][0]["text"].as_str().unwrap_or("");
                    if !text.is_empty() {
                        clock.arrived(&mut s);
                    }
                    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                        let count = |k: &str| u[k].as_u64().unwrap_or(0);
                        s.tokens = count("completion_tokens") as usize;
                        s.prompt_tokens = count("prompt_tokens");
                        s.cached_prompt_tokens = u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
                    }
                })
                .await
                .map_err(|e| {
                    // "HTTP 429: ..." counts as "HTTP 429"; other errors by their first words.
                    let message = format!("{e:#}");
                    Failed {
                        kind: message.split(':').next().unwrap_or(&message).to_owned(),
                        message,
                    }
                })?;
            }
        }
        Ok(s)
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

pub async fn run(addr: &str, a: BenchArgs) -> Result<()> {
    if a.concurrency == 0 || a.requests == 0 {
        bail!("--concurrency and --requests must be at least 1");
    }
    let target = Target::connect(a.api, addr).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(a.requests as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let a = Arc::new(a);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let mut target = target.clone();
        let next = next.clone();
        let bar = bar.clone();
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors: Vec<Failed> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= a.requests {
                    break;
                }
                let prompt = if a.distinct {
                    format!("{} {i}", a.prompt)
                } else {
                    a.prompt.clone()
                };
                match target.one(&prompt, &a.sampling).await {
                    Ok(s) => samples.push(s),
                    Err(e) => errors.push(e),
                }
                bar.inc(1);
            }
            (samples, errors)
        }));
    }
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        let (s, e) = t.await?;
        samples.extend(s);
        errors.extend(e);
    }
    let wall = t0.elapsed();
    bar.finish_and_clear();
    report(&a, samples, errors, wall);
    Ok(())
}

fn report(a: &BenchArgs, samples: Vec<Sample>, errors: Vec<Failed>, wall: Duration) {
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    let mut tpot: Vec<f64> = samples.iter().flat_map(|s| s.tpot.iter().copied()).collect();
    let tps = tokens as f64 / wall.as_secs_f64();
    let prompt: u64 = samples.iter().map(|s| s.prompt_tokens).sum();
    let cached: u64 = samples.iter().map(|s| s.cached_prompt_tokens).sum();
    let (t50, t90, t99) = (pct(&mut ttft, 0.5), pct(&mut ttft, 0.9), pct(&mut ttft, 0.99));
    let (p50, p90, p99) = (pct(&mut tpot, 0.5), pct(&mut tpot, 0.9), pct(&mut tpot, 0.99));
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "api": a.api.name(),
                "concurrency": a.concurrency, "requests": samples.len(), "errors": errors.len(),
                "first_error": errors.first().map(|e| &e.message),
                "generated_tokens": tokens, "seconds": wall.as_secs_f64(), "tokens_per_second": tps,
                "prompt_tokens": prompt, "cached_prompt_tokens": cached,
                "ttft_ms": {"p50": t50 * 1e3, "p90": t90 * 1e3, "p99": t99 * 1e3},
                "tpot_ms": {"p50": p50 * 1e3, "p90": p90 * 1e3, "p99": p99 * 1e3},
            })
        );
        return;
    }
    println!(
        "{} API, concurrency {}, {} requests ok, {} errors, {:.1} s",
        a.api.name(),
        a.concurrency,
        samples.len(),
        errors.len(),
        wall.as_secs_f64()
    );
    println!("throughput  {tps:.1} generated tokens/s");
    if prompt > 0 {
        println!(
            "prompts     {prompt} tokens, {cached} from the prefix cache ({:.0}%)",
            100.0 * cached as f64 / prompt as f64
        );
    }
    println!(
        "TTFT ms     p50 {:.1}  p90 {:.1}  p99 {:.1}",
        t50 * 1e3,
        t90 * 1e3,
        t99 * 1e3
    );
    println!(
        "TPOT ms     p50 {:.2}  p90 {:.2}  p99 {:.2}",
        p50 * 1e3,
        p90 * 1e3,
        p99 * 1e3
    );
    if let Some(first) = errors.first() {
        println!("first error {}", first.message);
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for e in &errors {
            *counts.entry(&e.kind).or_default() += 1;
        }
        println!("errors      {counts:?}");
    }
}
