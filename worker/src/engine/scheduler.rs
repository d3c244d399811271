//! The continuous-batching engine loop.
//!
//! One thread owns the group's [`StepRunner`]. Between steps it takes new requests, drops
//! cancelled and expired ones (freeing their KV blocks at once), admits waiting requests in
//! arrival order while KV blocks and batch slots allow, and builds the next step: one decode
//! token for every running sequence first, then prefill chunks up to the step's token budget
//! (long prompts are prefilled over several steps). Admission, where a sequence's KV starts
//! from, and what gives way when blocks run out are in `admission`. A decoding sequence may
//! feed draft tokens after its last one (`speculation`); the step samples each of its rows and
//! keeps the drafts the samples agree with.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::model::{IncrementalDecoder, LogitsWanted, ModelError, NeoXTokenizer};
use crate::shard::{SeqPlan, StepRunner};

use super::blocks::{held_blocks, BlockManager, Holding};
use super::prefix_cache::PrefixCache;
use super::request::{Event, Failure, Finish, FinishReason, Request, TokenInfo};
use super::sampling::{logprob_and_top, sample_batch, token_logprobs, SampleRow, Sampled, Sampler, SamplingPlace};
use super::speculation::{self, DraftLength, SpeculationConfig};
use super::stop::{StopMatcher, StopOutcome};

/// How often an idle engine checks that every rank is still there.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The shortest prompt prefix worth copying from the prefix cache.
const MIN_PREFIX_TOKENS: usize = 8;

/// Limits of the engine (flags of `neox-worker serve`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_batch_size: usize,
    /// Token budget of one step (decode tokens + prefill chunk tokens).
    pub max_tokens_per_step: usize,
    pub max_waiting_requests: usize,
    /// Prompt + generated tokens of one request, at most.
    pub max_total_tokens: usize,
    pub kv_block_size: usize,
    /// KV blocks available (from the KV memory budget).
    pub kv_blocks: usize,
    /// Where tokens are sampled.
    pub sampling: SamplingPlace,
    /// Keep finished sequences' KV while blocks are free and start prompts that share their
    /// tokens from a copy (see `prefix_cache`).
    pub prefix_caching: bool,
    /// Whether the ranks' caches are paged: a fork shares its source's full prefix blocks
    /// (the budget counts them once) and a growing sequence copies nothing. Per-sequence
    /// caches copy both.
    pub paged_kv: bool,
    /// Draft tokens from prompt lookup (speculative decoding; off when `max_tokens` is 0).
    pub speculation: SpeculationConfig,
}

/// Why a request was not accepted; its message is the one every API shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the waiting queue is full ({0} requests); retry later")]
    QueueFull(usize),
    #[error("{0}")]
    Unavailable(String),
    /// The request can never fit (more KV than the whole budget): `prompt` when the prompt
    /// alone is too long, else the prompt with its `max_new_tokens`.
    #[error("{message}")]
    TooLarge { prompt: bool, message: String },
}

/// The handle servers use to submit requests.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Request>,
    waiting: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    /// Cleared when the server is told to stop: probes read not-ready at once, while work is
    /// still admitted until `drain` (traffic takes seconds to move away).
    leaving: Arc<AtomicBool>,
    config: EngineConfig,
    rejected: prometheus::IntCounterVec,
}

impl EngineHandle {
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// True while the group runs steps and the engine admits work.
    pub fn is_serving(&self) -> bool {
        self.healthy.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// True while serving and not told to stop: what readiness probes and load balancers
    /// should read.
    pub fn is_ready(&self) -> bool {
        self.is_serving() && !self.leaving.load(Ordering::SeqCst)
    }

    /// Says the server is about to stop (readiness goes false) without refusing work yet.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::SeqCst);
    }

