//! Command line of `neox-worker`. Errors meet `anyhow` here, at the binary's edge.

mod bench;
mod group;
mod offline;
mod serve;

use clap::{Args, Parser, Subcommand};
use neox_worker::model::on_compute_threads;

#[derive(Parser)]
#[command(name = "neox-worker", version, about = "GPT-NeoX inference worker (NeoX Serve)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model over gRPC (the default command).
    Serve(serve::ServeArgs),
    /// Generate a continuation of a prompt and print it.
    Generate(offline::GenerateArgs),
    /// Print the logits of the last prompt position (or all positions).
    Logits(offline::LogitsArgs),
    /// Perplexity over non-overlapping windows of a token-id file.
    Perplexity(offline::PerplexityArgs),
    /// Measure load time, prefill throughput, decode ms/step per batch size and peak memory.
    Bench(bench::BenchArgs),
    /// Run as rank ≥ 1 of a tensor-parallel group (NEOX_RANK, NEOX_WORLD_SIZE, NEOX_LEADER_ADDR).
    Follower(group::FollowerArgs),
}

/// Options shared by every command that loads a model.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A HuggingFace GPT-NeoX checkpoint directory, or `builtin:shakespeare`.
    #[arg(long, env = "NEOX_MODEL", default_value = neox_worker::model::BUILTIN_DEFAULT)]
    pub model: String,
    /// Compute dtype: fp32, fp16 or bf16.
    #[arg(long, env = "NEOX_DTYPE", default_value = "fp32")]
    pub dtype: String,
    /// Device: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long, env = "NEOX_DEVICE", default_value = "cpu")]
    pub device: String,
    /// CPU threads for matrix work (default: all cores, split between local ranks).
    #[arg(long, env = "NEOX_THREADS")]
    pub threads: Option<usize>,
}

const COMMANDS: &[&str] = &[
    "serve",
    "generate",
    "logits",
    "perplexity",
    "bench",
    "follower",
    "help",
    "-h",
    "--help",
    "-V",
    "--version",
];

pub fn main() -> std::process::ExitCode {
    // candle looks the CPU count up (reading /proc) on every op unless this is set: set it
    // once, before any thread starts. `--threads` and the TP launcher override it.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    // `neox-worker [FLAGS]` means `neox-worker serve [FLAGS]`.
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .get(1)
        .and_then(|a| a.to_str())
        .is_none_or(|a| !COMMANDS.contains(&a))
    {
        args.insert(1, "serve".into());
    }
    let cli = Cli::parse_from(args);
    // Flushes what is still queued for stderr when main returns.
    let _logs = init_logging();
    let result = match cli.command {
        Command::Serve(a) => serve::serve(a),
        // The serving engine moves onto the compute threads itself.
        Command::Generate(a) => on_compute_threads(|| offline::generate(a)),
        Command::Logits(a) => on_compute_threads(|| offline::logits(a)),
        Command::Perplexity(a) => on_compute_threads(|| offline::perplexity(a)),
        Command::Bench(a) => on_compute_threads(|| bench::bench(a)),
        Command::Follower(a) => on_compute_threads(|| group::follower(a)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `NEOX_LOG` (an env-filter, default `warn`); `NEOX_LOG_FORMAT=json` gives one
/// JSON object a line for log collectors, else text, coloured only on a terminal. Lines go
/// through a writer thread, so a slow or stalled log pipe never stalls the engine's steps
/// (past a large backlog, lines are dropped rather than waited for).
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("NEOX_LOG").unwrap_or_else(|_| "warn".into());
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    if std::env::var("NEOX_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
    guard
}
