//! `x · Wᵀ` against a weight matrix packed once at load time.
//!
//! The weight `W` (`[n, k]`, PyTorch's `[out, in]`) is stored as panels of [`PANEL`] output
//! columns, each panel `k × PANEL` contiguous. A micro-kernel broadcasts one activation value
//! and multiplies it into a whole panel row held in vector registers, so it needs no
//! horizontal reductions and every weight load feeds up to 8 FMAs (one per activation row).
//! The panels are also read strictly sequentially, so a single-row decode step streams the
//! weights at memory speed, and a 16-row step runs at arithmetic speed.

use rayon::prelude::*;

/// Output columns per panel: two AVX-512 registers, four AVX2 registers.
pub const PANEL: usize = 32;

/// Activation rows per parallel task: a task re-reads its panel (from cache) once per
/// [`MAX_TILE_ROWS`] rows of it.
const ROWS_PER_TASK: usize = 64;

/// Activation rows one micro-kernel call handles.
const MAX_TILE_ROWS: usize = 8;

/// A cache line of panel data, so that panels start 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A `[n, k]` weight matrix in panel layout; see the module docs.
pub struct PackedMatrix {
    lines: Vec<Line>,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl PackedMatrix {
    /// Packs the row-major `[n, k]` matrix `w`.
    ///
    /// # Panics
    /// If `w` is shorter than `n × k`.
    pub fn from_rows(w: &[f32], n: usize, k: usize) -> Self {
        assert!(
            w.len() >= n * k,
            "PackedMatrix: {} values for a {n}×{k} matrix",
            w.len()
        );
        let panels = n.div_ceil(PANEL);
        let panel_lines = k * PANEL / 16;
        let mut lines = vec![Line([0.0; 16]); panels * panel_lines];
        lines
            .par_chunks_mut(panel_lines.max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                let flat = lines_as_floats_mut(panel);
                let j0 = p * PANEL;
                for c in 0..PANEL.min(n - j0) {
                    let row = &w[(j0 + c) * k..(j0 + c + 1) * k];
                    for (kk, &v) in row.iter().enumerate() {
                        flat[kk * PANEL + c] = v;
                    }
                }
            });
        Self { lines, n, k }
    }

    /// Output features (`n`).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features (`k`).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held, padding included.
    pub fn bytes(&self) -> usize {
        self.lines.len() * std::mem::size_of::<Line>()
    }

    /// The original row-major `[n, k]` matrix.
    pub fn to_rows(&self) -> Vec<f32> {
        let flat = lines_as_floats(&self.lines);
        let mut w = vec![0f32; self.n * self.k];
        for (j, row) in w.chunks_exact_mut(self.k.max(1)).enumerate().take(self.n) {
            let panel = &flat[(j / PANEL) * self.k * PANEL..];
            for (kk, v) in row.iter_mut().enumerate() {
                *v = panel[kk * PANEL + j % PANEL];
            }
        }
        w
    }

    /// `out[i][j] = bias[j] + Σₖ x[i][k] · W[j][k]` for `x`: `[m, k]` and `out`: `[m, n]`,
    /// row-major and contiguous.
    ///
    /// # Panics
    /// If a slice is shorter than its shape says.
    pub fn matmul_t(&self, x: &[f32], m: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert!(
            x.len() >= m * k && out.len() >= m * n && bias.is_none_or(|b| b.len() >= n),
            "PackedMatrix::matmul_t: slice shorter than its shape"
        );
        if m == 0 || n == 0 {
            return;
        }
        let panels = n.div_ceil(PANEL);
        let row_blocks = m.div_ceil(ROWS_PER_TASK);
        let micro = micro_kernel();
        let dst = SharedOut(out.as_mut_ptr());
        let flat = lines_as_floats(&self.lines);
        // Tasks are (row block, panel) pairs; each writes its own columns of its own rows.
        (0..row_blocks * panels).into_par_iter().for_each(|t| {
            let (rb, p) = (t / panels, t % panels);
            let panel = &flat[p * k * PANEL..(p + 1) * k * PANEL];
            let j0 = p * PANEL;
            let cols = PANEL.min(n - j0);
            let row_end = ((rb + 1) * ROWS_PER_TASK).min(m);
            let mut i = rb * ROWS_PER_TASK;
            while i < row_end {
                let rows = (row_end - i).min(MAX_TILE_ROWS);
                let mut tile = [[0f32; PANEL]; MAX_TILE_ROWS];
                micro(&x[i * k..(i + rows) * k], rows, k, panel, &mut tile);
                for (r, acc) in tile.iter().enumerate().take(rows) {
                    for (c, v) in acc.iter().enumerate().take(cols) {
                        let b = bias.map_or(0.0, |b| b[j0 + c]);
                        // SAFETY: i + r < m and j0 + c < n, inside `out` (checked above to hold
                        // m × n); tasks own disjoint (rows, columns) blocks.
                        unsafe { *dst.get().add((i + r) * n + j0 + c) = v + b };
                    }
                }
                i += rows;
            }
        });
    }
}

