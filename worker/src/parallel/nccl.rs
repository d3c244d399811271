//! NCCL collectives between CUDA ranks, one GPU per rank, through cudarc's NCCL bindings.
//!
//! The leader makes the unique id ([`new_unique_id`]) and hands it to the followers in the
//! group setup (`neox.shard.v1.Setup.nccl_id`); every rank then joins with
//! [`NcclCommunicator::connect`]. Collectives run on candle's stream of the rank's device, so
//! they are ordered with the model's kernels. Each one is waited for with a deadline: NCCL
//! itself would wait forever for a dead peer, so past the collective timeout (or on an
//! asynchronous NCCL error) the communicator is aborted and the step fails like a lost TCP
//! peer does.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CpuStorage, CudaStorage, DType, Device, Layout, Shape, Tensor};
use cudarc::nccl::{result, sys};

use super::{Communicator, ParallelError, RankInfo};

/// Bytes of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

fn nccl_error(op: &'static str, e: impl std::fmt::Debug) -> ParallelError {
    ParallelError::Nccl {
        op,
        message: format!("{e:?}"),
    }
}

/// A fresh NCCL unique id for a new group (made by the leader).
pub fn new_unique_id() -> Result<Vec<u8>, ParallelError> {
    let id = result::get_uniqueid().map_err(|e| nccl_error("unique id", e.0))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// An NCCL communicator handle. NCCL allows any thread to use it, one call at a time; the
/// owner serialises calls with a mutex.
struct RawComm(sys::ncclComm_t);

// SAFETY: see the type's docs; the handle is only used under `NcclCommunicator::comm`'s lock.
unsafe impl Send for RawComm {}

/// How long an NCCL group may take to form, and each collective once it has.
#[derive(Debug, Clone, Copy)]
pub struct NcclTimeouts {
    pub join: Duration,
    pub collective: Duration,
}

pub struct NcclCommunicator {
    rank: RankInfo,
    device: CudaDevice,
    stream: Arc<CudaStream>,
    /// `None` once aborted: the group is broken for good.
    comm: Mutex<Option<RawComm>>,
    timeout: Duration,
}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator").field("rank", &self.rank).finish()
    }
}

