//! One fused CPU op for a decode token's attention (`softmax(q·Kᵀ·scale)·V` per head),
//! reading the cache views in place. It replaces ~8 candle ops per sequence and layer, which
//! dominate a batched decode step's overhead once the matmuls are fast.

use candle_core::{CpuStorage, DType, Layout, Shape, Storage, Tensor};

use super::ModelError;

/// Attention output `[heads, 1, head_dim]` for `q` `[heads, 1, head_dim]` against cache views
/// `k`, `v` `[heads, len, head_dim]`; `None` where the fused op does not apply (not CPU f32).
pub(super) fn attend_one_token(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>, ModelError> {
    let applies = q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if !applies {
        return Ok(None);
    }
    Ok(Some(q.contiguous()?.apply_op3_no_bwd(
        k,
        v,
        &DecodeAttention { scale: scale as f32 },
    )?))
}

struct DecodeAttention {
    scale: f32,
}

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

impl candle_core::CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (s1, s2, s3) else {
            candle_core::bail!("decode attention needs f32 inputs");
        };
        let (&[heads, 1, hd], &[kh, len, khd], &[vh, vlen, vhd]) = (l1.dims(), l2.dims(), l3.dims()) else {
            candle_core::bail!(
                "decode attention: shapes {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        };
        if (kh, khd, vh, vlen, vhd) != (heads, hd, heads, len, hd) {
            candle_core::bail!(
                "decode attention: q {:?} does not fit k {:?} / v {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let Some((q0, q1)) = l1.contiguous_offsets() else {
            candle_core::bail!("decode attention needs a contiguous query");
        };
        let mut out = vec![0f32; heads * hd];
        let shape = neox_kernels::AttendShape {
            heads,
            len,
            head_dim: hd,
            scale: self.scale,
        };
        let q = neox_kernels::HeadsView {
            data: &q[q0..q1],
            offset: 0,
            head_stride: hd,
            row_stride: hd,
        };
        neox_kernels::attend_one(q, view(k, l2)?, view(v, l3)?, shape, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((heads, 1, hd))))
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
