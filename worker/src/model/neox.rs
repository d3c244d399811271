//! The GPT-NeoX forward pass, sharded Megatron-style over the ranks of a [`Communicator`].
//!
//! A step runs any mix of sequences (prefill chunks and single decode tokens): their new
//! tokens are stacked into one `[tokens, hidden]` matrix so every projection is one matmul,
//! and only attention runs per sequence, against that sequence's own KV cache.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::checkpoint::{Checkpoint, Slice};
use super::config::{Activation, NeoXConfig};
use super::decode_attention::attend_decode_step;
use super::kv_cache::SequenceCache;
use super::linear::Linear;
use super::paged_kv::{scatter_index, KvPool, PoolShape};
use super::ModelError;
use crate::parallel::{Communicator, RankInfo};

/// Which logits a sequence wants back from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    /// Only the last new token's (for sampling).
    Last,
    /// Every new token's (prompt logprobs, perplexity).
    All,
}

/// One sequence's part of a forward step.
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SequenceCache,
    pub logits: LogitsWanted,
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

struct Layer {
    ln_attn: LayerNorm,
    ln_mlp: LayerNorm,
    /// This rank's heads of `query_key_value`: output rows laid out `[heads, 3, head_dim]`.
    qkv: Linear,
    /// Input columns of `attention.dense` for this rank's heads; bias kept apart.
    attn_out: Linear,
    mlp_up: Linear,
    /// Input columns of `dense_4h_to_h` for this rank's slice; bias kept apart.
    mlp_down: Linear,
    /// Row-parallel biases, added once after the all-reduce.
    attn_out_bias: Option<Tensor>,
    mlp_down_bias: Tensor,
    /// Both of the above, pre-summed for the parallel residual.
    fused_bias: Tensor,
}

/// GPT-NeoX, holding this rank's shard of the weights.
pub struct GptNeoX {
    config: NeoXConfig,
    rank: RankInfo,
    comm: Arc<dyn Communicator>,
    dtype: DType,
    device: Device,
    embed_in: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    /// This rank's vocabulary rows of `embed_out`.
    embed_out: Linear,
    local_heads: usize,
    cos: Tensor,
    sin: Tensor,
    /// Logits of rows at or past this id are never sampled (embedding rows padded past the
    /// tokenizer's vocabulary).
    sampleable_vocab: usize,
    weight_bytes: usize,
    /// Set by [`GptNeoX::use_paged_kv`]: new caches take blocks of this pool.
    kv_pool: Option<Arc<KvPool>>,
    /// Paged steps of up to [`FUSED_MAX_NEW`] new tokens a sequence run the fused CUDA kernels
    /// (`fused.rs`) instead of candle's one kernel per op.
    fused: bool,
}

/// Most new tokens a sequence may feed for its step to take the fused kernels: their attention
/// runs one block per token and head, which suits decode and speculative verification, not
/// long prompts (those run as batched matmuls).
pub const FUSED_MAX_NEW: usize = 64;

/// Whether the fused CUDA kernels can run this model (`NEOX_UNFUSED=1` turns them off, for
/// side-by-side benchmarks and bisecting).
#[cfg(feature = "cuda")]
fn fused_kernels_fit(c: &NeoXConfig, dtype: DType, dev: &Device) -> bool {
    dev.is_cuda()
        && super::fused::supports(dtype)
        && c.use_parallel_residual
        && c.head_dim() <= super::fused::MAX_HEAD_DIM
        && c.hidden_size <= super::fused::MAX_HIDDEN
        && c.rotary_dims.is_multiple_of(2)
        && std::env::var_os("NEOX_UNFUSED").is_none()
}

#[cfg(not(feature = "cuda"))]
fn fused_kernels_fit(_: &NeoXConfig, _: DType, _: &Device) -> bool {
    false
}

/// What every layer of one step needs from a paged KV pool, built once per step.
struct PagedPlan {
    /// Arena positions of the step's new tokens, broadcast to `[heads, tokens, head_dim]` (the
    /// shape `scatter_set` wants); not needed by the fused kernels.
    write: Option<Tensor>,
    attend: PagedAttend,
}

enum PagedAttend {
    /// Every sequence feeds one token: one gather of `[sequences · longest]` positions
    /// (padded), with an additive mask `[sequences, 1, 1, longest]` hiding the padding.
    Decode {
        gather: Tensor,
        mask: Tensor,
        longest: usize,
    },
    /// Otherwise, per sequence: its positions and, for several new tokens, a causal mask.
    Each(Vec<(Tensor, Option<Tensor>)>),
    /// Every layer runs the fused kernels (`forward_fused`).
    #[cfg(feature = "cuda")]
    Fused(super::fused::PagedIndex),
}

