//! `neox-worker bench`: load time, prefill throughput, decode ms/step at several batch sizes
//! and peak memory, through the same step runner the server uses (TP groups included). It
//! ships in the binary because GPU machines have no Rust toolchain to run `cargo bench`.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use candle_core::Tensor;
use neox_worker::engine::{sample_batch, SampleRow, Sampled, Sampler, SamplingParams, SamplingPlace};
use neox_worker::model::LogitsWanted;
use neox_worker::shard::{SeqPlan, StepRunner};

use super::group::{start_leader, GroupArgs};
use super::serve::KvLayout;
use super::ModelArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    group: GroupArgs,
    /// Decode batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<usize>,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prefill_len: usize,
    /// Prompt length of every sequence before the decode measurement.
    #[arg(long, default_value_t = 32)]
    context_len: usize,
    /// Decode steps measured per batch size (after 2 warm-up steps).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// KV cache layout, as `serve --kv-layout` (auto: paged on GPUs, per-sequence on CPU).
    #[arg(long, value_enum, default_value_t = KvLayout::Auto)]
    kv_layout: KvLayout,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Tokens per block of the paged pool the benchmark sizes for itself.
const BENCH_BLOCK: usize = 16;

/// Deterministic, spread-out token ids below `vocab`.
fn tokens(n: usize, seed: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729 + 13) % vocab) as u32)
        .collect()
}

/// The greedy next token of each sequence, sampled as the server does (one batch, on the
/// logits' device), so the timing includes the device-to-host copy a served step has.
fn next_tokens(out: Vec<Option<Tensor>>, vocab: usize) -> Result<Vec<u32>> {
    let greedy = SamplingParams::default();
    Ok(sample(&every_logits(out)?, vocab, &greedy, SamplingPlace::Auto)?
        .into_iter()
        .map(|s| s.id)
        .collect())
}

fn every_logits(out: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
    out.into_iter()
        .map(|l| l.context("a sequence returned no logits"))
        .collect()
}

/// The middle value (the upper one of an even count); `v` is never empty here.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Draft tokens per sequence in the speculative-verification figure.
const VERIFY_DRAFTS: usize = 4;

/// One decode step: each sequence feeds its last token at position `start`.
fn decode_plan(ids: &[u64], last: &[u32], start: usize, reserve: usize) -> Vec<SeqPlan> {
    ids.iter()
        .zip(last)
        .map(|(&id, &t)| SeqPlan {
            id,
            start,
            tokens: vec![t],
            logits: LogitsWanted::Last,
            reserve,
        })
        .collect()
}

fn sample(logits: &[Tensor], vocab: usize, params: &SamplingParams, place: SamplingPlace) -> Result<Vec<Sampled>> {
    let mut samplers: Vec<Sampler> = logits.iter().map(|_| Sampler::new(params.clone())).collect();
    let context = tokens(64, 1, vocab);
    let mut rows = SampleRow::alike(logits, &mut samplers, &context, &context[32..], false);
    Ok(sample_batch(&mut rows, vocab, place)?)
}

