//! Launches the fused CUDA kernels of `cuda/neox_kernels.cu` (compiled to PTX by build.rs) on
//! candle tensors. They replace the ~30 small candle kernels of a decode layer with four; see
//! the .cu file for what each does. Inputs must be contiguous CUDA tensors of the model's dtype
//! (indices: u32); outputs are fresh tensors, except the KV arenas, written in place.

use candle_core::{DType, Device, Storage, Tensor};
use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};

use super::{Activation, ModelError};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/neox_kernels.ptx"));
const MODULE: &str = "neox_fused";
/// Most head_dim `paged_attention` takes (MAX_HD in the .cu file).
pub(super) const MAX_HEAD_DIM: usize = 256;
/// Threads of a `paged_attention` block (8 warps).
const ATTENTION_THREADS: u32 = 256;
/// Threads of an `add_layernorm` block, each holding up to 16 elements of the row
/// (LN_PER_THREAD in the .cu file).
const NORM_THREADS: u32 = 1024;
/// Widest row `add_layernorm` takes.
pub(super) const MAX_HIDDEN: usize = 16 * NORM_THREADS as usize;
/// Shared memory a block may use without opting in to more.
const SHARED_LIMIT: usize = 48 * 1024;
/// Most rows of `x` the GEMV kernels take (`gemv1` .. `gemv3` in the .cu file): from 4 rows on
/// cuBLAS reads the weights as fast (measured on an H100, worker/benches/gpu_gemv.rs).
pub const GEMV_MAX_ROWS: usize = 3;
/// Output columns a warp of `gemvM` owns, by M - 1 (as instantiated in the .cu file).
const GEMV_COLS_PER_WARP: [usize; GEMV_MAX_ROWS] = [1, 2, 2];
/// Warps (output columns) of a `gemv` block.
const GEMV_WARPS: u32 = 4;

/// Whether the kernels handle this dtype.
pub(super) fn supports(dtype: DType) -> bool {
    suffix(dtype).is_ok()
}

/// Bytes of shared memory `paged_attention` needs for sequences of up to `max_len` tokens.
fn attention_shared_bytes(head_dim: usize, max_len: usize) -> usize {
    4 * (head_dim + 33 + max_len + (ATTENTION_THREADS as usize / 32) * head_dim)
}

/// Whether `paged_attention` can attend over `max_len` tokens.
pub(super) fn attention_fits(head_dim: usize, max_len: usize) -> bool {
    head_dim <= MAX_HEAD_DIM && attention_shared_bytes(head_dim, max_len) <= SHARED_LIMIT
}

fn suffix(dtype: DType) -> Result<&'static str, ModelError> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        d => Err(ModelError::Internal(format!("no fused kernels for {d:?}"))),
    }
}

fn device(t: &Tensor) -> Result<&candle_core::CudaDevice, ModelError> {
    match t.device() {
        Device::Cuda(d) => Ok(d),
        d => Err(ModelError::Internal(format!(
            "fused kernels need a CUDA tensor, got {d:?}"
        ))),
    }
}

