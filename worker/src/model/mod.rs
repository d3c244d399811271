//! GPT-NeoX on candle: configuration, checkpoint loading, forward pass, tokenizer.

mod builtin;
mod checkpoint;
mod config;
mod decode_attention;
#[cfg(feature = "cuda")]
mod fused;
mod kv_cache;
mod linear;
mod neox;
mod paged_kv;
mod tokenizer;
#[cfg(feature = "cuda")]
mod upload;

pub use builtin::{builtin_names, BUILTIN_DEFAULT};
pub use checkpoint::{Checkpoint, Slice};
pub use config::{Activation, NeoXConfig};
/// The decode GEMV kernels, public for the GPU tests and the GEMV benchmark.
#[cfg(feature = "cuda")]
pub use fused::{gemv, GEMV_MAX_ROWS};
pub use kv_cache::SequenceCache;
pub use neox::{GptNeoX, LogitsWanted, SeqStep, FUSED_MAX_NEW};
pub use paged_kv::KvPool;
pub use tokenizer::{IncrementalDecoder, NeoXTokenizer};

use std::path::Path;

use candle_core::{DType, Device};

use crate::parallel::RankInfo;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("checkpoint {file}{}: {message}", tensor.as_ref().map(|t| format!(", tensor {t}")).unwrap_or_default())]
    Checkpoint {
        file: String,
        tensor: Option<String>,
        message: String,
    },
    #[error("device: {0}")]
    Device(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor parallelism: {0}")]
    Parallel(String),
    #[error(transparent)]
    Collective(#[from] crate::parallel::ParallelError),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("tensor op failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Parses `cpu`, `cuda` or `cuda:N` into a device; CUDA needs the `cuda` build.
pub fn parse_device(name: &str) -> Result<Device, ModelError> {
    parse_device_for_rank(name, 0)
}

/// As [`parse_device`], for rank `rank` of a group: plain `cuda` is the rank's own GPU among
/// those visible (`cuda:(rank mod count)`), so `--tp N` on an N-GPU host spreads its ranks and
/// a pod that sees one GPU uses it.
pub fn parse_device_for_rank(name: &str, rank: usize) -> Result<Device, ModelError> {
    let name = name.trim().to_ascii_lowercase();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.strip_prefix("cuda") {
        Some("") => rank % cuda_device_count()?.max(1),
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| ModelError::Device(format!("{name:?} is not cpu, cuda or cuda:N")))?,
        None => return Err(ModelError::Device(format!("{name:?} is not cpu, cuda or cuda:N"))),
    };
    cuda_device(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device, ModelError> {
    Device::new_cuda(ordinal).map_err(|e| ModelError::Device(format!("CUDA device {ordinal} is not usable: {e}")))
}

/// `(free, total)` bytes of `device`'s memory (a GPU); `None` on the CPU.
pub fn device_memory(device: &Device) -> Option<(usize, usize)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d.cuda_stream().context().mem_get_info().ok(),
        _ => None,
    }
}

/// CUDA devices visible to this process (an error in builds without CUDA).
#[cfg(feature = "cuda")]
pub fn cuda_device_count() -> Result<usize, ModelError> {
    use candle_core::cuda_backend::cudarc::driver::CudaContext;
    let n = CudaContext::device_count().map_err(|e| ModelError::Device(format!("no usable CUDA driver: {e}")))?;
    match usize::try_from(n) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ModelError::Device(
            "no CUDA device is visible (CUDA_VISIBLE_DEVICES?)".into(),
        )),
    }
}

/// CUDA devices visible to this process (an error in builds without CUDA).
#[cfg(not(feature = "cuda"))]
pub fn cuda_device_count() -> Result<usize, ModelError> {
    cuda_device(0).map(|_| 0)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device, ModelError> {
    Err(ModelError::Device(
        "this neox-worker was built without CUDA support (rebuild with --features cuda)".into(),
    ))
}

/// Parses a dtype name as used on the command line and in `config.json`.
pub fn parse_dtype(name: &str) -> Result<DType, ModelError> {
    match name.to_ascii_lowercase().as_str() {
        "fp32" | "f32" | "float32" => Ok(DType::F32),
        "fp16" | "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(ModelError::Config(format!(
            "dtype {other:?} is not supported (fp32, fp16, bf16)"
        ))),
    }
}

/// `cpu` or `cuda:N`.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "fp32",
        DType::F16 => "fp16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

/// A model and its tokenizer, ready to run on this rank.
pub struct LoadedModel {
    pub name: String,
    pub model: GptNeoX,
    pub tokenizer: NeoXTokenizer,
}

/// Where a model comes from: a HuggingFace checkpoint directory or a model built into the binary.
pub enum ModelSource<'a> {
    Dir(&'a Path),
    Builtin(&'a str),
}

impl<'a> ModelSource<'a> {
    /// `builtin:NAME` or a directory path.
    pub fn parse(spec: &'a str) -> Self {
        match spec.strip_prefix("builtin:") {
            Some(name) => ModelSource::Builtin(name),
            None => ModelSource::Dir(Path::new(spec)),
        }
    }
}

/// Loads config, tokenizer and this rank's weight shards.
pub fn load(spec: &str, dtype: DType, device: &Device, rank: RankInfo) -> Result<LoadedModel, ModelError> {
    let (name, config_text, tokenizer_bytes, checkpoint) = match ModelSource::parse(spec) {
        ModelSource::Builtin(name) => {
            let b = builtin::find(name)?;
            (
                spec.to_owned(),
                b.config.to_owned(),
                b.tokenizer.to_vec(),
                Checkpoint::from_static(b.weights_name, b.weights)?,
            )
        }
        ModelSource::Dir(dir) => {
            let cfg_path = dir.join("config.json");
            let config_text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::Checkpoint {
                file: cfg_path.display().to_string(),
                tensor: None,
                message: format!("cannot read: {e}"),
            })?;
            let tok_path = dir.join("tokenizer.json");
            let tok = std::fs::read(&tok_path)
                .map_err(|e| ModelError::Tokenizer(format!("cannot read {}: {e}", tok_path.display())))?;
            (dir.display().to_string(), config_text, tok, Checkpoint::open_dir(dir)?)
        }
    };
    let config = NeoXConfig::from_json(&config_text)?;
    let tokenizer = NeoXTokenizer::from_bytes(&tokenizer_bytes, config.eos_token_id)?;
    let started = std::time::Instant::now();
    let model = GptNeoX::load(&config, &checkpoint, dtype, device, rank)?;
    drop(checkpoint);
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        "loaded {:.2} GB of weights onto {device:?} in {secs:.2} s ({:.1} GB/s)",
        model.weight_bytes() as f64 / 1e9,
        model.weight_bytes() as f64 / 1e9 / secs.max(1e-9)
    );
    let model = model.with_sampleable_vocab(tokenizer.vocab_size().min(config.vocab_size));
    Ok(LoadedModel { name, model, tokenizer })
}

/// Runs `f` on a thread of the compute pool (rayon's global pool, `RAYON_NUM_THREADS` threads)
/// instead of beside it. The caller then takes part in every parallel op it starts, so N
/// threads share N cores; a driving thread outside the pool would contend with N spinning
/// workers for them between ops (2 cores: decode ~10%, 16 served streams ~12% faster).
pub fn on_compute_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
