//! Bringing up this process's part of a tensor-parallel group from the command line:
//! a single rank, the leader of a multi-host group (NEOX_RANK=0), or the local launcher
//! (`--tp N`), which spawns and supervises N-1 follower processes like torchrun.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use neox_worker::model::{self, LoadedModel, NeoXTokenizer};
use neox_worker::parallel::{net, Backend, RankInfo};
use neox_worker::shard::{self, GroupLeader, GroupOptions, LeaderRunner, LocalRunner, StepRunner};

use super::ModelArgs;

#[derive(Args, Clone, Debug)]
pub struct GroupArgs {
    /// Tensor-parallel size on this host: spawns tp-1 follower processes.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// This process's rank in a multi-host group (0 = leader).
    #[arg(long, env = "NEOX_RANK")]
    pub rank: Option<usize>,
    /// Ranks in the group.
    #[arg(long, env = "NEOX_WORLD_SIZE")]
    pub world_size: Option<usize>,
    /// host:port of rank 0's internal endpoint (the leader listens on its port).
    #[arg(long, env = "NEOX_LEADER_ADDR")]
    pub leader_addr: Option<String>,
    /// Host other ranks reach this one at (default: found by connecting to the leader).
    #[arg(long, env = "NEOX_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// Port for collective traffic (0: any free port).
    #[arg(long, env = "NEOX_COLLECTIVE_PORT", default_value_t = 0)]
    pub collective_port: u16,
    /// Seconds a collective may wait for a peer before the group is declared broken.
    #[arg(long, env = "NEOX_COLLECTIVE_TIMEOUT", default_value_t = 30.0)]
    pub collective_timeout: f64,
    /// All-reduces of at least this many bytes use a ring instead of one-shot exchange
    /// (worth lowering for groups spread over slow links).
    #[arg(long, env = "NEOX_RING_THRESHOLD_BYTES", default_value_t = neox_worker::parallel::DEFAULT_RING_THRESHOLD)]
    pub ring_threshold_bytes: usize,
    /// Collectives between ranks: nccl (GPUs, one per rank), tcp (any device, any hosts), or
    /// auto: nccl when the model runs on CUDA, else tcp. Followers use the leader's choice.
    #[arg(long, env = "NEOX_COLLECTIVES", value_enum, default_value_t = Collectives::Auto)]
    pub collectives: Collectives,
    /// Seconds to wait for every rank to join (model loads included).
    #[arg(long, env = "NEOX_RENDEZVOUS_TIMEOUT", default_value_t = 600.0)]
    pub rendezvous_timeout: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Collectives {
    Auto,
    Tcp,
    Nccl,
}

impl Collectives {
    /// The backend for a group of `world` ranks whose leader runs on `device` (from
    /// `--device device_arg`); `local`: every rank is on this host (the `--tp` launcher).
    fn resolve(self, device: &candle_core::Device, device_arg: &str, world: usize, local: bool) -> Result<Backend> {
        if self == Collectives::Tcp || !device.is_cuda() {
            if self == Collectives::Nccl {
                bail!("--collectives nccl needs --device cuda (the model runs on {device:?})");
            }
            return Ok(Backend::Tcp);
        }
        // NCCL refuses two ranks on one GPU: a pinned ordinal, or more local ranks than GPUs.
        let pinned = device_arg.trim().to_ascii_lowercase().starts_with("cuda:");
        let shares_gpu = local && world > 1 && (pinned || world > model::cuda_device_count()?);
        Ok(match (self, shares_gpu) {
            (Collectives::Nccl, true) => bail!(
                "--collectives nccl needs one GPU per rank, but the {world} ranks on this host would share \
                 GPUs (--device {device_arg}); use --collectives tcp, or --device cuda with enough GPUs"
            ),
            (_, true) => Backend::Tcp,
            _ => Backend::Nccl,
        })
    }
}

fn secs(name: &str, v: f64) -> Result<Duration> {
    if !(v > 0.0 && v.is_finite()) {
        bail!("--{name} must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// The resolved place of this process.
struct Role {
    rank: RankInfo,
    /// Spawn followers locally (the `--tp` launcher).
    launcher: bool,
}

fn role(g: &GroupArgs) -> Result<Role> {
    if g.tp == 0 {
        bail!("--tp must be at least 1");
    }
    match (g.rank, g.world_size) {
        (None, None) => Ok(Role {
            rank: RankInfo {
                rank: 0,
                world_size: g.tp,
            },
            launcher: g.tp > 1,
        }),
        (Some(rank), Some(world)) => {
            if g.tp != 1 && g.tp != world {
                bail!("--tp {} conflicts with world size {world}", g.tp);
            }
            if world == 0 || rank >= world {
                bail!("rank {rank} is outside a world of {world} (NEOX_RANK must be in 0..NEOX_WORLD_SIZE)");
            }
            if world > 1 && g.leader_addr.is_none() {
                bail!("a group of {world} ranks needs --leader-addr (NEOX_LEADER_ADDR)");
            }
            Ok(Role {
                rank: RankInfo {
                    rank,
                    world_size: world,
                },
                launcher: false,
            })
        }
        _ => bail!("give both --rank and --world-size (NEOX_RANK, NEOX_WORLD_SIZE), or neither"),
    }
}

fn set_threads(m: &ModelArgs, world: usize, launcher: bool) -> Result<Option<usize>> {
    let threads = match m.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => Some(t),
        // Ranks sharing one host split its cores rather than oversubscribe them.
        None if launcher => Some((std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) / world).max(1)),
        None => None,
    };
    if let Some(t) = threads {
        // candle and gemm size their pools from this before the first matmul.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    Ok(threads)
}

fn load(m: &ModelArgs, rank: RankInfo) -> Result<LoadedModel> {
    let dtype = model::parse_dtype(&m.dtype)?;
    let device = model::parse_device_for_rank(&m.device, rank.rank)?;
    model::load(&m.model, dtype, &device, rank)
        .with_context(|| format!("loading model {} (rank {})", m.model, rank.rank))
}

/// This process's runner (and, on a leader, the followers it supervises).
pub struct Group {
    pub name: String,
    pub tokenizer: NeoXTokenizer,
    runner: Option<Box<dyn StepRunner>>,
    /// The least free device memory a follower reported with its shard loaded (GPU ranks).
    pub followers_device_free: Option<usize>,
    children: Arc<Mutex<Vec<(usize, Child)>>>,
    /// The group endpoint: its runtime, a shutdown trigger and the server task.
    endpoint: Option<Endpoint>,
}

struct Endpoint {
    runtime: tokio::runtime::Runtime,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Group {
    /// Moves the runner out (to the engine thread); the group keeps supervising.
    pub fn take_runner(&mut self) -> Result<Box<dyn StepRunner>> {
        self.runner.take().context("the group is shut down")
    }

    pub fn runner(&mut self) -> Result<&mut dyn StepRunner> {
        match self.runner.as_deref_mut() {
            Some(r) => Ok(r),
            None => bail!("the group is shut down"),
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Dropping the runner tells followers to shut down and ends their streams; a graceful
        // server shutdown then makes sure that last message reaches them before we exit (bounded:
        // a stuck follower must not hold up a failing leader).
        self.runner = None;
        if let Some(ep) = self.endpoint.take() {
            let _ = ep.stop.send(());
            let _ = ep
                .runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(1), ep.server).await });
        }
        if let Ok(mut children) = self.children.lock() {
            for (_, c) in children.iter_mut() {
                for _ in 0..50 {
                    if matches!(c.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Starts this process as rank 0 (alone, as a multi-host leader, or as the local launcher).
pub fn start_leader(m: &ModelArgs, g: &GroupArgs) -> Result<Group> {
    let role = role(g)?;
    if role.rank.rank != 0 {
        bail!(
            "this command runs on rank 0; rank {} runs `neox-worker follower`",
            role.rank.rank
        );
    }
    let threads = set_threads(m, role.rank.world_size, role.launcher)?;
    let loaded = load(m, role.rank)?;
    let children = Arc::new(Mutex::new(Vec::new()));
    if role.rank.world_size == 1 {
        return Ok(Group {
            name: loaded.name,
            tokenizer: loaded.tokenizer,
            runner: Some(Box::new(LocalRunner::new(loaded.model))),
            followers_device_free: None,
            children,
            endpoint: None,
        });
    }
    let collective_timeout = secs("collective-timeout", g.collective_timeout)?;
    let rendezvous_timeout = secs("rendezvous-timeout", g.rendezvous_timeout)?;
    let (grpc, collective, leader_host) = if role.launcher {
        let grpc = TcpListener::bind("127.0.0.1:0").context("binding the group endpoint")?;
        (grpc, TcpListener::bind("127.0.0.1:0")?, "127.0.0.1".to_owned())
    } else {
        let addr = g.leader_addr.clone().unwrap_or_default();
        let (host, port) = addr
            .rsplit_once(':')
            .with_context(|| format!("leader address {addr:?} is not host:port"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("leader address {addr:?} has no valid port"))?;
        let grpc = net::listen_any(port).with_context(|| format!("binding the group endpoint :{port}"))?;
        let coll = net::listen_any(g.collective_port).context("binding the collective port")?;
        (grpc, coll, host.to_owned())
    };
    let grpc_addr = grpc.local_addr()?;
    let collective_addr = net::host_port(&leader_host, collective.local_addr()?.port());
    let leader = GroupLeader::new(GroupOptions {
        world_size: role.rank.world_size,
        fingerprint: loaded.model.config().fingerprint(),
        rendezvous_timeout,
        collective_timeout,
        collective_addr,
        ring_threshold: g.ring_threshold_bytes,
        backend: g
            .collectives
            .resolve(loaded.model.device(), &m.device, role.rank.world_size, role.launcher)?,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    grpc.set_nonblocking(true)?;
    let incoming = {
        let _guard = runtime.enter();
        // No Nagle: step plans are small messages on the critical path of every step.
        tonic::transport::server::TcpIncoming::from(tokio::net::TcpListener::from_std(grpc)?).with_nodelay(Some(true))
    };
    let svc = leader.service();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            tracing::error!("group endpoint failed: {e}");
        }
    });
    if role.launcher {
        let exe = std::env::current_exe().context("locating neox-worker for the followers")?;
        for r in 1..role.rank.world_size {
            let mut cmd = Command::new(&exe);
            cmd.args([
                "follower", "--model", &m.model, "--dtype", &m.dtype, "--device", &m.device,
            ])
            .args([
                "--rank",
                &r.to_string(),
                "--world-size",
                &role.rank.world_size.to_string(),
            ])
            .args(["--leader-addr", &grpc_addr.to_string(), "--advertise-host", "127.0.0.1"])
            .args(["--collective-timeout", &g.collective_timeout.to_string()])
            .args(["--rendezvous-timeout", &g.rendezvous_timeout.to_string()])
            .args(["--ring-threshold-bytes", &g.ring_threshold_bytes.to_string()])
            .env_remove("NEOX_RANK")
            .env_remove("NEOX_WORLD_SIZE")
            .env_remove("NEOX_LEADER_ADDR")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
            if let Some(t) = threads {
                cmd.args(["--threads", &t.to_string()]);
            }
            let child = cmd.spawn().with_context(|| format!("spawning follower rank {r}"))?;
            tracing::info!(rank = r, pid = child.id(), "spawned follower");
            eprintln!("neox-worker: follower rank {r} pid {}", child.id());
            children
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .push((r, child));
        }
        watch_children(children.clone(), leader.clone());
    }
    let mut model = loaded.model;
    let formed = leader.form_group(collective, model.device())?;
    model.attach_comm(formed.comm)?;
    eprintln!("neox-worker: group of {} ranks formed", role.rank.world_size);
    Ok(Group {
        name: loaded.name,
        tokenizer: loaded.tokenizer,
        runner: Some(Box::new(LeaderRunner::new(LocalRunner::new(model), formed.followers))),
        followers_device_free: formed.followers_device_free,
        children,
        endpoint: Some(Endpoint { runtime, stop, server }),
    })
}

/// A follower that exits ends the group: fail the rendezvous at once instead of waiting it out.
fn watch_children(children: Arc<Mutex<Vec<(usize, Child)>>>, leader: GroupLeader) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(100));
        let Ok(mut cs) = children.lock() else { return };
        if cs.is_empty() {
            return;
        }
        for (r, c) in cs.iter_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                if !status.success() {
                    leader.fail(format!("follower rank {r} exited with {status}"));
                    return;
                }
            }
        }
    });
}

/// A follower outlives the first SIGTERM or SIGINT. The whole group gets one at once (a
/// terminal's Ctrl-C, systemd stopping a unit, `kill` of a process group) and the leader then
/// drains its in-flight requests, which needs every rank; it ends the group when done, and a
/// follower also ends when its leader is gone. A second signal ends the follower at once. (In
/// a container the rank is PID 1, which the kernel already spares signals it does not handle.)
fn outlive_first_signal(rank: usize) {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers are in place before this returns: a signal from then on is caught.
    let install = || -> std::io::Result<_> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
        let signals = {
            let _in = rt.enter();
            (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?)
        };
        Ok((rt, signals))
    };
    let (rt, (mut term, mut int)) = match install() {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("cannot catch signals (SIGTERM will stop this rank at once): {e}");
            return;
        }
    };
    let watch = move || {
        rt.block_on(async move {
            let name = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
            tracing::info!(
                rank,
                "{name}: staying up until the leader ends the group (again to stop now)"
            );
            let name = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
            tracing::warn!(rank, "second {name}: exiting now");
            std::process::exit(130);
        })
    };
    if let Err(e) = std::thread::Builder::new().name("signals".into()).spawn(watch) {
        tracing::warn!("cannot watch for signals (SIGTERM will stop this rank at once): {e}");
    }
}

