//! Per-sequence key/value cache.
//!
//! Each sequence owns one K and one V buffer per layer, `[heads, capacity, head_dim]`,
//! written in place. Capacity follows the reservation the caller makes (the engine reserves
//! whole KV blocks from its budget, offline generation reserves prompt + max_new_tokens), so
//! memory held matches what was accounted; past the reservation it doubles.

use candle_core::{DType, Device, Tensor};

use super::paged_kv::{KvPool, PagedBlocks};
use super::ModelError;

pub struct SequenceCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Blocks in a shared pool instead of the buffers above (see `paged_kv`).
    paged: Option<PagedBlocks>,
    len: usize,
    reserve: usize,
}

impl SequenceCache {
    /// A cache for `num_layers` layers that expects about `reserve` tokens in total.
    pub fn new(num_layers: usize, reserve: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            paged: None,
            len: 0,
            reserve: reserve.max(1),
        }
    }

    /// A cache whose tokens live in `pool`'s blocks.
    pub(crate) fn paged(pool: std::sync::Arc<KvPool>) -> Self {
        Self {
            layers: Vec::new(),
            paged: Some(PagedBlocks::new(pool)),
            len: 0,
            reserve: 1,
        }
    }

    pub(crate) fn blocks(&self) -> Option<&PagedBlocks> {
        self.paged.as_ref()
    }

    pub(crate) fn blocks_mut(&mut self) -> Option<&mut PagedBlocks> {
        self.paged.as_mut()
    }

    /// Tokens already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the K/V buffers (or the pool blocks).
    pub fn bytes(&self) -> usize {
        if let Some(p) = &self.paged {
            return p.len() * p.bytes_per_block();
        }
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Tokens the caller has reserved room for; the buffers grow to it when they next grow.
    pub fn set_reserve(&mut self, reserve: usize) {
        self.reserve = reserve.max(1);
    }

    /// A new cache holding this one's first `tokens` tokens, expecting about `reserve` tokens in
    /// total: a new sequence that starts with a cached prefix skips recomputing it (prefix
    /// caching). Per-sequence buffers are copied; paged caches share the prefix's full blocks
    /// and copy only a partial last one. Either way the new sequence's logits are the ones it
    /// would have had computing the prefix itself, up to the prefill's chunking.
    pub fn fork(&self, tokens: usize, reserve: usize) -> Result<SequenceCache, ModelError> {
        if tokens > self.len {
            return Err(ModelError::Input(format!(
                "cannot fork {tokens} tokens from a cache of {}",
                self.len
            )));
        }
        if let Some(src) = &self.paged {
            let blocks = src.fork(tokens)?;
            return Ok(Self {
                layers: Vec::new(),
                paged: Some(blocks),
                len: tokens,
                reserve: reserve.max(1),
            });
        }
        let reserve = reserve.max(tokens).max(1);
        let layers = self
            .layers
            .iter()
            .map(|slot| match slot {
                Some((k, v)) if tokens > 0 => {
                    Ok(Some((with_room(k, tokens, reserve)?, with_room(v, tokens, reserve)?)))
                }
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            layers,
            paged: None,
            len: tokens,
            reserve,
        })
    }

    /// Forgets the tokens from `len` on: the next write goes to position `len`. Speculative
    /// decoding feeds draft tokens and keeps only those the model agreed with; the rejected
    /// ones' keys are overwritten by the next step (their room stays reserved).
    pub fn rewind(&mut self, len: usize) -> Result<(), ModelError> {
        if len > self.len {
            return Err(ModelError::Internal(format!(
                "cannot rewind a cache of {} tokens to {len}",
                self.len
            )));
        }
        self.len = len;
        Ok(())
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Writes `k`, `v` (`[heads, n, head_dim]`) after the cached tokens of `layer` and returns
    /// views of the whole history, `[heads, len + n, head_dim]`.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor), ModelError> {
        let (heads, n, hd) = k.dims3()?;
        let needed = self.len + n;
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::Internal(format!("no layer {layer}")))?;
        let cap = slot.as_ref().map(|(k, _)| k.dim(1)).transpose()?.unwrap_or(0);
        if needed > cap {
            let new_cap = if self.reserve >= needed {
                self.reserve
            } else {
                needed.max(cap * 2)
            };
            *slot = Some(match slot.as_ref() {
                Some((ok, ov)) if self.len > 0 => {
                    (with_room(ok, self.len, new_cap)?, with_room(ov, self.len, new_cap)?)
                }
                _ => alloc(heads, new_cap, hd, k.dtype(), k.device())?,
            });
        }
        let (ck, cv) = slot.as_ref().ok_or_else(|| ModelError::Internal("cache slot".into()))?;
        ck.slice_set(k, 1, self.len)?;
        cv.slice_set(v, 1, self.len)?;
        Ok((ck.narrow(1, 0, needed)?, cv.narrow(1, 0, needed)?))
    }
}

/// A new `[heads, cap, head_dim]` buffer holding `t`'s first `tokens` tokens and then empty
/// room, in one pass that writes each element once (zeroing it all first and copying the
/// tokens over would write them twice).
fn with_room(t: &Tensor, tokens: usize, cap: usize) -> Result<Tensor, ModelError> {
    let (heads, _, hd) = t.dims3()?;
    let prefix = t.narrow(1, 0, tokens)?;
    if cap <= tokens {
        return Ok(prefix.contiguous()?);
    }
    let rest = Tensor::zeros((heads, cap - tokens, hd), t.dtype(), t.device())?;
    Ok(Tensor::cat(&[&prefix, &rest], 1)?)
}

fn alloc(heads: usize, cap: usize, hd: usize, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor), ModelError> {
    Ok((
        Tensor::zeros((heads, cap, hd), dtype, dev)?,
        Tensor::zeros((heads, cap, hd), dtype, dev)?,
    ))
}
