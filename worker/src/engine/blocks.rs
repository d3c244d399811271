//! The KV block budget: fixed-size blocks of token slots, counted against a memory budget.
//!
//! A sequence holding `n` tokens of KV holds at least `ceil(n / block_size)` blocks (the engine
//! reserves ahead; ranks allocate as tokens arrive, never past the reservation, see
//! `SeqPlan::reserve`), so the budget bounds what the process really holds for KV. In the
//! paged layout a forked sequence shares its source's full prefix blocks ([`SharedBlock`]):
//! they count once, until their last holder lets go, as the ranks' pools free them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A KV block several sequences hold (a forked prompt prefix in the paged layout).
#[derive(Debug)]
pub struct SharedBlock {
    alive: Arc<AtomicUsize>,
}

impl Drop for SharedBlock {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The KV blocks one sequence holds in the budget: its first blocks shared with others, then
/// `own` ones it holds alone.
#[derive(Debug, Default)]
pub struct Holding {
    pub shared: Vec<Arc<SharedBlock>>,
    pub own: usize,
}

impl Holding {
    pub fn own(n: usize) -> Self {
        Self {
            shared: Vec::new(),
            own: n,
        }
    }

    /// Blocks it holds, shared ones included.
    pub fn len(&self) -> usize {
        self.shared.len() + self.own
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Blocks `holdings` hold together, a block several of them share counted once.
pub fn held_blocks<'a>(holdings: impl IntoIterator<Item = &'a Holding>) -> usize {
    let mut shared = HashSet::new();
    let mut own = 0;
    for h in holdings {
        own += h.own;
        shared.extend(h.shared.iter().map(Arc::as_ptr));
    }
    own + shared.len()
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    total: usize,
    /// Blocks held alone.
    used: usize,
    /// Shared blocks still held by someone.
    shared: Arc<AtomicUsize>,
}

impl BlockManager {
    pub fn new(block_size: usize, total: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            total,
            used: 0,
            shared: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// As many blocks as `budget_bytes` holds at `bytes_per_token`.
    pub fn from_budget(block_size: usize, budget_bytes: usize, bytes_per_token: usize) -> Self {
        let block_bytes = (block_size.max(1) * bytes_per_token).max(1);
        Self::new(block_size, budget_bytes / block_bytes)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn total(&self) -> usize {
        self.total
    }
    pub fn free(&self) -> usize {
        self.total
            .saturating_sub(self.used + self.shared.load(Ordering::SeqCst))
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Takes `n` blocks if that many are free.
    pub fn try_take(&mut self, n: usize) -> bool {
        if n <= self.free() {
            self.used += n;
            true
        } else {
            false
        }
    }

    pub fn give_back(&mut self, n: usize) {
        self.used = self.used.saturating_sub(n);
    }

    /// Lets go of a sequence's blocks: its own ones now, each shared one when its last holder
    /// has let go.
    pub fn release(&mut self, h: Holding) {
        self.give_back(h.own);
    }

    /// The first `k` blocks of `src` (at most all it holds), to be shared with a fork of it:
    /// as many of its own blocks as needed become shared ones, which changes no total.
    pub fn share_prefix(&mut self, src: &mut Holding, k: usize) -> Vec<Arc<SharedBlock>> {
        let k = k.min(src.len());
        while src.shared.len() < k {
            debug_assert!(src.own > 0, "sharing more blocks than the source holds");
            src.own -= 1;
            self.used = self.used.saturating_sub(1);
            self.shared.fetch_add(1, Ordering::SeqCst);
            src.shared.push(Arc::new(SharedBlock {
                alive: self.shared.clone(),
            }));
        }
        src.shared[..k].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_and_accounting() {
        let mut b = BlockManager::from_budget(16, 16 * 100 * 10 + 5, 100);
        assert_eq!(b.total(), 10);
        assert_eq!(b.blocks_for(0), 0);
        assert_eq!(b.blocks_for(16), 1);
        assert_eq!(b.blocks_for(17), 2);
        assert!(b.try_take(7));
        assert!(!b.try_take(4));
        assert_eq!(b.free(), 3);
        b.give_back(7);
        assert_eq!(b.free(), 10);
    }

    #[test]
    fn shared_prefix_blocks_count_once_until_the_last_holder_lets_go() {
        let mut b = BlockManager::new(16, 10);
        assert!(b.try_take(4));
        let mut source = Holding::own(4);
        // A fork shares the source's first 3 blocks and takes 2 of its own.
        let shared = b.share_prefix(&mut source, 3);
        assert!(b.try_take(2));
        let fork = Holding { shared, own: 2 };
        assert_eq!((source.len(), fork.len()), (4, 5));
        assert_eq!(held_blocks([&source, &fork]), 6);
        assert_eq!(b.free(), 4);
        // A fork of the fork, sharing more than the source did.
        let mut fork = fork;
        let deeper = b.share_prefix(&mut fork, 4);
        assert_eq!(Arc::as_ptr(&deeper[0]), Arc::as_ptr(&source.shared[0]));
        assert!(b.try_take(1));
        let deeper = Holding { shared: deeper, own: 1 };
        assert_eq!(held_blocks([&source, &fork, &deeper]), 7);
        assert_eq!(b.free(), 3);
        // The source goes: its own block is freed, the shared ones stay for the forks.
        b.release(source);
        assert_eq!(b.free(), 4);
        b.release(fork);
        assert_eq!(b.free(), 5);
        b.release(deeper);
        assert_eq!(b.free(), 10);
    }
}
