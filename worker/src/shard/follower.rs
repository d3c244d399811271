//! Ranks 1..tp: join the leader, form the collective mesh, then run every step plan.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use neox_proto::neox::shard::v1 as pb;
use pb::shard_client::ShardClient;

use super::{LocalRunner, SeqPlan, StepRunner};
use crate::model::{GptNeoX, LogitsWanted, ModelError};
use crate::parallel::{connect_nccl, net, Communicator, ParallelError, RankInfo, TcpCommunicator};

/// How much longer than the collective timeout a rank waits for the leader's next plan: the
/// leader's heartbeat comes every second, a plan after each step.
const LEADER_SILENCE_MARGIN: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct FollowerOptions {
    pub rank: RankInfo,
    /// host:port of the leader's internal gRPC endpoint.
    pub leader_addr: String,
    /// Host (IP or name) other ranks reach this one at; default: the local address of a
    /// connection to the leader.
    pub advertise_host: Option<String>,
    /// Port of this rank's collective listener (0: any free port).
    pub collective_port: u16,
    pub rendezvous_timeout: Duration,
    pub collective_timeout: Duration,
    /// All-reduces of at least this many bytes use the ring algorithm.
    pub ring_threshold: usize,
    /// Called once the group has formed (e.g. to turn a health endpoint SERVING).
    pub on_ready: Option<Arc<dyn Fn() + Send + Sync>>,
}

fn rendezvous(m: String) -> ModelError {
    ModelError::Collective(ParallelError::Rendezvous(m))
}

