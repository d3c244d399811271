//! The KV block budget: fixed-size blocks of token slots, counted against a memory budget.
//!
//! A sequence holding `n` tokens of KV holds `ceil(n / block_size)` blocks, and its cache on
//! every rank is sized to exactly those blocks (see `SeqPlan::reserve`), so the budget is
//! what the process really holds for KV.

#[derive(Debug, Clone)]
pub struct BlockManager {
    block_size: usize,
    total: usize,
    used: usize,
}

impl BlockManager {
    pub fn new(block_size: usize, total: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            total,
            used: 0,
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
        self.total - self.used
    }
    pub fn usage_ratio(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.used as f64 / self.total as f64
        }
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
        assert!((b.usage_ratio() - 0.7).abs() < 1e-9);
        b.give_back(7);
        assert_eq!(b.free(), 10);
    }
}