impl NcclCommunicator {
    /// Joins the group with unique id `id` as `rank`, on `device` (this rank's GPU). Fails if
    /// the other ranks do not join within `timeouts.join`; each collective then has
    /// `timeouts.collective`.
    pub fn connect(rank: RankInfo, id: &[u8], device: &Device, timeouts: NcclTimeouts) -> Result<Self, ParallelError> {
        let timeout = timeouts.join;
        let Device::Cuda(dev) = device else {
            return Err(ParallelError::Rendezvous(format!(
                "NCCL collectives need a CUDA device; rank {} runs on {device:?}",
                rank.rank
            )));
        };
        let internal: [std::ffi::c_char; NCCL_ID_BYTES] = id
            .try_into()
            .map(|b: [u8; NCCL_ID_BYTES]| b.map(|x| x as std::ffi::c_char))
            .map_err(|_| {
                ParallelError::Rendezvous(format!(
                    "an NCCL id has {NCCL_ID_BYTES} bytes, the leader sent {}",
                    id.len()
                ))
            })?;
        let (world, r) = (
            i32::try_from(rank.world_size).map_err(|_| ParallelError::Rendezvous("world size".into()))?,
            i32::try_from(rank.rank).map_err(|_| ParallelError::Rendezvous("rank".into()))?,
        );
        let stream = dev.cuda_stream();
        // ncclCommInitRank blocks until every rank has joined: run it aside and wait with a
        // deadline, so a rank that never comes is a clear error rather than a hang.
        let (tx, rx) = std::sync::mpsc::channel();
        let ctx = stream.context().clone();
        std::thread::spawn(move || {
            let joined = ctx
                .bind_to_thread()
                .map_err(|e| nccl_error("bind device", e))
                .and_then(|_| {
                    let mut comm = std::ptr::null_mut();
                    let id = sys::ncclUniqueId { internal };
                    // SAFETY: `comm` is a valid out-pointer; world/rank were checked above.
                    unsafe { result::comm_init_rank(&mut comm, world, id, r) }
                        .map(|_| RawComm(comm))
                        .map_err(|e| nccl_error("init", e.0))
                });
            // Nobody waits any more (the join timed out): do not leave the communicator open.
            if let Err(std::sync::mpsc::SendError(Ok(late))) = tx.send(joined) {
                // SAFETY: a live communicator that nothing else holds.
                let _ = unsafe { result::comm_abort(late.0) };
            }
        });
        let comm = match rx.recv_timeout(timeout) {
            Ok(joined) => joined?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(ParallelError::Rendezvous(format!(
                    "the NCCL group of {} ranks did not form within {:.0}s",
                    rank.world_size,
                    timeout.as_secs_f64()
                )))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(nccl_error("init", "the joining thread died"));
            }
        };
        Ok(Self {
            rank,
            device: dev.clone(),
            stream,
            comm: Mutex::new(Some(comm)),
            timeout: timeouts.collective,
        })
    }

    /// Runs `op` on a contiguous CUDA tensor and returns its flat result.
    fn run(&self, op: Collective, t: &Tensor) -> Result<Tensor, ParallelError> {
        let t = t.contiguous().map_err(|e| tensor_error(op.name(), e))?;
        let call = NcclOp {
            comm: self,
            op,
            failure: Mutex::new(None),
        };
        match t.apply_op1_no_bwd(&call) {
            Ok(out) => Ok(out),
            Err(e) => Err(call
                .failure
                .into_inner()
                .ok()
                .flatten()
                .unwrap_or_else(|| tensor_error(op.name(), e))),
        }
    }

    /// Enqueues `op` from `src` into a new buffer on the device's stream and waits for it.
    fn launch<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
        &self,
        op: Collective,
        input: &CudaStorage,
        layout: &Layout,
        dtype: sys::ncclDataType_t,
    ) -> Result<CudaStorage, ParallelError> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| tensor_error(op.name(), "input is not contiguous"))?;
        let src = input.as_cuda_slice::<T>().map_err(|e| tensor_error(op.name(), e))?;
        let src = src.slice(start..end);
        let count = end - start;
        let out_len = match op {
            Collective::AllGather => count * self.rank.world_size,
            _ => count,
        };
        let mut dst = self
            .device
            .alloc_zeros::<T>(out_len)
            .map_err(|e| tensor_error(op.name(), e))?;
        let guard = self.comm.lock().map_err(|_| nccl_error(op.name(), "lock poisoned"))?;
        let comm = guard
            .as_ref()
            .ok_or_else(|| nccl_error(op.name(), "the communicator was aborted after an earlier failure"))?
            .0;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| nccl_error(op.name(), e))?;
        {
            let (sp, _src_sync) = src.device_ptr(&self.stream);
            let (dp, _dst_sync) = dst.device_ptr_mut(&self.stream);
            let cu = self.stream.cu_stream() as sys::cudaStream_t;
            // SAFETY: both buffers live on this rank's device for the whole call (the guards
            // above hold them), and `count`/`out_len` are their element counts.
            let status = unsafe {
                match op {
                    Collective::AllReduceSum => {
                        result::all_reduce(sp as _, dp as _, count, dtype, sys::ncclRedOp_t::ncclSum, comm, cu)
                    }
                    Collective::AllGather => result::all_gather(sp as _, dp as _, count, dtype, comm, cu),
                    Collective::Broadcast => result::broadcast(sp as _, dp as _, count, dtype, 0, comm, cu),
                }
            };
            status.map_err(|e| nccl_error(op.name(), e.0))?;
        }
        drop(guard);
        self.wait(op)?;
        Ok(CudaStorage::wrap_cuda_slice(dst, self.device.clone()))
    }

    /// Waits for the stream to pass the collective just enqueued; aborts the communicator on
    /// an asynchronous NCCL error or past the timeout.
    fn wait(&self, op: Collective) -> Result<(), ParallelError> {
        let event = self.stream.record_event(None).map_err(|e| nccl_error(op.name(), e))?;
        let deadline = Instant::now() + self.timeout;
        let mut polls = 0u32;
        loop {
            if event.try_is_complete().map_err(|e| nccl_error(op.name(), e))? {
                return Ok(());
            }
            if let Some(err) = self.async_error()? {
                self.abort();
                return Err(nccl_error(op.name(), err));
            }
            if Instant::now() >= deadline {
                self.abort();
                return Err(ParallelError::Nccl {
                    op: op.name(),
                    message: format!(
                        "timed out after {:.1}s (a rank is gone or stuck); communicator aborted",
                        self.timeout.as_secs_f64()
                    ),
                });
            }
            // Decode-step collectives finish in microseconds: spin briefly, then back off.
            polls += 1;
            if polls < 2000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn async_error(&self) -> Result<Option<sys::ncclResult_t>, ParallelError> {
        let guard = self.comm.lock().map_err(|_| nccl_error("poll", "lock poisoned"))?;
        let Some(comm) = guard.as_ref() else {
            return Ok(Some(sys::ncclResult_t::ncclInvalidUsage));
        };
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator and a valid out-pointer.
        unsafe { sys::ncclCommGetAsyncError(comm.0, &mut state) };
        Ok(match state {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => None,
            e => Some(e),
        })
    }

    fn abort(&self) {
        if let Ok(mut guard) = self.comm.lock() {
            if let Some(comm) = guard.take() {
                // SAFETY: a live communicator, never used again (taken out of the slot).
                let _ = unsafe { result::comm_abort(comm.0) };
            }
        }
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        self.abort();
    }
}

fn tensor_error(op: &'static str, e: impl std::fmt::Display) -> ParallelError {
    ParallelError::Tensor {
        op,
        message: e.to_string(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Collective {
    AllReduceSum,
    AllGather,
    /// From rank 0.
    Broadcast,
}

impl Collective {
    fn name(self) -> &'static str {
        match self {
            Collective::AllReduceSum => "all-reduce",
            Collective::AllGather => "all-gather",
            Collective::Broadcast => "broadcast",
        }
    }
}

/// One collective as a candle op, so it reads and writes device storage directly; the
/// precise failure is kept aside because candle's error type would flatten it.
struct NcclOp<'a> {
    comm: &'a NcclCommunicator,
    op: Collective,
    failure: Mutex<Option<ParallelError>>,
}

impl candle_core::CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        self.op.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives need CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        use sys::ncclDataType_t as N;
        let c = self.comm;
        let out = match s.dtype() {
            DType::F32 => c.launch::<f32>(self.op, s, l, N::ncclFloat32),
            DType::F16 => c.launch::<half::f16>(self.op, s, l, N::ncclFloat16),
            DType::BF16 => c.launch::<half::bf16>(self.op, s, l, N::ncclBfloat16),
            DType::U32 => c.launch::<u32>(self.op, s, l, N::ncclUint32),
            DType::U8 => c.launch::<u8>(self.op, s, l, N::ncclUint8),
            other => Err(tensor_error(self.op.name(), format!("{other:?} is not supported"))),
        };
        match out {
            Ok(storage) => {
                let n = storage_len(&storage);
                Ok((storage, Shape::from(n)))
            }
            Err(e) => {
                let message = e.to_string();
                if let Ok(mut f) = self.failure.lock() {
                    *f = Some(e);
                }
                Err(candle_core::Error::msg(message))
            }
        }
    }
}

