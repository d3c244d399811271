//! The decode GEMV kernels against cuBLAS on GPT-NeoX-20B's matrix shapes (fp16, one GPU):
//! for each row count the kernels take, the time per matmul and the weight bytes read per
//! second. What the row limit and the columns a warp owns in `fused.rs` are chosen from
//! (results/h100-session16/ keeps the run that compared 1, 2 and 4 columns a warp).
//!
//! `worker/scripts/build-cuda.sh --bench gpu_gemv`, then run the binary on the GPU machine
//! (pack-for-gpu.sh packs it; gpu-run.sh --bench runs it).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use neox_worker::model::{gemv, GEMV_MAX_ROWS};

/// (name, outputs, inputs) of a 20B layer's matmuls at TP=1, and the LM head.
const SHAPES: [(&str, usize, usize); 5] = [
    ("qkv", 18432, 6144),
    ("attn out", 6144, 6144),
    ("mlp up", 24576, 6144),
    ("mlp down", 6144, 24576),
    ("lm head", 50432, 6144),
];
const REPEATS: usize = 50;

/// Seconds per call of `f`, over REPEATS calls queued back to back (as a model's layers
/// are) between two synchronisations.
fn time(dev: &Device, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..REPEATS {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / REPEATS as f64)
}

fn main() -> anyhow::Result<()> {
    let dev = Device::new_cuda(0)?;
    let mut layer_gemv = [0f64; GEMV_MAX_ROWS];
    let mut layer_cublas = [0f64; GEMV_MAX_ROWS];
    for (name, n, k) in SHAPES {
        let w = (Tensor::randn(0f32, 0.02, (n, k), &dev)?).to_dtype(DType::F16)?;
        let wt = w.t()?;
        let bytes = (n * k * 2) as f64;
        println!("\n{name}: [{n}, {k}] fp16, {:.0} MB", bytes / 1e6);
        println!("  rows   cuBLAS µs (GB/s)     GEMV µs (GB/s)   speedup");
        for rows in 1..=GEMV_MAX_ROWS {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?.to_dtype(DType::F16)?;
            let cublas = time(&dev, || x.matmul(&wt).map(drop))?;
            let ours = time(&dev, || match gemv(&x, &w, None, None, GEMV_MAX_ROWS) {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(candle_core::Error::Msg("the GEMV kernel did not take it".into())),
                Err(e) => Err(candle_core::Error::Msg(e.to_string())),
            })?;
            println!(
                "  {rows:<6} {:>8.1} ({:>5.0})   {:>8.1} ({:>5.0})   {:.2}x",
                cublas * 1e6,
                bytes / cublas / 1e9,
                ours * 1e6,
                bytes / ours / 1e9,
                cublas / ours
            );
            if name != "lm head" {
                layer_cublas[rows - 1] += cublas;
                layer_gemv[rows - 1] += ours;
            }
        }
    }
    println!("\na layer's four matmuls, µs (cuBLAS / GEMV):");
    for rows in 1..=GEMV_MAX_ROWS {
        println!(
            "  rows {rows}: {:7.1} / {:7.1}  ({:.2}x)",
            layer_cublas[rows - 1] * 1e6,
            layer_gemv[rows - 1] * 1e6,
            layer_cublas[rows - 1] / layer_gemv[rows - 1]
        );
    }
    Ok(())
}