/// The device address of a contiguous tensor's first element. The tensor must outlive the
/// kernel's launch; frees are stream-ordered, so dropping it after the launch is safe.
fn ptr(t: &Tensor) -> Result<u64, ModelError> {
    if !t.is_contiguous() {
        return Err(ModelError::Internal(format!(
            "fused kernel input {:?} is not contiguous",
            t.shape()
        )));
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(ModelError::Internal(
            "fused kernel input is not on a CUDA device".into(),
        ));
    };
    let stream = cs.device.cuda_stream();
    let base = match t.dtype() {
        DType::F32 => cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::F16 => cs.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        DType::BF16 => cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::U32 => cs.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        d => return Err(ModelError::Internal(format!("fused kernel input of {d:?}"))),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

fn opt_ptr(t: Option<&Tensor>) -> Result<u64, ModelError> {
    t.map(ptr).transpose().map(|p| p.unwrap_or(0))
}

/// An uninitialised output the kernel fills completely.
fn output(shape: &[usize], like: &Tensor) -> Result<Tensor, ModelError> {
    // SAFETY: every element is written by the kernel the caller launches next.
    Ok(unsafe { Tensor::empty(shape, like.dtype(), like.device())? })
}

fn as_i32(n: usize, what: &str) -> Result<i32, ModelError> {
    i32::try_from(n).map_err(|_| ModelError::Internal(format!("{what} = {n} is too large for the fused kernels")))
}

/// Launches `name_<dtype>` with `args` (each an 8-byte pointer or a scalar, in the kernel's
/// order).
fn launch(like: &Tensor, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<(), ModelError> {
    let dev = device(like)?;
    let func = dev.get_or_load_custom_func(&format!("{name}_{}", suffix(like.dtype())?), MODULE, PTX)?;
    let mut b = func.builder();
    for a in args {
        match a {
            Arg::U64(v) => b.arg(v),
            Arg::I32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
        };
    }
    // SAFETY: the argument list matches the kernel's signature in neox_kernels.cu, every
    // pointer is a live allocation of the size the kernel reads or writes (checked by the
    // callers' shape checks), and all work is on the device's one stream.
    unsafe { b.launch(cfg) }.map_err(|e| ModelError::Device(format!("{name}: {e}")))?;
    Ok(())
}

enum Arg {
    U64(u64),
    I32(i32),
    F32(f32),
}

fn check_shape(t: &Tensor, want: &[usize], what: &str) -> Result<(), ModelError> {
    if t.dims() != want {
        return Err(ModelError::Internal(format!(
            "{what} is {:?}, expected {want:?}",
            t.dims()
        )));
    }
    Ok(())
}

/// Up to how many rows a linear layer takes `gemv` rather than cuBLAS: [`GEMV_MAX_ROWS`], or
/// `NEOX_GEMV_MAX_ROWS` (0: always cuBLAS, for side-by-side figures).
pub(super) fn gemv_max_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("NEOX_GEMV_MAX_ROWS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map_or(GEMV_MAX_ROWS, |n: usize| n.min(GEMV_MAX_ROWS))
    })
}

/// `act(x · wᵀ + bias)` for `x` `[.., k]` of at most `max_rows` rows and `w` `[n, k]` through the
/// GEMV kernel, or `None` where it does not apply (more rows, a dtype or device it has no
/// kernel for, a `k` or an address not on 16 bytes): the caller then uses cuBLAS.
pub fn gemv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    act: Option<Activation>,
    max_rows: usize,
) -> Result<Option<Tensor>, ModelError> {
    let Ok((n, k)) = w.dims2() else {
        return Ok(None);
    };
    let dtype = w.dtype();
    let elems_per_load = 16 / dtype.size_in_bytes();
    let rows = x.elem_count() / k.max(1);
    let takes = supports(dtype)
        && x.dtype() == dtype
        && x.device().is_cuda()
        && w.is_contiguous()
        && x.dim(x.rank().saturating_sub(1))? == k
        && k.is_multiple_of(elems_per_load)
        && (1..=max_rows.min(GEMV_MAX_ROWS)).contains(&rows);
    if !takes {
        return Ok(None);
    }
    if let Some(b) = bias {
        check_shape(b, &[n], "a linear layer's bias")?;
    }
    let x = x.contiguous()?;
    let (xp, wp) = (ptr(&x)?, ptr(w)?);
    if xp % 16 != 0 || wp % 16 != 0 {
        return Ok(None);
    }
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    let y = output(&dims, &x)?;
    let cols_per_warp = GEMV_COLS_PER_WARP[rows - 1];
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(GEMV_WARPS as usize * cols_per_warp) as u32, 1, 1),
        block_dim: (32 * GEMV_WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    let args = [
        Arg::U64(xp),
        Arg::U64(wp),
        Arg::U64(opt_ptr(bias)?),
        Arg::U64(ptr(&y)?),
        Arg::I32(as_i32(n, "output features")?),
        Arg::I32(as_i32(k, "input features")?),
        Arg::I32(act.map_or(-1, activation_code)),
    ];
    if n > 0 {
        launch(w, &format!("gemv{rows}"), cfg, &args)?;
    }
    Ok(Some(y))
}

/// The kernels' code of an activation (`activate` in the .cu file).
fn activation_code(act: Activation) -> i32 {
    match act {
        Activation::GeluErf => 0,
        Activation::GeluTanh => 1,
        Activation::Relu => 2,
    }
}

/// A layer norm's weight and bias.
pub(super) type Norm<'a> = (&'a Tensor, &'a Tensor);

/// What `add_layernorm` adds to the residual: `a`, `m` and `bias`, each optional.
pub(super) struct ResidualAdd<'a> {
    pub a: &'a Tensor,
    pub m: Option<&'a Tensor>,
    pub bias: Option<&'a Tensor>,
}