/// The IP this host uses to reach `addr`, found by connecting to it.
fn local_ip_towards(addr: &str, deadline: Instant) -> Result<String, ModelError> {
    loop {
        let target = addr.to_socket_addrs().ok().and_then(|mut a| a.next());
        if let Some(t) = target {
            if let Ok(s) = TcpStream::connect_timeout(&t, Duration::from_secs(2)) {
                let ip = s.local_addr().map_err(|e| rendezvous(e.to_string()))?.ip();
                return Ok(ip.to_string());
            }
        }
        if Instant::now() > deadline {
            return Err(rendezvous(format!(
                "cannot reach the leader at {addr} (NEOX_LEADER_ADDR)"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Joins the group led by `opts.leader_addr` with `model` (this rank's shard) and runs step
/// plans until the leader shuts the group down. Returns an error if the leader goes away.
pub fn run_follower(opts: FollowerOptions, mut model: GptNeoX) -> Result<(), ModelError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ModelError::Internal(e.to_string()))?;
    let deadline = Instant::now() + opts.rendezvous_timeout;
    let host = match &opts.advertise_host {
        Some(h) => h.clone(),
        None => local_ip_towards(&opts.leader_addr, deadline)?,
    };
    let listener = net::listen_any(opts.collective_port)
        .map_err(|e| rendezvous(format!("cannot listen on port {}: {e}", opts.collective_port)))?;
    let port = listener.local_addr().map_err(|e| rendezvous(e.to_string()))?.port();
    let collective_addr = net::host_port(&host, port);
    let url = format!("http://{}", opts.leader_addr);
    let mut client = rt.block_on(async {
        loop {
            match ShardClient::connect(url.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => {
                    return Err(rendezvous(format!(
                        "cannot reach the leader at {}: {e}",
                        opts.leader_addr
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })?;
    let join = pb::JoinRequest {
        rank: opts.rank.rank as u32,
        world_size: opts.rank.world_size as u32,
        collective_addr,
        model_fingerprint: model.config().fingerprint(),
        device_free_bytes: crate::model::device_memory(model.device()).map_or(0, |(free, _)| free as u64),
    };
    let mut stream = rt
        .block_on(client.join(join))
        .map_err(|s| rendezvous(format!("the leader refused rank {}: {}", opts.rank.rank, s.message())))?
        .into_inner();
    // The leader sends a plan at least every second (a heartbeat when idle), so a silence past
    // the collective timeout means it is gone without closing the stream: a lost node or a
    // partition sends no FIN, and this rank would otherwise wait (and report SERVING) forever.
    let lost = |message: String| {
        ModelError::Collective(ParallelError::PeerLost {
            op: "group stream",
            peer: 0,
            message,
        })
    };
    let mut next = |what: &str, within: Duration| -> Result<pb::step_plan::Kind, ModelError> {
        let Ok(message) = rt.block_on(async { tokio::time::timeout(within, stream.message()).await }) else {
            return Err(lost(format!(
                "no word from the leader for {:.0} s while this rank waited for {what}",
                within.as_secs_f64()
            )));
        };
        match message {
            Ok(Some(pb::StepPlan { kind: Some(k) })) => Ok(k),
            Ok(Some(_)) => Err(ModelError::Internal(format!("empty message while waiting for {what}"))),
            Ok(None) => Err(lost(format!(
                "the leader closed the group while this rank waited for {what}"
            ))),
            Err(s) => Err(lost(format!("{} ({what})", s.message()))),
        }
    };
    // The setup comes once every rank joined, which the leader waits for up to its rendezvous
    // timeout.
    let setup_wait = opts.rendezvous_timeout + opts.collective_timeout;
    let step_wait = opts.collective_timeout + LEADER_SILENCE_MARGIN;
    let pb::step_plan::Kind::Setup(setup) = next("the group setup", setup_wait)? else {
        return Err(ModelError::Internal("the leader sent a step before the setup".into()));
    };
    // The leader chose the collectives: NCCL when it sent an id, TCP otherwise.
    let comm: Arc<dyn Communicator> = if setup.nccl_id.is_empty() {
        Arc::new(
            TcpCommunicator::connect_mesh(opts.rank, listener, &setup.collective_addrs, opts.collective_timeout)?
                .with_ring_threshold(opts.ring_threshold),
        )
    } else {
        drop(listener);
        let device = model.device().clone();
        connect_nccl(
            opts.rank,
            &setup.nccl_id,
            &device,
            opts.rendezvous_timeout,
            opts.collective_timeout,
        )?
    };
    model.attach_comm(comm)?;
    let mut runner = LocalRunner::new(model);
    if let Some(f) = &opts.on_ready {
        f();
    }
    // Debug knob for failure tests: a slow (or, past the collective timeout, stuck) rank.
    let delay = std::env::var("NEOX_DEBUG_STEP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    tracing::info!(rank = opts.rank.rank, "group formed; running step plans");
    loop {
        match next("the next step", step_wait)? {
            pb::step_plan::Kind::Forward(f) if f.sequences.is_empty() => runner.model().barrier()?,
            pb::step_plan::Kind::Forward(f) => {
                if let Some(ms) = delay {
                    std::thread::sleep(Duration::from_millis(ms));
                }
                let mut plan = Vec::with_capacity(f.sequences.len());
                for s in f.sequences {
                    let have = runner.cached_len(s.id);
                    if have != s.cached as usize {
                        return Err(ModelError::Internal(format!(
                            "step {}: sequence {} has {} tokens cached on the leader but {have} here",
                            f.step, s.id, s.cached
                        )));
                    }
                    let logits = match pb::Logits::try_from(s.logits) {
                        Ok(pb::Logits::Last) => LogitsWanted::Last,
                        Ok(pb::Logits::All) => LogitsWanted::All,
                        _ => LogitsWanted::None,
                    };
                    plan.push(SeqPlan {
                        id: s.id,
                        start: s.start_pos as usize,
                        tokens: s.tokens,
                        logits,
                        reserve: s.reserve as usize,
                    });
                }
                runner.step(&plan)?;
            }
            pb::step_plan::Kind::Release(r) => runner.release(&r.ids)?,
            pb::step_plan::Kind::Fork(f) => runner.fork(f.from, f.to, f.tokens as usize, f.reserve as usize)?,
            pb::step_plan::Kind::PagedKv(p) => runner.use_paged_kv(p.blocks as usize, p.block_size as usize)?,
            pb::step_plan::Kind::Shutdown(s) => {
                tracing::info!(reason = %s.reason, "leader shut the group down");
                return Ok(());
            }
            pb::step_plan::Kind::Setup(_) => return Err(ModelError::Internal("a second setup".into())),
        }
    }
}
