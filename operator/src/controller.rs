//! The controller process: watches, leader election, `/metrics`, `/healthz`, shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
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
    if let Some(l) = &lease {
        tracing::info!(identity = %opts.identity, "waiting for the leader lease");
        l.acquire().await;
    }
    metrics.leader.set(1);
    tracing::info!("leading; starting the controller");
    let ctx = Arc::new(Context::new(client.clone(), metrics.clone()));
    let owned = watcher::Config::default().labels(DEPLOYMENT_LABEL);
    let controller = Controller::new(
        api::<NeoXDeployment>(&client, &opts.namespace),
        watcher::Config::default(),
    )
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
    .shutdown_on_signal()
    .run(reconcile, error_policy, ctx)
    .for_each(|res| async move {
        match res {
            Ok((obj, _)) => tracing::debug!(name = %obj.name, "reconciled"),
            Err(e) => tracing::debug!("reconcile: {e}"),
        }
    });
    match &lease {
        Some(l) => {
            tokio::select! {
                _ = controller => {},
                _ = l.hold() => {
                    metrics.leader.set(0);
                    anyhow::bail!("lost the leader lease; exiting so a fresh replica takes over");
                }
            }
        }
        None => controller.await,
    }
    tracing::info!("controller stopped");
    Ok(())
}
