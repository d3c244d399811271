//! `neox-worker serve` (the default command): the gRPC server on rank 0; ranks ≥ 1 of a
//! group run as followers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use neox_proto::neox::v1 as pb;

use neox_worker::engine::{self, BlockManager, EngineConfig, SamplingPlace, SpeculationConfig};
use neox_worker::metrics::Metrics;
use neox_worker::model::dtype_name;
use neox_worker::server::{self, Exit, Limits, ServerOptions};

use super::group::{follower_with_health, start_leader, FollowerArgs, GroupArgs};
use super::ModelArgs;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    group: GroupArgs,
    /// gRPC listen address.
    #[arg(long, env = "NEOX_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    grpc_addr: SocketAddr,
    /// Prometheus /metrics listen address.
    #[arg(long, env = "NEOX_METRICS_ADDR", default_value = "127.0.0.1:9400")]
    metrics_addr: SocketAddr,
    /// OpenAI-compatible HTTP API (POST /v1/completions, GET /v1/models) listen address, or
    /// `off`.
    #[arg(long, env = "NEOX_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    http_addr: Listen,
    /// The model's name in ModelInfo and the name OpenAI API requests give as `model`
    /// (default: the --model argument).
    #[arg(long, env = "NEOX_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Sequences in the running batch, at most.
    #[arg(long, env = "NEOX_MAX_BATCH_SIZE", default_value_t = 32)]
    max_batch_size: usize,
    /// Tokens (decode + prefill chunks) one engine step processes, at most.
    #[arg(long, env = "NEOX_MAX_TOKENS_PER_STEP", default_value_t = 512)]
    max_tokens_per_step: usize,
    /// Requests waiting for admission, at most; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "NEOX_MAX_WAITING_REQUESTS", default_value_t = 128)]
    max_waiting_requests: usize,
    /// Prompt + generated tokens of a request, at most (default: the model's context).
    #[arg(long, env = "NEOX_MAX_TOTAL_TOKENS")]
    max_total_tokens: Option<usize>,
    /// Cap on a request's max_new_tokens.
    #[arg(long, env = "NEOX_MAX_NEW_TOKENS", default_value_t = 1024)]
    max_new_tokens: usize,
    /// max_new_tokens of a request that leaves it unset.
    #[arg(long, env = "NEOX_DEFAULT_MAX_NEW_TOKENS", default_value_t = 64)]
    default_max_new_tokens: usize,
    /// Prompt text size limit in bytes. gRPC messages may be 4x this plus 256 KiB, so that an
    /// oversized prompt is refused by validation, naming the field; past that, OUT_OF_RANGE.
    #[arg(long, env = "NEOX_MAX_PROMPT_BYTES", default_value_t = 256 * 1024)]
    max_prompt_bytes: usize,
    /// KV cache memory budget per rank, in MiB (default: 1024 on CPU; on a GPU, 90% of the
    /// device memory still free once the weights are loaded, on the rank with the least).
    #[arg(long, env = "NEOX_KV_CACHE_MIB")]
    kv_cache_mib: Option<usize>,
    /// KV cache layout: paged (one pool of blocks per rank, allocated up front; fewest kernel
    /// launches on GPUs), per-sequence (buffers per sequence; fastest on CPU), or auto: paged on
    /// GPUs, per-sequence on CPU.
    #[arg(long, env = "NEOX_KV_LAYOUT", value_enum, default_value_t = KvLayout::Auto)]
    kv_layout: KvLayout,
    /// Tokens per KV block.
    #[arg(long, env = "NEOX_KV_BLOCK_SIZE", default_value_t = 16)]
    kv_block_size: usize,
    /// Where tokens are sampled: device (all of a step's rows with tensor ops where the
    /// logits are, so a GPU sends back only ids and asked-for logprobs), host (each row copied
    /// out), or auto: device on GPUs, host on CPU.
    #[arg(long, env = "NEOX_SAMPLING", value_enum, default_value_t = SamplingPlace::Auto)]
    sampling: SamplingPlace,
    /// Keep finished requests' KV while blocks are free, and start prompts that begin with the
    /// same tokens (a shared system prompt, a chat's history) from a copy of it instead of
    /// recomputing it. Cached prefixes are evicted first whenever blocks are needed.
    #[arg(long, env = "NEOX_PREFIX_CACHING", default_value_t = true, action = clap::ArgAction::Set)]
    prefix_caching: bool,
    /// Speculative decoding by prompt lookup: a decoding sequence whose last tokens occurred
    /// earlier in its prompt or output feeds up to this many of the tokens that followed them
    /// as drafts, and keeps those the model agrees with (several tokens for one step's weight
    /// reads). Output is unchanged, seeded sampling included (on a GPU with `--sampling auto`,
    /// up to the f32 rounding of the device sampler, which a step's extra rows may bring in:
    /// see the README). 0: off.
    #[arg(long, env = "NEOX_SPECULATIVE_TOKENS", default_value_t = 0)]
    speculative_tokens: usize,
    /// Longest and shortest suffix (in tokens) looked up for drafts.
    #[arg(long, env = "NEOX_SPECULATIVE_NGRAM_MAX", default_value_t = 3)]
    speculative_ngram_max: usize,
    #[arg(long, env = "NEOX_SPECULATIVE_NGRAM_MIN", default_value_t = 2)]
    speculative_ngram_min: usize,
    /// Speculate only in steps where at most this many sequences decode (larger batches
    /// already share each weight read, and draft rows would cost compute).
    #[arg(long, env = "NEOX_SPECULATIVE_MAX_BATCH", default_value_t = 4)]
    speculative_max_batch: usize,
    /// Seconds in-flight requests may take to finish after SIGTERM (after the drain delay).
    #[arg(long, env = "NEOX_SHUTDOWN_GRACE", default_value_t = 30.0)]
    shutdown_grace: f64,
    /// Seconds the server goes on admitting requests after SIGTERM while health reports
    /// NOT_SERVING, for load balancers to stop routing here first (not after SIGINT).
    #[arg(long, env = "NEOX_DRAIN_DELAY", default_value_t = 5.0)]
    drain_delay: f64,
}

