//! Prefix caching: which finished sequences' KV the engine keeps, and which one a new prompt
//! can start from.
//!
//! When a sequence ends, its KV cache stays on every rank under its id (an *entry*) instead
//! of being freed, still counted against the KV block budget. A new request whose prompt
//! starts with an entry's tokens begins with a copy of that KV (`StepRunner::fork`) and
//! prefills only the rest: a shared system prompt or a multi-turn chat's history is computed
//! once. Entries only use blocks nothing else wants: the engine evicts them, least recently
//! used first, before it refuses admission or preempts a running sequence.
//!
//! The engine owns this table alone, so every rank keeps, forks and drops the same caches in
//! the same order, driven by the leader's plan.

use super::blocks::Holding;

/// A finished sequence whose KV is kept.
#[derive(Debug)]
pub struct Entry {
    /// The sequence id its caches live under on every rank.
    pub id: u64,
    /// KV blocks it holds in the engine's budget.
    pub hold: Holding,
    tokens: Vec<u32>,
    last_used: u64,
}

/// A cached prefix a prompt can start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// The entry to copy from.
    pub id: u64,
    /// Tokens of KV to copy.
    pub tokens: usize,
}

/// What a lookup found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lookup {
    /// The prefix to start from, if any.
    pub hit: Option<Hit>,
    /// A running sequence is still computing a share of the prompt at least the minimum match
    /// longer than `hit`: better to wait a step and copy it. Identical prompts queued together
    /// (a request's `n` choices, a burst with one system prompt) then compute it once, where
    /// each would otherwise compute it beside the others in the same steps.
    pub wait: bool,
}

#[derive(Debug)]
pub struct PrefixCache {
    entries: Vec<Entry>,
    /// Shorter matches are not worth a copy (nor an entry's place in the LRU order).
    min_tokens: usize,
    clock: u64,
}

impl PrefixCache {
    pub fn new(min_tokens: usize) -> Self {
        Self {
            entries: Vec::new(),
            min_tokens: min_tokens.max(1),
            clock: 0,
        }
    }

    /// The blocks of the entry `id`, if it is one.
    pub fn holding(&self, id: u64) -> Option<&Holding> {
        self.entries.iter().find(|e| e.id == id).map(|e| &e.hold)
    }

