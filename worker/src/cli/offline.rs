//! The offline commands: generate, logits, perplexity.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use neox_worker::engine::{self, OfflineOptions, SamplingParams, SamplingPlace};
use neox_worker::model::LogitsWanted;
use neox_worker::shard::SeqPlan;

use super::group::{start_leader, Group, GroupArgs};
use super::ModelArgs;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    group: GroupArgs,
    /// Prompt text.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Greedy decoding (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    greedy: bool,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past the end-of-text token.
    #[arg(long)]
    ignore_eos: bool,
    /// Where tokens are sampled, as `serve --sampling`.
    #[arg(long, value_enum, default_value_t = SamplingPlace::Auto)]
    sampling: SamplingPlace,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    group: GroupArgs,
    #[arg(long, value_delimiter = ',', required = true)]
    prompt_ids: Vec<u32>,
    /// Every position's logits instead of the last one's.
    #[arg(long)]
    all_positions: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    group: GroupArgs,
    /// JSON file with a list of token ids (or an object with an "ids" list).
    #[arg(long)]
    ids_file: std::path::PathBuf,
    #[arg(long, default_value_t = 256)]
    window: usize,
    #[arg(long)]
    json: bool,
}

fn sampling(a: &GenerateArgs) -> Result<SamplingParams> {
    let mut p = SamplingParams {
        seed: a.seed,
        ..SamplingParams::default()
    };
    if a.greedy {
        return Ok(p);
    }
    if let Some(t) = a.temperature {
        if !(t >= 0.0 && t.is_finite()) {
            bail!("--temperature must be >= 0, got {t}");
        }
        p.temperature = t;
    } else if a.top_k.is_some() || a.top_p.is_some() {
        p.temperature = 1.0;
    }
    if let Some(k) = a.top_k {
        p.top_k = k;
    }
    if let Some(tp) = a.top_p {
        if !(tp > 0.0 && tp <= 1.0) {
            bail!("--top-p must be in (0, 1], got {tp}");
        }
        p.top_p = tp;
    }
    Ok(p)
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let t_load = Instant::now();
    let mut m: Group = start_leader(&a.model, &a.group)?;
    let load_secs = t_load.elapsed().as_secs_f64();
    let prompt_ids = match (&a.prompt, &a.prompt_ids) {
        (Some(text), None) => m.tokenizer.encode(text)?,
        (None, Some(ids)) => ids.clone(),
        _ => bail!("give exactly one of --prompt or --prompt-ids"),
    };
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    let opts = OfflineOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: sampling(&a)?,
        eos_token_id: if a.ignore_eos { None } else { m.tokenizer.eos_token_id() },
        place: a.sampling,
    };
    let (gens, t) = engine::generate_batch(m.runner()?, std::slice::from_ref(&prompt_ids), &opts)?;
    let g = gens.into_iter().next().context("no generation")?;
    let text = m.tokenizer.decode(&g.ids)?;
    if a.json {
        let decode_tps = if t.decode_secs > 0.0 {
            t.decode_steps as f64 / t.decode_secs
        } else {
            0.0
        };
        let out = json!({
            "model": m.name,
            "prompt_ids": prompt_ids,
            "generated_ids": g.ids,
            "text": text,
            "finish_reason": g.finish_reason.as_str(),
            "rank0_weight_bytes": m.runner()?.model().weight_bytes(),
            "timings": {
                "load_ms": load_secs * 1e3,
                "prefill_ms": t.prefill_secs * 1e3,
                "decode_ms_per_token": if t.decode_steps > 0 { t.decode_secs * 1e3 / t.decode_steps as f64 } else { 0.0 },
                "decode_tokens_per_second": decode_tps,
            }
        });
        println!("{out}");
    } else {
        let prompt_text = match &a.prompt {
            Some(p) => p.clone(),
            None => m.tokenizer.decode(&prompt_ids)?,
        };
        println!("{prompt_text}{text}");
    }
    Ok(())
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    let mut m = start_leader(&a.model, &a.group)?;
    if a.prompt_ids.is_empty() {
        bail!("--prompt-ids is empty");
    }
    let wanted = if a.all_positions {
        LogitsWanted::All
    } else {
        LogitsWanted::Last
    };
    let plan = [SeqPlan {
        id: 0,
        start: 0,
        tokens: a.prompt_ids.clone(),
        logits: wanted,
        reserve: a.prompt_ids.len(),
    }];
    let out = m.runner()?.step(&plan)?;
    let rows: Vec<Vec<f32>> = out.into_iter().next().flatten().context("no logits")?.to_vec2()?;
    if a.json {
        let logits = if a.all_positions {
            json!(rows)
        } else {
            json!(rows.last())
        };
        println!("{}", json!({ "prompt_ids": a.prompt_ids, "logits": logits }));
    } else {
        for r in rows {
            println!("{}", r.iter().map(|x| format!("{x:.6}")).collect::<Vec<_>>().join(" "));
        }
    }
    Ok(())
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let mut m = start_leader(&a.model, &a.group)?;
    let text = std::fs::read_to_string(&a.ids_file).with_context(|| format!("reading {}", a.ids_file.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", a.ids_file.display()))?;
    let list = v.as_array().or_else(|| v.get("ids").and_then(|x| x.as_array()));
    let Some(list) = list else {
        bail!(
            "{}: expected a JSON list of token ids or {{\"ids\": [...]}}",
            a.ids_file.display()
        );
    };
    let ids = list
        .iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .with_context(|| format!("{}: entry {i} is not a token id", a.ids_file.display()))
        })
        .collect::<Result<Vec<u32>>>()?;
    let t0 = Instant::now();
    let p = engine::perplexity(m.runner()?, &ids, a.window)?;
    if a.json {
        println!(
            "{}",
            json!({
                "model": m.name, "perplexity": p.perplexity, "mean_nll": p.mean_nll, "windows": p.windows,
                "predicted_tokens": p.predicted_tokens, "window": a.window, "seconds": t0.elapsed().as_secs_f64(),
            })
        );
    } else {
        println!(
            "perplexity {:.4} (mean NLL {:.5} over {} tokens in {} windows)",
            p.perplexity, p.mean_nll, p.predicted_tokens, p.windows
        );
    }
    Ok(())
}
