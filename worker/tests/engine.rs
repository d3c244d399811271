//! The engine driven directly (no server), over a runner that records what every step feeds,
//! so the scheduling decisions themselves are asserted, against HF's greedy goldens.

mod common;

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Tensor};
use common::*;
use neox_worker::engine::{
    self, EngineConfig, Event, Request, SamplingParams, SamplingPlace, SpeculationConfig, StopCriteria,
};
use neox_worker::metrics::Metrics;
use neox_worker::model::{GptNeoX, ModelError};
use neox_worker::shard::{LocalRunner, SeqPlan, StepRunner};
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Default)]
struct Log {
    /// Tokens fed per sequence id, over every step.
    fed: HashMap<u64, usize>,
    /// `(from, to, tokens)` of every fork.
    forks: Vec<(u64, u64, usize)>,
    /// The sequence ids each step fed, in order.
    steps: Vec<Vec<u64>>,
    /// Per sequence id, the KV room reserved for it each time that changed.
    reserves: HashMap<u64, Vec<usize>>,
}

/// A local runner whose first step waits for the test (so requests can queue meanwhile), and
/// which logs every step and fork.
struct Recording {
    inner: LocalRunner,
    entered: Option<mpsc::Sender<()>>,
    gate: Option<mpsc::Receiver<()>>,
    log: Arc<Mutex<Log>>,
}

impl StepRunner for Recording {
    fn step(&mut self, plan: &[SeqPlan]) -> Result<Vec<Option<Tensor>>, ModelError> {
        if let (Some(entered), Some(gate)) = (self.entered.take(), self.gate.take()) {
            entered.send(()).unwrap();
            gate.recv().unwrap();
        }
        let mut log = self.log.lock().unwrap();
        for p in plan {
            *log.fed.entry(p.id).or_default() += p.tokens.len();
            let seen = log.reserves.entry(p.id).or_default();
            if seen.last() != Some(&p.reserve) {
                seen.push(p.reserve);
            }
        }
        log.steps.push(plan.iter().map(|p| p.id).collect());
        drop(log);
        self.inner.step(plan)
    }
    fn release(&mut self, ids: &[u64]) -> Result<(), ModelError> {
        self.inner.release(ids)
    }
    fn fork(&mut self, from: u64, to: u64, tokens: usize, reserve: usize) -> Result<(), ModelError> {
        self.log.lock().unwrap().forks.push((from, to, tokens));
        self.inner.fork(from, to, tokens, reserve)
    }
    fn model(&self) -> &GptNeoX {
        self.inner.model()
    }
    fn use_paged_kv(&mut self, blocks: usize, block_size: usize) -> Result<(), ModelError> {
        self.inner.use_paged_kv(blocks, block_size)
    }
}

fn greedy_request(prompt: &[u32], max_new_tokens: usize) -> (Request, UnboundedReceiver<Event>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let req = Request {
        id: "test".into(),
        prompt_ids: prompt.to_vec(),
        sampling: SamplingParams::default(),
        stop: StopCriteria {
            max_new_tokens,
            ..Default::default()
        },
        logprobs: false,
        prompt_logprobs: false,
        deadline: None,
        received: Instant::now(),
        events: tx,
        counted: true,
    };
    (req, rx)
}

fn generated(mut rx: UnboundedReceiver<Event>) -> Vec<u32> {
    let mut ids = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token { token, .. } => ids.push(token.id),
            Event::Finished(_) => return ids,
            Event::Failed(f) => panic!("request failed: {f}"),
            Event::PromptTokens(_) => {}
        }
    }
    panic!("the events ended without a finish");
}