fn storage_len(s: &CudaStorage) -> usize {
    match s.dtype() {
        DType::F32 => s.as_cuda_slice::<f32>().map(|x| x.len()),
        DType::F16 => s.as_cuda_slice::<half::f16>().map(|x| x.len()),
        DType::BF16 => s.as_cuda_slice::<half::bf16>().map(|x| x.len()),
        DType::U32 => s.as_cuda_slice::<u32>().map(|x| x.len()),
        _ => s.as_cuda_slice::<u8>().map(|x| x.len()),
    }
    .unwrap_or(0)
}

impl Communicator for NcclCommunicator {
    fn rank_info(&self) -> RankInfo {
        self.rank
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, ParallelError> {
        let out = self.run(Collective::AllReduceSum, t)?;
        out.reshape(t.shape()).map_err(|e| tensor_error("all-reduce", e))
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor, ParallelError> {
        let world = self.rank.world_size;
        let flat = self.run(Collective::AllGather, t)?;
        // NCCL lays the ranks' buffers end to end: [world, ..t's shape].
        let mut dims = vec![world];
        dims.extend_from_slice(t.dims());
        let stacked = flat.reshape(dims).map_err(|e| tensor_error("all-gather", e))?;
        let parts = (0..world)
            .map(|r| stacked.get(r))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| tensor_error("all-gather", e))?;
        Tensor::cat(&parts, dim).map_err(|e| tensor_error("all-gather", e))
    }

    /// A one-value all-reduce: unlike a broadcast, its root cannot finish before every rank
    /// has contributed, so a lost rank is noticed within the collective timeout.
    fn barrier(&self) -> Result<(), ParallelError> {
        let dev = Device::Cuda(self.device.clone());
        let one = Tensor::ones(1, DType::F32, &dev).map_err(|e| tensor_error("barrier", e))?;
        self.run(Collective::AllReduceSum, &one).map(|_| ())
    }

    fn broadcast_bytes(&self, data: Vec<u8>) -> Result<Vec<u8>, ParallelError> {
        let dev = Device::Cuda(self.device.clone());
        let t = |e: candle_core::Error| tensor_error("broadcast", e);
        // The length first: the other ranks size their buffers from it.
        let len = u32::try_from(data.len()).map_err(|_| tensor_error("broadcast", "payload over 4 GiB"))?;
        let len_t = Tensor::new(&[if self.rank.rank == 0 { len } else { 0 }], &dev).map_err(t)?;
        let len = self.run(Collective::Broadcast, &len_t)?.to_vec1::<u32>().map_err(t)?;
        let len = len.first().copied().unwrap_or(0) as usize;
        if len == 0 {
            return Ok(Vec::new());
        }
        let payload = if self.rank.rank == 0 {
            Tensor::from_vec(data, len, &dev).map_err(t)?
        } else {
            Tensor::zeros(len, DType::U8, &dev).map_err(t)?
        };
        self.run(Collective::Broadcast, &payload)?.to_vec1::<u8>().map_err(t)
    }
}
