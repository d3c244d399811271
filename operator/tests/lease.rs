//! Leader election against a fake API server holding one Lease: a replica takes a lease over
//! only after watching it unchanged for its duration (by its own clock, whatever the holder's
//! `renewTime` says), and a leader whose renewals hang stops leading before anyone may take over.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use neox_operator::lease::LeaseLock;
use serde_json::{json, Value};

#[derive(Default)]
struct Store {
    lease: Option<Value>,
    /// Leave every request from now on unanswered (a half-open connection).
    hang: bool,
}

fn fake(store: Arc<Mutex<Store>>) -> Client {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        let mut unanswered = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            if store.lock().unwrap().hang {
                unanswered.push(send);
                continue;
            }
            let method = req.method().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let mut s = store.lock().unwrap();
            let (code, reply) = match (method.as_str(), &s.lease) {
                ("GET", Some(l)) => (200, l.clone()),
                ("GET", None) => (
                    404,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
                _ => {
                    s.lease = Some(body.clone());
                    (200, body)
                }
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
    Client::new(svc, "ops")
}

fn held_by(holder: &str, renewed: &str, secs: i32) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "neox", "namespace": "ops", "resourceVersion": "1"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": secs,
                    "renewTime": renewed, "acquireTime": renewed, "leaseTransitions": 0}})
}

#[tokio::test]
async fn a_lease_is_taken_over_only_once_seen_unchanged_for_its_duration() {
    // Renewed an hour ago by the holder's clock: a skewed clock, or a dead holder. Either way
    // only watching it tells.
    let store = Arc::new(Mutex::new(Store {
        lease: Some(held_by("other", "2026-01-01T00:00:00.000000Z", 2)),
        ..Default::default()
    }));
    let lock = LeaseLock::new(fake(store.clone()), "ops", "neox", "me", Duration::from_secs(2));
    assert!(!lock.try_acquire().await.unwrap(), "taken on a stale-looking renewTime");
    // The holder renews meanwhile: the watch starts again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    store.lock().unwrap().lease = Some(held_by("other", "2026-01-01T00:00:01.000000Z", 2));
    assert!(!lock.try_acquire().await.unwrap());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!lock.try_acquire().await.unwrap(), "taken 1.5 s after the last renewal");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        lock.try_acquire().await.unwrap(),
        "not taken after the lease went unrenewed"
    );
    let lease = store.lock().unwrap().lease.clone().unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "me");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn a_leader_whose_renewals_hang_stops_before_the_lease_can_be_taken() {
    let store = Arc::new(Mutex::new(Store::default()));
    let lock = LeaseLock::new(fake(store.clone()), "ops", "neox", "me", Duration::from_secs(3));
    let since = lock.acquire().await;
    assert_eq!(
        store.lock().unwrap().lease.as_ref().unwrap()["spec"]["holderIdentity"],
        "me"
    );
    // Renewals go through while the API server answers.
    let renewing = tokio::time::timeout(Duration::from_millis(2500), lock.hold(since)).await;
    assert!(renewing.is_err(), "stopped leading while renewals went through");
    // Then every request hangs: the leader must stop by the 2 s renew deadline after its last
    // renewal, within the 3 s others wait before taking over.
    store.lock().unwrap().hang = true;
    let t0 = Instant::now();
    let stopped = tokio::time::timeout(Duration::from_secs(3), lock.hold(Instant::now())).await;
    assert!(stopped.is_ok(), "still leading 3 s into hung renewals");
    assert!(t0.elapsed() >= Duration::from_millis(1900), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once_and_only_its_holder_releases_it() {
    let store = Arc::new(Mutex::new(Store::default()));
    let (me, next) = (
        LeaseLock::new(fake(store.clone()), "ops", "neox", "me", Duration::from_secs(30)),
        LeaseLock::new(fake(store.clone()), "ops", "neox", "next", Duration::from_secs(30)),
    );
    me.acquire().await;
    assert!(!next.try_acquire().await.unwrap(), "taken while held");
    me.release().await.unwrap();
    let lease = store.lock().unwrap().lease.clone().unwrap();
    assert!(
        lease["spec"].get("holderIdentity").is_none_or(Value::is_null),
        "{lease}"
    );
    // Well within the 30 s it would wait for an unreleased lease.
    assert!(next.try_acquire().await.unwrap(), "a released lease was not taken");
    // A replica that no longer holds it leaves it alone.
    me.release().await.unwrap();
    assert_eq!(
        store.lock().unwrap().lease.as_ref().unwrap()["spec"]["holderIdentity"],
        "next"
    );
    // client-go's release writes an empty holder.
    store.lock().unwrap().lease = Some(held_by("", "2026-01-01T00:00:00.000000Z", 30));
    assert!(
        me.try_acquire().await.unwrap(),
        "client-go's released lease was not taken"
    );
}
