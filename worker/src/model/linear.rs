//! Linear layers with PyTorch's `[out, in]` weight layout.
//!
//! On CPU in f32 the weight is packed once at load time into `neox_kernels::PackedMatrix`
//! panels and every matmul, decode or prefill, runs there with the bias fused; on other
//! devices and dtypes it stays a candle tensor and uses candle's matmul.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use neox_kernels::PackedMatrix;

use super::ModelError;

pub(super) struct Linear {
    weight: Weight,
}

enum Weight {
    Packed {
        matrix: PackedMatrix,
        bias: Option<Vec<f32>>,
    },
    Dense {
        /// `[out, in]`, contiguous.
        weight: Tensor,
        bias: Option<Tensor>,
    },
}

impl Linear {
    /// A layer over `weight` (`[out, in]`) and an optional `bias` (`[out]`).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self, ModelError> {
        let packable = weight.device().is_cpu() && weight.dtype() == DType::F32 && weight.rank() == 2;
        if !packable {
            return Ok(Self {
                weight: Weight::Dense { weight, bias },
            });
        }
        let (n, k) = weight.dims2()?;
        // Packed straight from the tensor's buffer: no intermediate copy of the weights.
        let matrix = {
            let (storage, layout) = weight.storage_and_layout();
            let (candle_core::Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
            else {
                return Err(ModelError::Internal(
                    "a CPU f32 weight without a contiguous f32 buffer".into(),
                ));
            };
            PackedMatrix::from_rows(&data[start..end], n, k)
        };
        let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
        if let Some(b) = &bias {
            if b.len() != n {
                return Err(ModelError::Internal(format!("bias of {} for {n} outputs", b.len())));
            }
        }
        Ok(Self {
            weight: Weight::Packed { matrix, bias },
        })
    }

    /// `x · Wᵀ + b` for `x`: `[rows, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match &self.weight {
            Weight::Packed { matrix, bias } if x.dtype() == DType::F32 && x.device().is_cpu() => {
                Ok(x.contiguous()?.apply_op1_no_bwd(&PackedMatmul {
                    matrix,
                    bias: bias.as_deref(),
                })?)
            }
            Weight::Packed { .. } => Err(ModelError::Internal(format!(
                "packed f32 CPU weights got a {:?} input on {:?}",
                x.dtype(),
                x.device()
            ))),
            Weight::Dense { weight, bias } => {
                #[cfg(feature = "cuda")]
                if let Some(y) = super::fused::gemv(x, weight, bias.as_ref(), None, super::fused::gemv_max_rows())? {
                    return Ok(y);
                }
                let y = x.matmul(&weight.t()?)?;
                Ok(match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
        }
    }

    /// `x · Wᵀ` alone, for a caller that fuses the bias into its next kernel ([`Self::bias`]).
    #[cfg(feature = "cuda")]
    pub fn forward_without_bias(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let weight = self.dense()?;
        match super::fused::gemv(x, weight, None, None, super::fused::gemv_max_rows())? {
            Some(y) => Ok(y),
            None => Ok(x.matmul(&weight.t()?)?),
        }
    }

    /// `act(x · Wᵀ + b)`: in the GEMV kernel's epilogue when it takes `x`, else cuBLAS and the
    /// fused bias-and-activation kernel.
    #[cfg(feature = "cuda")]
    pub fn forward_act(&self, x: &Tensor, act: super::Activation) -> Result<Tensor, ModelError> {
        let weight = self.dense()?;
        if let Some(y) = super::fused::gemv(x, weight, self.bias(), Some(act), super::fused::gemv_max_rows())? {
            return Ok(y);
        }
        super::fused::bias_act(&x.matmul(&weight.t()?)?, self.bias(), act)
    }

    #[cfg(feature = "cuda")]
    fn dense(&self) -> Result<&Tensor, ModelError> {
        match &self.weight {
            Weight::Dense { weight, .. } => Ok(weight),
            Weight::Packed { .. } => Err(ModelError::Internal("packed CPU weights have no unfused form".into())),
        }
    }

    /// The bias of a device (unpacked) layer.
    #[cfg(feature = "cuda")]
    pub fn bias(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense { bias, .. } => bias.as_ref(),
            Weight::Packed { .. } => None,
        }
    }

    /// Bytes of weights and bias held.
    pub fn bytes(&self) -> usize {
        match &self.weight {
            Weight::Packed { matrix, bias } => matrix.bytes() + bias.as_ref().map_or(0, |b| b.len() * 4),
            Weight::Dense { weight, bias } => {
                let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
                b(weight) + bias.as_ref().map_or(0, b)
            }
        }
    }
}

struct PackedMatmul<'a> {
    matrix: &'a PackedMatrix,
    bias: Option<&'a [f32]>,
}

impl candle_core::CustomOp1 for PackedMatmul<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("packed matmul needs an f32 input");
        };
        let Some((x0, x1)) = l.contiguous_offsets() else {
            candle_core::bail!("packed matmul needs a contiguous input");
        };
        let &[m, k] = l.dims() else {
            candle_core::bail!("packed matmul needs a 2-D input, got {:?}", l.dims());
        };
        let n = self.matrix.rows();
        if k != self.matrix.cols() {
            candle_core::bail!(
                "packed matmul: input has {k} features, the weight {}",
                self.matrix.cols()
            );
        }
        let mut out = vec![0f32; m * n];
        self.matrix.matmul_t(&x[x0..x1], m, self.bias, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}