/// Queues greedy requests for `prompts` (20 new tokens each) while the engine is held in a
/// step for an unrelated request, so they reach one admission together. Returns each one's
/// continuation and the log. Sequence ids: 1 is the request that holds the engine, then the
/// prompts in order.
fn queued_together(prefix_caching: bool, prompts: &[Vec<u32>]) -> (Vec<Vec<u32>>, Log) {
    let g = Goldens::load();
    let shortest = g
        .cases()
        .into_iter()
        .map(|i| g.ids(&format!("case{i}.input_ids")))
        .min_by_key(Vec::len)
        .unwrap();
    let loaded = load_model(fixture_dir().to_str().unwrap(), DType::F32);
    let config = config(&loaded.model, 16, 64, prefix_caching);
    let (entered_tx, entered) = mpsc::channel();
    let (release, gate) = mpsc::channel();
    let (handle, join, log) = start_recording(loaded, config, Some((entered_tx, gate)));
    let (first, first_rx) = greedy_request(&shortest, 1);
    handle.submit(first).unwrap();
    entered.recv().unwrap();
    let mut rxs = Vec::new();
    for prompt in prompts {
        let (req, rx) = greedy_request(prompt, 20);
        handle.submit(req).unwrap();
        rxs.push(rx);
    }
    release.send(()).unwrap();
    generated(first_rx);
    let outs = rxs.into_iter().map(generated).collect();
    drop(handle);
    join.join().unwrap();
    let log = std::mem::take(&mut *log.lock().unwrap());
    (outs, log)
}

/// Host sampling, no speculation, per-sequence caches.
fn config(model: &GptNeoX, kv_block_size: usize, kv_blocks: usize, prefix_caching: bool) -> EngineConfig {
    EngineConfig {
        max_batch_size: 8,
        max_tokens_per_step: 512,
        max_waiting_requests: 16,
        max_total_tokens: model.config().max_position_embeddings,
        kv_block_size,
        kv_blocks,
        sampling: SamplingPlace::Host,
        prefix_caching,
        paged_kv: false,
        speculation: SpeculationConfig {
            max_tokens: 0,
            max_ngram: 0,
            min_ngram: 0,
            max_batch: 0,
        },
    }
}

/// An engine over a recording runner; with `gate`, its first step tells the first sender and
/// waits for the second.
fn start_recording(
    loaded: neox_worker::model::LoadedModel,
    config: EngineConfig,
    gate: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>,
) -> (engine::EngineHandle, std::thread::JoinHandle<()>, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let (entered, gate) = gate.unzip();
    let runner = Recording {
        inner: LocalRunner::new(loaded.model),
        entered,
        gate,
        log: log.clone(),
    };
    let (handle, join) = engine::start(
        Box::new(runner),
        Arc::new(loaded.tokenizer),
        config,
        Metrics::new().unwrap(),
    );
    (handle, join, log)
}

/// Runs one greedy request of `new` tokens alone; its tokens and the log.
fn alone(prompt: &[u32], new: usize, kv_block_size: usize, kv_blocks: usize) -> (Vec<u32>, Log) {
    let loaded = load_model(fixture_dir().to_str().unwrap(), DType::F32);
    let config = config(&loaded.model, kv_block_size, kv_blocks, false);
    let (handle, join, log) = start_recording(loaded, config, None);
    let (req, rx) = greedy_request(prompt, new);
    handle.submit(req).unwrap();
    let out = generated(rx);
    drop(handle);
    join.join().unwrap();
    let log = std::mem::take(&mut *log.lock().unwrap());
    (out, log)
}

#[test]
fn a_long_sequence_grows_its_cache_a_few_times_not_every_block() {
    let g = Goldens::load();
    let (prompt, golden) = golden_case(&g, g.longest_case_index());
    // To the end of the context, a block of 2 tokens at a time: 110 blocks.
    let new = 256 - prompt.len();
    let (out, log) = alone(&prompt, new, 2, 256);
    // The copies keep the KV intact: HF's greedy tokens, then what a whole-context
    // reservation made up front (no growth at all) gives.
    assert_eq!(out[..golden.len()], golden[..]);
    let loaded = load_model(fixture_dir().to_str().unwrap(), DType::F32);
    let mut runner = LocalRunner::new(loaded.model);
    let opts = neox_worker::engine::OfflineOptions::greedy(new);
    let (whole, _) = neox_worker::engine::generate_batch(&mut runner, std::slice::from_ref(&prompt), &opts).unwrap();
    assert_eq!(out, whole[0].ids);
    // Growing exactly, a block at a time, it would grow (and copy its history) 110 times.
    let grown = &log.reserves[&1];
    assert!(grown.len() <= 20, "{} growths: {grown:?}", grown.len());
    assert!(
        *grown.last().unwrap() <= 256 + 1,
        "reserved past the request: {grown:?}"
    );
    // A budget of just the context: the last quarter of it is never taken ahead, so there it
    // grows a block at a time; the tokens are the same.
    let (tight, log) = alone(&prompt, new, 2, 128);
    assert_eq!(tight, out);
    let grown = &log.reserves[&1];
    let last_quarter: Vec<usize> = grown.iter().copied().filter(|&r| r > 192).collect();
    assert_eq!(last_quarter, (194..=256).step_by(2).collect::<Vec<_>>(), "{grown:?}");
}