/// `x' = x + a + m + bias` (when `add` is given, else `x' = x`), then `LN1(x')` and, if `ln2`
/// is given, `LN2(x')`. Returns `(x', LN1(x'), LN2(x'))`; `x` is `[rows, hidden]`.
pub(super) fn add_layernorm(
    x: &Tensor,
    add: Option<ResidualAdd<'_>>,
    ln1: Norm<'_>,
    ln2: Option<Norm<'_>>,
    eps: f32,
) -> Result<(Tensor, Tensor, Option<Tensor>), ModelError> {
    let (rows, h) = x.dims2()?;
    if h > MAX_HIDDEN {
        return Err(ModelError::Internal(format!(
            "fused layer norm over {h} > {MAX_HIDDEN} elements"
        )));
    }
    for t in [Some(ln1.0), Some(ln1.1), ln2.map(|n| n.0), ln2.map(|n| n.1)]
        .into_iter()
        .flatten()
        .chain(add.as_ref().and_then(|a| a.bias))
    {
        check_shape(t, &[h], "a layer-norm or residual bias")?;
    }
    if let Some(a) = &add {
        for t in std::iter::once(a.a).chain(a.m) {
            check_shape(t, &[rows, h], "a residual term")?;
        }
    }
    let x_out = match add {
        Some(_) => output(&[rows, h], x)?,
        None => x.clone(),
    };
    let o1 = output(&[rows, h], x)?;
    let o2 = ln2.map(|_| output(&[rows, h], x)).transpose()?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (NORM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let args = [
        Arg::U64(ptr(x)?),
        Arg::U64(opt_ptr(add.as_ref().map(|a| a.a))?),
        Arg::U64(opt_ptr(add.as_ref().and_then(|a| a.m))?),
        Arg::U64(opt_ptr(add.as_ref().and_then(|a| a.bias))?),
        Arg::U64(if add.is_some() { ptr(&x_out)? } else { 0 }),
        Arg::U64(ptr(ln1.0)?),
        Arg::U64(ptr(ln1.1)?),
        Arg::U64(ptr(&o1)?),
        Arg::U64(opt_ptr(ln2.map(|n| n.0))?),
        Arg::U64(opt_ptr(ln2.map(|n| n.1))?),
        Arg::U64(opt_ptr(o2.as_ref())?),
        Arg::I32(as_i32(h, "hidden size")?),
        Arg::F32(eps),
    ];
    if rows > 0 {
        launch(x, "add_layernorm", cfg, &args)?;
    }
    Ok((x_out, o1, o2))
}

/// `act(x + bias)` with `bias` broadcast over the rows of `x`.
pub(super) fn bias_act(x: &Tensor, bias: Option<&Tensor>, act: Activation) -> Result<Tensor, ModelError> {
    let cols = x.dim(x.rank().saturating_sub(1))?;
    if let Some(b) = bias {
        check_shape(b, &[cols], "an MLP bias")?;
    }
    let n = x.elem_count();
    let y = output(x.dims(), x)?;
    let blocks = n.div_ceil(256).clamp(1, 1 << 16) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let args = [
        Arg::U64(ptr(x)?),
        Arg::U64(opt_ptr(bias)?),
        Arg::U64(ptr(&y)?),
        Arg::U64(n as u64),
        Arg::I32(as_i32(cols, "MLP width")?),
        Arg::I32(activation_code(act)),
    ];
    if n > 0 {
        launch(x, "bias_act", cfg, &args)?;
    }
    Ok(y)
}

/// The rotary tables and the token positions they are read at.
pub(super) struct Rotary<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// Rotated dimensions of each head (the first `dims`).
    pub dims: usize,
}

/// Where a step's tokens go and what they see in the paged arenas (all u32, on the device),
/// built once per step and shared by every layer.
pub(super) struct PagedIndex {
    /// `[tokens]`: position of each new token in its sequence.
    pub pos: Tensor,
    /// `[tokens]`: arena place of each new token.
    pub slot: Tensor,
    /// `[sequences, max_blocks]`: each sequence's blocks.
    pub blocks: Tensor,
    /// `[tokens]`: which row of `blocks` each token belongs to.
    pub seq_of: Tensor,
    /// `[tokens]`: how many of its sequence's tokens each token sees (itself included).
    pub len_of: Tensor,
    pub max_len: usize,
    pub block_size: usize,
}

