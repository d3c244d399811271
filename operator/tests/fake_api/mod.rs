//! A fake Kubernetes API server behind kube's `Client` (the tower-test pattern of kube-rs's
//! controller-rs): it answers from a scenario and records every call in order.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ContainerStatus, Event as CoreEvent, Pod, PodCondition, PodStatus};
use kube::client::Body;
use kube::{Client, Resource, ResourceExt};
use neox_operator::crd::{NeoXDeployment, NeoXDeploymentSpec};
use neox_operator::metrics::Metrics;
use neox_operator::reconcile::Context;
use neox_operator::resources;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub query: String,
    pub body: Value,
}

impl Call {
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

#[derive(Default)]
pub struct Recorded {
    pub calls: Vec<Call>,
    pub events: Vec<String>,
}

impl Recorded {
    /// Every call but event posts, as `METHOD path`.
    pub fn lines(&self) -> Vec<String> {
        self.calls.iter().map(Call::line).collect()
    }
    pub fn body_of(&self, line: &str) -> &Value {
        &self
            .calls
            .iter()
            .find(|c| c.line() == line)
            .unwrap_or_else(|| panic!("no call {line}"))
            .body
    }
}

pub const NS: &str = "serving";

/// Starts a fake API server answering from `sts` and `pods`; returns a client and the log.
pub fn fake(sts: Vec<StatefulSet>, pods: Vec<Pod>) -> (Client, Arc<Mutex<Recorded>>) {
    fake_refusing(sts, pods, None)
}

/// A refusal by the API server: the call (`METHOD path`) it refuses, with its code and message.
pub struct Refusal {
    pub call: String,
    pub code: u16,
    pub message: String,
}

/// As `fake`, but refusing one call with an API error, as admission or validation would.
pub fn fake_refusing(sts: Vec<StatefulSet>, pods: Vec<Pod>, refuse: Option<Refusal>) -> (Client, Arc<Mutex<Recorded>>) {
    fake_with(sts, pods, vec![], refuse)
}

/// The general fake: a GET by name finds `sts` and the objects of `named` (Services, PDBs,
/// NetworkPolicies as JSON, by their `kind`); any other is 404.
pub fn fake_with(
    sts: Vec<StatefulSet>,
    pods: Vec<Pod>,
    named: Vec<Value>,
    refuse: Option<Refusal>,
) -> (Client, Arc<Mutex<Recorded>>) {
    fake_with_events(sts, pods, named, refuse, vec![])
}

/// As `fake_with`, and a list of core Events answers their lists (the operator's own Events,
/// which it posts to events.k8s.io, are recorded by reason instead).
pub fn fake_with_events(
    sts: Vec<StatefulSet>,
    pods: Vec<Pod>,
    named: Vec<Value>,
    refuse: Option<Refusal>,
    core_events: Vec<CoreEvent>,
) -> (Client, Arc<Mutex<Recorded>>) {
    let mut named: Vec<(String, Value)> = named
        .into_iter()
        .map(|o| {
            let plural = match o["kind"].as_str() {
                Some("Service") => "services",
                Some("PodDisruptionBudget") => "poddisruptionbudgets",
                Some("NetworkPolicy") => "networkpolicies",
                k => panic!("the fake holds no {k:?}"),
            };
            (format!("{plural}/{}", o["metadata"]["name"].as_str().unwrap()), o)
        })
        .collect();
    named.extend(sts.iter().map(|s| {
        (
            format!("statefulsets/{}", s.name_any()),
            serde_json::to_value(s).unwrap(),
        )
    }));
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let rec = Arc::new(Mutex::new(Recorded::default()));
    let log = rec.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or_default().to_owned();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let posted = path.contains("/events") && method != "GET";
            let reply = if posted {
                log.lock()
                    .unwrap()
                    .events
                    .push(body["reason"].as_str().unwrap_or_default().to_owned());
                body.clone()
            } else {
                log.lock().unwrap().calls.push(Call {
                    method: method.clone(),
                    path: path.clone(),
                    query,
                    body: body.clone(),
                });
                // `.../namespaces/serving/{plural}/{name}`: a GET by name.
                let segments: Vec<&str> = path.rsplitn(4, '/').collect();
                let by_name = (segments.len() == 4 && segments[2] == NS)
                    .then(|| format!("{}/{}", segments[1], segments[0]))
                    .map(|key| named.iter().find(|(k, _)| *k == key).map(|(_, o)| o.clone()));
                let failure = match (&refuse, &by_name) {
                    (Some(r), _) if r.call == format!("{method} {path}") => Some((r.code, r.message.clone())),
                    (_, Some(None)) if method == "GET" => Some((404, format!("{path:?} not found"))),
                    _ => None,
                };
                if let Some((code, message)) = failure {
                    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": message, "reason": if code == 404 { "NotFound" } else { "Invalid" }, "code": code});
                    send.send_response(
                        Response::builder()
                            .status(code)
                            .body(Body::from(serde_json::to_vec(&status).unwrap()))
                            .unwrap(),
                    );
                    continue;
                }
                match method.as_str() {
                    "GET" if by_name.is_some() => by_name.flatten().unwrap_or_default(),
                    "GET" if path.ends_with("/statefulsets") => list(&sts),
                    "GET" if path.ends_with("/pods") => list(&pods),
                    "GET" if path.ends_with("/events") => list(&core_events),
                    "DELETE" => json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
                    "PATCH" if path.contains("/neoxdeployments/") => json!({
                        "apiVersion": "serving.neox.dev/v1alpha1", "kind": "NeoXDeployment",
                        "metadata": {"name": "llm", "namespace": NS},
                        "spec": {"model": {"builtin": "shakespeare"}, "tensorParallelSize": 2},
                        "status": body["status"].clone(),
                    }),
                    _ => with_meta(body.clone(), &path),
                }
            };
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
    (Client::new(svc, NS), rec)
}

fn list<T: serde::Serialize>(items: &[T]) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items})
}

