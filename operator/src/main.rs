//! `neox-operator`: the NeoXDeployment controller.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::routing::get;
use clap::Parser;
use neox_operator::controller::{self, Options};
use neox_operator::metrics::Metrics;

#[derive(Parser, Debug)]
#[command(
    name = "neox-operator",
    version,
    about = "Reconciles NeoXDeployments into tensor-parallel worker groups"
)]
struct Args {
    /// Serve /metrics and /healthz here.
    #[arg(long, env = "NEOX_OPERATOR_METRICS_ADDR", default_value = "[::]:8080")]
    metrics_addr: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Leader election through a Lease (run two replicas safely).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    #[arg(long, env = "LEASE_NAME", default_value = "neox-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the operator pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    log_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into());
    if args.log_format == "json" {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let metrics = Metrics::new()?;
    let m = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move { m.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    // The IPv6 wildcard takes IPv4 too; the IPv4 one where the node has no IPv6.
    let listener = match tokio::net::TcpListener::bind(args.metrics_addr).await {
        Err(_) if args.metrics_addr.ip() == std::net::Ipv6Addr::UNSPECIFIED => {
            tokio::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, args.metrics_addr.port())).await
        }
        bound => bound,
    }
    .context("binding the metrics address")?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server: {e}");
        }
    });
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| format!("neox-operator-{}", std::process::id()));
    controller::run(
        client,
        metrics,
        Options {
            namespace: args.namespace,
            leader_election: args.leader_election,
            lease_name: args.lease_name,
            lease_namespace: args.lease_namespace,
            identity,
            lease_duration: Duration::from_secs(args.lease_duration_seconds.max(3)),
        },
    )
    .await
}
