//! The controller process: watches, leader election, `/metrics`, `/healthz`, shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::controller::{Controller, Error as ControllerError};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use crate::crd::NeoXDeployment;
use crate::lease::LeaseLock;
use crate::metrics::Metrics;
use crate::reconcile::{error_policy, reconcile, Context};
use crate::resources::DEPLOYMENT_LABEL;

#[derive(Debug, Clone)]
pub struct Options {
    /// Watch only this namespace (namespaced install); all namespaces when `None`.
    pub namespace: Option<String>,
    pub leader_election: bool,
    pub lease_name: String,
    pub lease_namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
}

fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match ns {
        Some(n) => Api::namespaced(client.clone(), n),
        None => Api::all(client.clone()),
    }
}

/// Runs until SIGTERM/SIGINT, or until leadership is lost.
pub async fn run(client: Client, metrics: Metrics, opts: Options) -> anyhow::Result<()> {
    let lease = opts.leader_election.then(|| {
        LeaseLock::new(
            client.clone(),
            &opts.lease_namespace,
            &opts.lease_name,
            &opts.identity,
            opts.lease_duration,
        )
    });
    let mut leading_since = std::time::Instant::now();
    if let Some(l) = &lease {
        tracing::info!(identity = %opts.identity, "waiting for the leader lease");
        tokio::select! {
            since = l.acquire() => leading_since = since,
            _ = terminated() => {
                tracing::info!("stopped before leading");
                return Ok(());
            }
        }
    }
    metrics.leader.set(1);
    tracing::info!("leading; starting the controller");
    let ctx = Arc::new(Context::new(client.clone(), metrics.clone()));
    let owned = watcher::Config::default().labels(DEPLOYMENT_LABEL);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = Controller::new(
        api::<NeoXDeployment>(&client, &opts.namespace),
        watcher::Config::default(),
    );
    tokio::spawn(forget_deleted(controller.store(), ctx.clone()));
    let controller = controller
        .owns(api::<StatefulSet>(&client, &opts.namespace), owned.clone())
        .owns(api::<Service>(&client, &opts.namespace), owned.clone())
        // Pods are owned by the StatefulSets; map them to their deployment by label.
        .watches(api::<Pod>(&client, &opts.namespace), owned, |p: Pod| {
            let ns = p.namespace();
            p.labels().get(DEPLOYMENT_LABEL).map(|name| {
                let r = ObjectRef::<NeoXDeployment>::new(name);
                match ns {
                    Some(ns) => r.within(&ns),
                    None => r,
                }
            })
        })
        .graceful_shutdown_on(async move {
            let _ = stop_rx.await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(name = %obj.name, "reconciled"),
                // Failed reconciles are logged by `error_policy`; what is left (a watch that cannot
                // list: API server unreachable, RBAC refusing) must be visible too.
                Err(ControllerError::ReconcilerFailed(..)) | Err(ControllerError::ObjectNotFound(_)) => {}
                Err(e) => tracing::warn!("watching the cluster: {e}"),
            }
        });
    tokio::pin!(controller);
    let lost_lease = async {
        match &lease {
            Some(l) => l.hold(leading_since).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = &mut controller => {},
        _ = terminated() => {
            // Running reconciles finish; a controller still waiting for its first list (API
            // server unreachable) would wait forever, so the wait is bounded.
            tracing::info!("shutting down");
            let _ = stop_tx.send(());
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut controller).await.is_err() {
                // Its writes may still land: the lease must run out before another leads.
                tracing::warn!("reconciles still running after {SHUTDOWN_GRACE:?}; exiting anyway");
            } else if let Some(l) = &lease {
                metrics.leader.set(0);
                match tokio::time::timeout(opts.lease_duration / 3, l.release()).await {
                    Ok(Ok(())) => tracing::info!("released the leader lease"),
                    Ok(Err(e)) => tracing::warn!("releasing the leader lease: {e}"),
                    Err(_) => tracing::warn!("releasing the leader lease: no answer in time"),
                }
            }
        }
        _ = lost_lease => {
            metrics.leader.set(0);
            anyhow::bail!("lost the leader lease; exiting so a fresh replica takes over");
        }
    }
    tracing::info!("controller stopped");
    Ok(())
}

/// Deleted NeoXDeployments are not reconciled (nothing of theirs needs cleaning up: owner
/// references do that), so what the operator keeps about them (metric series, autoscaler
/// look times) is dropped by comparing with the cache.
async fn forget_deleted(store: Store<NeoXDeployment>, ctx: Arc<Context>) {
    if store.wait_until_ready().await.is_err() {
        return;
    }
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let state = store.state();
        let live = state
            .iter()
            .map(|d| (d.namespace().unwrap_or_default(), d.name_any()))
            .collect();
        ctx.metrics.forget_all_but(&live);
        let uids: std::collections::HashSet<String> = state.iter().filter_map(|d| d.uid()).collect();
        ctx.autoscaled_at.retain(&uids);
        ctx.failures.retain(&uids);
    }
}

/// How long running reconciles may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// SIGTERM (Kubernetes stopping the pod) or SIGINT.
async fn terminated() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