    /// Stops admitting new requests (running and queued ones finish).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Requests queued or running.
    pub fn in_flight(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Queues a request, or says why not (and counts the refusal).
    pub fn submit(&self, req: Request) -> Result<(), SubmitError> {
        self.admit(req).inspect_err(|e| {
            let reason = match e {
                SubmitError::QueueFull(_) => "queue_full",
                SubmitError::TooLarge { .. } => "too_large",
                SubmitError::Unavailable(_) => "unavailable",
            };
            self.rejected.with_label_values(&[reason]).inc();
        })
    }

    fn admit(&self, req: Request) -> Result<(), SubmitError> {
        if !self.healthy.load(Ordering::SeqCst) {
            return Err(SubmitError::Unavailable("the worker group is unhealthy".into()));
        }
        if self.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::Unavailable("the server is shutting down".into()));
        }
        let block = self.config.kv_block_size.max(1);
        let prompt = req.prompt_ids.len().div_ceil(block);
        let need = (req.prompt_ids.len() + req.stop.max_new_tokens).div_ceil(block);
        if need > self.config.kv_blocks {
            let prompt_too_long = prompt > self.config.kv_blocks;
            let (what, blocks) = if prompt_too_long {
                (format!("the prompt ({} tokens)", req.prompt_ids.len()), prompt)
            } else {
                ("prompt + max_new_tokens".to_owned(), need)
            };
            return Err(SubmitError::TooLarge {
                prompt: prompt_too_long,
                message: format!(
                    "{what} needs {blocks} KV blocks but the server has {} ({block} tokens each)",
                    self.config.kv_blocks
                ),
            });
        }
        // `waiting` counts every request the engine holds, queued or running.
        let prev = self.waiting.fetch_add(1, Ordering::SeqCst);
        if prev >= self.config.max_waiting_requests + self.config.max_batch_size {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(self.config.max_waiting_requests));
        }
        self.tx.send(req).map_err(|_| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Unavailable("the engine has stopped".into())
        })
    }
}

pub(super) struct Seq {
    pub(super) id: u64,
    pub(super) req: Request,
    /// Prompt followed by generated tokens.
    pub(super) tokens: Vec<u32>,
    pub(super) generated: Vec<u32>,
    /// Tokens whose KV is cached on every rank.
    pub(super) computed: usize,
    /// Prompt tokens whose KV was copied from the prefix cache when it was (last) admitted.
    pub(super) cached_prompt: usize,
    /// Its KV blocks in the budget.
    pub(super) hold: Holding,
    pub(super) sampler: Sampler,
    /// How many draft tokens it tries next (speculative decoding).
    pub(super) draft_len: DraftLength,
    pub(super) decoder: IncrementalDecoder,
    /// Characters the decoder has given so far (what the client has, and what is held back).
    pub(super) decoded_chars: usize,
    pub(super) stop: StopMatcher,
    pub(super) prompt_lp: Vec<TokenInfo>,
    pub(super) prompt_lp_sent: bool,
    pub(super) admitted_at: Option<Instant>,
    pub(super) first_token_at: Option<Instant>,
    pub(super) last_token_at: Option<Instant>,
}

impl Seq {
    pub(super) fn prompt_len(&self) -> usize {
        self.req.prompt_ids.len()
    }

    /// Prompt logprobs are asked for and not sent yet (a preemption does not send them twice).
    pub(super) fn scores_prompt(&self) -> bool {
        self.req.prompt_logprobs && !self.prompt_lp_sent
    }

    /// The request's log line (ids, counts and timings in ms as numbers; never its text).
    fn log_end(&self, finish_reason: &str) {
        let since = |t: Instant| ((t - self.req.received).as_secs_f64() * 1e4).round() / 10.0;
        let now = Instant::now();
        tracing::info!(
            request_id = %self.req.id,
            finish_reason,
            prompt_tokens = self.prompt_len(),
            cached_prompt_tokens = self.cached_prompt,
            generated_tokens = self.generated.len(),
            queue_ms = since(self.admitted_at.unwrap_or(now)),
            // Recorded only when a token came.
            ttft_ms = self.first_token_at.map(since),
            total_ms = since(now),
            "request ended"
        );
    }
}

