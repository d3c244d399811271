//! CPU kernels of the worker's hot loop: matmuls against packed weights ([`PackedMatrix`])
//! and a decode token's attention ([`attend_one`]). candle's generic ops allocate and dispatch
//! per call and its GEMM packs the weights on every call, which dominates decode steps of a few
//! rows; these run straight over the worker's buffers. Kept in their own crate so they are
//! always compiled with optimisations (see the workspace's dev profile).

mod packed;

pub use packed::{PackedMatrix, PANEL};

/// Strided view of a `[heads, len, head_dim]` tensor with unit stride on the last axis.
#[derive(Debug, Clone, Copy)]
pub struct HeadsView<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub head_stride: usize,
    pub row_stride: usize,
}

impl HeadsView<'_> {
    fn row(&self, h: usize, j: usize, hd: usize) -> &[f32] {
        let at = self.offset + h * self.head_stride + j * self.row_stride;
        &self.data[at..at + hd]
    }
}

/// Sizes of one decode-attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttendShape {
    pub heads: usize,
    /// Cached positions (the new token's included).
    pub len: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Attention of one new token against `len` cached positions, per head:
/// `out[h] = softmax(scale · q[h] · K[h]ᵀ) · V[h]` (no mask is needed: every cached position
/// precedes the token). `q` is read at row 0 of each head; `out` is `[heads, head_dim]`;
/// softmax is computed in f32 with the maximum subtracted, as torch does.
///
/// # Panics
/// If a view is shorter than its shape says.
pub fn attend_one(q: HeadsView<'_>, k: HeadsView<'_>, v: HeadsView<'_>, shape: AttendShape, out: &mut [f32]) {
    let AttendShape {
        heads,
        len,
        head_dim: hd,
        scale,
    } = shape;
    let dot = dot_fn();
    let mut scores = vec![0f32; len];
    for h in 0..heads {
        let qh = q.row(h, 0, hd);
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate() {
            *s = dot(qh, k.row(h, j, hd)) * scale;
            max = max.max(*s);
        }
        let mut z = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            z += *s;
        }
        let o = &mut out[h * hd..(h + 1) * hd];
        o.iter_mut().for_each(|x| *x = 0.0);
        for (j, &p) in scores.iter().enumerate() {
            let w = p / z;
            for (x, &vv) in o.iter_mut().zip(v.row(h, j, hd)) {
                *x += w * vv;
            }
        }
    }
}

/// One sequence of a batched decode step: its new token's query and its cache.
#[derive(Debug, Clone, Copy)]
pub struct DecodeSeq<'a> {
    pub q: HeadsView<'a>,
    pub k: HeadsView<'a>,
    pub v: HeadsView<'a>,
    /// Cached positions (the new token's included).
    pub len: usize,
}

/// [`attend_one`] for every sequence of a decode step, in parallel over sequences: row `b`
/// of `out` (`[seqs, heads · head_dim]`) is sequence `b`'s attention output.
///
/// # Panics
/// If `out` or a view is shorter than its shape says.
pub fn attend_batch(seqs: &[DecodeSeq<'_>], heads: usize, head_dim: usize, scale: f32, out: &mut [f32]) {
    let width = heads * head_dim;
    assert!(out.len() >= seqs.len() * width, "attend_batch: output too short");
    if width == 0 {
        return;
    }
    use rayon::prelude::*;
    out.par_chunks_mut(width).zip(seqs).for_each(|(o, s)| {
        let shape = AttendShape {
            heads,
            len: s.len,
            head_dim,
            scale,
        };
        attend_one(s.q, s.k, s.v, shape, o);
    });
}

type DotFn = fn(&[f32], &[f32]) -> f32;

fn dot_fn() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return |a, b| {
                // SAFETY: the CPU supports AVX2 and FMA (checked above).
                unsafe { x86::dot_avx2(a, b) }
            };
        }
    }
    dot_scalar
}

fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums let the compiler vectorise and pipeline.
    let mut acc = [0f32; 8];
    let (ca, ra) = a.split_at(a.len() / 8 * 8);
    let (cb, rb) = b.split_at(ca.len());
    for (x, y) in ca.chunks_exact(8).zip(cb.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (u, a_u) in acc.iter_mut().enumerate() {
                let off = i + 8 * u;
                *a_u = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(off)), _mm256_loadu_ps(pb.add(off)), *a_u);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let hi = _mm256_extractf128_ps(s, 1);
        let lo = _mm256_castps256_ps128(s);
        let q = _mm_add_ps(hi, lo);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        let mut sum = _mm_cvtss_f32(q);
        while i < n {
            sum += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attend_one_matches_a_plain_softmax() {
        let (heads, len, hd, cap) = (3, 5, 8, 7);
        let q: Vec<f32> = (0..heads * hd).map(|i| ((i * 13 % 7) as f32 - 3.0) / 4.0).collect();
        // K/V buffers with spare capacity (strided like a narrowed cache).
        let kbuf: Vec<f32> = (0..heads * cap * hd)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let vbuf: Vec<f32> = (0..heads * cap * hd)
            .map(|i| ((i * 3 % 13) as f32 - 6.0) / 6.0)
            .collect();
        let view = |d: &'static [f32]| HeadsView {
            data: d,
            offset: 0,
            head_stride: cap * hd,
            row_stride: hd,
        };
        let (kb, vb): (&'static [f32], &'static [f32]) = (kbuf.leak(), vbuf.leak());
        let mut out = vec![0f32; heads * hd];
        let qv = HeadsView {
            data: &q,
            offset: 0,
            head_stride: hd,
            row_stride: hd,
        };
        attend_one(
            qv,
            view(kb),
            view(vb),
            AttendShape {
                heads,
                len,
                head_dim: hd,
                scale: 0.5,
            },
            &mut out,
        );
        for h in 0..heads {
            let s: Vec<f64> = (0..len)
                .map(|j| {
                    (0..hd)
                        .map(|d| q[h * hd + d] as f64 * kb[h * cap * hd + j * hd + d] as f64)
                        .sum::<f64>()
                        * 0.5
                })
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for d in 0..hd {
                let want: f64 = (0..len)
                    .map(|j| (s[j] - m).exp() / z * vb[h * cap * hd + j * hd + d] as f64)
                    .sum();
                assert!((out[h * hd + d] as f64 - want).abs() < 1e-5, "h {h} d {d}");
            }
        }
    }

    #[test]
    fn attend_batch_equals_attend_one_per_sequence() {
        let (heads, hd, cap) = (2, 4, 6);
        let lens = [1usize, 3, 6];
        let b = lens.len();
        // q head-major [heads, b, hd], as the model's query projection is laid out.
        let q: Vec<f32> = (0..heads * b * hd).map(|i| ((i * 7 % 9) as f32 - 4.0) / 3.0).collect();
        let caches: Vec<(Vec<f32>, Vec<f32>)> = (0..b)
            .map(|s| {
                let k = (0..heads * cap * hd)
                    .map(|i| (((i + s) * 5 % 11) as f32 - 5.0) / 4.0)
                    .collect();
                let v = (0..heads * cap * hd)
                    .map(|i| (((i + 2 * s) * 3 % 7) as f32 - 3.0) / 2.0)
                    .collect();
                (k, v)
            })
            .collect();
        fn kv_view(d: &[f32], cap: usize, hd: usize) -> HeadsView<'_> {
            HeadsView {
                data: d,
                offset: 0,
                head_stride: cap * hd,
                row_stride: hd,
            }
        }
        let seqs: Vec<DecodeSeq<'_>> = caches
            .iter()
            .enumerate()
            .map(|(s, (k, v))| DecodeSeq {
                q: HeadsView {
                    data: &q,
                    offset: s * hd,
                    head_stride: b * hd,
                    row_stride: hd,
                },
                k: kv_view(k, cap, hd),
                v: kv_view(v, cap, hd),
                len: lens[s],
            })
            .collect();
        let mut out = vec![f32::NAN; b * heads * hd];
        attend_batch(&seqs, heads, hd, 0.5, &mut out);
        for (s, seq) in seqs.iter().enumerate() {
            let mut one = vec![0f32; heads * hd];
            let shape = AttendShape {
                heads,
                len: lens[s],
                head_dim: hd,
                scale: 0.5,
            };
            attend_one(seq.q, seq.k, seq.v, shape, &mut one);
            assert_eq!(&out[s * heads * hd..(s + 1) * heads * hd], &one[..], "sequence {s}");
        }
    }
}
