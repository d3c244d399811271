//! The worker's Prometheus metrics (names follow the vLLM/TGI family, prefixed `neox_`).

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests_running: IntGauge,
    pub requests_waiting: IntGauge,
    pub kv_cache_usage_ratio: Gauge,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub request_duration: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub requests: IntCounterVec,
    pub rejected: IntCounterVec,
    pub batch_size: Histogram,
    pub preemptions: IntCounter,
    pub prefix_cache_blocks: IntGauge,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub spec_draft_tokens: IntCounter,
    pub spec_accepted_tokens: IntCounter,
    pub group_healthy: IntGauge,
}

/// First tokens: from a cached prefix's tens of milliseconds to minutes queued behind a 20B.
const TTFT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0,
];
/// Between tokens: 5-50 ms on GPUs, 10-100 ms on CPUs, more in big batches; fine where decode
/// steps fall, so TPOT percentiles mean something.
const TPOT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Every value `neox_requests_total` is labelled with.
pub const FINISH_LABELS: &[&str] = &[
    "length",
    "eos_token",
    "stop_sequence",
    "stop_token",
    "cancelled",
    "deadline_exceeded",
    "error",
];

/// Every value `neox_requests_rejected_total` is labelled with.
pub const REJECT_LABELS: &[&str] = &["queue_full", "too_large", "unavailable"];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        };
        let m = Self {
            requests_running: IntGauge::new("neox_requests_running", "Requests in the running batch")?,
            requests_waiting: IntGauge::new("neox_requests_waiting", "Requests waiting for admission")?,
            kv_cache_usage_ratio: Gauge::new("neox_kv_cache_usage_ratio", "Fraction of KV cache blocks in use")?,
            time_to_first_token: hist(
                "neox_time_to_first_token_seconds",
                "Time from request arrival to its first generated token",
                TTFT_BUCKETS,
            )?,
            time_per_output_token: hist(
                "neox_time_per_output_token_seconds",
                "Time between consecutive generated tokens of a request",
                TPOT_BUCKETS,
            )?,
            request_duration: hist(
                "neox_request_duration_seconds",
                "Time from request arrival to its last token",
                DURATION_BUCKETS,
            )?,
            prompt_tokens: IntCounter::new(
                "neox_prompt_tokens_total",
                "Prompt tokens of requests that got their first token (cached or computed; once per request)",
            )?,
            generation_tokens: IntCounter::new("neox_generation_tokens_total", "Tokens generated")?,
            requests: IntCounterVec::new(
                Opts::new("neox_requests_total", "Requests ended, by finish reason"),
                &["finish_reason"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "neox_requests_rejected_total",
                    "Valid requests the engine turned away, by reason (queue_full: 429 / RESOURCE_EXHAUSTED)",
                ),
                &["reason"],
            )?,
            batch_size: hist("neox_batch_size", "Sequences per engine step", BATCH_BUCKETS)?,
            preemptions: IntCounter::new(
                "neox_preemptions_total",
                "Sequences preempted (KV freed, recomputed later) for lack of KV blocks",
            )?,
            prefix_cache_blocks: IntGauge::new(
                "neox_prefix_cache_blocks",
                "KV blocks holding cached prompt prefixes (evicted first when blocks are needed)",
            )?,
            prefix_cache_queries: IntCounter::new(
                "neox_prefix_cache_queries_total",
                "Tokens of admitted sequences looked up in the prefix cache (the prompt, plus what a preempted one had generated)",
            )?,
            prefix_cache_hits: IntCounter::new(
                "neox_prefix_cache_hits_total",
                "Tokens of admitted sequences whose KV was copied from the prefix cache (never a sequence's last token)",
            )?,
            spec_draft_tokens: IntCounter::new(
                "neox_spec_decode_draft_tokens_total",
                "Draft tokens proposed by prompt lookup and verified (speculative decoding)",
            )?,
            spec_accepted_tokens: IntCounter::new(
                "neox_spec_decode_accepted_tokens_total",
                "Draft tokens the model agreed with and kept (each saved a decode step)",
            )?,
            group_healthy: IntGauge::new(
                "neox_group_healthy",
                "1 while every rank of the tensor-parallel group is connected and serving",
            )?,
            registry,
        };
        m.registry.register(Box::new(m.requests_running.clone()))?;
        m.registry.register(Box::new(m.requests_waiting.clone()))?;
        m.registry.register(Box::new(m.kv_cache_usage_ratio.clone()))?;
        m.registry.register(Box::new(m.time_to_first_token.clone()))?;
        m.registry.register(Box::new(m.time_per_output_token.clone()))?;
        m.registry.register(Box::new(m.request_duration.clone()))?;
        m.registry.register(Box::new(m.prompt_tokens.clone()))?;
        m.registry.register(Box::new(m.generation_tokens.clone()))?;
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.rejected.clone()))?;
        m.registry.register(Box::new(m.batch_size.clone()))?;
        m.registry.register(Box::new(m.preemptions.clone()))?;
        m.registry.register(Box::new(m.prefix_cache_blocks.clone()))?;
        m.registry.register(Box::new(m.prefix_cache_queries.clone()))?;
        m.registry.register(Box::new(m.prefix_cache_hits.clone()))?;
        m.registry.register(Box::new(m.spec_draft_tokens.clone()))?;
        m.registry.register(Box::new(m.spec_accepted_tokens.clone()))?;
        m.registry.register(Box::new(m.group_healthy.clone()))?;
        for l in FINISH_LABELS {
            m.requests.with_label_values(&[l]);
        }
        for l in REJECT_LABELS {
            m.rejected.with_label_values(&[l]);
        }
        Ok(m)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = String::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode_utf8(&self.registry.gather(), &mut buf) {
            tracing::error!("encoding metrics: {e}");
        }
        buf
    }
}