/// Starts the engine thread over `runner`.
pub fn start(
    runner: Box<dyn StepRunner>,
    tokenizer: Arc<NeoXTokenizer>,
    config: EngineConfig,
    metrics: Metrics,
) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = EngineHandle {
        tx,
        waiting: Arc::new(AtomicUsize::new(0)),
        healthy: Arc::new(AtomicBool::new(true)),
        draining: Arc::new(AtomicBool::new(false)),
        leaving: Arc::new(AtomicBool::new(false)),
        config: config.clone(),
        rejected: metrics.rejected.clone(),
    };
    metrics.group_healthy.set(1);
    // Matches shorter than a block are not worth a copy.
    let prefix = config
        .prefix_caching
        .then(|| PrefixCache::new(config.kv_block_size.max(MIN_PREFIX_TOKENS)));
    let mut engine = Engine {
        prefix,
        runner,
        tokenizer,
        blocks: BlockManager::new(config.kv_block_size, config.kv_blocks),
        config,
        metrics,
        rx,
        in_engine: handle.waiting.clone(),
        healthy: handle.healthy.clone(),
        waiting: VecDeque::new(),
        running: Vec::new(),
        next_id: 1,
    };
    let guard = UnwindGuard {
        healthy: handle.healthy.clone(),
        gauge: engine.metrics.group_healthy.clone(),
    };
    let join = std::thread::Builder::new()
        .name("neox-engine".into())
        .spawn(move || {
            let _guard = guard;
            crate::model::on_compute_threads(move || engine.run())
        })
        .unwrap_or_else(|e| panic!("cannot start the engine thread: {e}"));
    (handle, join)
}

/// Alternatives `(id, logprob)` with their text. A token that does not decode on its own reads
/// as empty, never failing the step.
fn named(tok: &NeoXTokenizer, alternatives: &[(u32, f32)]) -> Vec<(u32, String, f32)> {
    alternatives
        .iter()
        .map(|&(id, lp)| (id, tok.decode(&[id]).unwrap_or_default(), lp))
        .collect()
}

/// Marks the worker unhealthy if the engine thread unwinds. Without it a panic would leave
/// health SERVING (the pod Ready, the group never restarted) while every request failed.
struct UnwindGuard {
    healthy: Arc<AtomicBool>,
    gauge: prometheus::IntGauge,
}

/// Health NOT_SERVING and `neox_group_healthy` 0: the worker exits and its group restarts.
fn mark_unhealthy(healthy: &AtomicBool, gauge: &prometheus::IntGauge) {
    healthy.store(false, Ordering::SeqCst);
    gauge.set(0);
}

impl Drop for UnwindGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the engine thread panicked: the worker reports itself unhealthy and exits");
            mark_unhealthy(&self.healthy, &self.gauge);
        }
    }
}

/// A step's tokens for one sequence: when its previous token came, and how many came now.
#[derive(Clone, Copy)]
struct Pace {
    since: Option<Instant>,
    tokens: usize,
}

/// One row to sample: a sequence's logits row with the sampler state and the tokens plain
/// decoding would have had there (a verification row's include the drafts before it).
struct RowSource<'a> {
    /// Index of its sequence in the step's `Due` list.
    due: usize,
    logits: candle_core::Tensor,
    sampler: Sampler,
    context: Cow<'a, [u32]>,
    generated: Cow<'a, [u32]>,
    want_logprob: bool,
}

/// A sequence due its next token (and, if it fed drafts, theirs too) after a step.
struct Due {
    id: u64,
    /// `[rows, vocab]`: the last row, or one row per draft plus one after them.
    logits: candle_core::Tensor,
    drafts: Vec<u32>,
}

pub(super) struct Engine {
    pub(super) runner: Box<dyn StepRunner>,
    pub(super) tokenizer: Arc<NeoXTokenizer>,
    pub(super) config: EngineConfig,
    pub(super) blocks: BlockManager,
    /// Finished sequences' KV kept for prompts that start the same way (None: disabled).
    pub(super) prefix: Option<PrefixCache>,
    pub(super) metrics: Metrics,
    pub(super) rx: Receiver<Request>,
    pub(super) in_engine: Arc<AtomicUsize>,
    pub(super) healthy: Arc<AtomicBool>,
    pub(super) waiting: VecDeque<Seq>,
    pub(super) running: Vec<Seq>,
    pub(super) next_id: u64,
}

