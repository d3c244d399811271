//! Small-batch `x · Wᵀ` for decode steps on CPU.
//!
//! At decode time a step multiplies a handful of activation rows by every weight matrix, so it
//! is bound by streaming the weights from memory. General GEMM libraries pack the weight
//! matrix first, which doubles that traffic; here each weight row is read from memory once
//! and dotted with every activation row while it sits in cache. Several rows are computed as
//! register tiles (4 activation rows × 4 weight rows with AVX-512, × 2 with AVX2) so that
//! every load feeds several FMAs. Kept in its own crate so it is always compiled with
//! optimisations (see the workspace's dev profile).

use rayon::prelude::*;

/// Output columns per parallel task: large enough to amortise scheduling, small enough to
/// balance 2–64 threads on the smallest matrices.
const COLS_PER_TASK: usize = 64;

/// `out[i][j] = Σₖ x[i][k] · w[j][k]` for `x`: `[m, k]`, `w`: `[n, k]`, `out`: `[m, n]`,
/// all row-major and contiguous.
///
/// # Panics
/// If a slice is shorter than its shape says.
pub fn matmul_xwt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert!(
        x.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
        "matmul_xwt: slice shorter than its shape"
    );
    if m == 0 || n == 0 {
        return;
    }
    let dot = dot_fn();
    if m == 1 {
        out[..n]
            .par_chunks_mut(COLS_PER_TASK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let j0 = c * COLS_PER_TASK;
                for (dj, o) in chunk.iter_mut().enumerate() {
                    let j = j0 + dj;
                    *o = dot(&x[..k], &w[j * k..(j + 1) * k]);
                }
            });
        return;
    }
    // Each task owns a block of output columns in every row and writes them in place.
    let dst = SharedOut(out.as_mut_ptr());
    let tile = tile_fn();
    (0..n.div_ceil(COLS_PER_TASK)).into_par_iter().for_each(|c| {
        let j0 = c * COLS_PER_TASK;
        let cols = COLS_PER_TASK.min(n - j0);
        // Register tiles of up to 4 activation rows × `tile.cols` weight rows: every load
        // feeds several FMAs, so the loop is bound by arithmetic, not loads.
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(4);
            let mut dj = 0;
            while dj < cols {
                let wcols = (cols - dj).min(tile.cols);
                let j = j0 + dj;
                // Missing columns of a tail tile repeat the last one; their results are dropped.
                let ws: [&[f32]; 4] = std::array::from_fn(|q| {
                    let jj = j + q.min(wcols - 1);
                    &w[jj * k..(jj + 1) * k]
                });
                let mut acc = [[0f32; 4]; 4];
                (tile.f)(&x[i * k..(i + rows) * k], rows, k, ws, &mut acc);
                for (r, a) in acc.iter().enumerate().take(rows) {
                    for (q, v) in a.iter().enumerate().take(wcols) {
                        // SAFETY: (i + r) < m and j + q < j0 + cols ≤ n, so the index is inside
                        // `out` (checked above to hold m × n); column blocks are disjoint
                        // between tasks, so no two tasks write the same element.
                        unsafe { *dst.get().add((i + r) * n + j + q) = *v };
                    }
                }
                dj += wcols;
            }
            i += rows;
        }
    });
}

/// The output buffer shared by tasks that write disjoint column blocks of it.
struct SharedOut(*mut f32);

// SAFETY: tasks only write disjoint elements (see `matmul_xwt`), and the buffer outlives them.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// `acc[r][q] = x[r] · w[q]` for `rows` ≤ 4 activation rows (`x`: `[rows, k]`) and up to
/// `Tile::cols` weight rows.
type TileFn = fn(&[f32], usize, usize, [&[f32]; 4], &mut [[f32; 4]; 4]);

struct Tile {
    f: TileFn,
    /// Weight rows one call handles.
    cols: usize,
}

fn tile_fn() -> Tile {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // 32 vector registers: 4 × 4 accumulators, 16 lanes each.
            return Tile {
                f: |x, rows, k, ws, acc| {
                    // SAFETY: AVX-512F is present (checked above); slices are sized by the caller.
                    unsafe { x86::tile_avx512(x, rows, k, ws, acc) }
                },
                cols: 4,
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Tile {
                f: |x, rows, k, ws, acc| {
                    // SAFETY: the CPU supports AVX2 and FMA (checked above); slices are sized by
                    // the caller (`x` holds rows × k, each w holds k).
                    unsafe { x86::tile_avx2(x, rows, k, ws[0], ws[1], acc) }
                },
                cols: 2,
            };
        }
    }
    Tile {
        f: tile_scalar,
        cols: 4,
    }
}