/// A listen address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(Option<SocketAddr>);

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen(None));
        }
        s.parse()
            .map(|a| Listen(Some(a)))
            .map_err(|e| format!("{e} (expected HOST:PORT or off)"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvLayout {
    Auto,
    Paged,
    PerSequence,
}

impl KvLayout {
    /// Whether caches on `device` are paged (auto: on GPUs).
    pub fn paged_on(self, device: &candle_core::Device) -> bool {
        match self {
            KvLayout::Paged => true,
            KvLayout::PerSequence => false,
            KvLayout::Auto => !device.is_cpu(),
        }
    }
}

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.group.rank.is_some_and(|r| r > 0) {
        let grpc = a.grpc_addr;
        return follower_with_health(
            FollowerArgs {
                model: a.model,
                group: a.group,
            },
            Some(grpc),
        );
    }
    for (name, v) in [
        ("max-batch-size", a.max_batch_size),
        ("max-tokens-per-step", a.max_tokens_per_step),
        ("kv-block-size", a.kv_block_size),
        ("kv-cache-mib", a.kv_cache_mib.unwrap_or(1)),
        ("max-new-tokens", a.max_new_tokens),
        ("default-max-new-tokens", a.default_max_new_tokens),
    ] {
        if v == 0 {
            bail!("--{name} must be at least 1");
        }
    }
    for (name, v) in [
        ("speculative-ngram-max", a.speculative_ngram_max),
        ("speculative-ngram-min", a.speculative_ngram_min),
    ] {
        if v == 0 {
            bail!("--{name} must be at least 1");
        }
    }
    if a.max_tokens_per_step < a.max_batch_size {
        // Every running sequence feeds a token each step; a smaller budget starves the last.
        bail!(
            "--max-tokens-per-step ({}) must be at least --max-batch-size ({})",
            a.max_tokens_per_step,
            a.max_batch_size
        );
    }
    if a.speculative_ngram_min > a.speculative_ngram_max {
        bail!(
            "--speculative-ngram-min ({}) is more than --speculative-ngram-max ({})",
            a.speculative_ngram_min,
            a.speculative_ngram_max
        );
    }
    if a.served_model_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        bail!("--served-model-name must not be empty");
    }
    if !(a.shutdown_grace >= 0.0 && a.shutdown_grace.is_finite()) {
        bail!("--shutdown-grace must be a non-negative number of seconds");
    }
    if !(a.drain_delay >= 0.0 && a.drain_delay.is_finite()) {
        bail!("--drain-delay must be a non-negative number of seconds");
    }
    let mut group = start_leader(&a.model, &a.group)?;
    let mut runner = group.take_runner()?;
    let model = runner.model();
    let cfg = model.config().clone();
    let context = a
        .max_total_tokens
        .unwrap_or(cfg.max_position_embeddings)
        .min(cfg.max_position_embeddings);
    // Every rank holds its share of every block: the budget is what the fullest device leaves.
    let own_free = neox_worker::model::device_memory(model.device()).map(|(free, _total)| free);
    let kv_cache_mib = match a.kv_cache_mib {
        Some(mib) => mib,
        None => match own_free.into_iter().chain(group.followers_device_free).min() {
            Some(free) => (free / 10 * 9) >> 20,
            None => 1024,
        },
    };
    tracing::info!(kv_cache_mib, "KV cache budget per rank");
    let blocks = BlockManager::from_budget(a.kv_block_size, kv_cache_mib << 20, model.kv_bytes_per_token());
    if blocks.total() == 0 {
        bail!(
            "a KV budget of {kv_cache_mib} MiB (--kv-cache-mib) holds no KV block of {} tokens",
            a.kv_block_size
        );
    }
    // The longest sequence is also what the whole KV budget holds: advertising more (in
    // ModelInfo, /v1/models' max_model_len) would have clients size prompts that are refused.
    let kv_tokens = blocks.total() * a.kv_block_size;
    let max_total = context.min(kv_tokens);
    if max_total < context {
        tracing::warn!(
            context,
            kv_tokens,
            "the KV budget holds fewer tokens than the context: sequences are limited to {kv_tokens} tokens (raise --kv-cache-mib)"
        );
    }
    let info = pb::ModelInfoResponse {
        model: a.served_model_name.clone().unwrap_or_else(|| group.name.clone()),
        architecture: "GPTNeoXForCausalLM".into(),
        vocab_size: model.sampleable_vocab() as u32,
        hidden_size: cfg.hidden_size as u32,
        num_layers: cfg.num_layers as u32,
        num_heads: cfg.num_heads as u32,
        max_position_embeddings: cfg.max_position_embeddings as u32,
        tensor_parallel_size: model.rank().world_size as u32,
        dtype: dtype_name(model.dtype()).into(),
        device: neox_worker::model::device_name(model.device()),
        max_batch_size: a.max_batch_size as u32,
        max_total_tokens: max_total as u32,
        max_new_tokens: a.max_new_tokens.min(max_total) as u32,
        max_waiting_requests: a.max_waiting_requests as u32,
        eos_token_id: group.tokenizer.eos_token_id().unwrap_or(0),
        kv_block_size: a.kv_block_size as u32,
        kv_cache_blocks: blocks.total() as u32,
        prefix_caching: a.prefix_caching,
        speculative_tokens: a.speculative_tokens as u32,
    };
    let limits = Limits {
        max_total_tokens: max_total,
        max_new_tokens: a.max_new_tokens.min(max_total),
        default_max_new_tokens: a.default_max_new_tokens.min(a.max_new_tokens).min(max_total),
        max_prompt_bytes: a.max_prompt_bytes,
        max_stop_sequences: 8,
        max_stop_sequence_chars: 256,
        max_stop_token_ids: 64,
        max_top_n_tokens: 5,
        vocab_size: model.sampleable_vocab(),
    };
    let paged = a.kv_layout.paged_on(runner.model().device());
    let config = EngineConfig {
        max_batch_size: a.max_batch_size,
        max_tokens_per_step: a.max_tokens_per_step,
        max_waiting_requests: a.max_waiting_requests,
        max_total_tokens: max_total,
        kv_block_size: a.kv_block_size,
        kv_blocks: blocks.total(),
        sampling: a.sampling,
        prefix_caching: a.prefix_caching,
        paged_kv: paged,
        speculation: SpeculationConfig {
            max_tokens: a.speculative_tokens,
            max_ngram: a.speculative_ngram_max,
            min_ngram: a.speculative_ngram_min,
            max_batch: a.speculative_max_batch,
        },
    };
    if paged {
        // The whole budget up front, on every rank: the engine's block accounting is exact.
        runner
            .use_paged_kv(blocks.total(), a.kv_block_size)
            .context("allocating the paged KV pool")?;
    }
    tracing::info!(paged, blocks = blocks.total(), "KV cache layout");
    if runner.model().device().is_cuda() {
        warm_up(runner.as_mut()).context("warming up the CUDA kernels")?;
    }
    let metrics = Metrics::new().context("creating metrics")?;
    let tokenizer = Arc::new(group.tokenizer.clone());
    let (handle, engine_thread) = engine::start(runner, tokenizer.clone(), config, metrics.clone());
    let opts = ServerOptions {
        grpc_addr: a.grpc_addr,
        metrics_addr: a.metrics_addr,
        http_addr: a.http_addr.0,
        max_message_bytes: a.max_prompt_bytes + 64 * 1024,
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace),
        drain_delay: Duration::from_secs_f64(a.drain_delay),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let exit = rt.block_on(server::serve(opts, handle, tokenizer, limits, info, metrics))?;
    drop(rt);
    // The engine thread ends once every handle is gone and its work is done or failed.
    let _ = engine_thread.join();
    match exit {
        Exit::Drained => {
            eprintln!("neox-worker: drained, exiting");
            Ok(())
        }
        Exit::GroupFailed => bail!("the worker group failed; exiting so the group restarts as a unit"),
    }
}