/// Median milliseconds to sample one step's rows: greedy and filtered (temperature, top-k,
/// top-p, repetition penalty) where the logits are, and filtered with every row copied to
/// the host.
fn sampling_cost(logits: &[Tensor], vocab: usize) -> Result<serde_json::Value> {
    let filtered = SamplingParams {
        temperature: 0.8,
        top_k: 50,
        top_p: 0.95,
        repetition_penalty: 1.1,
        ..Default::default()
    };
    let median_ms = |params: &SamplingParams, place| -> Result<f64> {
        let mut ms = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            sample(logits, vocab, params, place)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(ms))
    };
    Ok(json!({
        "greedy_device_ms": median_ms(&SamplingParams::default(), SamplingPlace::Device)?,
        "filtered_device_ms": median_ms(&filtered, SamplingPlace::Device)?,
        "filtered_host_ms": median_ms(&filtered, SamplingPlace::Host)?,
        "filtered_auto_ms": median_ms(&filtered, SamplingPlace::Auto)?,
    }))
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.batch.is_empty() || a.batch.contains(&0) || a.steps == 0 || a.prefill_len == 0 || a.context_len == 0 {
        bail!("--batch entries, --steps, --prefill-len and --context-len must be positive");
    }
    let t_load = Instant::now();
    let mut group = start_leader(&a.model, &a.group)?;
    let load_secs = t_load.elapsed().as_secs_f64();
    let runner = group.runner()?;
    let vocab = runner.model().sampleable_vocab();
    let max_pos = runner.model().config().max_position_embeddings;
    if a.prefill_len > max_pos || a.context_len + a.steps + 2 > max_pos {
        bail!("the model has {max_pos} positions: shorten --prefill-len or --context-len + --steps");
    }
    let paged = a.kv_layout.paged_on(runner.model().device());
    let fused = paged && runner.model().uses_fused_kernels();
    if paged {
        // Room for the largest phase: the prefill prompt, or the biggest decode batch.
        let per_seq = (a.context_len + a.steps + 3 + VERIFY_DRAFTS).div_ceil(BENCH_BLOCK);
        let biggest = a.batch.iter().max().copied().unwrap_or(1);
        // The prefix-caching measurement holds two prompts at once.
        let blocks = (biggest * per_seq).max(2 * a.prefill_len.div_ceil(BENCH_BLOCK));
        runner.use_paged_kv(blocks, BENCH_BLOCK)?;
    }
    let mut next_id = 0u64;

    // Prefill: one warm-up at a tenth of the length, then the measured prompt.
    let mut prefill = |runner: &mut dyn StepRunner, len: usize| -> Result<f64> {
        next_id += 1;
        let plan = [SeqPlan {
            id: next_id,
            start: 0,
            tokens: tokens(len, next_id as usize, vocab),
            logits: LogitsWanted::Last,
            reserve: len,
        }];
        let t = Instant::now();
        next_tokens(runner.step(&plan)?, vocab)?;
        let secs = t.elapsed().as_secs_f64();
        runner.release(&[next_id])?;
        Ok(secs)
    };
    prefill(runner, (a.prefill_len / 10).max(1))?;
    let prefill_secs = prefill(runner, a.prefill_len)?;
    let prefix = prefix_cached(runner, a.prefill_len, vocab)?;
    let mut peak = memory_in_use(runner);

    let mut decode = Vec::new();
    for &b in &a.batch {
        let ids: Vec<u64> = (0..b as u64).map(|i| 1_000_000 + next_id + i).collect();
        next_id += b as u64;
        let reserve = a.context_len + a.steps + 3 + VERIFY_DRAFTS;
        let plan: Vec<SeqPlan> = ids
            .iter()
            .map(|&id| SeqPlan {
                id,
                start: 0,
                tokens: tokens(a.context_len, id as usize, vocab),
                logits: LogitsWanted::Last,
                reserve,
            })
            .collect();
        let mut last = next_tokens(runner.step(&plan)?, vocab)?;
        let mut step_secs = Vec::with_capacity(a.steps);
        for s in 0..a.steps + 2 {
            let plan = decode_plan(&ids, &last, a.context_len + s, reserve);
            let t = Instant::now();
            last = next_tokens(runner.step(&plan)?, vocab)?;
            if s >= 2 {
                step_secs.push(t.elapsed().as_secs_f64());
            }
        }
        // The sampling cost on this step's real logits.
        let at = a.context_len + a.steps + 2;
        let logits = every_logits(runner.step(&decode_plan(&ids, &last, at, reserve))?)?;
        let sampling = sampling_cost(&logits, vocab)?;
        // What verifying speculative drafts costs: the same step with each sequence feeding
        // VERIFY_DRAFTS draft tokens after its last one (every row's logits), rewound after.
        let mut verify_secs = Vec::new();
        for _ in 0..(a.steps / 2).max(3) {
            let plan: Vec<SeqPlan> = decode_plan(&ids, &last, at, reserve)
                .into_iter()
                .map(|mut p| {
                    p.tokens.extend(tokens(VERIFY_DRAFTS, p.id as usize, vocab));
                    p.logits = LogitsWanted::All;
                    p
                })
                .collect();
            let t = Instant::now();
            every_logits(runner.step(&plan)?)?;
            // Steps run asynchronously on a GPU: wait for this one, as sampling its rows would.
            runner.model().device().synchronize()?;
            verify_secs.push(t.elapsed().as_secs_f64());
        }
        let verify = median(verify_secs);
        peak = peak.max(memory_in_use(runner));
        runner.release(&ids)?;
        let median = median(step_secs);
        decode.push(json!({
            "batch": b,
            "ms_per_step": median * 1e3,
            "tokens_per_second": b as f64 / median,
            "ms_per_step_verifying_4_drafts": verify * 1e3,
            "verify_cost_vs_decode": verify / median,
            "sampling": sampling,
        }));
    }
    let out = json!({
        "model": group.name,
        "device": a.model.device,
        "dtype": a.model.dtype,
        "tp": a.group.world_size.unwrap_or(a.group.tp),
        "kv_layout": if paged { "paged" } else { "per-sequence" },
        "fused_kernels": fused,
        "load_seconds": load_secs,
        "prefill": { "tokens": a.prefill_len, "seconds": prefill_secs, "tokens_per_second": a.prefill_len as f64 / prefill_secs },
        "prefix_cached": {
            "cached_tokens": prefix.cached,
            "new_tokens": a.prefill_len - prefix.cached,
            "seconds": prefix.secs,
            "speedup_vs_prefill": prefill_secs / prefix.secs,
        },
        "decode": decode,
        "context_len": a.context_len,
        "peak_memory_bytes": peak,
    });
    if a.json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "{} on {} ({}, {} KV), load {:.2} s",
        group.name,
        a.model.device,
        a.model.dtype,
        if paged { "paged" } else { "per-sequence" },
        load_secs
    );
    println!(
        "prefill {} tokens: {:.1} ms, {:.0} tokens/s",
        a.prefill_len,
        prefill_secs * 1e3,
        a.prefill_len as f64 / prefill_secs
    );
    println!(
        "the same prompt with {} tokens from the prefix cache: {:.1} ms ({:.1}x faster)",
        prefix.cached,
        prefix.secs * 1e3,
        prefill_secs / prefix.secs
    );
    println!(
        "batch  decode ms/step  tokens/s  +{VERIFY_DRAFTS} drafts ms/step  sampling ms: greedy  filtered  filtered on host"
    );
    for d in &decode {
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        let s = &d["sampling"];
        println!(
            "{:<6} {:>14.2} {:>9.1}  {:>9.2} ({:.2}x)  {:>19.2} {:>9.2} {:>17.2}",
            d["batch"],
            f(&d["ms_per_step"]),
            f(&d["tokens_per_second"]),
            f(&d["ms_per_step_verifying_4_drafts"]),
            f(&d["verify_cost_vs_decode"]),
            f(&s["greedy_device_ms"]),
            f(&s["filtered_device_ms"]),
            f(&s["filtered_host_ms"])
        );
    }
    println!("peak memory in use: {:.2} GiB", peak as f64 / (1u64 << 30) as f64);
    Ok(())
}

