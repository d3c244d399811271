//! One fused CPU op for a decode token's attention (`softmax(q·Kᵀ·scale)·V` per head),
//! reading the cache views in place. It replaces ~8 candle ops per sequence and layer, which
//! dominate a batched decode step's overhead once the matmuls are fast.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

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
        neox_kernels::attend_one(&q[q0..q1], view(k, l2)?, view(v, l3)?, shape, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((heads, 1, hd))))
    }
}
