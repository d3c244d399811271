//! Running model steps on a whole tensor-parallel group.
//!
//! The engine drives a [`StepRunner`]. On one rank that is a [`LocalRunner`]; on the leader
//! of a group it is a [`LeaderRunner`], which sends each step plan to the followers over the
//! internal `neox.shard.v1` gRPC stream before running its own shard, so every rank runs the
//! same forward in lockstep and keeps identical KV caches under the same sequence ids.

mod follower;
mod leader;

use std::collections::HashMap;

use candle_core::Tensor;

use crate::model::{GptNeoX, LogitsWanted, ModelError, SeqStep, SequenceCache};

pub use follower::{run_follower, FollowerOptions};
pub use leader::{GroupLeader, GroupOptions, LeaderRunner};

/// One sequence's part of a step.
#[derive(Debug, Clone)]
pub struct SeqPlan {
    pub id: u64,
    /// Position of the first of `tokens`: the sequence's cached tokens so far, or fewer when
    /// it drops KV it no longer wants (rejected draft tokens), never more.
    pub start: usize,
    pub tokens: Vec<u32>,
    pub logits: LogitsWanted,
    /// Tokens of KV room reserved for the sequence (its cache grows to this when it grows).
    pub reserve: usize,
}

/// Runs engine steps on this rank or a whole group.
pub trait StepRunner: Send {
    /// Runs one step; returns, per sequence, the f32 logits it asked for (`[rows, vocab]`).
    fn step(&mut self, plan: &[SeqPlan]) -> Result<Vec<Option<Tensor>>, ModelError>;
    /// Frees the KV caches of finished sequences.
    fn release(&mut self, ids: &[u64]) -> Result<(), ModelError>;
    /// Starts the new sequence `to`'s cache, on every rank, as a copy of the first `tokens`
    /// cached tokens of sequence `from`, sized for `reserve` tokens (prefix caching).
    fn fork(&mut self, from: u64, to: u64, tokens: usize, reserve: usize) -> Result<(), ModelError>;
    fn model(&self) -> &GptNeoX;
    /// Switches every rank's new KV caches to one paged pool of `blocks` blocks of
    /// `block_size` tokens (see `model::KvPool`); before the first step.
    fn use_paged_kv(&mut self, blocks: usize, block_size: usize) -> Result<(), ModelError>;
    /// Proves every rank is still there (a barrier), so an idle group notices a lost rank
    /// within the collective timeout too.
    fn heartbeat(&mut self) -> Result<(), ModelError> {
        Ok(())
    }
}

/// The model on this rank, with the KV caches of every live sequence.
pub struct LocalRunner {
    model: GptNeoX,
    caches: HashMap<u64, SequenceCache>,
}

impl LocalRunner {
    pub fn new(model: GptNeoX) -> Self {
        Self {
            model,
            caches: HashMap::new(),
        }
    }

    /// Cached tokens of sequence `id` (0 if unknown).
    pub fn cached_len(&self, id: u64) -> usize {
        self.caches.get(&id).map(|c| c.len()).unwrap_or(0)
    }
}

impl StepRunner for LocalRunner {
    fn step(&mut self, plan: &[SeqPlan]) -> Result<Vec<Option<Tensor>>, ModelError> {
        for p in plan {
            match self.caches.get_mut(&p.id) {
                Some(c) if p.start > c.len() => {
                    return Err(ModelError::Internal(format!(
                        "sequence {} starts at {} but has {} tokens cached",
                        p.id,
                        p.start,
                        c.len()
                    )))
                }
                Some(c) => {
                    c.rewind(p.start)?;
                    c.set_reserve(p.reserve);
                }
                None if p.start > 0 => {
                    return Err(ModelError::Internal(format!(
                        "sequence {} starts at {} but has no KV cache",
                        p.id, p.start
                    )))
                }
                None => {
                    self.caches.insert(p.id, self.model.new_cache(p.reserve));
                }
            }
        }
        // Take the caches out so each step borrows them mutably side by side.
        let mut taken: Vec<SequenceCache> = Vec::with_capacity(plan.len());
        for p in plan {
            let c = self
                .caches
                .remove(&p.id)
                .ok_or_else(|| ModelError::Input(format!("sequence {} appears twice in one step", p.id)))?;
            taken.push(c);
        }
        let result = {
            let mut steps: Vec<SeqStep<'_>> = plan
                .iter()
                .zip(taken.iter_mut())
                .map(|(p, cache)| SeqStep {
                    tokens: &p.tokens,
                    cache,
                    logits: p.logits,
                })
                .collect();
            self.model.forward(&mut steps)
        };
        for (p, c) in plan.iter().zip(taken) {
            self.caches.insert(p.id, c);
        }
        result
    }

    fn release(&mut self, ids: &[u64]) -> Result<(), ModelError> {
        for id in ids {
            self.caches.remove(id);
        }
        Ok(())
    }

    fn fork(&mut self, from: u64, to: u64, tokens: usize, reserve: usize) -> Result<(), ModelError> {
        if self.caches.contains_key(&to) {
            return Err(ModelError::Internal(format!("sequence {to} already has a KV cache")));
        }
        let src = self
            .caches
            .get(&from)
            .ok_or_else(|| ModelError::Internal(format!("no KV cache for sequence {from} to fork")))?;
        let copy = src.fork(tokens, reserve)?;
        self.caches.insert(to, copy);
        Ok(())
    }

    fn model(&self) -> &GptNeoX {
        &self.model
    }

    fn use_paged_kv(&mut self, blocks: usize, block_size: usize) -> Result<(), ModelError> {
        if !self.caches.is_empty() {
            return Err(ModelError::Internal(
                "the KV layout changes only before the first step".into(),
            ));
        }
        self.model.use_paged_kv(blocks, block_size)
    }
}