fn lines_as_floats(lines: &[Line]) -> &[f32] {
    // SAFETY: `Line` is `repr(C)` over `[f32; 16]` with no padding (64 bytes, align 64).
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast::<f32>(), lines.len() * 16) }
}

fn lines_as_floats_mut(lines: &mut [Line]) -> &mut [f32] {
    // SAFETY: as in `lines_as_floats`; the borrow is exclusive.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<f32>(), lines.len() * 16) }
}

/// The output buffer shared by tasks that write disjoint blocks of it.
struct SharedOut(*mut f32);

// SAFETY: tasks only write disjoint elements (see `matmul_t`), and the buffer outlives them.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// `tile[r][c] = Σₖ x[r][k] · panel[k][c]` for `rows` ≤ [`MAX_TILE_ROWS`] rows of `x`
/// (`[rows, k]`, row-major) and one panel (`[k, PANEL]`).
type MicroKernel = fn(&[f32], usize, usize, &[f32], &mut [[f32; PANEL]; MAX_TILE_ROWS]);

fn micro_kernel() -> MicroKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |x, rows, k, panel, tile| {
                // SAFETY: AVX-512F is present (checked above); the caller sizes the slices.
                unsafe { x86::micro_avx512(x, rows, k, panel, tile) }
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return |x, rows, k, panel, tile| {
                // SAFETY: AVX2 and FMA are present (checked above); the caller sizes the slices.
                unsafe { x86::micro_avx2(x, rows, k, panel, tile) }
            };
        }
    }
    micro_scalar
}

