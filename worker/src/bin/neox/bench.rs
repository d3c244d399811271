//! `neox bench`: a closed-loop load generator. C workers each send requests back to back
//! (streaming, so time to first token and time per output token are measured at the client)
//! until N requests are done.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::{connect, SamplingArgs};

#[derive(Args, Debug)]
pub struct BenchArgs {
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
    tpot: Vec<f64>,
    tokens: usize,
    prompt_tokens: u64,
    cached_prompt_tokens: u64,
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
    let client = connect(addr).await?;
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
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let mut c = client.clone();
        let next = next.clone();
        let bar = bar.clone();
        let req = a.sampling.request(&a.prompt);
        let distinct = a.distinct;
        let total = a.requests;
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors: Vec<String> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let mut req = req.clone();
                if distinct {
                    req.prompt.push_str(&format!(" {i}"));
                }
                let start = Instant::now();
                let mut s = Sample::default();
                let mut last = start;
                let res: Result<(), tonic::Status> = async {
                    let mut stream = c.generate_stream(req).await?.into_inner();
                    while let Some(m) = stream.message().await? {
                        if let Some(u) = &m.usage {
                            s.prompt_tokens = u64::from(u.prompt_tokens);
                            s.cached_prompt_tokens = u64::from(u.cached_prompt_tokens);
                        }
                        if m.token.is_some() {
                            let now = Instant::now();
                            if s.tokens == 0 {
                                s.ttft = (now - start).as_secs_f64();
                            } else {
                                s.tpot.push((now - last).as_secs_f64());
                            }
                            last = now;
                            s.tokens += 1;
                        }
                    }
                    Ok(())
                }
                .await;
                match res {
                    Ok(()) => samples.push(s),
                    Err(e) => errors.push(format!("{:?}", e.code())),
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

fn report(a: &BenchArgs, samples: Vec<Sample>, errors: Vec<String>, wall: Duration) {
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
                "concurrency": a.concurrency, "requests": samples.len(), "errors": errors.len(),
                "generated_tokens": tokens, "seconds": wall.as_secs_f64(), "tokens_per_second": tps,
                "prompt_tokens": prompt, "cached_prompt_tokens": cached,
                "ttft_ms": {"p50": t50 * 1e3, "p90": t90 * 1e3, "p99": t99 * 1e3},
                "tpot_ms": {"p50": p50 * 1e3, "p90": p90 * 1e3, "p99": p99 * 1e3},
            })
        );
        return;
    }
    println!(
        "concurrency {}, {} requests ok, {} errors, {:.1} s",
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
    if !errors.is_empty() {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for e in errors {
            *counts.entry(e).or_default() += 1;
        }
        println!("errors      {counts:?}");
    }
}
