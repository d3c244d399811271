//! Throughput of `matmul_xwt` for decode-sized steps: `cargo bench -p neox-kernels --bench matmul --profile dev`.

use std::time::Instant;
fn main() {
    for &(m, k, n) in &[
        (1usize, 768usize, 3072usize),
        (4, 768, 3072),
        (8, 768, 3072),
        (16, 768, 3072),
        (16, 3072, 768),
        (16, 768, 50432),
    ] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut out = vec![0f32; m * n];
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            neox_kernels::matmul_xwt(&x, m, k, &w, n, &mut out);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "m={m:2} k={k} n={n}: {:.3} ms, {:.1} GFLOPS, {:.1} GB/s of weights",
            best * 1e3,
            2.0 * (m * k * n) as f64 / best / 1e9,
            (n * k * 4) as f64 / best / 1e9
        );
    }
}
