//! `neox`: command-line client of a NeoX Serve worker (gRPC; `bench` also loads the
//! OpenAI-compatible HTTP API).

mod bench;
mod openai;

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use neox_proto::neox::v1 as pb;
use pb::text_generation_client::TextGenerationClient;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "neox", version, about = "Client of a NeoX Serve worker")]
struct Cli {
    /// Server address [default: http://127.0.0.1:50051, or http://127.0.0.1:8000 for
    /// `bench --api openai`].
    #[arg(long, global = true, env = "NEOX_ADDR")]
    addr: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of PROMPT.
    Generate(GenerateArgs),
    /// Show the token ids of TEXT.
    Tokenize { text: String },
    /// Show the served model and the server's limits.
    Info,
    /// Check the server's gRPC health (the whole server, as Kubernetes probes do, or one service).
    Health {
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Load generator: throughput and latency percentiles.
    Bench(bench::BenchArgs),
}

/// Sampling and stopping flags, shared by `generate` and `bench`.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: u32,
    /// 0 (default) is greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub typical_p: Option<f32>,
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop at this text (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    pub fn request(&self, prompt: &str) -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt: prompt.to_owned(),
            parameters: Some(pb::GenerationParameters {
                max_new_tokens: self.max_new_tokens,
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                typical_p: self.typical_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
                stop_sequences: self.stop.clone(),
                ignore_eos: self.ignore_eos,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[derive(Args, Debug)]
struct GenerateArgs {
    prompt: String,
    /// Print tokens as they arrive.
    #[arg(long)]
    stream: bool,
    /// Print the whole response as JSON.
    #[arg(long, conflicts_with = "stream")]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub async fn connect(addr: &str) -> Result<TextGenerationClient<Channel>> {
    let ch = Channel::from_shared(addr.to_owned())
        .with_context(|| format!("invalid address {addr}"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    Ok(TextGenerationClient::new(ch))
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

fn reason(code: i32) -> &'static str {
    match pb::FinishReason::try_from(code) {
        Ok(pb::FinishReason::Length) => "length",
        Ok(pb::FinishReason::EosToken) => "eos_token",
        Ok(pb::FinishReason::StopSequence) => "stop_sequence",
        Ok(pb::FinishReason::StopToken) => "stop_token",
        _ => "unspecified",
    }
}

const GRPC_ADDR: &str = "http://127.0.0.1:50051";
const HTTP_ADDR: &str = "http://127.0.0.1:8000";

async fn run(cli: Cli) -> Result<()> {
    let addr = cli.addr.as_deref().unwrap_or(GRPC_ADDR);
    match cli.command {
        Command::Generate(a) => {
            let mut c = connect(addr).await?;
            let req = a.sampling.request(&a.prompt);
            if a.stream {
                let mut s = c.generate_stream(req).await.map_err(status)?.into_inner();
                let mut out = std::io::stdout();
                write!(out, "{}", a.prompt)?;
                while let Some(m) = s.message().await.map_err(status)? {
                    write!(out, "{}", m.text_delta)?;
                    out.flush()?;
                    if let Some(f) = m.finish_reason {
                        let u = m.usage.unwrap_or_default();
                        eprintln!(
                            "\n[{}; {} prompt + {} generated tokens]",
                            reason(f),
                            u.prompt_tokens,
                            u.generated_tokens
                        );
                    }
                }
            } else {
                let r = c.generate(req).await.map_err(status)?.into_inner();
                if a.json {
                    let u = r.usage.unwrap_or_default();
                    let t = r.timings.unwrap_or_default();
                    println!(
                        "{}",
                        serde_json::json!({
                            "text": r.text, "token_ids": r.token_ids, "finish_reason": reason(r.finish_reason),
                            "prompt_tokens": u.prompt_tokens, "generated_tokens": u.generated_tokens,
                            "time_to_first_token_s": t.time_to_first_token_seconds, "total_s": t.total_seconds,
                        })
                    );
                } else {
                    println!("{}{}", a.prompt, r.text);
                }
            }
        }
        Command::Tokenize { text } => {
            let mut c = connect(addr).await?;
            let r = c
                .tokenize(pb::TokenizeRequest { text })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", serde_json::json!({ "ids": r.ids, "tokens": r.tokens }));
        }
        Command::Info => {
            let mut c = connect(addr).await?;
            let i = c
                .model_info(pb::ModelInfoRequest {})
                .await
                .map_err(status)?
                .into_inner();
            println!("model:             {}", i.model);
            println!(
                "architecture:      {} ({} layers, hidden {}, {} heads, vocab {})",
                i.architecture, i.num_layers, i.hidden_size, i.num_heads, i.vocab_size
            );
            println!("context:           {} positions", i.max_position_embeddings);
            println!(
                "tensor parallel:   {} ranks, {} on {}",
                i.tensor_parallel_size, i.dtype, i.device
            );
            println!(
                "limits:            batch {}, total tokens {}, new tokens {}, queue {}",
                i.max_batch_size, i.max_total_tokens, i.max_new_tokens, i.max_waiting_requests
            );
            println!(
                "KV cache:          {} blocks of {} tokens per rank ({} tokens), prefix caching {}",
                i.kv_cache_blocks,
                i.kv_block_size,
                u64::from(i.kv_cache_blocks) * u64::from(i.kv_block_size),
                if i.prefix_caching { "on" } else { "off" }
            );
            match i.speculative_tokens {
                0 => println!("speculative decoding: off"),
                n => println!("speculative decoding: prompt lookup, up to {n} draft tokens"),
            }
        }
        Command::Health { service } => {
            let ch = Channel::from_shared(addr.to_owned())?
                .connect()
                .await
                .with_context(|| format!("cannot connect to {addr}"))?;
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            let r = h
                .check(tonic_health::pb::HealthCheckRequest { service })
                .await
                .map_err(status)?
                .into_inner();
            let serving = r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
            println!("{}", if serving { "SERVING" } else { "NOT_SERVING" });
            if !serving {
                bail!("the server is not serving");
            }
        }
        Command::Bench(a) => {
            let default = match a.api {
                bench::Api::Grpc => GRPC_ADDR,
                bench::Api::Openai => HTTP_ADDR,
            };
            bench::run(cli.addr.as_deref().unwrap_or(default), a).await?
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
