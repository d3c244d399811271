//! With the `cuda` feature: compiles the fused kernels (cuda/neox_kernels.cu) to PTX with nvcc,
//! for `CUDA_COMPUTE_CAP` (default 90: H100/H200). Without it, nothing to do.
use std::{env, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=cuda/neox_kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("neox_kernels.ptx");
    let status = Command::new("nvcc")
        .args(["--ptx", "-O3", &format!("-arch=sm_{cap}"), "-o"])
        .arg(&out)
        .arg("cuda/neox_kernels.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed on cuda/neox_kernels.cu ({s})"),
        Err(e) => panic!("the cuda feature needs nvcc on PATH: {e}"),
    }
}
