//! The public servers of a group's leader: gRPC (`neox.v1.TextGeneration`, standard health and
//! reflection), an OpenAI-compatible HTTP API, and Prometheus metrics on a separate HTTP port.

mod http;
mod openai;
mod service;
mod submit;
mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;

use neox_proto::neox::v1 as pb;
use pb::text_generation_server::TextGenerationServer;
use tonic_health::ServingStatus;

pub use openai::OpenAiApi;
pub use service::GenerationService;
pub use validate::{validate, Invalid, Limits, Validated};

use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::model::NeoXTokenizer;
use crate::parallel::net;

/// Runs a request's CPU-bound part (tokenizing prompts of up to `max_prompt_bytes`) on the
/// blocking pool: on the runtime's workers a large prompt would stall every stream sharing
/// the worker. `Err` only if the work panicked.
async fn off_runtime<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("handling the request failed: {e}"))
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The OpenAI-compatible HTTP API's address; `None`: not served.
    pub http_addr: Option<SocketAddr>,
    /// Largest gRPC message accepted (request size limit).
    pub max_message_bytes: usize,
    /// How long in-flight requests may run after SIGTERM before the server exits.
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long the server goes on admitting requests while reporting
    /// NOT_SERVING, so load balancers stop sending before it starts refusing.
    pub drain_delay: Duration,
}

/// How the server ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Drained after a signal.
    Drained,
    /// The worker group broke (a rank died or a collective timed out).
    GroupFailed,
}

const SERVICE_NAME: &str = "neox.v1.TextGeneration";

/// Serves until SIGTERM/SIGINT (graceful drain) or until the group breaks.
pub async fn serve(
    opts: ServerOptions,
    engine: EngineHandle,
    tokenizer: Arc<NeoXTokenizer>,
    limits: Limits,
    info: pb::ModelInfoResponse,
    metrics: Metrics,
) -> anyhow::Result<Exit> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // Both reflection versions: grpcurl and most tools still speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(neox_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let openai = OpenAiApi {
        engine: engine.clone(),
        tokenizer: tokenizer.clone(),
        limits: limits.clone(),
        model: info.model.clone(),
        // Room for a batch of prompts (as token ids, too), not just one.
        max_body_bytes: opts.max_message_bytes * 4,
    };
    let svc = GenerationService {
        engine: engine.clone(),
        tokenizer,
        limits,
        info,
    };
    // Gzip requests are taken (the size limit holds on the decompressed message); answers go
    // out uncompressed: a stream's messages are a token each, which gzip only makes longer.
    // Room for prompts well past the limit, so that validation (which names the field) refuses
    // them rather than the decoder (OUT_OF_RANGE, no field).
    let generation = TextGenerationServer::new(svc)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_decoding_message_size(opts.max_message_bytes.saturating_mul(4))
        .max_encoding_message_size(64 << 20);

    let grpc_listener = net::bind(opts.grpc_addr).await?;
    let metrics_listener = net::bind(opts.metrics_addr).await?;
    let http_listener = match opts.http_addr {
        Some(addr) => Some(net::bind(addr).await?),
        None => None,
    };
    tracing::info!(grpc = %grpc_listener.local_addr()?, metrics = %metrics_listener.local_addr()?, "serving");
    eprintln!(
        "neox-worker: serving gRPC on {} (metrics on http://{}/metrics)",
        grpc_listener.local_addr()?,
        metrics_listener.local_addr()?
    );
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http_server = match http_listener {
        Some(listener) => {
            eprintln!(
                "neox-worker: serving the OpenAI-compatible HTTP API on http://{}/v1",
                listener.local_addr()?
            );
            // No Nagle: a stream's small events must not wait for delayed ACKs.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let app = openai::router(openai);
            Some(tokio::spawn(async move {
                let stopped = async {
                    let _ = http_stop_rx.await;
                };
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
                    tracing::error!("HTTP API server: {e}");
                }
            }))
        }
        None => None,
    };
    let app = http::router(metrics, engine.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, app).await {
            tracing::error!("metrics server: {e}");
        }
    });

    // Ready only now: weights loaded, every rank connected.
    reporter.set_service_status("", ServingStatus::Serving).await;
    reporter.set_service_status(SERVICE_NAME, ServingStatus::Serving).await;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(generation)
            // No Nagle: a stream's small token messages must not wait for delayed ACKs (~40 ms).
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );

    let (exit, signal) = tokio::select! {
        s = shutdown_signal() => (Exit::Drained, Some(s)),
        _ = group_failure(&engine) => (Exit::GroupFailed, None),
    };
    engine.leave();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    if signal == Some(Signal::Terminate) && !opts.drain_delay.is_zero() {
        // Kubernetes sends SIGTERM as it takes the pod out of its Services, and proxies,
        // ingresses and meshes learn of it a few seconds later: refusing at once would fail
        // the requests they still route here. Ctrl-C (SIGINT) or a second signal skips this.
        eprintln!(
            "neox-worker: SIGTERM: not serving, still admitting for {:.1}s while traffic moves away",
            opts.drain_delay.as_secs_f64()
        );
        tokio::select! {
            _ = tokio::time::sleep(opts.drain_delay) => {},
            _ = shutdown_signal() => {},
            _ = group_failure(&engine) => {},
        }
    }
    if exit == Exit::Drained {
        engine.drain();
        eprintln!("neox-worker: draining ({} requests in flight)", engine.in_flight());
        let deadline = Instant::now() + opts.shutdown_grace;
        while engine.in_flight() > 0 && Instant::now() < deadline && engine.is_healthy() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        // Let clients read their UNAVAILABLE errors and probes see NOT_SERVING.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = stop_tx.send(());
    let _ = http_stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    if let Some(h) = http_server {
        let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
    }
    Ok(exit)
}

async fn group_failure(engine: &EngineHandle) {
    while engine.is_healthy() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGINT: Ctrl-C in a terminal.
    Interrupt,
    /// SIGTERM: Kubernetes, systemd, `kill`.
    Terminate,
}

async fn shutdown_signal() -> Signal {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => Signal::Interrupt,
        _ = term => Signal::Terminate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn request_work_leaves_the_runtime_free_for_other_streams() {
        // One runtime thread: a ticker advances only while nothing blocks it.
        let ticks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        };
        tokio::task::yield_now().await;
        let during = off_runtime({
            let ticks = ticks.clone();
            move || {
                let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(300));
                ticks.load(std::sync::atomic::Ordering::Relaxed) - before
            }
        })
        .await
        .unwrap();
        ticker.abort();
        assert!(during >= 5, "the runtime ticked {during} times during the work");
        let panicked = off_runtime(|| -> usize { panic!("boom") }).await;
        assert!(panicked.unwrap_err().contains("handling the request failed"));
    }
}