struct PrefixTiming {
    cached: usize,
    secs: f64,
}

/// A prompt of `len` tokens whose first `len - len/16` tokens are in the prefix cache: the
/// time to copy their KV (`fork`, as the engine does on admission) and prefill the rest.
fn prefix_cached(runner: &mut dyn StepRunner, len: usize, vocab: usize) -> Result<PrefixTiming> {
    let (src, dst) = (2_000_000_000, 2_000_000_001);
    let cached = len - (len / 16).max(1);
    let prompt = tokens(len, 3, vocab);
    if cached == 0 {
        return Ok(PrefixTiming { cached, secs: f64::NAN });
    }
    runner.step(&[SeqPlan {
        id: src,
        start: 0,
        tokens: prompt[..cached].to_vec(),
        logits: LogitsWanted::None,
        reserve: len,
    }])?;
    let t = Instant::now();
    runner.fork(src, dst, cached, len)?;
    next_tokens(
        runner.step(&[SeqPlan {
            id: dst,
            start: cached,
            tokens: prompt[cached..].to_vec(),
            logits: LogitsWanted::Last,
            reserve: len,
        }])?,
        vocab,
    )?;
    let secs = t.elapsed().as_secs_f64();
    runner.release(&[src, dst])?;
    Ok(PrefixTiming { cached, secs })
}

/// Device memory in use on a GPU (all processes'), else this process's peak resident set.
fn memory_in_use(runner: &mut dyn StepRunner) -> u64 {
    if let Some((free, total)) = neox_worker::model::device_memory(runner.model().device()) {
        return (total - free) as u64;
    }
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