impl Engine {
    fn run(&mut self) {
        let mut last_beat = Instant::now();
        loop {
            if !self.receive() {
                break;
            }
            if self.running.is_empty() && self.waiting.is_empty() {
                if last_beat.elapsed() >= HEARTBEAT {
                    last_beat = Instant::now();
                    if let Err(e) = self.runner.heartbeat() {
                        tracing::error!("group heartbeat failed: {e}");
                        self.fail_everything(e);
                        break;
                    }
                }
                continue;
            }
            last_beat = Instant::now();
            self.drop_dead();
            if let Err(e) = self.admit() {
                tracing::error!("admitting requests failed: {e}");
                self.fail_everything(e);
                break;
            }
            self.update_gauges();
            if self.running.is_empty() {
                continue;
            }
            if let Err(e) = self.step() {
                tracing::error!("engine step failed: {e}");
                self.fail_everything(e);
                break;
            }
        }
        self.update_gauges();
    }

    /// Takes queued requests; blocks while idle. False once every handle is gone and no
    /// work is left.
    fn receive(&mut self) -> bool {
        let idle = self.running.is_empty() && self.waiting.is_empty();
        if idle {
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(r) => self.enqueue(r),
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        while let Ok(r) = self.rx.try_recv() {
            self.enqueue(r);
        }
        true
    }

    fn enqueue(&mut self, req: Request) {
        let id = self.next_id;
        self.next_id += 1;
        let sampler = Sampler::new(req.sampling.clone());
        let stop = StopMatcher::new(req.stop.stop_sequences.clone());
        self.waiting.push_back(Seq {
            id,
            tokens: req.prompt_ids.clone(),
            generated: Vec::new(),
            computed: 0,
            cached_prompt: 0,
            hold: Holding::default(),
            sampler,
            draft_len: DraftLength::new(self.config.speculation.max_tokens),
            decoder: IncrementalDecoder::new(),
            decoded_chars: 0,
            stop,
            prompt_lp: Vec::new(),
            prompt_lp_sent: false,
            admitted_at: None,
            first_token_at: None,
            last_token_at: None,
            req,
        });
    }

    fn update_gauges(&self) {
        self.metrics.requests_running.set(self.running.len() as i64);
        self.metrics.requests_waiting.set(self.waiting.len() as i64);
        // Cached prefixes are evicted whenever anything needs their blocks: not in use.
        let in_use = held_blocks(self.running.iter().map(|s| &s.hold));
        let held = self.blocks.total() - self.blocks.free();
        self.metrics
            .kv_cache_usage_ratio
            .set(in_use as f64 / self.blocks.total().max(1) as f64);
        self.metrics.prefix_cache_blocks.set(held.saturating_sub(in_use) as i64);
    }

    /// Drops requests whose client went away or whose deadline passed.
    fn drop_dead(&mut self) {
        let now = Instant::now();
        for queue in [true, false] {
            let list = if queue {
                std::mem::take(&mut self.waiting).into_iter().collect::<Vec<_>>()
            } else {
                std::mem::take(&mut self.running)
            };
            let mut keep = Vec::with_capacity(list.len());
            for s in list {
                // The deadline first: a unary call's own timer may have dropped the receiver
                // at the same moment.
                let label = if s.req.deadline.is_some_and(|d| now >= d) {
                    let _ = s.req.events.send(Event::Failed(Failure::DeadlineExceeded));
                    Some("deadline_exceeded")
                } else if s.req.events.is_closed() {
                    Some("cancelled")
                } else {
                    None
                };
                match label {
                    Some(l) => {
                        let id = s.id;
                        if let Err(e) = self.retire(s, l) {
                            tracing::warn!("releasing sequence {id}: {e}");
                        }
                    }
                    None => keep.push(s),
                }
            }
            if queue {
                self.waiting = keep.into();
            } else {
                self.running = keep;
            }
        }
    }

    fn step(&mut self) -> Result<(), ModelError> {
        let mut budget = self.config.max_tokens_per_step.max(1);
        // (seq id, its tokens this step, draft tokens fed after them)
        let mut plan: Vec<(u64, usize, Vec<u32>)> = Vec::new();
        // Decode first: every fully prefilled sequence feeds its last sampled token. By id: a
        // sequence short of blocks may preempt others (or itself) on the way.
        let decoders: Vec<(u64, usize)> = self
            .running
            .iter()
            .filter(|s| s.computed + 1 == s.tokens.len())
            .map(|s| (s.id, s.tokens.len()))
            .collect();
        for (id, want) in decoders {
            if budget == 0 {
                break;
            }
            if self.ensure_blocks(id, want)? {
                plan.push((id, 1, Vec::new()));
                budget -= 1;
            }
        }
        let decoding = plan.len();
        // Then prefill chunks in admission order.
        let ids: Vec<u64> = self.running.iter().map(|s| s.id).collect();
        for id in ids {
            if budget == 0 {
                break;
            }
            let Some(s) = self.running.iter().find(|s| s.id == id) else {
                continue;
            };
            if s.computed + 1 >= s.tokens.len() {
                continue;
            }
            let chunk = (s.tokens.len() - s.computed).min(budget);
            let end = s.computed + chunk;
            if self.ensure_blocks(id, end + usize::from(end == s.tokens.len()))? {
                plan.push((id, chunk, Vec::new()));
                budget -= chunk;
            }
        }
        // Then drafts for the decoding sequences, from what the budget leaves: prompts waiting
        // for their first token come first.
        let spec = self.config.speculation;
        if spec.enabled() && decoding > 0 && decoding <= spec.max_batch {
            for (id, _, drafts) in plan[..decoding].iter_mut() {
                *drafts = self.draft(*id, budget, &spec)?;
                budget -= drafts.len();
            }
        }
        if plan.is_empty() {
            return Ok(());
        }
        let (steps, drafts): (Vec<SeqPlan>, Vec<Vec<u32>>) = plan
            .into_iter()
            .filter_map(|(id, n, drafts)| {
                let s = self.running.iter().find(|s| s.id == id)?;
                let completes = s.computed + n == s.tokens.len();
                // Prompt logprobs already sent (before a preemption) are not computed again.
                let scores_prompt = s.scores_prompt() && s.computed < s.prompt_len();
                let logits = if !drafts.is_empty() || scores_prompt {
                    LogitsWanted::All
                } else if completes {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                };
                let mut tokens = s.tokens[s.computed..s.computed + n].to_vec();
                tokens.extend_from_slice(&drafts);
                let p = SeqPlan {
                    id,
                    start: s.computed,
                    tokens,
                    logits,
                    reserve: s.hold.len() * self.blocks.block_size(),
                };
                Some((p, drafts))
            })
            .unzip();
        self.metrics.batch_size.observe(steps.len() as f64);
        let logits = self.runner.step(&steps)?;
        // Account for every sequence's step; those that completed their tokens are due one.
        let mut due: Vec<Due> = Vec::new();
        for ((p, drafts), l) in steps.iter().zip(drafts).zip(logits) {
            let Some(idx) = self.running.iter().position(|s| s.id == p.id) else {
                continue;
            };
            if let Some(logits) = self.absorb(idx, p, drafts.len(), l)? {
                due.push(Due {
                    id: p.id,
                    logits,
                    drafts,
                });
            }
        }
        let mut finished = Vec::new();
        for (id, sampled, drafted) in self.sample(&due)? {
            let Some(idx) = self.running.iter().position(|s| s.id == id) else {
                continue;
            };
            // Every sampled token but the last is a draft the model agreed with: its KV is
            // already cached.
            let last = sampled.len() - 1;
            let pace = Pace {
                since: self.running[idx].last_token_at,
                tokens: sampled.len(),
            };
            let mut emitted = 0;
            for (j, t) in sampled.into_iter().enumerate() {
                emitted += 1;
                if let Some(label) = self.emit(idx, t, pace)? {
                    finished.push((id, label));
                    break;
                }
                if j < last {
                    self.running[idx].computed += 1;
                }
            }
            if drafted > 0 {
                // The step's own token came for free; the others each saved a step.
                self.metrics.spec_draft_tokens.inc_by(drafted as u64);
                self.metrics.spec_accepted_tokens.inc_by(emitted as u64 - 1);
                self.running[idx].draft_len.record(drafted, last, spec.max_tokens);
            }
        }
        for (id, label) in finished {
            if let Some(idx) = self.running.iter().position(|s| s.id == id) {
                let s = self.running.remove(idx);
                self.retire(s, label)?;
            }
        }
        self.update_gauges();
        Ok(())
    }

    /// Draft tokens for decoding sequence `id` this step (at most `budget`): what prompt lookup
    /// proposes, within its remaining `max_new_tokens` and the KV blocks it holds or can get
    /// without preempting anything (see `blocks_for_drafts`).
    fn draft(&mut self, id: u64, budget: usize, spec: &SpeculationConfig) -> Result<Vec<u32>, ModelError> {
        let Some(i) = self.running.iter().position(|s| s.id == id) else {
            return Ok(Vec::new());
        };
        let s = &mut self.running[i];
        // The step's own sampled token comes on top of the accepted drafts.
        let left = s.req.stop.max_new_tokens.saturating_sub(s.generated.len() + 1);
        let max = s.draft_len.take().min(left).min(budget);
        let mut drafts = speculation::propose(&s.tokens, spec, max);
        if !drafts.is_empty() {
            let len = s.tokens.len();
            let room = self.blocks_for_drafts(i, len + drafts.len())?;
            drafts.truncate(room.saturating_sub(len));
        }
        Ok(drafts)
    }

    /// Samples the next token of every sequence in `due` in one batch, where the engine's
    /// `sampling` place says: on a GPU only the ids and asked-for logprobs cross. A sequence
    /// that fed drafts has each of its rows sampled as plain decoding would have sampled it
    /// (the drafts before it in the context, the generator as far on); its tokens are those
    /// up to and including the first that differs from its draft. Returns, per sequence, its
    /// id, its tokens and how many drafts it fed.
    fn sample(&mut self, due: &[Due]) -> Result<Vec<(u64, Vec<Sampled>, usize)>, ModelError> {
        let vocab = self.runner.model().sampleable_vocab();
        let mut rows: Vec<RowSource<'_>> = Vec::new();
        for (d, due) in due.iter().enumerate() {
            let Some(s) = self.running.iter().find(|s| s.id == due.id) else {
                continue;
            };
            // The step's last rows: one per draft plus the one after them (just the last row
            // for a sequence without drafts, whose step may have returned more).
            let first = due
                .logits
                .dim(0)?
                .checked_sub(due.drafts.len() + 1)
                .ok_or_else(|| ModelError::Internal(format!("sequence {} returned too few logits rows", due.id)))?;
            // Row j's generator has made the draws of the j rows before it.
            let mut samplers = vec![s.sampler.clone()];
            for _ in &due.drafts {
                let next = samplers[samplers.len() - 1].successor();
                samplers.push(next);
            }
            for (j, sampler) in samplers.into_iter().enumerate() {
                let ahead = &due.drafts[..j];
                let (context, generated) = if j == 0 {
                    (Cow::Borrowed(&s.tokens[..]), Cow::Borrowed(&s.generated[..]))
                } else {
                    (
                        Cow::Owned([&s.tokens[..], ahead].concat()),
                        Cow::Owned([&s.generated[..], ahead].concat()),
                    )
                };
                rows.push(RowSource {
                    due: d,
                    logits: due.logits.narrow(0, first + j, 1)?,
                    sampler,
                    context,
                    generated,
                    want_logprob: s.req.logprobs,
                });
            }
        }
        let mut batch: Vec<SampleRow<'_>> = rows
            .iter_mut()
            .map(|r| SampleRow {
                logits: &r.logits,
                sampler: &mut r.sampler,
                context: &r.context,
                generated: &r.generated,
                want_logprob: r.want_logprob,
            })
            .collect();
        let sampled = sample_batch(&mut batch, vocab, self.config.sampling)?;
        drop(batch);
        let rows: Vec<(usize, Sampler)> = rows.into_iter().map(|r| (r.due, r.sampler)).collect();
        // Back per sequence: keep rows while they agree with the drafts; the sequence's
        // generator goes on from the last kept row's.
        let mut out: Vec<(u64, Vec<Sampled>, usize)> = Vec::with_capacity(due.len());
        let mut rows = sampled.into_iter().zip(rows).peekable();
        while let Some((first, (d, sampler))) = rows.next() {
            let drafts = &due[d].drafts;
            let mut kept = vec![first];
            let mut state = sampler;
            while let Some((t, (_, next_state))) = rows.next_if(|(_, (o, _))| *o == d) {
                let n = kept.len();
                let agreed = n <= drafts.len() && kept[n - 1].id == drafts[n - 1];
                if agreed {
                    kept.push(t);
                    state = next_state;
                }
            }
            if let Some(s) = self.running.iter_mut().find(|s| s.id == due[d].id) {
                s.sampler = state;
            }
            out.push((due[d].id, kept, drafts.len()));
        }
        Ok(out)
    }

    /// Applies a step's result to a sequence (progress, prompt logprobs); returns the logits
    /// to sample from if the sequence is due its next token.
    fn absorb(
        &mut self,
        idx: usize,
        p: &SeqPlan,
        drafted: usize,
        logits: Option<candle_core::Tensor>,
    ) -> Result<Option<candle_core::Tensor>, ModelError> {
        let tok = self.tokenizer.clone();
        let vocab = self.runner.model().sampleable_vocab();
        let s = &mut self.running[idx];
        let start = s.computed;
        // Drafts count as computed only once they are accepted.
        let fed = p.tokens.len() - drafted;
        s.computed += fed;
        let Some(logits) = logits else { return Ok(None) };
        if p.logits == LogitsWanted::All && s.scores_prompt() {
            // Row j predicts token start + j + 1.
            let targets = &s.tokens[start + 1..(start + fed + 1).min(s.prompt_len())];
            // The alternatives, when asked for: each row's top tokens (copied to the host;
            // prompt details are for evaluation, not the hot path). The token's own logprob
            // then comes from the same rows by the same arithmetic, so it equals its entry
            // among the alternatives exactly, as evaluation harnesses compare them (`==`).
            let n = s.req.sampling.top_n_tokens;
            let (logprobs, tops): (Vec<f32>, Vec<Vec<(u32, f32)>>) = if n > 0 && !targets.is_empty() {
                let rows = logits
                    .narrow(0, 0, targets.len())?
                    .narrow(1, 0, vocab)?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec2::<f32>()?;
                rows.iter().zip(targets).map(|(r, &t)| logprob_and_top(r, t, n)).unzip()
            } else {
                (token_logprobs(&logits, vocab, targets)?, Vec::new())
            };
            if start == 0 {
                let first = s.tokens[0];
                s.prompt_lp.push(TokenInfo {
                    id: first,
                    text: tok.decode(&[first])?,
                    logprob: None,
                    top: Vec::new(),
                });
            }
            for (j, (&id, lp)) in targets.iter().zip(logprobs).enumerate() {
                let top = tops.get(j).map(|row| named(&tok, row)).unwrap_or_default();
                s.prompt_lp.push(TokenInfo {
                    id,
                    text: tok.decode(&[id])?,
                    logprob: Some(lp),
                    top,
                });
            }
        }
        if s.computed < s.tokens.len() {
            return Ok(None);
        }
        if s.scores_prompt() {
            s.prompt_lp_sent = true;
            let _ = s.req.events.send(Event::PromptTokens(std::mem::take(&mut s.prompt_lp)));
        }
        Ok(Some(logits))
    }

    /// Appends a sampled token to a sequence and streams it; returns the finish label if the
    /// sequence ended. `pace` is the step's: its tokens share the time since the previous one.
    fn emit(&mut self, idx: usize, sampled: Sampled, pace: Pace) -> Result<Option<&'static str>, ModelError> {
        let tok = self.tokenizer.clone();
        let s = &mut self.running[idx];
        let now = Instant::now();
        match (s.last_token_at, pace.since) {
            (None, _) => {
                s.first_token_at = Some(now);
                // Once per request, its whole prompt (as vLLM counts): a prompt recomputed
                // after a preemption is not counted again, and the prefix cache's share is
                // in neox_prefix_cache_hits_total.
                if s.req.counted {
                    self.metrics
                        .time_to_first_token
                        .observe((now - s.req.received).as_secs_f64());
                    self.metrics.prompt_tokens.inc_by(s.prompt_len() as u64);
                }
            }
            // Accepted drafts come in the same step: each token took its share of the step,
            // not the ~0 s since the token before it.
            (Some(_), Some(since)) => self
                .metrics
                .time_per_output_token
                .observe((now - since).as_secs_f64() / pace.tokens.max(1) as f64),
            (Some(_), None) => {}
        }
        s.last_token_at = Some(now);
        self.metrics.generation_tokens.inc();
        s.tokens.push(sampled.id);
        s.generated.push(sampled.id);
        let eos = s.req.stop.eos_token_id == Some(sampled.id);
        let stop_tok = s.req.stop.stop_token_ids.contains(&sampled.id);
        let mut reason = if eos {
            Some(FinishReason::EosToken)
        } else if stop_tok {
            Some(FinishReason::StopToken)
        } else if s.generated.len() >= s.req.stop.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        let mut text = if eos || stop_tok {
            String::new()
        } else {
            s.decoder.push(&tok, sampled.id)?
        };
        if reason.is_some() {
            // The bytes of a character the sequence never finished, in order, through the
            // stop matcher like any other text.
            text.push_str(&s.decoder.finish(&tok)?);
        }
        let offset = s.decoded_chars;
        s.decoded_chars += text.chars().count();
        match s.stop.push(&text) {
            StopOutcome::Continue(t) => {
                text = t;
                // Text held back as a possible start of a stop sequence is owed to the client
                // whatever else ends the sequence.
                if reason.is_some() {
                    text.push_str(&s.stop.flush());
                }
            }
            StopOutcome::Stop(t) => {
                text = t;
                reason = Some(FinishReason::StopSequence);
            }
        }
        let info = TokenInfo {
            id: sampled.id,
            text: tok.decode(&[sampled.id])?,
            logprob: s.req.logprobs.then_some(sampled.logprob),
            top: named(&tok, &sampled.top),
        };
        let _ = s.req.events.send(Event::Token {
            token: info,
            delta: text,
            offset,
        });
        let Some(reason) = reason else { return Ok(None) };
        let total = (now - s.req.received).as_secs_f64();
        if s.req.counted {
            self.metrics.request_duration.observe(total);
        }
        let admitted = s.admitted_at.unwrap_or(now);
        let _ = s.req.events.send(Event::Finished(Finish {
            reason,
            prompt_tokens: s.prompt_len(),
            cached_prompt_tokens: s.cached_prompt,
            generated_tokens: s.generated.len(),
            queue_secs: (admitted - s.req.received).as_secs_f64(),
            ttft_secs: s
                .first_token_at
                .map(|t| (t - s.req.received).as_secs_f64())
                .unwrap_or(total),
            total_secs: total,
        }));
        Ok(Some(reason.as_str()))
    }

