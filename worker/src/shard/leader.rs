//! Rank 0: the `neox.shard.v1` service followers join, and the runner that sends them plans.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use neox_proto::neox::shard::v1 as pb;
use pb::shard_server::{Shard, ShardServer};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use super::{LocalRunner, SeqPlan, StepRunner};
use crate::model::{GptNeoX, LogitsWanted, ModelError};
use crate::parallel::{connect_nccl, new_nccl_id, Backend, Communicator, ParallelError, RankInfo, TcpCommunicator};

#[derive(Debug, Clone)]
pub struct GroupOptions {
    pub world_size: usize,
    /// Model fingerprint every follower must match.
    pub fingerprint: String,
    /// How long to wait for every follower to join (their model loads included).
    pub rendezvous_timeout: Duration,
    pub collective_timeout: Duration,
    /// The leader's collective endpoint as followers can reach it (host:port).
    pub collective_addr: String,
    /// All-reduces of at least this many bytes use the ring algorithm.
    pub ring_threshold: usize,
    /// The collectives every rank of the group uses (the leader decides for all).
    pub backend: Backend,
}

type PlanSender = UnboundedSender<Result<pb::StepPlan, Status>>;

/// A follower that joined: where it listens for collectives, its plan stream, and its
/// device's free memory (0: unknown).
struct Joined {
    addr: String,
    plans: PlanSender,
    device_free: u64,
}

/// The group as it formed: the collectives, each follower's plan stream, and the least free
/// device memory any follower reported.
pub struct FormedGroup {
    pub comm: Arc<dyn Communicator>,
    pub followers: Vec<PlanSender>,
    pub followers_device_free: Option<usize>,
}

#[derive(Default)]
struct State {
    joined: HashMap<u32, Joined>,
    /// A follower configured inconsistently with the leader: the group cannot form.
    fatal: Option<String>,
}

/// The leader's side of the rendezvous.
#[derive(Clone)]
pub struct GroupLeader {
    opts: GroupOptions,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl GroupLeader {
    pub fn new(opts: GroupOptions) -> Self {
        Self {
            opts,
            state: Arc::new((Mutex::new(State::default()), Condvar::new())),
        }
    }

    /// The tonic service to mount on the leader's internal gRPC server.
    pub fn service(&self) -> ShardServer<Self> {
        ShardServer::new(self.clone())
    }

    /// Marks the group as impossible to form (e.g. a follower process died).
    pub fn fail(&self, message: String) {
        let (m, cv) = &*self.state;
        if let Ok(mut s) = m.lock() {
            s.fatal.get_or_insert(message);
        }
        cv.notify_all();
    }

    fn reject(&self, status: Status, fatal: bool) -> Status {
        if fatal {
            let (m, cv) = &*self.state;
            if let Ok(mut s) = m.lock() {
                s.fatal.get_or_insert_with(|| status.message().to_owned());
            }
            cv.notify_all();
        }
        status
    }

    /// Waits for every follower, hands out the group's setup and joins its collectives
    /// (`device`: the leader's, for NCCL).
    pub fn form_group(
        &self,
        listener: TcpListener,
        device: &candle_core::Device,
    ) -> Result<FormedGroup, ParallelError> {
        let world = self.opts.world_size;
        let deadline = Instant::now() + self.opts.rendezvous_timeout;
        let (m, cv) = &*self.state;
        let mut s = m
            .lock()
            .map_err(|_| ParallelError::Rendezvous("state poisoned".into()))?;
        loop {
            if let Some(f) = &s.fatal {
                return Err(ParallelError::Rendezvous(f.clone()));
            }
            if s.joined.len() == world - 1 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> = (1..world as u32)
                    .filter(|r| !s.joined.contains_key(r))
                    .map(|r| r.to_string())
                    .collect();
                return Err(ParallelError::Rendezvous(format!(
                    "rank(s) {} did not join within {:.0}s",
                    missing.join(", "),
                    self.opts.rendezvous_timeout.as_secs_f64()
                )));
            }
            s = cv
                .wait_timeout(s, deadline - now)
                .map_err(|_| ParallelError::Rendezvous("state poisoned".into()))?
                .0;
        }
        let followers_device_free = least_device_free(s.joined.values());
        let mut addrs = vec![self.opts.collective_addr.clone()];
        let mut senders = Vec::with_capacity(world - 1);
        // Moved out, not cloned: once the runner drops them the group streams can end.
        for r in 1..world as u32 {
            let j = s
                .joined
                .remove(&r)
                .ok_or_else(|| ParallelError::Rendezvous(format!("rank {r} vanished")))?;
            addrs.push(j.addr);
            senders.push(j.plans);
        }
        drop(s);
        let nccl_id = match self.opts.backend {
            Backend::Tcp => Vec::new(),
            Backend::Nccl => new_nccl_id()?,
        };
        let setup = pb::StepPlan {
            kind: Some(pb::step_plan::Kind::Setup(pb::Setup {
                collective_addrs: addrs.clone(),
                nccl_id: nccl_id.clone(),
            })),
        };
        for (i, tx) in senders.iter().enumerate() {
            tx.send(Ok(setup.clone())).map_err(|_| ParallelError::PeerLost {
                op: "setup",
                peer: i + 1,
                message: "its group stream closed".into(),
            })?;
        }
        let rank = RankInfo {
            rank: 0,
            world_size: world,
        };
        let comm: Arc<dyn Communicator> = match self.opts.backend {
            Backend::Tcp => Arc::new(
                TcpCommunicator::connect_mesh(rank, listener, &addrs, self.opts.collective_timeout)?
                    .with_ring_threshold(self.opts.ring_threshold),
            ),
            Backend::Nccl => connect_nccl(
                rank,
                &nccl_id,
                device,
                self.opts.rendezvous_timeout,
                self.opts.collective_timeout,
            )?,
        };
        Ok(FormedGroup {
            comm,
            followers: senders,
            followers_device_free,
        })
    }
}

