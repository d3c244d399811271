//! Admission and KV blocks: which waiting sequences run next, where their KV starts from (a
//! cached or running sequence's prefix, see `prefix_cache`, or nothing), and what gives way
//! when blocks run out: cached prefixes first, least recently used, then the most recently
//! admitted running sequence, which is preempted and recomputed later.

use std::time::Instant;

use crate::model::ModelError;

use super::blocks::{held_blocks, Holding};
use super::prefix_cache::{Entry, Hit, Lookup};
use super::scheduler::{Engine, Seq};

impl Engine {
    /// Blocks that evicting every cached prefix but `keep` would free: what neither running
    /// sequences nor `keep` hold too.
    fn evictable(&self, keep: Option<u64>) -> usize {
        let held = self.blocks.total() - self.blocks.free();
        let kept = keep.and_then(|k| self.prefix.as_ref()?.holding(k));
        let staying = held_blocks(self.running.iter().map(|s| &s.hold).chain(kept));
        held.saturating_sub(staying)
    }

    /// Ends a sequence that left the engine and counts it: its KV stays as a cached prefix if
    /// prefix caching is on, else it is freed everywhere.
    pub(super) fn retire(&mut self, mut s: Seq, label: &str) -> Result<(), ModelError> {
        self.account_end(&s, label);
        if s.hold.is_empty() {
            // Never admitted, or preempted: it holds no KV.
            return Ok(());
        }
        let hold = std::mem::take(&mut s.hold);
        match self.prefix.as_mut() {
            Some(p) if s.computed > 0 => {
                let freed = p.insert(s.id, s.tokens[..s.computed].to_vec(), hold);
                self.free_entries(freed)
            }
            _ => self.free(vec![(s.id, hold)]),
        }
    }

    fn free_entries(&mut self, entries: Vec<Entry>) -> Result<(), ModelError> {
        self.free(entries.into_iter().map(|e| (e.id, e.hold)).collect())
    }