fn tile_scalar(x: &[f32], rows: usize, k: usize, ws: [&[f32]; 4], acc: &mut [[f32; 4]; 4]) {
    for r in 0..rows {
        let xr = &x[r * k..(r + 1) * k];
        acc[r] = ws.map(|w| dot_scalar(xr, w));
    }
}

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
/// precedes the token). `q` and `out` are `[heads, head_dim]`; softmax is computed in f32 with
/// the maximum subtracted, as torch does.
///
/// # Panics
/// If a view is shorter than its shape says.
pub fn attend_one(q: &[f32], k: HeadsView<'_>, v: HeadsView<'_>, shape: AttendShape, out: &mut [f32]) {
    let AttendShape {
        heads,
        len,
        head_dim: hd,
        scale,
    } = shape;
    let dot = dot_fn();
    let mut scores = vec![0f32; len];
    for h in 0..heads {
        let qh = &q[h * hd..(h + 1) * hd];
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
    unsafe fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2(x: &[f32], rows: usize, k: usize, w0: &[f32], w1: &[f32], acc: &mut [[f32; 4]; 4]) {
        // A constant row count lets the compiler keep all accumulators in registers.
        match rows {
            1 => tile_n::<1>(x, k, w0, w1, acc),
            2 => tile_n::<2>(x, k, w0, w1, acc),
            3 => tile_n::<3>(x, k, w0, w1, acc),
            _ => tile_n::<4>(x, k, w0, w1, acc),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_n<const R: usize>(x: &[f32], k: usize, w0: &[f32], w1: &[f32], acc: &mut [[f32; 4]; 4]) {
        let rows = R;
        let mut a = [[_mm256_setzero_ps(); 2]; R];
        let (p0, p1, px) = (w0.as_ptr(), w1.as_ptr(), x.as_ptr());
        let mut kk = 0;
        while kk + 8 <= k {
            let v0 = _mm256_loadu_ps(p0.add(kk));
            let v1 = _mm256_loadu_ps(p1.add(kk));
            for (r, ar) in a.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(px.add(r * k + kk));
                ar[0] = _mm256_fmadd_ps(xv, v0, ar[0]);
                ar[1] = _mm256_fmadd_ps(xv, v1, ar[1]);
            }
            kk += 8;
        }
        for r in 0..rows {
            let mut s = [hsum(a[r][0]), hsum(a[r][1])];
            for t in kk..k {
                let xv = *px.add(r * k + t);
                s[0] += xv * *p0.add(t);
                s[1] += xv * *p1.add(t);
            }
            acc[r][..2].copy_from_slice(&s);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512(x: &[f32], rows: usize, k: usize, ws: [&[f32]; 4], acc: &mut [[f32; 4]; 4]) {
        match rows {
            1 => tile512::<1>(x, k, ws, acc),
            2 => tile512::<2>(x, k, ws, acc),
            3 => tile512::<3>(x, k, ws, acc),
            _ => tile512::<4>(x, k, ws, acc),
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn tile512<const R: usize>(x: &[f32], k: usize, ws: [&[f32]; 4], acc: &mut [[f32; 4]; 4]) {
        let mut a = [[_mm512_setzero_ps(); 4]; R];
        let p = ws.map(|w| w.as_ptr());
        let px = x.as_ptr();
        let mut kk = 0;
        while kk + 16 <= k {
            let v = p.map(|q| _mm512_loadu_ps(q.add(kk)));
            for (r, ar) in a.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(px.add(r * k + kk));
                for q in 0..4 {
                    ar[q] = _mm512_fmadd_ps(xv, v[q], ar[q]);
                }
            }
            kk += 16;
        }
        for r in 0..R {
            for q in 0..4 {
                let mut s = _mm512_reduce_add_ps(a[r][q]);
                for t in kk..k {
                    s += *px.add(r * k + t) * *p[q].add(t);
                }
                acc[r][q] = s;
            }
        }
    }

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

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

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
        attend_one(
            &q,
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
    fn matches_reference_on_ragged_shapes() {
        for &(m, k, n) in &[(1, 1, 1), (1, 37, 130), (3, 64, 65), (8, 768, 200), (5, 33, 1)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 11 % 13) as f32 - 6.0) / 6.0).collect();
            let mut out = vec![0f32; m * n];
            matmul_xwt(&x, m, k, &w, n, &mut out);
            let want = reference(&x, m, k, &w, n);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{m}x{k}x{n}: {a} vs {b}");
            }
            assert_eq!(dot_scalar(&x[..k], &w[..k]), dot_scalar(&x[..k], &w[..k]));
        }
    }
}