/// Runs every kind of step once before the worker reports ready. The first launch of a CUDA
/// kernel compiles its module's PTX for the device (measured on an H100: 15 s at start-up and
/// 5 s more at the first use of another path, with an empty driver cache), which belongs in
/// start-up, not in a user's first request. Two prompts, one longer than the fused kernels
/// take, so both prefill paths run; greedy and filtered sampling on the device.
fn warm_up(runner: &mut dyn neox_worker::shard::StepRunner) -> Result<()> {
    const NEW_TOKENS: usize = 3;
    let started = std::time::Instant::now();
    // Prompt and new tokens must fit the context, however small.
    let room = runner
        .model()
        .config()
        .max_position_embeddings
        .saturating_sub(NEW_TOKENS);
    if room == 0 {
        return Ok(());
    }
    let long = (neox_worker::model::FUSED_MAX_NEW + 16).min(room);
    let prompts = [vec![0u32; NEW_TOKENS.min(room)], vec![0u32; long]];
    engine::generate_batch(runner, &prompts, &engine::OfflineOptions::greedy(NEW_TOKENS))?;
    let filtered = engine::OfflineOptions {
        sampling: engine::SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            repetition_penalty: 1.1,
            ..Default::default()
        },
        place: SamplingPlace::Device,
        ..engine::OfflineOptions::greedy(2)
    };
    engine::generate_batch(runner, &prompts, &filtered)?;
    tracing::info!(secs = started.elapsed().as_secs_f64(), "warmed up the CUDA kernels");
    Ok(())
}
