//! Fused CPU attention for decode tokens (`softmax(q·Kᵀ·scale)·V` per head), reading the
//! cache views in place. It replaces ~8 candle ops per sequence and layer, which dominate a
//! batched decode step's overhead once the matmuls are fast.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

use super::ModelError;

fn view<'a>(data: &'a [f32], l: &Layout) -> candle_core::Result<neox_kernels::HeadsView<'a>> {
    match l.stride() {
        &[hs, rs, 1] => Ok(neox_kernels::HeadsView {
            data,
            offset: l.start_offset(),
            head_stride: hs,
            row_stride: rs,
        }),
        s => candle_core::bail!("decode attention needs a unit last stride, got {s:?}"),
    }
}

/// Attention outputs `[tokens, heads · head_dim]` of a step in which every sequence feeds one
/// token: `q` is `[heads, tokens, head_dim]` and `kv[b]` sequence `b`'s cache views
/// `[heads, len, head_dim]`, all CPU f32. One parallel pass over all sequences.
pub(super) fn attend_decode_step(q: &Tensor, kv: &[(Tensor, Tensor)], scale: f64) -> Result<Tensor, ModelError> {
    let q = q.contiguous()?;
    let (heads, tokens, hd) = q.dims3()?;
    if tokens != kv.len() {
        return Err(ModelError::Internal(format!(
            "{tokens} decode tokens for {} caches",
            kv.len()
        )));
    }
    let (q_storage, q_layout) = q.storage_and_layout();
    let guards: Vec<_> = kv
        .iter()
        .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
        .collect();
    let q_data = f32_data(&q_storage)?;
    let mut seqs = Vec::with_capacity(kv.len());
    for (b, ((ks, kl), (vs, vl))) in guards.iter().enumerate() {
        let len = kl.dims().get(1).copied().unwrap_or(0);
        seqs.push(neox_kernels::DecodeSeq {
            q: neox_kernels::HeadsView {
                data: q_data,
                offset: q_layout.start_offset() + b * hd,
                head_stride: tokens * hd,
                row_stride: hd,
            },
            k: view(f32_data(ks)?, kl)?,
            v: view(f32_data(vs)?, vl)?,
            len,
        });
        if kl.dims() != [heads, len, hd] || vl.dims() != [heads, len, hd] {
            return Err(ModelError::Internal(format!(
                "sequence {b}: cache {:?}/{:?} does not fit {heads} heads of {hd}",
                kl.dims(),
                vl.dims()
            )));
        }
    }
    let mut out = vec![0f32; tokens * heads * hd];
    neox_kernels::attend_batch(&seqs, heads, hd, scale as f32, &mut out);
    drop(seqs);
    drop(guards);
    drop(q_storage);
    Ok(Tensor::from_vec(out, (tokens, heads * hd), q.device())?)
}

fn f32_data(s: &Storage) -> Result<&[f32], ModelError> {
    match s {
        Storage::Cpu(CpuStorage::F32(d)) => Ok(d.as_slice()),
        _ => Err(ModelError::Internal("decode attention needs CPU f32 storage".into())),
    }
}
