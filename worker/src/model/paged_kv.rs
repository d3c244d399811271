//! A paged KV cache: per layer, one K and one V arena `[heads, blocks · block_size, head_dim]`
//! on the model's device, handed out to sequences a block at a time.
//!
//! It exists for accelerators, where per-sequence caches cost a handful of kernel launches per
//! sequence and layer: with every sequence's keys in one arena, a step writes all new keys
//! with one scatter per layer and a decode step gathers every sequence's history with one
//! index-select, so launches per layer no longer grow with the batch. (On CPU the
//! per-sequence caches and the fused attention kernel are faster and stay the default.)

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::ModelError;

pub struct KvPool {
    block_size: usize,
    blocks: usize,
    /// Per layer: K and V arenas, `[heads, blocks · block_size, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
    owners: Mutex<Owners>,
}

/// Which blocks are free, and how many sequences hold each block: a forked sequence shares its
/// source's full prefix blocks (nobody writes into a full block below their lengths).
struct Owners {
    free: Vec<u32>,
    holders: Vec<u32>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("block_size", &self.block_size)
            .field("blocks", &self.blocks)
            .finish()
    }
}

/// The arena shape of a pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolShape {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub blocks: usize,
    pub block_size: usize,
}

impl KvPool {
    pub fn new(shape: PoolShape, dtype: DType, device: &Device) -> Result<Arc<Self>, ModelError> {
        if shape.blocks == 0 || shape.block_size == 0 || shape.blocks > u32::MAX as usize {
            return Err(ModelError::Input(format!(
                "a KV pool needs at least one block of at least one token (got {} x {})",
                shape.blocks, shape.block_size
            )));
        }
        let tokens = shape.blocks * shape.block_size;
        let layers = (0..shape.layers)
            .map(|_| {
                Ok((
                    Tensor::zeros((shape.heads, tokens, shape.head_dim), dtype, device)?,
                    Tensor::zeros((shape.heads, tokens, shape.head_dim), dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>, candle_core::Error>>()?;
        // Handed out lowest first (popped from the end).
        let free = (0..shape.blocks as u32).rev().collect();
        Ok(Arc::new(Self {
            block_size: shape.block_size,
            blocks: shape.blocks,
            layers,
            owners: Mutex::new(Owners {
                free,
                holders: vec![0; shape.blocks],
            }),
        }))
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn free_blocks(&self) -> usize {
        self.owners.lock().map(|o| o.free.len()).unwrap_or(0)
    }

    /// The K and V arenas of `layer`.
    pub(crate) fn layer(&self, layer: usize) -> Result<&(Tensor, Tensor), ModelError> {
        self.layers
            .get(layer)
            .ok_or_else(|| ModelError::Internal(format!("no KV arena for layer {layer}")))
    }

    /// Bytes held by the arenas.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    fn owners(&self) -> Result<std::sync::MutexGuard<'_, Owners>, ModelError> {
        self.owners
            .lock()
            .map_err(|_| ModelError::Internal("KV pool lock poisoned".into()))
    }

    fn take(&self, n: usize) -> Result<Vec<u32>, ModelError> {
        let mut o = self.owners()?;
        if o.free.len() < n {
            return Err(ModelError::Internal(format!(
                "KV pool exhausted: {n} blocks wanted, {} of {} free",
                o.free.len(),
                self.blocks
            )));
        }
        let at = o.free.len() - n;
        let taken = o.free.split_off(at);
        for &b in &taken {
            o.holders[b as usize] = 1;
        }
        Ok(taken)
    }

    /// One more holder for each of `blocks`.
    fn share(&self, blocks: &[u32]) -> Result<(), ModelError> {
        let mut o = self.owners()?;
        for &b in blocks {
            debug_assert!(o.holders[b as usize] > 0, "sharing a free block");
            o.holders[b as usize] += 1;
        }
        Ok(())
    }

    /// One holder less for each of `blocks`; those nobody holds are free again.
    fn give_back(&self, blocks: &mut Vec<u32>) {
        if let Ok(mut o) = self.owners.lock() {
            for b in blocks.drain(..) {
                let h = &mut o.holders[b as usize];
                debug_assert!(*h > 0, "freeing a free block");
                *h = h.saturating_sub(1);
                if *h == 0 {
                    o.free.push(b);
                }
            }
        }
    }
}

/// Arena positions as the index `scatter_set` wants along the token axis of
/// `[heads, positions, head_dim]` values.
pub(crate) fn scatter_index(
    positions: Vec<u32>,
    heads: usize,
    head_dim: usize,
    device: &Device,
) -> Result<Tensor, ModelError> {
    let n = positions.len();
    Ok(Tensor::from_vec(positions, (1, n, 1), device)?
        .broadcast_as((heads, n, head_dim))?
        .contiguous()?)
}

/// One sequence's blocks in a [`KvPool`]; they go back to the pool when this is dropped.
pub(crate) struct PagedBlocks {
    pool: Arc<KvPool>,
    blocks: Vec<u32>,
}

impl PagedBlocks {
    pub fn new(pool: Arc<KvPool>) -> Self {
        Self {
            pool,
            blocks: Vec::new(),
        }
    }

    /// Makes room for `tokens` tokens in all.
    pub fn ensure(&mut self, tokens: usize) -> Result<(), ModelError> {
        let needed = tokens.div_ceil(self.pool.block_size);
        if needed > self.blocks.len() {
            let mut more = self.pool.take(needed - self.blocks.len())?;
            self.blocks.append(&mut more);
        }
        Ok(())
    }

    /// The sequence's blocks, in order.
    #[cfg(feature = "cuda")]
    pub fn ids(&self) -> &[u32] {
        &self.blocks
    }

    /// Arena positions of tokens `range` of the sequence (within its blocks).
    pub fn positions(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = u32> + '_ {
        let bs = self.pool.block_size;
        range.map(move |t| self.blocks[t / bs] * bs as u32 + (t % bs) as u32)
    }

    /// Blocks holding this sequence's first `tokens` tokens for a new sequence: the full
    /// blocks are shared (held by both, freed when both let go), the partial last one is
    /// copied into a block of its own, since both sequences write after it.
    pub fn fork(&self, tokens: usize) -> Result<Self, ModelError> {
        let bs = self.pool.block_size;
        if tokens > self.blocks.len() * bs {
            return Err(ModelError::Internal(format!(
                "forking {tokens} tokens from a cache of {} blocks",
                self.blocks.len()
            )));
        }
        let full = tokens / bs;
        let shared = self.blocks[..full].to_vec();
        self.pool.share(&shared)?;
        let mut new = Self {
            pool: self.pool.clone(),
            blocks: shared,
        };
        new.ensure(tokens)?;
        self.copy_to(&new, full * bs..tokens)?;
        Ok(new)
    }

    /// Copies the K and V of this sequence's tokens `range` into the same positions of
    /// `dst`'s, every layer: one gather and one scatter per arena.
    fn copy_to(&self, dst: &PagedBlocks, range: std::ops::Range<usize>) -> Result<(), ModelError> {
        let tokens = range.len();
        if tokens == 0 {
            return Ok(());
        }
        let bs = self.pool.block_size;
        if range.end > self.blocks.len() * bs || range.end > dst.blocks.len() * bs {
            return Err(ModelError::Internal(format!(
                "copying tokens {range:?} between caches of {} and {} blocks",
                self.blocks.len(),
                dst.blocks.len()
            )));
        }
        let Some((first, _)) = self.pool.layers.first() else {
            return Ok(());
        };
        let (heads, _, hd) = first.dims3()?;
        let from = Tensor::from_vec(self.positions(range.clone()).collect(), tokens, first.device())?;
        let to = scatter_index(dst.positions(range).collect(), heads, hd, first.device())?;
        for arena in self.pool.layers.iter().flat_map(|(k, v)| [k, v]) {
            let rows = arena.index_select(&from, 1)?;
            arena.scatter_set(&to, &rows, 1)?;
        }
        Ok(())
    }

    pub fn bytes_per_block(&self) -> usize {
        self.pool.bytes() / self.pool.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }
}

impl Drop for PagedBlocks {
    fn drop(&mut self) {
        self.pool.give_back(&mut self.blocks);
    }
}
