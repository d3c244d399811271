//! Whole-batch generation without a server: used by `neox-worker generate`, the
//! perplexity command, tests and benchmarks.

use std::time::Instant;

use crate::model::{LogitsWanted, ModelError};
use crate::shard::{SeqPlan, StepRunner};

use super::request::FinishReason;
use super::sampling::{sample_batch, token_logprobs, SampleRow, Sampler, SamplingParams, SamplingPlace};

#[derive(Debug, Clone)]
pub struct OfflineOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop a sequence at this token (included in its output).
    pub eos_token_id: Option<u32>,
    /// Where tokens are sampled.
    pub place: SamplingPlace,
}

impl OfflineOptions {
    /// Greedy decoding of `max_new_tokens` tokens, not stopped at end-of-text.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            sampling: SamplingParams::default(),
            eos_token_id: None,
            place: SamplingPlace::Auto,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// Timings of a batch generation.
#[derive(Debug, Clone, Default)]
pub struct BatchTimings {
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub decode_steps: usize,
}

/// Generates continuations of every prompt together: one prefill step over all prompts,
/// then decode steps over the sequences still running.
pub fn generate_batch(
    runner: &mut dyn StepRunner,
    prompts: &[Vec<u32>],
    opts: &OfflineOptions,
) -> Result<(Vec<Generation>, BatchTimings), ModelError> {
    let ids: Vec<u64> = (0..prompts.len() as u64).collect();
    let result = run_batch(runner, &ids, prompts, opts);
    // Free every cache, also after an error, so the runner can be reused.
    let released = runner.release(&ids);
    let out = result?;
    released?;
    Ok(out)
}

fn run_batch(
    runner: &mut dyn StepRunner,
    ids: &[u64],
    prompts: &[Vec<u32>],
    opts: &OfflineOptions,
) -> Result<(Vec<Generation>, BatchTimings), ModelError> {
    let (max_pos, vocab) = (
        runner.model().config().max_position_embeddings,
        runner.model().sampleable_vocab(),
    );
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ModelError::Input(format!("prompt {i} is empty")));
        }
        if p.len() + opts.max_new_tokens > max_pos {
            return Err(ModelError::Input(format!(
                "prompt {i} has {} tokens; with max_new_tokens {} it exceeds the context of {max_pos}",
                p.len(),
                opts.max_new_tokens
            )));
        }
    }
    let n = prompts.len();
    let mut samplers: Vec<Sampler> = (0..n)
        .map(|i| {
            let mut s = opts.sampling.clone();
            s.seed = s.seed.wrapping_add(i as u64);
            Sampler::new(s)
        })
        .collect();
    let mut out: Vec<Generation> = (0..n)
        .map(|_| Generation {
            ids: Vec::new(),
            finish_reason: FinishReason::Length,
        })
        .collect();
    let mut timings = BatchTimings::default();
    if opts.max_new_tokens == 0 {
        return Ok((out, timings));
    }
    let mut running: Vec<usize> = (0..n).collect();
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    let mut first = true;
    while !running.is_empty() {
        let t0 = Instant::now();
        let plan: Vec<SeqPlan> = running
            .iter()
            .map(|&i| SeqPlan {
                id: ids[i],
                // Everything but the tokens fed now is cached.
                start: prompts[i].len() + out[i].ids.len() - next[i].len(),
                tokens: std::mem::take(&mut next[i]),
                logits: LogitsWanted::Last,
                reserve: prompts[i].len() + opts.max_new_tokens,
            })
            .collect();
        let logits = runner.step(&plan)?;
        let contexts: Vec<Vec<u32>> = running
            .iter()
            .map(|&i| prompts[i].iter().chain(out[i].ids.iter()).copied().collect())
            .collect();
        let picked = {
            let mut rows = Vec::with_capacity(running.len());
            // `running` is ascending: its samplers come out of one pass in order.
            let mut active = samplers
                .iter_mut()
                .enumerate()
                .filter(|(j, _)| running.binary_search(j).is_ok())
                .map(|(_, s)| s);
            for (row, &i) in running.iter().enumerate() {
                let sampler = active
                    .next()
                    .ok_or_else(|| ModelError::Internal("a running sequence has no sampler".into()))?;
                rows.push(SampleRow {
                    logits: logits[row]
                        .as_ref()
                        .ok_or_else(|| ModelError::Internal("missing logits".into()))?,
                    sampler,
                    context: &contexts[row],
                    generated: &out[i].ids,
                    want_logprob: false,
                });
            }
            sample_batch(&mut rows, vocab, opts.place)?
        };
        let mut still = Vec::with_capacity(running.len());
        for (s, &i) in picked.into_iter().zip(running.iter()) {
            out[i].ids.push(s.id);
            if Some(s.id) == opts.eos_token_id {
                out[i].finish_reason = FinishReason::EosToken;
            } else if out[i].ids.len() < opts.max_new_tokens {
                next[i] = vec![s.id];
                still.push(i);
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        if first {
            timings.prefill_secs = dt;
            first = false;
        } else {
            timings.decode_secs += dt;
            timings.decode_steps += 1;
        }
        running = still;
    }
    Ok((out, timings))
}

#[derive(Debug, Clone)]
pub struct Perplexity {
    pub perplexity: f64,
    pub mean_nll: f64,
    pub windows: usize,
    pub predicted_tokens: usize,
}

/// Perplexity over non-overlapping `window`-token windows of `ids` (no context carried between
/// windows; a trailing partial window is dropped), each predicting its positions 1..window.
pub fn perplexity(runner: &mut dyn StepRunner, ids: &[u32], window: usize) -> Result<Perplexity, ModelError> {
    if window < 2 {
        return Err(ModelError::Input("window must be at least 2 tokens".into()));
    }
    let windows = ids.len() / window;
    if windows == 0 {
        return Err(ModelError::Input(format!(
            "{} ids do not fill one window of {window}",
            ids.len()
        )));
    }
    let mut nll = 0.0f64;
    let mut count = 0usize;
    for w in 0..windows {
        let chunk = &ids[w * window..(w + 1) * window];
        let plan = [SeqPlan {
            id: w as u64,
            start: 0,
            tokens: chunk.to_vec(),
            logits: LogitsWanted::All,
            reserve: window,
        }];
        let logits = runner.step(&plan);
        runner.release(&[w as u64])?;
        let logits = logits?;
        let logits = logits
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| ModelError::Internal("missing logits".into()))?;
        let vocab = logits.dim(1)?;
        for lp in token_logprobs(&logits, vocab, &chunk[1..])? {
            nll -= lp as f64;
            count += 1;
        }
    }
    let mean_nll = nll / count as f64;
    Ok(Perplexity {
        perplexity: mean_nll.exp(),
        mean_nll,
        windows,
        predicted_tokens: count,
    })
}