/// The least free device memory among followers that know theirs.
fn least_device_free<'a>(joined: impl Iterator<Item = &'a Joined>) -> Option<usize> {
    joined
        .map(|j| j.device_free)
        .filter(|&free| free > 0)
        .min()
        .map(|free| usize::try_from(free).unwrap_or(usize::MAX))
}

#[tonic::async_trait]
impl Shard for GroupLeader {
    type JoinStream = UnboundedReceiverStream<Result<pb::StepPlan, Status>>;

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<Self::JoinStream>, Status> {
        let j = req.into_inner();
        let world = self.opts.world_size as u32;
        if j.world_size != world {
            return Err(self.reject(
                Status::invalid_argument(format!(
                    "world size mismatch: rank {} says {}, the leader runs {world}",
                    j.rank, j.world_size
                )),
                true,
            ));
        }
        if j.rank == 0 || j.rank >= world {
            return Err(self.reject(
                Status::invalid_argument(format!(
                    "rank {} is not a follower rank of a world of {world} (1..{world})",
                    j.rank
                )),
                true,
            ));
        }
        if j.model_fingerprint != self.opts.fingerprint {
            return Err(self.reject(
                Status::failed_precondition(format!(
                    "rank {} loaded a different model ({}) than the leader ({})",
                    j.rank, j.model_fingerprint, self.opts.fingerprint
                )),
                true,
            ));
        }
        let (tx, rx) = unbounded_channel();
        let (m, cv) = &*self.state;
        {
            let mut s = m.lock().map_err(|_| Status::internal("state poisoned"))?;
            if s.joined.contains_key(&j.rank) {
                drop(s);
                return Err(self.reject(
                    Status::already_exists(format!("duplicate rank {}: already joined", j.rank)),
                    true,
                ));
            }
            s.joined.insert(
                j.rank,
                Joined {
                    addr: j.collective_addr.clone(),
                    plans: tx,
                    device_free: j.device_free_bytes,
                },
            );
        }
        cv.notify_all();
        tracing::info!(rank = j.rank, addr = %j.collective_addr, device_free = j.device_free_bytes, "follower joined");
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

/// The leader's runner: every step goes to the followers first, then runs here.
pub struct LeaderRunner {
    local: LocalRunner,
    followers: Vec<PlanSender>,
    step: u64,
}

fn logits_pb(l: LogitsWanted) -> i32 {
    match l {
        LogitsWanted::None => pb::Logits::None as i32,
        LogitsWanted::Last => pb::Logits::Last as i32,
        LogitsWanted::All => pb::Logits::All as i32,
    }
}

impl LeaderRunner {
    pub fn new(local: LocalRunner, followers: Vec<PlanSender>) -> Self {
        Self {
            local,
            followers,
            step: 0,
        }
    }

    fn send(&self, plan: pb::StepPlan) -> Result<(), ModelError> {
        for (i, tx) in self.followers.iter().enumerate() {
            tx.send(Ok(plan.clone())).map_err(|_| {
                ModelError::Collective(ParallelError::PeerLost {
                    op: "step plan",
                    peer: i + 1,
                    message: "group stream closed".into(),
                })
            })?;
        }
        Ok(())
    }
}

impl StepRunner for LeaderRunner {
    fn step(&mut self, plan: &[SeqPlan]) -> Result<Vec<Option<Tensor>>, ModelError> {
        self.step += 1;
        let sequences = plan
            .iter()
            .map(|p| pb::Sequence {
                id: p.id,
                tokens: p.tokens.clone(),
                start_pos: p.start as u32,
                cached: self.local.cached_len(p.id) as u32,
                logits: logits_pb(p.logits),
                reserve: p.reserve as u32,
            })
            .collect();
        self.send(pb::StepPlan {
            kind: Some(pb::step_plan::Kind::Forward(pb::Forward {
                step: self.step,
                sequences,
            })),
        })?;
        self.local.step(plan)
    }

    fn release(&mut self, ids: &[u64]) -> Result<(), ModelError> {
        self.send(pb::StepPlan {
            kind: Some(pb::step_plan::Kind::Release(pb::Release { ids: ids.to_vec() })),
        })?;
        self.local.release(ids)
    }

    fn fork(&mut self, from: u64, to: u64, tokens: usize, reserve: usize) -> Result<(), ModelError> {
        let too_big = |what: &str| ModelError::Input(format!("{what} does not fit the group protocol"));
        self.send(pb::StepPlan {
            kind: Some(pb::step_plan::Kind::Fork(pb::Fork {
                from,
                to,
                tokens: u32::try_from(tokens).map_err(|_| too_big("the forked prefix"))?,
                reserve: u32::try_from(reserve).map_err(|_| too_big("the KV reservation"))?,
            })),
        })?;
        self.local.fork(from, to, tokens, reserve)
    }

    fn model(&self) -> &GptNeoX {
        self.local.model()
    }

    fn use_paged_kv(&mut self, blocks: usize, block_size: usize) -> Result<(), ModelError> {
        let too_big = |what: &str| ModelError::Input(format!("{what} does not fit the group protocol"));
        self.send(pb::StepPlan {
            kind: Some(pb::step_plan::Kind::PagedKv(pb::PagedKv {
                blocks: u32::try_from(blocks).map_err(|_| too_big("the KV block count"))?,
                block_size: u32::try_from(block_size).map_err(|_| too_big("the KV block size"))?,
            })),
        })?;
        self.local.use_paged_kv(blocks, block_size)
    }

    fn heartbeat(&mut self) -> Result<(), ModelError> {
        self.step += 1;
        self.send(pb::StepPlan {
            kind: Some(pb::step_plan::Kind::Forward(pb::Forward {
                step: self.step,
                sequences: vec![],
            })),
        })?;
        self.local.model().barrier()
    }
}

impl Drop for LeaderRunner {
    fn drop(&mut self) {
        let bye = pb::StepPlan {
            kind: Some(pb::step_plan::Kind::Shutdown(pb::Shutdown {
                reason: "leader done".into(),
            })),
        };
        for tx in &self.followers {
            let _ = tx.send(Ok(bye.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_kv_budget_follows_the_follower_with_the_least_free_device_memory() {
        let leader = GroupLeader::new(GroupOptions {
            world_size: 4,
            fingerprint: "fp".into(),
            rendezvous_timeout: Duration::from_secs(1),
            collective_timeout: Duration::from_secs(1),
            collective_addr: "127.0.0.1:1".into(),
            ring_threshold: 0,
            backend: Backend::Tcp,
        });
        // A CPU rank, or one that cannot tell, says 0: it does not count.
        for (rank, free) in [(1, 5u64 << 30), (2, 3 << 30), (3, 0)] {
            let join = pb::JoinRequest {
                rank,
                world_size: 4,
                collective_addr: format!("127.0.0.1:{rank}"),
                model_fingerprint: "fp".into(),
                device_free_bytes: free,
            };
            leader.join(Request::new(join)).await.unwrap();
        }
        let state = leader.state.0.lock().unwrap();
        assert_eq!(least_device_free(state.joined.values()), Some(3 << 30));
        assert_eq!(
            least_device_free(state.joined.values().filter(|j| j.device_free == 0)),
            None
        );
    }
}