fn ln(ckpt: &Checkpoint, prefix: &str, c: &NeoXConfig, dtype: DType, dev: &Device) -> Result<LayerNorm, ModelError> {
    let h = c.hidden_size;
    Ok(LayerNorm {
        weight: ckpt.load(&format!("{prefix}.weight"), &[h], Slice::Full, dtype, dev)?,
        bias: ckpt.load(&format!("{prefix}.bias"), &[h], Slice::Full, dtype, dev)?,
        eps: c.layer_norm_eps as f32,
    })
}

/// Checks that every sharded dimension divides by the group size, naming what does not.
fn check_divisible(c: &NeoXConfig, tp: usize) -> Result<(), ModelError> {
    for (what, n) in [
        ("num_attention_heads", c.num_heads),
        ("intermediate_size", c.intermediate_size),
        ("vocab_size (embedding rows)", c.vocab_size),
    ] {
        if !n.is_multiple_of(tp) {
            return Err(ModelError::Parallel(format!(
                "tensor-parallel size {tp} does not divide {what} = {n}; choose a size that divides it"
            )));
        }
    }
    Ok(())
}

/// `cos`/`sin` tables `[max_positions, rotary_dims / 2]`, computed in f32 exactly as HF does.
fn rotary_tables(c: &NeoXConfig, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor), ModelError> {
    let half = c.rotary_dims / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / (c.rotary_base as f32).powf((2 * i) as f32 / c.rotary_dims as f32))
        .collect();
    let n = c.max_position_embeddings;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), dev)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (n, half), dev)?.to_dtype(dtype)?,
    ))
}

impl GptNeoX {
    /// Loads this rank's shard of every weight from `ckpt`.
    /// Loads rank `rank`'s shard of every weight from `ckpt`. A group of more than one rank
    /// needs [`GptNeoX::attach_comm`] before its first step.
    pub fn load(
        c: &NeoXConfig,
        ckpt: &Checkpoint,
        dtype: DType,
        dev: &Device,
        rank: RankInfo,
    ) -> Result<Self, ModelError> {
        let tp = rank.world_size;
        if tp == 0 || rank.rank >= tp {
            return Err(ModelError::Parallel(format!(
                "rank {} is outside a world of {tp}",
                rank.rank
            )));
        }
        let comm: Arc<dyn Communicator> = if tp == 1 {
            Arc::new(crate::parallel::SingleRank)
        } else {
            Arc::new(crate::parallel::Unconnected(rank))
        };
        check_divisible(c, tp)?;
        let (h, hd, inter, vocab) = (c.hidden_size, c.head_dim(), c.intermediate_size, c.vocab_size);
        let (head0, local_heads) = rank.split(c.num_heads);
        let (i0, local_inter) = rank.split(inter);
        let (v0, local_vocab) = rank.split(vocab);
        let load = |name: &str, shape: &[usize], s: Slice| ckpt.load(name, shape, s, dtype, dev);
        let qkv_rows = Slice::Rows {
            start: head0 * 3 * hd,
            len: local_heads * 3 * hd,
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("gpt_neox.layers.{l}");
            let bias = |name: &str, n: usize, s: Slice| -> Result<Option<Tensor>, ModelError> {
                if c.attention_bias {
                    Ok(Some(load(name, &[n], s)?))
                } else {
                    Ok(None)
                }
            };
            let qkv = Linear::new(
                load(&format!("{p}.attention.query_key_value.weight"), &[3 * h, h], qkv_rows)?,
                bias(&format!("{p}.attention.query_key_value.bias"), 3 * h, qkv_rows)?,
            )?;
            let attn_out = Linear::new(
                load(
                    &format!("{p}.attention.dense.weight"),
                    &[h, h],
                    Slice::Cols {
                        start: head0 * hd,
                        len: local_heads * hd,
                    },
                )?,
                None,
            )?;
            let attn_out_bias = bias(&format!("{p}.attention.dense.bias"), h, Slice::Full)?;
            let up_rows = Slice::Rows {
                start: i0,
                len: local_inter,
            };
            let mlp_up = Linear::new(
                load(&format!("{p}.mlp.dense_h_to_4h.weight"), &[inter, h], up_rows)?,
                Some(load(&format!("{p}.mlp.dense_h_to_4h.bias"), &[inter], up_rows)?),
            )?;
            let mlp_down = Linear::new(
                load(
                    &format!("{p}.mlp.dense_4h_to_h.weight"),
                    &[h, inter],
                    Slice::Cols {
                        start: i0,
                        len: local_inter,
                    },
                )?,
                None,
            )?;
            let mlp_down_bias = load(&format!("{p}.mlp.dense_4h_to_h.bias"), &[h], Slice::Full)?;
            let fused_bias = match &attn_out_bias {
                Some(b) => (b + &mlp_down_bias)?,
                None => mlp_down_bias.clone(),
            };
            layers.push(Layer {
                ln_attn: ln(ckpt, &format!("{p}.input_layernorm"), c, dtype, dev)?,
                ln_mlp: ln(ckpt, &format!("{p}.post_attention_layernorm"), c, dtype, dev)?,
                qkv,
                attn_out,
                mlp_up,
                mlp_down,
                attn_out_bias,
                mlp_down_bias,
                fused_bias,
            });
        }
        let embed_in = load("gpt_neox.embed_in.weight", &[vocab, h], Slice::Full)?;
        let out_rows = Slice::Rows {
            start: v0,
            len: local_vocab,
        };
        // `embed_out` as GPT-NeoX checkpoints name it; `lm_head` where a writer renamed it.
        let out_name = ["embed_out.weight", "lm_head.weight"]
            .into_iter()
            .find(|n| ckpt.contains(n));
        let embed_out = Linear::new(
            match out_name {
                None if c.tie_word_embeddings => load("gpt_neox.embed_in.weight", &[vocab, h], out_rows)?,
                name => load(name.unwrap_or("embed_out.weight"), &[vocab, h], out_rows)?,
            },
            None,
        )?;
        let final_ln = ln(ckpt, "gpt_neox.final_layer_norm", c, dtype, dev)?;
        let (cos, sin) = rotary_tables(c, dtype, dev)?;
        let fused = fused_kernels_fit(c, dtype, dev);
        let weight_bytes = Self::count_bytes(&embed_in, &layers, &embed_out, &final_ln);
        Ok(Self {
            config: c.clone(),
            rank,
            comm,
            dtype,
            device: dev.clone(),
            embed_in,
            layers,
            final_ln,
            embed_out,
            local_heads,
            cos,
            sin,
            sampleable_vocab: vocab,
            weight_bytes,
            kv_pool: None,
            fused,
        })
    }