/// HF's greedy continuation of golden case `case`'s prompt.
fn golden_case(g: &Goldens, case: usize) -> (Vec<u32>, Vec<u32>) {
    (
        g.ids(&format!("case{case}.input_ids")),
        g.ids(&format!("case{case}.greedy")),
    )
}

#[test]
fn identical_prompts_queued_together_compute_their_prompt_once() {
    let g = Goldens::load();
    let (prompt, want) = golden_case(&g, g.longest_case_index());
    let copies = 4;
    let len = prompt.len();
    // Sequence ids: 1 is the request that holds the engine, then the copies in order.
    let copy_ids = 2..2 + copies as u64;
    for prefix_caching in [false, true] {
        let (outs, log) = queued_together(prefix_caching, &vec![prompt.clone(); copies]);
        for out in &outs {
            assert_eq!(
                out, &want,
                "prefix caching {prefix_caching}: a copy differs from HF's greedy"
            );
        }
        // A sequence feeds its prompt, then each generated token but the last.
        let whole = len + want.len() - 1;
        let fed: Vec<usize> = copy_ids.clone().map(|id| log.fed[&id]).collect();
        if prefix_caching {
            // The first computes the prompt; the others wait a step and copy all of it but
            // the last token, whose logits they need.
            assert_eq!(fed[0], whole, "the first copy's tokens");
            assert!(
                fed[1..].iter().all(|&f| f == whole - (len - 1)),
                "the other copies computed their prompts themselves: fed {fed:?} of a {len}-token prompt"
            );
            let copied: Vec<_> = log.forks.iter().map(|&(_, to, tokens)| (to, tokens)).collect();
            let want: Vec<_> = copy_ids.clone().skip(1).map(|to| (to, len - 1)).collect();
            assert_eq!(copied, want);
            assert!(
                log.forks
                    .iter()
                    .all(|&(from, to, _)| copy_ids.contains(&from) && from < to),
                "each copy starts from an earlier one: {:?}",
                log.forks
            );
        } else {
            assert!(fed.iter().all(|&f| f == whole), "{fed:?}");
            assert!(log.forks.is_empty());
        }
    }
}

/// A prompt waiting a step for its twin's prefill (to copy its KV) holds up nobody behind it:
/// a different prompt queued after the twin runs in the twin's first step.
#[test]
fn a_prompt_waiting_for_its_twin_does_not_hold_up_the_queue() {
    let g = Goldens::load();
    let twin_case = g.longest_case_index();
    let (prompt, _) = golden_case(&g, twin_case);
    let other_case = g
        .cases()
        .into_iter()
        .find(|i| *i != twin_case && g.ids(&format!("case{i}.input_ids"))[0] != prompt[0])
        .expect("a golden case that shares no prefix with the longest");
    let (twin, twin_greedy) = golden_case(&g, twin_case);
    let (other, other_greedy) = golden_case(&g, other_case);
    let (outs, log) = queued_together(true, &[twin.clone(), twin, other]);
    assert_eq!(outs[0], twin_greedy);
    assert_eq!(outs[1], twin_greedy);
    assert_eq!(outs[2], other_greedy, "the prompt behind the twins");
    // Ids: 2 and 3 are the twins, 4 the other prompt.
    let first_with = |id: u64| log.steps.iter().position(|s| s.contains(&id)).unwrap();
    assert_eq!(
        first_with(4),
        first_with(2),
        "the other prompt waited behind the twin: steps {:?}",
        log.steps
    );
    assert!(
        first_with(3) > first_with(2),
        "the twin computed its own prompt: {:?}",
        log.steps
    );
    assert_eq!(
        log.forks.iter().map(|f| f.1).collect::<Vec<_>>(),
        vec![3],
        "{:?}",
        log.forks
    );
}