#[derive(Args, Debug)]
pub struct FollowerArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub group: GroupArgs,
}

/// `neox-worker follower`: ranks 1..tp of a group.
pub fn follower(a: FollowerArgs) -> Result<()> {
    follower_with_health(a, None)
}

/// A follower that also answers gRPC health on `health_addr` (NOT_SERVING until the group
/// has formed), so every rank of a Kubernetes group has the same probes.
pub fn follower_with_health(a: FollowerArgs, health_addr: Option<std::net::SocketAddr>) -> Result<()> {
    let role = role(&a.group)?;
    if role.rank.rank == 0 || role.launcher {
        bail!("a follower needs --rank ≥ 1 with --world-size and --leader-addr (or NEOX_RANK, NEOX_WORLD_SIZE, NEOX_LEADER_ADDR)");
    }
    outlive_first_signal(role.rank.rank);
    set_threads(&a.model, role.rank.world_size, false)?;
    let loaded = load(&a.model, role.rank)?;
    let opts = shard::FollowerOptions {
        rank: role.rank,
        leader_addr: a.group.leader_addr.clone().unwrap_or_default(),
        advertise_host: a.group.advertise_host.clone(),
        collective_port: a.group.collective_port,
        rendezvous_timeout: secs("rendezvous-timeout", a.group.rendezvous_timeout)?,
        collective_timeout: secs("collective-timeout", a.group.collective_timeout)?,
        ring_threshold: a.group.ring_threshold_bytes,
        on_ready: None,
    };
    let Some(addr) = health_addr else {
        shard::run_follower(opts, loaded.model).with_context(|| format!("rank {}", role.rank.rank))?;
        return Ok(());
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    // tonic-health starts the whole server ("") as SERVING; this rank serves nothing until its
    // group has formed.
    runtime.block_on(reporter.set_service_status("", tonic_health::ServingStatus::NotServing));
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .with_context(|| format!("binding {addr}"))?;
    runtime.spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!("follower health endpoint: {e}");
        }
    });
    let handle = runtime.handle().clone();
    let opts = shard::FollowerOptions {
        on_ready: Some(Arc::new(move || {
            let r = reporter.clone();
            handle.spawn(async move { r.set_service_status("", tonic_health::ServingStatus::Serving).await });
        })),
        ..opts
    };
    let result = shard::run_follower(opts, loaded.model).with_context(|| format!("rank {}", role.rank.rank));
    runtime.shutdown_timeout(Duration::from_millis(200));
    result?;
    Ok(())
}
