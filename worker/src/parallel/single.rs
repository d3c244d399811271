use candle_core::Tensor;

use super::{Communicator, ParallelError, RankInfo};

/// The communicator of a group of one: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank_info(&self) -> RankInfo {
        RankInfo::SINGLE
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, ParallelError> {
        Ok(t.clone())
    }
    fn all_gather(&self, t: &Tensor, _dim: usize) -> Result<Tensor, ParallelError> {
        Ok(t.clone())
    }
    fn broadcast_bytes(&self, data: Vec<u8>) -> Result<Vec<u8>, ParallelError> {
        Ok(data)
    }
}

/// The communicator of a multi-rank shard before its group has formed: every collective
/// fails, so a forward can never silently run on a partial model.
#[derive(Debug, Clone, Copy)]
pub struct Unconnected(pub RankInfo);

impl Communicator for Unconnected {
    fn rank_info(&self) -> RankInfo {
        self.0
    }
    fn all_reduce_sum(&self, _t: &Tensor) -> Result<Tensor, ParallelError> {
        Err(ParallelError::Rendezvous("the group has not formed yet".into()))
    }
    fn all_gather(&self, _t: &Tensor, _dim: usize) -> Result<Tensor, ParallelError> {
        Err(ParallelError::Rendezvous("the group has not formed yet".into()))
    }
    fn broadcast_bytes(&self, _data: Vec<u8>) -> Result<Vec<u8>, ParallelError> {
        Err(ParallelError::Rendezvous("the group has not formed yet".into()))
    }
}
