//! End to end against a real API server, gated on `KUBECONFIG` (skipped, with the reason
//! printed, when it is unset). Runs unchanged against kind, a real cluster, or a bare
//! kube-apiserver + kube-controller-manager without nodes: where pods stay Pending, the test
//! plays the kubelet and drives readiness by patching pod status.
//!
//! It applies deploy/ (the operator Deployment as a server-side dry run, since its image may
//! not be pullable; the controller itself runs in this process), creates a NeoXDeployment,
//! waits for its group, fails a rank, scales 1 → 2 → 1, and deletes it.

mod admission;

use std::future::Future;
use std::time::{Duration, Instant};

use admission::read;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::Discovery;
use kube::{Client, ResourceExt};
use neox_operator::controller::{self, Options};
use neox_operator::crd::NeoXDeployment;
use neox_operator::metrics::Metrics;
use serde_json::json;

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Server-side applies every document of a deploy/ file (`dry_run` for the operator itself).
async fn apply_file(client: &Client, discovery: &Discovery, rel: &str, dry_run: bool) {
    for doc in serde_yaml::Deserializer::from_str(&read(rel)) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(v).unwrap();
        let tm = obj.types.clone().unwrap();
        let (group, version) = tm.api_version.split_once('/').unwrap_or(("", &tm.api_version));
        let gvk = GroupVersionKind::gvk(group, version, &tm.kind);
        let (ar, caps) = discovery
            .resolve_gvk(&gvk)
            .unwrap_or_else(|| panic!("{rel}: unknown kind {gvk:?}"));
        let api: Api<DynamicObject> = match (caps.scope, obj.namespace()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), &ns, &ar),
            (kube::discovery::Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &ar),
            _ => Api::all_with(client.clone(), &ar),
        };
        let mut pp = PatchParams::apply("neox-e2e").force();
        pp.dry_run = dry_run;
        api.patch(&obj.name_any(), &pp, &Patch::Apply(&obj))
            .await
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
    }
}

/// Plays the kubelet for pods no node runs: marks them Running and Ready.
async fn make_ready(pods: &Api<Pod>, p: &Pod) {
    let pending_without_node = p.spec.as_ref().and_then(|s| s.node_name.clone()).is_none();
    if !pending_without_node {
        return;
    }
    let status = json!({ "status": {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [{"name": "worker", "ready": true, "restartCount": 0, "image": "neox-worker", "imageID": "",
                               "state": {"running": {}}}],
    }});
    let _ = pods
        .patch_status(&p.name_any(), &PatchParams::default(), &Patch::Merge(status))
        .await;
}

#[tokio::test]
async fn operator_end_to_end_on_a_real_api_server() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("SKIPPED: KUBECONFIG is not set; this suite needs a Kubernetes API server (kind, a cluster, or kube-apiserver + kube-controller-manager)");
        return;
    }
    let client = Client::try_default().await.expect("KUBECONFIG points at an API server");
    let long = Duration::from_secs(120);

    // deploy/: the CRD first, then everything else.
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    apply_file(&client, &discovery, "deploy/crd.yaml", false).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    wait_for("the CRD to be established", long, || async {
        crds.get("neoxdeployments.serving.neox.dev")
            .await
            .ok()
            .and_then(|c| c.status)
            .and_then(|s| s.conditions)
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
    })
    .await;
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    apply_file(&client, &discovery, "deploy/namespace.yaml", false).await;
    apply_file(&client, &discovery, "deploy/rbac.yaml", false).await;
    apply_file(&client, &discovery, "deploy/operator.yaml", true).await;

    let ns = format!("neox-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();

    let nxds: Api<NeoXDeployment> = Api::namespaced(client.clone(), &ns);
    let mut sample: serde_json::Value = serde_yaml::from_str(&read("deploy/samples/shakespeare-cpu.yaml")).unwrap();
    sample["metadata"]["namespace"] = json!(ns);
    // The API server itself refuses a bad object.
    let mut bad = sample.clone();
    bad["spec"]["tensorParallelSize"] = json!(3);
    let err = nxds
        .create(&PostParams::default(), &serde_json::from_value(bad).unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("tensorParallelSize must be 1, 2, 4 or 8"),
        "{err}"
    );

    let ctl = tokio::spawn(controller::run(
        client.clone(),
        Metrics::new().unwrap(),
        Options {
            namespace: Some(ns.clone()),
            leader_election: false,
            lease_name: "unused".into(),
            lease_namespace: ns.clone(),
            identity: "e2e".into(),
            lease_duration: Duration::from_secs(15),
        },
    ));
    nxds.create(&PostParams::default(), &serde_json::from_value(sample).unwrap())
        .await
        .unwrap();
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let lp = ListParams::default().labels("serving.neox.dev/deployment=shakespeare");
    wait_for("StatefulSet shakespeare-0", long, || async {
        stss.get_opt("shakespeare-0").await.ok().flatten().is_some()
    })
    .await;
    wait_for("both ranks of group 0", long, || async {
        pods.list(&lp).await.map(|l| l.items.len() == 2).unwrap_or(false)
    })
    .await;
    wait_for("group 0 Ready", long, || async {
        for p in pods.list(&lp).await.map(|l| l.items).unwrap_or_default() {
            make_ready(&pods, &p).await;
        }
        nxds.get_status("shakespeare")
            .await
            .ok()
            .and_then(|d| d.status)
            .is_some_and(|s| s.ready_replicas == 1)
    })
    .await;

    // A failed rank restarts the whole group: both pods are replaced.
    let before: Vec<String> = pods
        .list(&lp)
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|p| p.uid())
        .collect();
    let status = json!({"status": {"phase": "Failed", "conditions": [{"type": "Ready", "status": "False"}]}});
    pods.patch_status("shakespeare-0-1", &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
    wait_for("the whole group to be replaced", long, || async {
        let now: Vec<String> = pods
            .list(&lp)
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.uid())
            .collect();
        now.len() == 2 && now.iter().all(|u| !before.contains(u))
    })
    .await;

    // Scale 1 -> 2 -> 1 through the scale subresource's field.
    let pp = PatchParams::default();
    let (two, one) = (
        Patch::Merge(json!({"spec": {"replicas": 2}})),
        Patch::Merge(json!({"spec": {"replicas": 1}})),
    );
    nxds.patch("shakespeare", &pp, &two).await.unwrap();
    wait_for("group 1", long, || async {
        stss.get_opt("shakespeare-1").await.ok().flatten().is_some()
    })
    .await;
    nxds.patch("shakespeare", &pp, &one).await.unwrap();
    wait_for("group 1 removed", long, || async {
        stss.get_opt("shakespeare-1").await.ok().flatten().is_none()
    })
    .await;

    // Deleting the NeoXDeployment removes what it owns (garbage collection by owner refs).
    nxds.delete("shakespeare", &DeleteParams::foreground()).await.unwrap();
    wait_for("owned StatefulSets to go", long, || async {
        stss.list(&lp).await.map(|l| l.items.is_empty()).unwrap_or(false)
    })
    .await;
    ctl.abort();
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
