//! Decode benchmark: a 125M-shaped GPT-NeoX (random weights written as an HF checkpoint by
//! the benchmark itself), prefill and decode at batch 1 and 8, side by side with HF
//! transformers on the same checkpoint and thread count when it is installed.
//!
//! Then tensor parallelism: the same model through `neox-worker generate --tp N` (separate
//! rank processes over loopback TCP, the host's threads split between them), bytes moved per
//! token per rank, and the latency of one hidden-sized all-reduce.
//!
//! `cargo bench -p neox-worker --bench decode` (env: NEOX_BENCH_THREADS=2,
//! NEOX_BENCH_LAYERS=12, NEOX_HF_PYTHON=python3 with transformers, NEOX_BENCH_SKIP_HF=1,
//! NEOX_BENCH_TP=1,2, NEOX_BENCH_SAVE=DIR keeps a servable copy of the checkpoint).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use neox_worker::engine::sampling::argmax;
use neox_worker::model::{Checkpoint, GptNeoX, LogitsWanted, NeoXConfig, SeqStep};
use neox_worker::parallel::RankInfo;

const PROMPT: usize = 32;
const DECODE: usize = 32;
const REPEATS: usize = 3;

/// The worker crate: where cargo runs the bench from, else where it was compiled (a shared
/// target directory can hold a bench compiled in another clone).
fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn write_checkpoint(dir: &Path, layers: usize) -> anyhow::Result<NeoXConfig> {
    let (h, inter, vocab) = (768usize, 3072usize, 50432usize);
    let config = serde_json::json!({
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": vocab,
        "hidden_size": h, "num_attention_heads": 12, "num_hidden_layers": layers, "intermediate_size": inter,
        "hidden_act": "gelu", "rotary_pct": 0.25, "rotary_emb_base": 10000, "max_position_embeddings": 2048,
        "layer_norm_eps": 1e-5, "use_parallel_residual": true, "tie_word_embeddings": false,
        "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    let dev = Device::Cpu;
    let rand = |shape: &[usize]| Tensor::randn(0f32, 0.02, shape, &dev);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("gpt_neox.embed_in.weight".into(), rand(&[vocab, h])?);
    t.insert("embed_out.weight".into(), rand(&[vocab, h])?);
    t.insert(
        "gpt_neox.final_layer_norm.weight".into(),
        Tensor::ones(h, DType::F32, &dev)?,
    );
    t.insert(
        "gpt_neox.final_layer_norm.bias".into(),
        Tensor::zeros(h, DType::F32, &dev)?,
    );
    for l in 0..layers {
        let p = format!("gpt_neox.layers.{l}");
        for ln in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{ln}.weight"), Tensor::ones(h, DType::F32, &dev)?);
            t.insert(format!("{p}.{ln}.bias"), Tensor::zeros(h, DType::F32, &dev)?);
        }
        for (name, out, inp) in [
            ("attention.query_key_value", 3 * h, h),
            ("attention.dense", h, h),
            ("mlp.dense_h_to_4h", inter, h),
            ("mlp.dense_4h_to_h", h, inter),
        ] {
            t.insert(format!("{p}.{name}.weight"), rand(&[out, inp])?);
            t.insert(format!("{p}.{name}.bias"), rand(&[out])?);
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(NeoXConfig::from_json(&std::fs::read_to_string(
        dir.join("config.json"),
    )?)?)
}

struct Figures {
    prefill_ms: f64,
    decode_ms_per_step: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(model: &GptNeoX, batch: usize) -> anyhow::Result<Figures> {
    let vocab = model.config().vocab_size as u32;
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for r in 0..REPEATS {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|b| {
                (0..PROMPT)
                    .map(|i| ((i * 7919 + b * 104729 + r * 31) as u32) % (vocab - 2) + 2)
                    .collect()
            })
            .collect();
        let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache(PROMPT + DECODE)).collect();
        let mut next: Vec<Vec<u32>> = prompts.clone();
        let step = |next: &mut Vec<Vec<u32>>, caches: &mut Vec<_>| -> anyhow::Result<()> {
            let mut steps: Vec<SeqStep<'_>> = next
                .iter()
                .zip(caches.iter_mut())
                .map(|(t, c)| SeqStep {
                    tokens: t,
                    cache: c,
                    logits: LogitsWanted::Last,
                })
                .collect();
            let logits = model.forward(&mut steps)?;
            for (i, l) in logits.into_iter().enumerate() {
                let row: Vec<f32> = l
                    .ok_or_else(|| anyhow::anyhow!("no logits"))?
                    .flatten_all()?
                    .to_vec1()?;
                next[i] = vec![argmax(&row)];
            }
            Ok(())
        };
        let t0 = Instant::now();
        step(&mut next, &mut caches)?;
        prefill.push(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        for _ in 0..DECODE {
            step(&mut next, &mut caches)?;
        }
        decode.push(t0.elapsed().as_secs_f64() / DECODE as f64);
    }
    Ok(Figures {
        prefill_ms: median(prefill) * 1e3,
        decode_ms_per_step: median(decode) * 1e3,
    })
}

fn hf(dir: &Path, threads: usize) -> Option<serde_json::Value> {
    if std::env::var("NEOX_BENCH_SKIP_HF").is_ok() {
        return None;
    }
    let python = std::env::var("NEOX_HF_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = crate_dir().join("benches/hf_decode.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(dir)
        .args(["--threads", &threads.to_string(), "--prompt-len", &PROMPT.to_string()])
        .args(["--decode-tokens", &DECODE.to_string(), "--batches", "1,8"])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "HF side skipped ({python}): {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        );
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn main() -> anyhow::Result<()> {
    let threads = env_or("NEOX_BENCH_THREADS", 2);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let layers = env_or("NEOX_BENCH_LAYERS", 12);
    let dir = tempfile::tempdir()?;
    let config = write_checkpoint(dir.path(), layers)?;
    // The demo tokenizer makes the checkpoint servable (`neox-worker` needs one); sampling is
    // then limited to its 2048 ids, the LM head still computes all 50432 rows.
    let tok = crate_dir().join("assets/shakespeare-neox/tokenizer.json");
    std::fs::copy(tok, dir.path().join("tokenizer.json"))?;
    if let Ok(save) = std::env::var("NEOX_BENCH_SAVE") {
        let save = Path::new(&save);
        std::fs::create_dir_all(save)?;
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(dir.path().join(f), save.join(f))?;
        }
        println!("checkpoint saved to {}", save.display());
    }
    let ckpt = Checkpoint::open_dir(dir.path())?;
    let model = GptNeoX::load(&config, &ckpt, DType::F32, &Device::Cpu, RankInfo::SINGLE)?;
    println!(
        "GPT-NeoX 125M-shaped (hidden 768, {layers} layers, vocab 50432), fp32, {threads} threads, prompt {PROMPT}, {DECODE} decode steps"
    );
    let hf = hf(dir.path(), threads);
    println!(
        "{:<8} {:>12} {:>14} {:>12} | {:>12} {:>14} {:>12} | {:>8}",
        "batch", "prefill ms", "decode ms/step", "tok/s", "HF prefill", "HF ms/step", "HF tok/s", "speedup"
    );
    for batch in [1usize, 8] {
        // On a compute-pool thread, as the engine runs steps.
        let f = neox_worker::model::on_compute_threads(|| run(&model, batch))?;
        let tps = batch as f64 / f.decode_ms_per_step * 1e3;
        let h = hf.as_ref().and_then(|v| v.get(format!("batch{batch}")).cloned());
        match h {
            Some(h) => {
                let hf_tps = h["decode_tokens_per_s"].as_f64().unwrap_or(f64::NAN);
                println!(
                    "{batch:<8} {:>12.2} {:>14.2} {:>12.1} | {:>12.2} {:>14.2} {:>12.1} | {:>7.2}x",
                    f.prefill_ms,
                    f.decode_ms_per_step,
                    tps,
                    h["prefill_ms"].as_f64().unwrap_or(f64::NAN),
                    h["decode_ms_per_step"].as_f64().unwrap_or(f64::NAN),
                    hf_tps,
                    tps / hf_tps
                );
            }
            None => println!(
                "{batch:<8} {:>12.2} {:>14.2} {:>12.1} | (HF transformers not available)",
                f.prefill_ms, f.decode_ms_per_step, tps
            ),
        }
    }
    tensor_parallel(dir.path(), &config, threads)?;
    Ok(())
}

fn tensor_parallel(dir: &Path, config: &NeoXConfig, threads: usize) -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::var("NEOX_BENCH_TP")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    println!("\ntensor parallel, {threads} threads split across ranks, batch 1, prompt {PROMPT}, 64 decode steps");
    println!(
        "{:<4} {:>16} {:>10} {:>24}",
        "tp", "decode ms/token", "vs tp=1", "bytes sent/token/rank"
    );
    let prompt: Vec<String> = (0..PROMPT).map(|i| ((i * 7919) % 50000 + 2).to_string()).collect();
    let mut base = None;
    for tp in sizes {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_neox-worker"))
            .args([
                "generate",
                "--model",
                &dir.display().to_string(),
                "--tp",
                &tp.to_string(),
            ])
            .args([
                "--threads",
                &(threads / tp).max(1).to_string(),
                "--prompt-ids",
                &prompt.join(","),
            ])
            .args(["--max-new-tokens", "65", "--ignore-eos", "--json"])
            .env("RAYON_NUM_THREADS", (threads / tp).max(1).to_string())
            .output()?;
        if !out.status.success() {
            println!("{tp:<4} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let ms = v["timings"]["decode_ms_per_token"].as_f64().unwrap_or(f64::NAN);
        let base_ms = *base.get_or_insert(ms);
        // One all-reduce of the hidden state per layer (parallel residual) plus the logits
        // all-gather, each sent to tp-1 peers (one-shot collectives).
        let bytes = (tp - 1) * 4 * (config.num_layers * config.hidden_size + config.vocab_size / tp);
        println!("{tp:<4} {ms:>16.2} {:>9.2}x {bytes:>24}", ms / base_ms);
    }
    all_reduce_latency(config.hidden_size)
}

/// Median all-reduce time of `floats` f32 across `n` in-process ranks over loopback TCP.
fn all_reduce_median(n: usize, floats: usize, ring_threshold: usize, iters: usize) -> anyhow::Result<f64> {
    use neox_worker::parallel::{Communicator, TcpCommunicator};
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<Result<_, _>>()?;
    let comms: Vec<TcpCommunicator> = std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = addrs.clone();
                s.spawn(move || {
                    TcpCommunicator::connect_mesh(
                        RankInfo { rank: r, world_size: n },
                        l,
                        &addrs,
                        std::time::Duration::from_secs(10),
                    )
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("mesh thread"))
                    .and_then(|r| Ok(r?.with_ring_threshold(ring_threshold)))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let t = Tensor::ones(floats, DType::F32, &Device::Cpu)?;
    let times: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| {
                let t = t.clone();
                s.spawn(move || {
                    (0..iters)
                        .map(|_| {
                            let t0 = Instant::now();
                            let _ = c.all_reduce_sum(&t);
                            t0.elapsed().as_secs_f64()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().next().and_then(|h| h.join().ok()).unwrap_or_default()
    });
    Ok(median(times))
}

/// One-shot against ring all-reduce, the measurement behind `DEFAULT_RING_THRESHOLD`.
fn all_reduce_latency(hidden: usize) -> anyhow::Result<()> {
    println!("\nall-reduce over loopback TCP, median (ranks are threads of one process)");
    println!(
        "{:<6} {:>12} {:>14} {:>14}",
        "ranks", "f32 values", "one-shot us", "ring us"
    );
    for n in [2usize, 4] {
        for floats in [hidden, 32 * hidden, 64 * hidden, 128 * hidden, 512 * hidden] {
            let iters = if floats > 100_000 { 20 } else { 300 };
            let one = all_reduce_median(n, floats, usize::MAX, iters)? * 1e6;
            let ring = if n > 2 {
                format!("{:.1}", all_reduce_median(n, floats, 0, iters)? * 1e6)
            } else {
                "= one-shot".into()
            };
            println!("{n:<6} {floats:>12} {one:>14.1} {ring:>14}");
        }
    }
    Ok(())
}