    /// The blocks of the entry `id`, if it is one.
    pub fn holding_mut(&mut self, id: u64) -> Option<&mut Holding> {
        self.entries.iter_mut().find(|e| e.id == id).map(|e| &mut e.hold)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The sequence sharing the longest prefix with `tokens`, at most all but its last token
    /// (the step that computes it gives the logits to sample from): an entry, or one of
    /// `running` (each its id, computed token count and all its tokens), whose computed KV is
    /// as good to copy; and whether to wait for more of a running one's. Marks an entry it
    /// picks used.
    pub fn lookup<'a>(&mut self, tokens: &[u32], running: impl IntoIterator<Item = (u64, usize, &'a [u32])>) -> Lookup {
        let limit = tokens.len().saturating_sub(1);
        if limit < self.min_tokens {
            return Lookup::default();
        }
        let wanted = &tokens[..limit];
        // Longest match; among equal entries the most recently used; entries before running
        // sequences.
        let entry = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, wanted)))
            .max_by_key(|&(i, len)| (len, self.entries[i].last_used));
        let mut live: Option<Hit> = None;
        let mut coming = 0;
        for (id, computed, all) in running {
            let share = common_prefix(all, wanted);
            let cached = share.min(computed);
            if live.is_none_or(|h| cached >= h.tokens) {
                live = Some(Hit { id, tokens: cached });
            }
            if share > computed {
                coming = coming.max(share);
            }
        }
        let hit = match (entry, live) {
            (Some((at, len)), r) if len >= self.min_tokens && r.is_none_or(|r| r.tokens <= len) => {
                let now = self.tick();
                let e = &mut self.entries[at];
                e.last_used = now;
                Some(Hit { id: e.id, tokens: len })
            }
            (_, r) => r.filter(|r| r.tokens >= self.min_tokens),
        };
        let wait = coming >= hit.map_or(0, |h| h.tokens) + self.min_tokens;
        Lookup { hit, wait }
    }

    /// Keeps the KV of the finished sequence `id` (`tokens` cached, in `hold`'s blocks).
    /// Returns what to free now: entries the new one contains, or the sequence itself when an
    /// entry already contains it or it is too short to be worth keeping.
    pub fn insert(&mut self, id: u64, tokens: Vec<u32>, hold: Holding) -> Vec<Entry> {
        let now = self.tick();
        let new = Entry {
            id,
            hold,
            tokens,
            last_used: now,
        };
        if new.tokens.len() < self.min_tokens {
            return vec![new];
        }
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| common_prefix(&e.tokens, &new.tokens) == new.tokens.len())
        {
            // An entry already holds all of it: that one is what was just used.
            e.last_used = now;
            return vec![new];
        }
        let (covered, kept): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|e| common_prefix(&e.tokens, &new.tokens) == e.tokens.len());
        self.entries = kept;
        self.entries.push(new);
        covered
    }

    /// Removes the least recently used entry other than `keep`.
    pub fn evict(&mut self, keep: Option<u64>) -> Option<Entry> {
        let at = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| Some(e.id) != keep)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(i, _)| i)?;
        Some(self.entries.swap_remove(at))
    }

    /// Removes every entry.
    pub fn clear(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.entries)
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[Entry]) -> Vec<u64> {
        v.iter().map(|e| e.id).collect()
    }

    #[test]
    fn lookup_takes_the_longest_prefix_and_leaves_the_last_token() {
        let mut c = PrefixCache::new(2);
        assert!(c.insert(1, vec![1, 2, 3, 4], Holding::own(1)).is_empty());
        assert!(c.insert(2, vec![1, 2, 9, 9, 9], Holding::own(2)).is_empty());
        assert_eq!(c.lookup(&[1, 2, 3, 4, 5], []).hit, Some(Hit { id: 1, tokens: 4 }));
        // The whole prompt is cached: its last token is still computed, for its logits.
        assert_eq!(c.lookup(&[1, 2, 3, 4], []).hit, Some(Hit { id: 1, tokens: 3 }));
        assert_eq!(c.lookup(&[1, 2, 9, 9, 9, 9], []).hit, Some(Hit { id: 2, tokens: 5 }));
        // Too short a match, or a different start: nothing.
        assert_eq!(c.lookup(&[1, 7, 7], []).hit, None);
        assert_eq!(c.lookup(&[5, 2, 3, 4, 5], []).hit, None);
        assert_eq!(c.lookup(&[1, 2], []).hit, None);
        assert_eq!(c.holding(1).map(Holding::len), Some(1));
        assert_eq!(c.holding(2).map(Holding::len), Some(2));
        assert!(c.holding_mut(2).is_some_and(|h| h.own == 2));
        assert!(c.holding(3).is_none());
    }

    #[test]
    fn running_sequences_are_sources_too_when_they_share_more() {
        let mut c = PrefixCache::new(2);
        c.insert(1, vec![1, 2, 3], Holding::own(1));
        // Running sequences with all their tokens computed.
        let live: [(u64, usize, &[u32]); 2] = [(7, 5, &[1, 2, 3, 4, 5]), (8, 3, &[9, 9, 9])];
        assert_eq!(c.lookup(&[1, 2, 3, 4, 5, 6], live).hit, Some(Hit { id: 7, tokens: 5 }));
        // Equal lengths: the entry (its KV will not move on).
        assert_eq!(c.lookup(&[1, 2, 3, 7], live).hit, Some(Hit { id: 1, tokens: 3 }));
        assert_eq!(c.lookup(&[9, 9, 9, 9], live).hit, Some(Hit { id: 8, tokens: 3 }));
        assert_eq!(c.lookup(&[9, 5, 5], live).hit, None);
        assert!(!c.lookup(&[1, 2, 3, 4, 5, 6], live).wait);
    }

    #[test]
    fn a_prompt_waits_for_a_running_sequence_still_computing_more_of_it() {
        let mut c = PrefixCache::new(2);
        c.insert(1, vec![1, 2], Holding::own(1));
        let prompt = [1, 2, 3, 4, 5, 6];
        let hit = Some(Hit { id: 1, tokens: 2 });
        assert_eq!(c.lookup(&prompt, []).hit, hit);
        // Its twin has computed nothing yet: 5 tokens to gain, from the entry's 2 or from none.
        let twin: [(u64, usize, &[u32]); 1] = [(9, 0, &prompt)];
        assert_eq!(c.lookup(&prompt, twin), Lookup { hit, wait: true });
        let mut empty = PrefixCache::new(2);
        assert_eq!(empty.lookup(&prompt, twin), Lookup { hit: None, wait: true });
        // Already computed (the lookup picks it), or it would add less than the minimum match.
        let done = c.lookup(&prompt, [(9, 5, &prompt[..])]);
        assert_eq!(
            done,
            Lookup {
                hit: Some(Hit { id: 9, tokens: 5 }),
                wait: false
            }
        );
        assert_eq!(c.lookup(&prompt, [(9, 0, &[1, 2, 3][..])]), Lookup { hit, wait: false });
        assert_eq!(
            c.lookup(&prompt, [(9, 0, &[1, 2, 3, 4, 9][..])]),
            Lookup { hit, wait: true }
        );
        // Nothing shared, or nothing running.
        assert!(!empty.lookup(&prompt, [(9, 0, &[7, 7, 7, 7][..])]).wait);
        assert!(!empty.lookup(&prompt, []).wait);
    }

    #[test]
    fn insert_keeps_only_the_longest_of_nested_prefixes() {
        let mut c = PrefixCache::new(1);
        assert!(c.insert(1, vec![1, 2], Holding::own(1)).is_empty());
        // 3 contains 1: 1 goes.
        assert_eq!(ids(&c.insert(3, vec![1, 2, 3], Holding::own(1))), vec![1]);
        // 4 is contained in 3: 4 itself goes back.
        assert_eq!(ids(&c.insert(4, vec![1, 2], Holding::own(1))), vec![4]);
        assert_eq!(c.len(), 1);
        // Too short for the cache: handed straight back.
        let mut c = PrefixCache::new(4);
        assert_eq!(ids(&c.insert(5, vec![1, 2, 3], Holding::own(1))), vec![5]);
        assert!(c.is_empty());
    }

    #[test]
    fn eviction_is_least_recently_used_and_spares_the_kept_entry() {
        let mut c = PrefixCache::new(1);
        c.insert(1, vec![1, 1], Holding::own(1));
        c.insert(2, vec![2, 2], Holding::own(1));
        c.insert(3, vec![3, 3], Holding::own(1));
        // Using 1 makes 2 the oldest.
        assert_eq!(c.lookup(&[1, 1, 5], []).hit.map(|h| h.id), Some(1));
        assert_eq!(c.evict(None).map(|e| e.id), Some(2));
        assert_eq!(c.evict(Some(3)).map(|e| e.id), Some(1));
        assert!(c.evict(Some(3)).is_none());
        assert_eq!(ids(&c.clear()), vec![3]);
        assert!(c.evict(None).is_none());
    }
}