fn micro_scalar(x: &[f32], rows: usize, k: usize, panel: &[f32], tile: &mut [[f32; PANEL]; MAX_TILE_ROWS]) {
    for (r, acc) in tile.iter_mut().enumerate().take(rows) {
        *acc = [0.0; PANEL];
        for (kk, &xv) in x[r * k..(r + 1) * k].iter().enumerate() {
            for (a, &w) in acc.iter_mut().zip(&panel[kk * PANEL..(kk + 1) * PANEL]) {
                *a += xv * w;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MAX_TILE_ROWS, PANEL};

    type Tile = [[f32; PANEL]; MAX_TILE_ROWS];

    #[target_feature(enable = "avx512f")]
    pub unsafe fn micro_avx512(x: &[f32], rows: usize, k: usize, panel: &[f32], tile: &mut Tile) {
        // A constant row count keeps every accumulator in a register.
        match rows {
            0 => {}
            1 => m512::<1>(x, k, panel, tile),
            2 => m512::<2>(x, k, panel, tile),
            3 => m512::<3>(x, k, panel, tile),
            4 => m512::<4>(x, k, panel, tile),
            5 => m512::<5>(x, k, panel, tile),
            6 => m512::<6>(x, k, panel, tile),
            7 => m512::<7>(x, k, panel, tile),
            _ => m512::<8>(x, k, panel, tile),
        }
    }

    /// `R` rows × 32 columns: 2·R accumulators, two panel loads and R broadcasts per k.
    #[target_feature(enable = "avx512f")]
    unsafe fn m512<const R: usize>(x: &[f32], k: usize, panel: &[f32], tile: &mut Tile) {
        // Checked always: the loop below reads through raw pointers.
        assert!(
            x.len() >= R * k && panel.len() >= k * PANEL,
            "micro-kernel: slice too short"
        );
        let (px, pw) = (x.as_ptr(), panel.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // The next panel, fetched into L2 while this one is computed: a step of many rows reads
        // each panel more than once and would otherwise leave memory idle on later passes.
        let next = pw.wrapping_add(k * PANEL);
        for kk in 0..k {
            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(kk * PANEL).cast());
            _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(kk * PANEL + 16).cast());
            let w0 = _mm512_load_ps(pw.add(kk * PANEL));
            let w1 = _mm512_load_ps(pw.add(kk * PANEL + 16));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*px.add(r * k + kk));
                a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
            }
        }
        for (a, t) in acc.iter().zip(tile.iter_mut()) {
            _mm512_storeu_ps(t.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(t.as_mut_ptr().add(16), a[1]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn micro_avx2(x: &[f32], rows: usize, k: usize, panel: &[f32], tile: &mut Tile) {
        // Sixteen registers: the panel is done in two halves of 16 columns, up to 6 rows each.
        let mut r0 = 0;
        while r0 < rows {
            let n = (rows - r0).min(6);
            let xr = &x[r0 * k..];
            for half in 0..2 {
                match n {
                    1 => m256::<1>(xr, k, panel, half, &mut tile[r0..]),
                    2 => m256::<2>(xr, k, panel, half, &mut tile[r0..]),
                    3 => m256::<3>(xr, k, panel, half, &mut tile[r0..]),
                    4 => m256::<4>(xr, k, panel, half, &mut tile[r0..]),
                    5 => m256::<5>(xr, k, panel, half, &mut tile[r0..]),
                    _ => m256::<6>(xr, k, panel, half, &mut tile[r0..]),
                }
            }
            r0 += n;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn m256<const R: usize>(x: &[f32], k: usize, panel: &[f32], half: usize, tile: &mut [[f32; PANEL]]) {
        // Checked always: the loop below reads through raw pointers.
        assert!(
            x.len() >= R * k && panel.len() >= k * PANEL && tile.len() >= R,
            "micro-kernel: slice too short"
        );
        let (px, pw) = (x.as_ptr(), panel.as_ptr().add(half * 16));
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for kk in 0..k {
            let w0 = _mm256_load_ps(pw.add(kk * PANEL));
            let w1 = _mm256_load_ps(pw.add(kk * PANEL + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*px.add(r * k + kk));
                a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
            }
        }
        for (a, t) in acc.iter().zip(tile.iter_mut()) {
            _mm256_storeu_ps(t.as_mut_ptr().add(half * 16), a[0]);
            _mm256_storeu_ps(t.as_mut_ptr().add(half * 16 + 8), a[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                out[i * n + j] = (dot + bias.map_or(0.0, |b| b[j] as f64)) as f32;
            }
        }
        out
    }

    fn check(m: usize, k: usize, n: usize, with_bias: bool, micro: Option<MicroKernel>) {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 11 % 13) as f32 - 6.0) / 6.0).collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 / 7.0 - 1.0).collect();
        let bias = with_bias.then_some(&bias[..]);
        let packed = PackedMatrix::from_rows(&w, n, k);
        assert_eq!(packed.to_rows(), w, "{n}×{k} round trip");
        let mut out = vec![f32::NAN; m * n];
        match micro {
            None => packed.matmul_t(&x, m, bias, &mut out),
            // Drive one micro-kernel directly over every panel.
            Some(f) => {
                let flat = lines_as_floats(&packed.lines);
                for p in 0..n.div_ceil(PANEL) {
                    for i in (0..m).step_by(MAX_TILE_ROWS) {
                        let rows = (m - i).min(MAX_TILE_ROWS);
                        let mut tile = [[0f32; PANEL]; MAX_TILE_ROWS];
                        f(&x[i * k..(i + rows) * k], rows, k, &flat[p * k * PANEL..], &mut tile);
                        for r in 0..rows {
                            for c in 0..PANEL.min(n - p * PANEL) {
                                out[(i + r) * n + p * PANEL + c] = tile[r][c] + bias.map_or(0.0, |b| b[p * PANEL + c]);
                            }
                        }
                    }
                }
            }
        }
        let want = reference(&x, m, k, &w, n, bias);
        for (idx, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{m}x{k}x{n} at {idx}: {a} vs {b}"
            );
        }
    }

    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (1, 37, 130),
        (3, 64, 65),
        (8, 768, 200),
        (5, 33, 1),
        (16, 96, 64),
        (9, 40, 33),
        (70, 24, 40),
        (130, 17, 31),
    ];

    #[test]
    fn matches_reference_on_ragged_shapes() {
        for &(m, k, n) in SHAPES {
            check(m, k, n, false, None);
            check(m, k, n, true, None);
        }
    }

    #[test]
    fn every_micro_kernel_this_cpu_has_matches() {
        let mut kernels: Vec<MicroKernel> = vec![micro_scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(|x, rows, k, panel, tile| unsafe { x86::micro_avx512(x, rows, k, panel, tile) });
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                kernels.push(|x, rows, k, panel, tile| unsafe { x86::micro_avx2(x, rows, k, panel, tile) });
            }
        }
        for f in kernels {
            for &(m, k, n) in SHAPES {
                check(m, k, n, true, Some(f));
            }
        }
    }
}