/// An applied object comes back with the name from its path (merge patches carry none).
fn with_meta(mut body: Value, path: &str) -> Value {
    let name = path.rsplit('/').next().unwrap_or_default();
    if body.get("metadata").is_none() {
        body["metadata"] = json!({});
    }
    body["metadata"]["name"] = json!(name);
    body
}

pub fn deployment(replicas: i32, tp: i32) -> NeoXDeployment {
    let spec: NeoXDeploymentSpec = serde_json::from_value(json!({
        "model": {"builtin": "shakespeare"}, "tensorParallelSize": tp, "replicas": replicas,
    }))
    .unwrap();
    let mut d = NeoXDeployment::new("llm", spec);
    d.metadata.namespace = Some(NS.into());
    d.metadata.uid = Some("uid-1".into());
    d.metadata.generation = Some(1);
    d
}

pub fn context(client: Client, now: i64) -> Arc<Context> {
    context_allowing(client, now, &[])
}

/// A context whose autoscaler may ask the Prometheus servers under `allowed`.
pub fn context_allowing(client: Client, now: i64, allowed: &[&str]) -> Arc<Context> {
    let mut ctx = Context::new(client, Metrics::new().unwrap());
    ctx.clock = Box::new(move || now);
    ctx.prometheus_url = None;
    ctx.prometheus_allowed = allowed.iter().map(|u| u.to_string()).collect();
    ctx.custom_queries_allowed = false;
    Arc::new(ctx)
}

/// The StatefulSet of group `g` as the API server would hold it, with `revision` on it.
pub fn existing_sts(d: &NeoXDeployment, g: i32, revision: Option<&str>) -> StatefulSet {
    let mut s = resources::statefulset(d, g);
    if let Some(r) = revision {
        s.labels_mut().insert(resources::REVISION_LABEL.into(), r.into());
    }
    s
}

/// Pod `rank` of group `g`, ready or not.
pub fn pod(d: &NeoXDeployment, g: i32, rank: i32, ready: bool) -> Pod {
    let mut p = Pod::default();
    p.meta_mut().name = Some(format!("{}-{rank}", resources::group_name(d, g)));
    p.meta_mut().namespace = Some(NS.into());
    let mut labels = resources::common_labels(d);
    labels.insert(resources::GROUP_LABEL.into(), g.to_string());
    labels.insert(resources::POD_INDEX_LABEL.into(), rank.to_string());
    p.meta_mut().labels = Some(labels);
    p.status = Some(PodStatus {
        phase: Some("Running".into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            ..Default::default()
        }]),
        container_statuses: Some(vec![ContainerStatus {
            name: "worker".into(),
            restart_count: 0,
            ready,
            ..Default::default()
        }]),
        ..Default::default()
    });
    p
}

pub fn ready_group(d: &NeoXDeployment, g: i32) -> Vec<Pod> {
    (0..d.spec.tensor_parallel_size).map(|r| pod(d, g, r, true)).collect()
}