    /// Frees the blocks and the caches (on every rank) of `(sequence id, blocks)` nothing uses
    /// any more.
    fn free(&mut self, seqs: Vec<(u64, Holding)>) -> Result<(), ModelError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(seqs.len());
        for (id, hold) in seqs {
            self.blocks.release(hold);
            ids.push(id);
        }
        self.runner.release(&ids)
    }

    /// Evicts the least recently used cached prefix other than `keep`; false if none is left.
    fn evict_prefix(&mut self, keep: Option<u64>) -> Result<bool, ModelError> {
        match self.prefix.as_mut().and_then(|p| p.evict(keep)) {
            Some(e) => {
                self.free_entries(vec![e])?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Admits waiting sequences in arrival order while slots and blocks allow (evicting cached
    /// prefixes for room); a prompt that starts with a cached prefix starts from its KV. A
    /// prompt waiting for a running twin's prefill (to copy its KV a step later) is passed
    /// over, not waited on: what queued behind it runs meanwhile. One short of blocks stops
    /// admission, so that later, smaller prompts cannot starve it.
    pub(super) fn admit(&mut self) -> Result<(), ModelError> {
        // Waiting sequences passed over this time, all at the head of the queue.
        let mut passed = 0;
        while self.running.len() < self.config.max_batch_size {
            let Some(front) = self.waiting.get(passed) else { break };
            let id = front.id;
            // Room for the whole (re)computation plus the next token.
            let need = self.blocks.blocks_for(front.tokens.len() + 1);
            let bs = self.blocks.block_size();
            // Prompt logprobs need every prompt position computed.
            let scores_prompt = front.scores_prompt();
            let queried = self.prefix.is_some() && !scores_prompt;
            let found = match self.prefix.as_mut() {
                Some(p) if queried => {
                    let live = self.running.iter().map(|r| (r.id, r.computed, &r.tokens[..]));
                    p.lookup(&front.tokens, live)
                }
                _ => Lookup::default(),
            };
            // A running sequence still computing more of this prompt: wait for its KV.
            if found.wait {
                passed += 1;
                continue;
            }
            let mut hit = found.hit;
            // Full blocks of the prefix the ranks share with the source instead of copying.
            let shared = match hit {
                Some(h) if self.config.paged_kv => h.tokens / bs,
                _ => 0,
            };
            let Some(taken) = self.make_room(need, need - shared, &mut hit)? else {
                break;
            };
            let mut hold = Holding::own(taken);
            if let Some(h) = hit {
                if shared > 0 {
                    let source = self
                        .prefix
                        .as_mut()
                        .and_then(|p| p.holding_mut(h.id))
                        .or_else(|| self.running.iter_mut().find(|r| r.id == h.id).map(|r| &mut r.hold))
                        .ok_or_else(|| ModelError::Internal(format!("fork source {} is gone", h.id)))?;
                    hold.shared = self.blocks.share_prefix(source, shared);
                }
                // Before the sequence leaves the queue: if this fails, the group's failure
                // still reaches its client.
                self.runner.fork(h.id, id, h.tokens, need * bs)?;
            }
            let Some(mut s) = self.waiting.remove(passed) else {
                break;
            };
            s.hold = hold;
            s.admitted_at.get_or_insert_with(Instant::now);
            if queried {
                self.metrics.prefix_cache_queries.inc_by(s.tokens.len() as u64);
            }
            s.cached_prompt = hit.map_or(0, |h| h.tokens.min(s.prompt_len()));
            if let Some(h) = hit {
                s.computed = h.tokens;
                self.metrics.prefix_cache_hits.inc_by(h.tokens as u64);
                tracing::debug!(
                    seq = s.id,
                    from = h.id,
                    tokens = h.tokens,
                    "prompt starts from a cached prefix"
                );
            }
            self.running.push(s);
        }
        Ok(())
    }

    /// Takes the blocks of a sequence about to be admitted: `need_with_hit` while it starts
    /// from `hit` (whose shared blocks it does not take), `need` otherwise. Evicts cached
    /// prefixes if that makes it fit: others first, then the one it would start from, which
    /// `hit` then no longer names. Evicts nothing when even that would not do: the sequence
    /// waits, and the prefixes stay for it and for others. Returns the blocks taken.
    fn make_room(
        &mut self,
        need: usize,
        need_with_hit: usize,
        hit: &mut Option<Hit>,
    ) -> Result<Option<usize>, ModelError> {
        let mut want = if hit.is_some() { need_with_hit } else { need };
        if self.blocks.try_take(want) {
            return Ok(Some(want));
        }
        let free = self.blocks.free();
        if hit.is_some_and(|h| free + self.evictable(Some(h.id)) < want) {
            *hit = None;
            want = need;
        }
        let keep = hit.map(|h| h.id);
        if free + self.evictable(keep) < want {
            return Ok(None);
        }
        while !self.blocks.try_take(want) {
            if !self.evict_prefix(keep)? {
                return Ok(None);
            }
        }
        Ok(Some(want))
    }

    /// Takes blocks for `running[i]` to hold `tokens` tokens, evicting cached prefixes (least
    /// recently used first) while that is not enough. False, evicting nothing, when even
    /// evicting them all would not do: a prefix whose blocks running forks share frees none,
    /// and dropping it would cost later prompts their cached KV for nothing.
    fn grow_evicting(&mut self, i: usize, tokens: usize) -> Result<bool, ModelError> {
        let need = self
            .blocks
            .blocks_for(tokens)
            .saturating_sub(self.running[i].hold.len());
        let ahead = self.room_ahead(i, need);
        if ahead > 0 && self.blocks.try_take(need + ahead) {
            self.running[i].hold.own += need + ahead;
            return Ok(true);
        }
        // Evicting cached prefixes (none it starts from) as admission does.
        let Some(taken) = self.make_room(need, need, &mut None)? else {
            return Ok(false);
        };
        self.running[i].hold.own += taken;
        Ok(true)
    }

    /// Blocks to take beyond the `need` of `running[i]` as it grows. A per-sequence cache copies
    /// its whole history into a larger buffer each time its reservation grows, so growing a
    /// block at a time copies a long sequence every few tokens (a stall each time, quadratic
    /// work in all). A quarter of what it holds ahead makes the copies geometric: a handful
    /// per sequence. Only while a quarter of the budget stays free, so the room ahead never
    /// costs a preemption that growing exactly would not, and never past what the request can
    /// ever use. Paged caches copy nothing as they grow: none for them.
    fn room_ahead(&self, i: usize, need: usize) -> usize {
        let s = &self.running[i];
        if need == 0 || self.config.paged_kv {
            return 0;
        }
        let held = s.hold.len() + need;
        let most = self
            .blocks
            .blocks_for(s.prompt_len() + s.req.stop.max_new_tokens + self.config.speculation.max_tokens);
        let spare = self.blocks.free().saturating_sub(need + self.blocks.total() / 4);
        (held / 4).min(most.saturating_sub(held)).min(spare)
    }

    /// Makes sure sequence `id` (running) holds blocks for `tokens` tokens, preempting the most
    /// recently admitted sequences if needed (cached prefixes go first). First come, first
    /// served: when `id` is itself the most recent, it is the one preempted, and waits for the
    /// blocks older sequences free rather than taking theirs. False if it does not run this
    /// step. By id, since preemptions move the sequences it is looked up among.
    pub(super) fn ensure_blocks(&mut self, id: u64, tokens: usize) -> Result<bool, ModelError> {
        loop {
            let Some(i) = self.running.iter().position(|s| s.id == id) else {
                return Ok(false);
            };
            if self.grow_evicting(i, tokens)? {
                return Ok(true);
            }
            // Alone, it cannot be short of blocks (submission bounds a sequence by the pool);
            // never preempt the last one.
            if self.running.len() < 2 {
                return Ok(false);
            }
            let youngest = (0..self.running.len()).max_by_key(|&j| self.running[j].admitted_at);
            if let Some(j) = youngest {
                self.preempt(j)?;
            }
        }
    }

    /// Sends `running[j]` back to the head of the queue, freeing its KV: it is recomputed
    /// (prompt and generated tokens) when it is admitted again.
    fn preempt(&mut self, j: usize) -> Result<(), ModelError> {
        let mut v = self.running.remove(j);
        self.blocks.release(std::mem::take(&mut v.hold));
        let id = v.id;
        v.computed = 0;
        v.cached_prompt = 0;
        // Its prompt is scored again from the start.
        if !v.prompt_lp_sent {
            v.prompt_lp.clear();
        }
        self.metrics.preemptions.inc();
        tracing::debug!(seq = id, "preempted for lack of KV blocks");
        // Queued before its KV goes, so a failure to free it still reaches its client.
        self.waiting.push_front(v);
        self.runner.release(&[id])
    }

    /// Grows `running[i]`'s blocks towards `tokens` tokens for draft tokens, as its own next
    /// tokens would (free blocks, then cached prefixes), but never preempting a running
    /// sequence: what is free when nothing is left to evict. Returns how many tokens its
    /// blocks now hold.
    pub(super) fn blocks_for_drafts(&mut self, i: usize, tokens: usize) -> Result<usize, ModelError> {
        if !self.grow_evicting(i, tokens)? {
            let free = self.blocks.free();
            if self.blocks.try_take(free) {
                self.running[i].hold.own += free;
            }
        }
        Ok(self.running[i].hold.len() * self.blocks.block_size())
    }
}