/// Splits `qkv` (`[tokens, heads · 3 · head_dim]`, no bias yet) into rotated queries
/// `[tokens, heads, head_dim]`, returned, and keys and values written into the arenas
/// (`[heads, arena_len, head_dim]`) at `index.slot`.
pub(super) fn rope_write_kv(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    rotary: &Rotary<'_>,
    index: &PagedIndex,
    arenas: (&Tensor, &Tensor),
) -> Result<Tensor, ModelError> {
    let (heads, arena_len, hd) = arenas.0.dims3()?;
    check_shape(arenas.1, &[heads, arena_len, hd], "the V arena")?;
    let tokens = qkv.dim(0)?;
    check_shape(qkv, &[tokens, heads * 3 * hd], "qkv")?;
    if let Some(b) = bias {
        check_shape(b, &[heads * 3 * hd], "the qkv bias")?;
    }
    check_shape(&index.pos, &[tokens], "positions")?;
    check_shape(&index.slot, &[tokens], "arena places")?;
    let half = rotary.dims / 2;
    if !rotary.dims.is_multiple_of(2)
        || rotary.dims > hd
        || rotary.cos.dim(1)? != half
        || rotary.sin.dims() != rotary.cos.dims()
    {
        return Err(ModelError::Internal(format!(
            "rotary tables {:?} do not fit {} rotated of {hd}",
            rotary.cos.dims(),
            rotary.dims
        )));
    }
    let q = output(&[tokens, heads, hd], qkv)?;
    // One (head, dim) per thread: enough blocks to fill the GPU even for one token.
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, (heads * hd).div_ceil(128) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let args = [
        Arg::U64(ptr(qkv)?),
        Arg::U64(opt_ptr(bias)?),
        Arg::U64(ptr(rotary.cos)?),
        Arg::U64(ptr(rotary.sin)?),
        Arg::U64(ptr(&index.pos)?),
        Arg::U64(ptr(&index.slot)?),
        Arg::U64(ptr(&q)?),
        Arg::U64(ptr(arenas.0)?),
        Arg::U64(ptr(arenas.1)?),
        Arg::I32(as_i32(heads, "heads")?),
        Arg::I32(as_i32(hd, "head_dim")?),
        Arg::I32(as_i32(rotary.dims, "rotary dims")?),
        Arg::U64(arena_len as u64),
    ];
    if tokens > 0 {
        launch(qkv, "rope_write_kv", cfg, &args)?;
    }
    Ok(q)
}

/// `softmax(q·Kᵀ·scale)·V` of every new token and head over what `index` lets it see:
/// `[tokens, heads · head_dim]`.
pub(super) fn paged_attention(
    q: &Tensor,
    arenas: (&Tensor, &Tensor),
    index: &PagedIndex,
    scale: f32,
) -> Result<Tensor, ModelError> {
    let (tokens, heads, hd) = q.dims3()?;
    let arena_len = arenas.0.dim(1)?;
    check_shape(arenas.0, &[heads, arena_len, hd], "the K arena")?;
    check_shape(arenas.1, &[heads, arena_len, hd], "the V arena")?;
    check_shape(&index.seq_of, &[tokens], "sequence of each token")?;
    check_shape(&index.len_of, &[tokens], "visible length of each token")?;
    let max_blocks = index.blocks.dim(1)?;
    if !attention_fits(hd, index.max_len) || index.max_len > max_blocks * index.block_size {
        return Err(ModelError::Internal(format!(
            "paged attention over {} tokens of head_dim {hd} with {max_blocks} blocks of {}",
            index.max_len, index.block_size
        )));
    }
    let out = output(&[tokens, heads * hd], q)?;
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, heads as u32, 1),
        block_dim: (ATTENTION_THREADS, 1, 1),
        shared_mem_bytes: attention_shared_bytes(hd, index.max_len) as u32,
    };
    let args = [
        Arg::U64(ptr(q)?),
        Arg::U64(ptr(arenas.0)?),
        Arg::U64(ptr(arenas.1)?),
        Arg::U64(ptr(&index.blocks)?),
        Arg::U64(ptr(&index.seq_of)?),
        Arg::U64(ptr(&index.len_of)?),
        Arg::U64(ptr(&out)?),
        Arg::I32(as_i32(heads, "heads")?),
        Arg::I32(as_i32(hd, "head_dim")?),
        Arg::U64(arena_len as u64),
        Arg::I32(as_i32(max_blocks, "blocks per sequence")?),
        Arg::I32(as_i32(index.block_size, "block size")?),
        Arg::F32(scale),
    ];
    if tokens > 0 {
        launch(q, "paged_attention", cfg, &args)?;
    }
    Ok(out)
}