    /// The group is broken: fail every request, mark the engine unhealthy.
    fn fail_everything(&mut self, e: ModelError) {
        mark_unhealthy(&self.healthy, &self.metrics.group_healthy);
        let msg = e.to_string();
        // The group is gone and its caches with it; the blocks go back so the gauges say so.
        for e in self.prefix.as_mut().map(PrefixCache::clear).unwrap_or_default() {
            self.blocks.release(e.hold);
        }
        // What is still in the channel fails like the rest (and is logged and counted).
        while let Ok(r) = self.rx.try_recv() {
            self.enqueue(r);
        }
        let all: Vec<Seq> = self.running.drain(..).chain(self.waiting.drain(..)).collect();
        for s in all {
            let _ = s.req.events.send(Event::Failed(Failure::Unavailable(msg.clone())));
            self.account_end(&s, "error");
        }
    }

    /// A request leaves the engine: counted by how it ended, and logged.
    pub(super) fn account_end(&self, s: &Seq, label: &str) {
        self.in_engine.fetch_sub(1, Ordering::SeqCst);
        if s.req.counted {
            self.metrics.requests.with_label_values(&[label]).inc();
        }
        s.log_end(label);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_engine_thread_leaves_the_worker_unhealthy() {
        let healthy = Arc::new(AtomicBool::new(true));
        let gauge = prometheus::IntGauge::new("g", "g").unwrap();
        gauge.set(1);
        let guard = UnwindGuard {
            healthy: healthy.clone(),
            gauge: gauge.clone(),
        };
        let ended = std::thread::spawn(move || {
            let _guard = guard;
            panic!("a bug in a step");
        })
        .join();
        assert!(ended.is_err());
        assert!(!healthy.load(Ordering::SeqCst));
        assert_eq!(gauge.get(), 0);
        // A thread that ends normally (shutdown) leaves health to the server.
        let healthy = Arc::new(AtomicBool::new(true));
        let guard = UnwindGuard {
            healthy: healthy.clone(),
            gauge,
        };
        std::thread::spawn(move || drop(guard)).join().unwrap();
        assert!(healthy.load(Ordering::SeqCst));
    }
}
