//! Collective communication between the ranks of a tensor-parallel group.
//!
//! The model only sees the [`Communicator`] trait; backends decide how bytes move:
//! [`SingleRank`] (no-op) and, for CPU ranks on any hosts, TCP.

use candle_core::Tensor;

mod single;
mod tcp;

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
    #[error("tensor error in {op}: {message}")]
    Tensor { op: &'static str, message: String },
}

/// This rank's place in its group.
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
