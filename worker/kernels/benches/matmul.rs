//! Throughput of `PackedMatrix::matmul_t` for the 125M model's shapes, decode and prefill:
//! `cargo bench -p neox-kernels --bench matmul --profile dev`.

use std::time::Instant;

use neox_kernels::PackedMatrix;

fn main() {
    let threads = rayon::current_num_threads();
    println!("threads: {threads}");
    for &(m, k, n) in &[
        (1usize, 768usize, 3072usize),
        (4, 768, 3072),
        (8, 768, 3072),
        (16, 768, 3072),
        (16, 3072, 768),
        (16, 768, 2304),
        (16, 768, 50432),
        (1, 768, 50432),
        (256, 768, 3072),
    ] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let packed = PackedMatrix::from_rows(&w, n, k);
        drop(w);
        let mut out = vec![0f32; m * n];
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            packed.matmul_t(&x, m, None, &mut out);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "m={m:3} k={k:4} n={n:5}: {:7.3} ms, {:6.1} GFLOPS, {:5.1} GB/s of weights",
            best * 1e3,
            2.0 * (m * k * n) as f64 / best / 1e9,
            (n * k * 4) as f64 / best / 1e9
        );
    }
}
