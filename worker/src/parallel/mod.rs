//! Collective communication between the ranks of a tensor-parallel group.
//!
//! The model only sees the [`Communicator`] trait; backends decide how bytes move:
//! [`SingleRank`] (no-op), TCP for CPU ranks on any hosts (or GPU ranks without NCCL), and
//! NCCL for GPU ranks (`cuda` builds).

use candle_core::Tensor;

#[cfg(feature = "cuda")]
mod nccl;
pub mod net;
mod single;
mod tcp;

#[cfg(feature = "cuda")]
pub use nccl::{NcclCommunicator, NcclTimeouts, NCCL_ID_BYTES};

pub use single::{SingleRank, Unconnected};
pub use tcp::{TcpCommunicator, DEFAULT_RING_THRESHOLD};

#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    #[error("collective {op} timed out after {secs:.1}s waiting for rank {peer}")]
    Timeout { op: &'static str, peer: usize, secs: f64 },
    #[error("rank {peer} is gone ({op}): {message}")]
    PeerLost {
        op: &'static str,
        peer: usize,
        message: String,
    },
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
    #[error("NCCL {op} failed: {message}")]
    Nccl { op: &'static str, message: String },
    #[error("tensor error in {op}: {message}")]
    Tensor { op: &'static str, message: String },
}

/// This rank's place in its group.
/// How a group's ranks move collective data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Sockets between any hosts; works for every device (GPU tensors go through the host).
    Tcp,
    /// NCCL between GPUs, one per rank (`cuda` builds only).
    Nccl,
}

/// A fresh NCCL unique id for a new group (made by the leader, sent to every rank).
pub fn new_nccl_id() -> Result<Vec<u8>, ParallelError> {
    #[cfg(feature = "cuda")]
    {
        nccl::new_unique_id()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(no_cuda())
    }
}

/// Joins the NCCL group `id` as `rank` on `device`: within `join` for the group to form, then
/// `collective` for each collective.
pub fn connect_nccl(
    rank: RankInfo,
    id: &[u8],
    device: &candle_core::Device,
    join: std::time::Duration,
    collective: std::time::Duration,
) -> Result<std::sync::Arc<dyn Communicator>, ParallelError> {
    #[cfg(feature = "cuda")]
    {
        let timeouts = NcclTimeouts { join, collective };
        Ok(std::sync::Arc::new(NcclCommunicator::connect(
            rank, id, device, timeouts,
        )?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (rank, id, device, join, collective);
        Err(no_cuda())
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> ParallelError {
    ParallelError::Rendezvous("NCCL collectives need a CUDA build of neox-worker (cargo build --features cuda)".into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankInfo {
    pub rank: usize,
    pub world_size: usize,
}

impl RankInfo {
    pub const SINGLE: RankInfo = RankInfo { rank: 0, world_size: 1 };

    /// `[start, start + len)` of `total` items owned by this rank; `total` must divide evenly.
    pub fn split(&self, total: usize) -> (usize, usize) {
        let len = total / self.world_size;
        (self.rank * len, len)
    }
}

/// Collectives over the ranks of one group. Every rank must call the same collectives in the
/// same order with tensors of the same shape and dtype.
pub trait Communicator: Send + Sync {
    fn rank_info(&self) -> RankInfo;
    /// Element-wise sum over all ranks; every rank receives the result.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, ParallelError>;
    /// Concatenation of every rank's tensor along `dim`, in rank order; every rank receives it.
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor, ParallelError>;
    /// Rank 0's bytes, delivered to every rank.
    fn broadcast_bytes(&self, data: Vec<u8>) -> Result<Vec<u8>, ParallelError>;
    /// Returns once every rank has reached it.
    fn barrier(&self) -> Result<(), ParallelError> {
        self.broadcast_bytes(Vec::new()).map(|_| ())
    }
}
