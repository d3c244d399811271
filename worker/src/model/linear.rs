//! Linear layers with PyTorch's `[out, in]` weight layout.
//!
//! Decode steps (a few rows) on CPU in f32 go through `neox_kernels::matmul_xwt`, which
//! streams each weight row once; everything else uses candle's matmul.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

use super::ModelError;

/// Up to this many rows the streaming kernel beats GEMM here (decode batches and short
/// prefill chunks; measured with `cargo bench -p neox-kernels --bench matmul`).
const STREAMING_MAX_ROWS: usize = 64;

pub(super) struct Linear {
    /// `[out, in]`, contiguous.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let y = matmul_wt(x, &self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `x · wᵀ` for `x`: `[m, in]` and `w`: `[out, in]`.
pub(super) fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor, ModelError> {
    let small = x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.rank() == 2
        && x.dim(0)? <= STREAMING_MAX_ROWS;
    if small {
        return Ok(x.contiguous()?.apply_op2_no_bwd(w, &StreamingMatmul)?);
    }
    Ok(x.matmul(&w.t()?)?)
}

struct StreamingMatmul;

impl candle_core::CustomOp2 for StreamingMatmul {
    fn name(&self) -> &'static str {
        "streaming-matmul-xwt"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("streaming matmul needs f32 inputs");
        };
        let (Some((x0, x1)), Some((w0, w1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("streaming matmul needs contiguous inputs");
        };
        let (&[m, k], &[n, k2]) = (l1.dims(), l2.dims()) else {
            candle_core::bail!(
                "streaming matmul needs 2-D inputs, got {:?} and {:?}",
                l1.dims(),
                l2.dims()
            );
        };
        if k != k2 {
            candle_core::bail!("streaming matmul: inner dims {k} and {k2} differ");
        }
        let mut out = vec![0f32; m * n];
        neox_kernels::matmul_xwt(&x[x0..x1], m, k, &w[w0..w1], n, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}