    fn count_bytes(embed_in: &Tensor, layers: &[Layer], embed_out: &Linear, final_ln: &LayerNorm) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let ob = |t: &Option<Tensor>| t.as_ref().map(b).unwrap_or(0);
        let lnb = |l: &LayerNorm| b(&l.weight) + b(&l.bias);
        b(embed_in)
            + embed_out.bytes()
            + lnb(final_ln)
            + layers
                .iter()
                .map(|l| {
                    lnb(&l.ln_attn)
                        + lnb(&l.ln_mlp)
                        + l.qkv.bytes()
                        + ob(&l.attn_out_bias)
                        + l.attn_out.bytes()
                        + l.mlp_up.bytes()
                        + l.mlp_down.bytes()
                        + b(&l.mlp_down_bias)
                })
                .sum::<usize>()
    }

    /// Connects this shard to the rest of its group.
    pub fn attach_comm(&mut self, comm: Arc<dyn Communicator>) -> Result<(), ModelError> {
        if comm.rank_info() != self.rank {
            return Err(ModelError::Parallel(format!(
                "communicator is rank {:?} but the weights were loaded for {:?}",
                comm.rank_info(),
                self.rank
            )));
        }
        self.comm = comm;
        Ok(())
    }

    /// Waits for every rank of the group.
    pub fn barrier(&self) -> Result<(), ModelError> {
        Ok(self.comm.barrier()?)
    }

    /// Limits sampling to the first `n` rows (the tokenizer's vocabulary).
    pub fn with_sampleable_vocab(mut self, n: usize) -> Self {
        self.sampleable_vocab = n.min(self.config.vocab_size).max(1);
        self
    }

    pub fn config(&self) -> &NeoXConfig {
        &self.config
    }
    pub fn rank(&self) -> RankInfo {
        self.rank
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn sampleable_vocab(&self) -> usize {
        self.sampleable_vocab
    }
    /// Whether decode-sized paged steps run the fused CUDA kernels.
    pub fn uses_fused_kernels(&self) -> bool {
        self.fused
    }
    /// Bytes of weights resident on this rank.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }
    /// Bytes of K+V cache one token takes on this rank.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.config.num_layers * self.local_heads * self.config.head_dim() * self.dtype.size_in_bytes()
    }

    /// A fresh, empty cache for one sequence expected to reach `reserve` tokens.
    pub fn new_cache(&self, reserve: usize) -> SequenceCache {
        match &self.kv_pool {
            Some(pool) => SequenceCache::paged(pool.clone()),
            None => SequenceCache::new(self.config.num_layers, reserve),
        }
    }

    /// From now on new caches take `block_size`-token blocks from one pool of `blocks` blocks
    /// on the model's device (see `paged_kv`); caches made before keep their own buffers.
    pub fn use_paged_kv(&mut self, blocks: usize, block_size: usize) -> Result<(), ModelError> {
        let shape = PoolShape {
            layers: self.config.num_layers,
            heads: self.local_heads,
            head_dim: self.config.head_dim(),
            blocks,
            block_size,
        };
        self.kv_pool = Some(KvPool::new(shape, self.dtype, &self.device)?);
        Ok(())
    }

    /// The paged KV pool, if the model uses one.
    pub fn kv_pool(&self) -> Option<&Arc<KvPool>> {
        self.kv_pool.as_ref()
    }

    /// Runs one step over `seqs` and returns, for each, the logits it asked for as a
    /// `[rows, vocab]` f32 tensor (full vocabulary on every rank).
    pub fn forward(&self, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Option<Tensor>>, ModelError> {
        let hidden = self.forward_hidden(seqs)?;
        let mut rows = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        let mut offset = 0u32;
        for s in seqs.iter() {
            let n = s.tokens.len() as u32;
            let first = rows.len();
            match s.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => rows.push(offset + n - 1),
                LogitsWanted::All => rows.extend(offset..offset + n),
            }
            spans.push((first, rows.len() - first));
            offset += n;
        }
        if rows.is_empty() {
            return Ok(seqs.iter().map(|_| None).collect());
        }
        let idx = Tensor::from_vec(rows.clone(), rows.len(), &self.device)?;
        let selected = hidden.index_select(&idx, 0)?;
        let logits = self.lm_head(&selected)?;
        spans
            .into_iter()
            .map(|(first, len)| {
                if len == 0 {
                    Ok(None)
                } else {
                    Ok(Some(logits.narrow(0, first, len)?))
                }
            })
            .collect()
    }

    /// Full-vocabulary f32 logits for `hidden` rows (gathered across ranks).
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        let local = self.embed_out.forward(hidden)?;
        let full = self.comm.all_gather(&local, 1)?;
        Ok(full.to_dtype(DType::F32)?)
    }

    /// Runs the transformer over the new tokens of `seqs`, appending to their caches, and
    /// returns the final-layer-norm output `[total_new_tokens, hidden]`.
    pub fn forward_hidden(&self, seqs: &mut [SeqStep<'_>]) -> Result<Tensor, ModelError> {
        let max_pos = self.config.max_position_embeddings;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(ModelError::Input(format!("sequence {i} has no new tokens")));
            }
            let start = s.cache.len();
            if start + s.tokens.len() > max_pos {
                return Err(ModelError::Input(format!(
                    "sequence {i} reaches position {} but the model has {max_pos} positions",
                    start + s.tokens.len()
                )));
            }
            for (j, &t) in s.tokens.iter().enumerate() {
                if t as usize >= self.config.vocab_size {
                    return Err(ModelError::Input(format!(
                        "token id {t} is outside the vocabulary of {} rows",
                        self.config.vocab_size
                    )));
                }
                ids.push(t);
                positions.push((start + j) as u32);
            }
        }
        if ids.is_empty() {
            return Err(ModelError::Input("a step needs at least one sequence".into()));
        }
        let n = ids.len();
        let ids = Tensor::from_vec(ids, n, &self.device)?;
        let mut x = self.embed_in.index_select(&ids, 0)?;
        let paged = self.paged_plan(seqs, &positions)?;
        #[cfg(feature = "cuda")]
        if let Some(PagedPlan {
            attend: PagedAttend::Fused(index),
            ..
        }) = &paged
        {
            let out = self.forward_fused(x, index)?;
            for s in seqs.iter_mut() {
                s.cache.advance(s.tokens.len());
            }
            return Ok(out);
        }
        let pos = Tensor::from_vec(positions, n, &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(layer, li, &x, (&cos, &sin), seqs, paged.as_ref())?;
        }
        for s in seqs.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        self.final_ln.forward(&x)
    }

    /// Blocks for the step's new tokens and the gather/scatter plan every layer shares, when
    /// the caches are paged. `positions` are the new tokens' positions (the fused kernels'
    /// rotary reads them).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn paged_plan(&self, seqs: &mut [SeqStep<'_>], positions: &[u32]) -> Result<Option<PagedPlan>, ModelError> {
        let paged = seqs.iter().filter(|s| s.cache.blocks().is_some()).count();
        if paged == 0 {
            return Ok(None);
        }
        if paged != seqs.len() {
            return Err(ModelError::Internal(
                "a step mixes paged and per-sequence KV caches".into(),
            ));
        }
        let (heads, hd) = (self.local_heads, self.config.head_dim());
        let mut write = Vec::new();
        for s in seqs.iter_mut() {
            let (start, n) = (s.cache.len(), s.tokens.len());
            let blocks = s
                .cache
                .blocks_mut()
                .ok_or_else(|| ModelError::Internal("paged cache without blocks".into()))?;
            blocks.ensure(start + n)?;
            write.extend(blocks.positions(start..start + n));
        }
        #[cfg(feature = "cuda")]
        if let Some(index) = self.fused_index(seqs, positions, &write)? {
            return Ok(Some(PagedPlan {
                write: None,
                attend: PagedAttend::Fused(index),
            }));
        }
        let write = Some(scatter_index(write, heads, hd, &self.device)?);
        let history = |s: &SeqStep<'_>, len: usize| -> Result<Vec<u32>, ModelError> {
            let b = s
                .cache
                .blocks()
                .ok_or_else(|| ModelError::Internal("paged cache without blocks".into()))?;
            Ok(b.positions(0..len).collect())
        };
        let attend = if seqs.iter().all(|s| s.tokens.len() == 1) {
            let longest = seqs.iter().map(|s| s.cache.len() + 1).max().unwrap_or(1);
            let mut gather = Vec::with_capacity(seqs.len() * longest);
            let mut mask = Vec::with_capacity(seqs.len() * longest);
            for s in seqs.iter() {
                let len = s.cache.len() + 1;
                gather.extend(history(s, len)?);
                // Padding reads position 0 of the arena, hidden by the mask.
                gather.extend(std::iter::repeat_n(0u32, longest - len));
                mask.extend((0..longest).map(|j| if j < len { 0f32 } else { f32::NEG_INFINITY }));
            }
            let b = seqs.len();
            PagedAttend::Decode {
                gather: Tensor::from_vec(gather, b * longest, &self.device)?,
                mask: Tensor::from_vec(mask, (b, 1, 1, longest), &self.device)?.to_dtype(self.dtype)?,
                longest,
            }
        } else {
            let mut each = Vec::with_capacity(seqs.len());
            for s in seqs.iter() {
                let (start, n) = (s.cache.len(), s.tokens.len());
                let pos = history(s, start + n)?;
                let len = pos.len();
                let mask = if n > 1 { Some(self.causal_mask(n, start)?) } else { None };
                each.push((Tensor::from_vec(pos, len, &self.device)?, mask));
            }
            PagedAttend::Each(each)
        };
        Ok(Some(PagedPlan { write, attend }))
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        li: usize,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        seqs: &mut [SeqStep<'_>],
        paged: Option<&PagedPlan>,
    ) -> Result<Tensor, ModelError> {
        let normed = layer.ln_attn.forward(x)?;
        let attn = match paged {
            Some(plan) => self.attention_paged(layer, li, &normed, cos, sin, plan)?,
            None => self.attention(layer, li, &normed, cos, sin, seqs)?,
        };
        if self.config.use_parallel_residual {
            // x + attn(ln1(x)) + mlp(ln2(x)): both partial sums reduced in ONE all-reduce.
            let mlp = self.mlp(layer, &layer.ln_mlp.forward(x)?)?;
            let reduced = self.comm.all_reduce_sum(&(attn + mlp)?)?;
            Ok((x + reduced.broadcast_add(&layer.fused_bias)?)?)
        } else {
            let mut a = self.comm.all_reduce_sum(&attn)?;
            if let Some(b) = &layer.attn_out_bias {
                a = a.broadcast_add(b)?;
            }
            let x = (x + a)?;
            let m = self
                .comm
                .all_reduce_sum(&self.mlp(layer, &layer.ln_mlp.forward(&x)?)?)?;
            Ok((x + m.broadcast_add(&layer.mlp_down_bias)?)?)
        }
    }

    fn mlp(&self, layer: &Layer, x: &Tensor) -> Result<Tensor, ModelError> {
        let h = layer.mlp_up.forward(x)?;
        let h = match self.config.activation {
            Activation::GeluErf => h.gelu_erf()?,
            Activation::GeluTanh => h.gelu()?,
            Activation::Relu => h.relu()?,
        };
        layer.mlp_down.forward(&h)
    }

    /// Rotates the first `rotary_dims` of each head (`x`: `[heads, tokens, head_dim]`).
    fn rotary(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor, ModelError> {
        let (heads, t, hd) = x.dims3()?;
        let rot = self.config.rotary_dims;
        if rot == hd {
            return Ok(candle_nn::rotary_emb::rope(&x.unsqueeze(0)?, cos, sin)?.reshape((heads, t, hd))?);
        }
        let x_rot = x.narrow(2, 0, rot)?.contiguous()?.unsqueeze(0)?;
        let x_rot = candle_nn::rotary_emb::rope(&x_rot, cos, sin)?.reshape((heads, t, rot))?;
        Ok(Tensor::cat(&[&x_rot, &x.narrow(2, rot, hd - rot)?], 2)?)
    }

    /// This rank's queries, keys (both rotated) and values, each `[heads, tokens, head_dim]`
    /// and contiguous.
    fn project_qkv(
        &self,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor), ModelError> {
        let t = x.dim(0)?;
        let (heads, hd) = (self.local_heads, self.config.head_dim());
        let qkv = layer.qkv.forward(x)?.reshape((t, heads, 3, hd))?;
        let part = |i: usize| -> Result<Tensor, ModelError> {
            Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(0, 1)?.contiguous()?)
        };
        let q = self.rotary(&part(0)?, cos, sin)?.contiguous()?;
        let k = self.rotary(&part(1)?, cos, sin)?.contiguous()?;
        Ok((q, k, part(2)?))
    }

    fn attention(
        &self,
        layer: &Layer,
        li: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seqs: &mut [SeqStep<'_>],
    ) -> Result<Tensor, ModelError> {
        let t = x.dim(0)?;
        let (heads, hd) = (self.local_heads, self.config.head_dim());
        let (q, k, v) = self.project_qkv(layer, x, cos, sin)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let on_cpu_f32 = q.device().is_cpu() && q.dtype() == DType::F32;
        if on_cpu_f32 && seqs.iter().all(|s| s.tokens.len() == 1) {
            // A pure decode step (the steady state of a busy server): every cache is appended
            // to, then one parallel pass attends all sequences.
            let mut kv = Vec::with_capacity(seqs.len());
            for (i, s) in seqs.iter_mut().enumerate() {
                let ks = k.narrow(1, i, 1)?.contiguous()?;
                let vs = v.narrow(1, i, 1)?.contiguous()?;
                kv.push(s.cache.append(li, &ks, &vs)?);
            }
            return layer.attn_out.forward(&attend_decode_step(&q, &kv, scale)?);
        }
        let mut outs = Vec::with_capacity(seqs.len());
        let mut offset = 0;
        for s in seqs.iter_mut() {
            let n = s.tokens.len();
            let start = s.cache.len();
            let qs = q.narrow(1, offset, n)?;
            let ks = k.narrow(1, offset, n)?.contiguous()?;
            let vs = v.narrow(1, offset, n)?.contiguous()?;
            let (kc, vc) = s.cache.append(li, &ks, &vs)?;
            offset += n;
            if n == 1 && on_cpu_f32 {
                // A decode token among prefill chunks: the fused kernel, for one sequence.
                let o = attend_decode_step(&qs, &[(kc, vc)], scale)?;
                outs.push(o.reshape((heads, 1, hd))?);
                continue;
            }
            let mut scores = (qs.matmul(&kc.t()?)? * scale)?;
            if n > 1 {
                scores = scores.broadcast_add(&self.causal_mask(n, start)?)?;
            }
            let probs = softmax_f32(&scores)?;
            outs.push(probs.matmul(&vc)?);
        }
        let o = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 1)?
        };
        let o = o.transpose(0, 1)?.reshape((t, heads * hd))?;
        layer.attn_out.forward(&o)
    }

    /// Attention against a paged pool: the step's keys and values are written with one scatter
    /// each, then read back per the step's plan.
    fn attention_paged(
        &self,
        layer: &Layer,
        li: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        plan: &PagedPlan,
    ) -> Result<Tensor, ModelError> {
        let t = x.dim(0)?;
        let (heads, hd) = (self.local_heads, self.config.head_dim());
        let (q, k, v) = self.project_qkv(layer, x, cos, sin)?;
        let pool = self
            .kv_pool
            .as_ref()
            .ok_or_else(|| ModelError::Internal("paged step without a pool".into()))?;
        let (ka, va) = pool.layer(li)?;
        let write = plan
            .write
            .as_ref()
            .ok_or_else(|| ModelError::Internal("a paged step without arena places".into()))?;
        ka.scatter_set(write, &k, 1)?;
        va.scatter_set(write, &v, 1)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let o = match &plan.attend {
            PagedAttend::Decode { gather, mask, longest } => {
                let b = t;
                // [heads, b · longest, hd] -> [b, heads, longest, hd]
                let hist = |arena: &Tensor| -> Result<Tensor, ModelError> {
                    Ok(arena
                        .index_select(gather, 1)?
                        .reshape((heads, b, *longest, hd))?
                        .transpose(0, 1)?
                        .contiguous()?)
                };
                let (kh, vh) = (hist(ka)?, hist(va)?);
                let qb = q.transpose(0, 1)?.unsqueeze(2)?.contiguous()?; // [b, heads, 1, hd]
                let scores = (qb.matmul(&kh.transpose(2, 3)?)? * scale)?.broadcast_add(mask)?;
                softmax_f32(&scores)?.matmul(&vh)?.reshape((b, heads * hd))?
            }
            PagedAttend::Each(each) => {
                let mut outs = Vec::with_capacity(each.len());
                let mut offset = 0;
                for (pos, mask) in each {
                    let n = mask.as_ref().map(|m| m.dim(0)).transpose()?.unwrap_or(1);
                    let qs = q.narrow(1, offset, n)?;
                    offset += n;
                    let kc = ka.index_select(pos, 1)?;
                    let vc = va.index_select(pos, 1)?;
                    let mut scores = (qs.matmul(&kc.t()?)? * scale)?;
                    if let Some(m) = mask {
                        scores = scores.broadcast_add(m)?;
                    }
                    outs.push(softmax_f32(&scores)?.matmul(&vc)?);
                }
                let o = if outs.len() == 1 {
                    outs.remove(0)
                } else {
                    Tensor::cat(&outs, 1)?
                };
                o.transpose(0, 1)?.reshape((t, heads * hd))?
            }
            #[cfg(feature = "cuda")]
            PagedAttend::Fused(_) => {
                return Err(ModelError::Internal(
                    "a fused step reached the unfused attention".into(),
                ));
            }
        };
        layer.attn_out.forward(&o)
    }

    /// The fused kernels' index of a paged step, when they can take it: every sequence feeds
    /// at most [`FUSED_MAX_NEW`] tokens and the longest fits the attention kernel. `write`
    /// holds the arena places of the step's tokens, blocks already ensured.
    #[cfg(feature = "cuda")]
    fn fused_index(
        &self,
        seqs: &[SeqStep<'_>],
        positions: &[u32],
        write: &[u32],
    ) -> Result<Option<super::fused::PagedIndex>, ModelError> {
        let max_len = seqs.iter().map(|s| s.cache.len() + s.tokens.len()).max().unwrap_or(0);
        let fits = self.fused
            && seqs.iter().all(|s| s.tokens.len() <= FUSED_MAX_NEW)
            && super::fused::attention_fits(self.config.head_dim(), max_len);
        let Some(pool) = self.kv_pool.as_ref().filter(|_| fits) else {
            return Ok(None);
        };
        let block_size = pool.block_size();
        let max_blocks = max_len.div_ceil(block_size).max(1);
        let t = write.len();
        // One buffer (one host-to-device copy): positions, arena places, sequence and visible
        // length of each token, then each sequence's block table.
        let mut buf = Vec::with_capacity(4 * t + seqs.len() * max_blocks);
        buf.extend_from_slice(positions);
        buf.extend_from_slice(write);
        for (i, s) in seqs.iter().enumerate() {
            buf.extend(std::iter::repeat_n(i as u32, s.tokens.len()));
        }
        for s in seqs {
            buf.extend((1..=s.tokens.len()).map(|j| (s.cache.len() + j) as u32));
        }
        for s in seqs {
            let blocks = s
                .cache
                .blocks()
                .ok_or_else(|| ModelError::Internal("paged cache without blocks".into()))?
                .ids();
            buf.extend_from_slice(&blocks[..blocks.len().min(max_blocks)]);
            buf.extend(std::iter::repeat_n(0u32, max_blocks.saturating_sub(blocks.len())));
        }
        let len = buf.len();
        let all = Tensor::from_vec(buf, len, &self.device)?;
        let part = |i: usize| all.narrow(0, i * t, t);
        Ok(Some(super::fused::PagedIndex {
            pos: part(0)?,
            slot: part(1)?,
            seq_of: part(2)?,
            len_of: part(3)?,
            blocks: all
                .narrow(0, 4 * t, seqs.len() * max_blocks)?
                .reshape((seqs.len(), max_blocks))?,
            max_len,
            block_size,
        }))
    }

    /// Every layer of a paged step through the fused kernels: per layer two layer norms and
    /// the residual in one kernel, the four matmuls, and one kernel each for rotary + KV
    /// write, attention and the MLP activation. Returns the final layer norm's output.
    #[cfg(feature = "cuda")]
    fn forward_fused(&self, x: Tensor, index: &super::fused::PagedIndex) -> Result<Tensor, ModelError> {
        use super::fused::{self, ResidualAdd, Rotary};
        let pool = self
            .kv_pool
            .as_ref()
            .ok_or_else(|| ModelError::Internal("a fused step without a KV pool".into()))?;
        let rotary = Rotary {
            cos: &self.cos,
            sin: &self.sin,
            dims: self.config.rotary_dims,
        };
        let scale = 1.0 / (self.config.head_dim() as f32).sqrt();
        fn norm(l: &LayerNorm) -> super::fused::Norm<'_> {
            (&l.weight, &l.bias)
        }
        let Some(first) = self.layers.first() else {
            return self.final_ln.forward(&x);
        };
        let (mut x, mut n1, mut n2) = fused::add_layernorm(
            &x,
            None,
            norm(&first.ln_attn),
            Some(norm(&first.ln_mlp)),
            first.ln_attn.eps,
        )?;
        for (li, layer) in self.layers.iter().enumerate() {
            let (ka, va) = pool.layer(li)?;
            let qkv = layer.qkv.forward_without_bias(&n1)?;
            let q = fused::rope_write_kv(&qkv, layer.qkv.bias(), &rotary, index, (ka, va))?;
            let attn = layer
                .attn_out
                .forward(&fused::paged_attention(&q, (ka, va), index, scale)?)?;
            let normed_mlp = n2
                .take()
                .ok_or_else(|| ModelError::Internal("a layer without its MLP layer norm".into()))?;
            let up = layer.mlp_up.forward_act(&normed_mlp, self.config.activation)?;
            let mlp = layer.mlp_down.forward(&up)?;
            let (next1, next2, eps) = match self.layers.get(li + 1) {
                Some(next) => (norm(&next.ln_attn), Some(norm(&next.ln_mlp)), next.ln_attn.eps),
                None => (norm(&self.final_ln), None, self.final_ln.eps),
            };
            // One rank adds both branches itself; a group reduces their sum first.
            let reduced;
            let add = if self.rank.world_size == 1 {
                ResidualAdd {
                    a: &attn,
                    m: Some(&mlp),
                    bias: Some(&layer.fused_bias),
                }
            } else {
                reduced = self.comm.all_reduce_sum(&(attn + mlp)?)?;
                ResidualAdd {
                    a: &reduced,
                    m: None,
                    bias: Some(&layer.fused_bias),
                }
            };
            (x, n1, n2) = fused::add_layernorm(&x, Some(add), next1, next2, eps)?;
        }
        Ok(n1)
    }

    /// `[n, start + n]` additive mask: new token i (position start + i) sees positions ≤ its own.
    fn causal_mask(&self, n: usize, start: usize) -> Result<Tensor, ModelError> {
        let total = start + n;
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..total).map(move |j| if j <= start + i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        Ok(Tensor::from_vec(mask, (n, total), &self.device)?.to_dtype(self.dtype)?)
    }
}

/// Softmax over the last dim, computed in f32 whatever the compute dtype.
fn softmax_f32(x: &Tensor) -> Result<Tensor, ModelError> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        return Ok(candle_nn::ops::softmax_last_dim(x)?);
    }
    Ok(candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?)
}
