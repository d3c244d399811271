//! The reconciler against a fake API server: the exact calls for create, group restart,
//! scaling and rolling updates, and the status it reports.

mod fake_api;

use std::sync::Arc;

use fake_api::*;
use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting};
use kube::ResourceExt;
use neox_operator::reconcile::{reconcile, Context};
use neox_operator::resources;

const BASE: &str = "/apis/apps/v1/namespaces/serving/statefulsets";
const SVC: &str = "/api/v1/namespaces/serving/services";
const PODS: &str = "/api/v1/namespaces/serving/pods";
const STATUS: &str = "PATCH /apis/serving.neox.dev/v1alpha1/namespaces/serving/neoxdeployments/llm/status";

const PDB: &str = "/apis/policy/v1/namespaces/serving/poddisruptionbudgets/llm";
const NETPOL: &str = "/apis/networking.k8s.io/v1/namespaces/serving/networkpolicies/llm";

fn preamble() -> Vec<String> {
    vec![
        format!("GET {SVC}/llm"),
        format!("PATCH {SVC}/llm"),
        format!("GET {PDB}"),
        format!("PATCH {PDB}"),
        format!("GET {NETPOL}"),
        format!("PATCH {NETPOL}"),
        format!("GET {BASE}"),
        format!("GET {PODS}"),
    ]
}

fn expect(extra: &[String]) -> Vec<String> {
    let mut v = preamble();
    v.extend(extra.iter().cloned());
    v.push(STATUS.into());
    v
}

#[tokio::test]
async fn creates_every_group_with_its_service_then_reports_status() {
    let d = deployment(2, 2);
    let (client, rec) = fake(vec![], vec![]);
    let action = reconcile(Arc::new(d.clone()), context(client, 1000)).await.unwrap();
    let rec = rec.lock().unwrap();
    assert_eq!(
        rec.lines(),
        expect(&[
            format!("GET {SVC}/llm-0"),
            format!("PATCH {SVC}/llm-0"),
            format!("GET {BASE}/llm-0"),
            format!("PATCH {BASE}/llm-0"),
            format!("GET {SVC}/llm-1"),
            format!("PATCH {SVC}/llm-1"),
            format!("GET {BASE}/llm-1"),
            format!("PATCH {BASE}/llm-1"),
        ])
    );
    assert_eq!(rec.events, vec!["CreatedGroup", "CreatedGroup"]);
    // Server-side apply with our field manager.
    assert!(rec.calls[1].query.contains("fieldManager=neox-operator") && rec.calls[1].query.contains("force=true"));
    let sts = rec.body_of(&format!("PATCH {BASE}/llm-1"));
    assert_eq!(sts["spec"]["replicas"], 2);
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    assert_eq!(sts["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    let env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let leader = env.iter().find(|e| e["name"] == "NEOX_LEADER_ADDR").unwrap();
    assert_eq!(leader["value"], "llm-1-0.llm-1.serving.svc:50052");
    let status = &rec.body_of(STATUS)["status"];
    assert_eq!(
        (status["replicas"].as_i64(), status["readyReplicas"].as_i64()),
        (Some(0), Some(0))
    );
    assert_eq!(
        status["selector"],
        "serving.neox.dev/deployment=llm,apps.kubernetes.io/pod-index=0"
    );
    assert_eq!(status["groups"][0]["phase"], "Pending");
    let progressing = condition_of(status, "Progressing");
    assert_eq!(progressing["status"], "True");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5))
    );
}

#[tokio::test]
async fn an_object_the_api_server_refuses_is_reported_in_status_once() {
    // The CRD embeds Kubernetes types whose rules only the API server checks on the objects
    // made from them (a toleration with operator Exists and a value, say).
    let d = deployment(1, 2);
    let message = "StatefulSet.apps \"llm-0\" is invalid: spec.template.spec.tolerations[0].operator: Invalid value";
    let refusal = || Refusal {
        call: format!("PATCH {BASE}/llm-0"),
        code: 422,
        message: message.into(),
    };
    let (client, rec) = fake_refusing(vec![], vec![], Some(refusal()));
    let err = reconcile(Arc::new(d.clone()), context(client, 1000)).await.unwrap_err();
    assert!(err.to_string().contains("is invalid"), "{err}");
    let status = {
        let rec = rec.lock().unwrap();
        assert_eq!(rec.events, vec!["ApplyRefused"]);
        assert_eq!(rec.lines().last().map(String::as_str), Some(STATUS));
        rec.body_of(STATUS)["status"].clone()
    };
    let degraded = condition_of(&status, "Degraded");
    assert_eq!(state(&degraded), (Some("True"), Some("ApplyRefused")));
    assert!(degraded["message"].as_str().unwrap().contains(message), "{degraded}");
    // This generation is observed, and said not to be rolling out.
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(
        state(&condition_of(&status, "Progressing")),
        (Some("False"), Some("ApplyRefused"))
    );
    // The retry meets the same refusal: nothing new to say, no status write, no second Event.
    let mut reported = d;
    reported.status = Some(serde_json::from_value(status).unwrap());
    let (client, rec) = fake_refusing(vec![], vec![], Some(refusal()));
    assert!(reconcile(Arc::new(reported), context(client, 1030)).await.is_err());
    let rec = rec.lock().unwrap();
    assert!(rec.events.is_empty(), "{:?}", rec.events);
    assert!(!rec.lines().iter().any(|l| l == STATUS), "{:?}", rec.lines());
}

#[tokio::test]
async fn a_deployment_being_deleted_is_left_to_the_garbage_collector() {
    let mut d = deployment(2, 2);
    d.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(900).unwrap(),
    ));
    // One group already gone: nothing is created again, nothing written.
    let (client, rec) = fake(vec![existing_sts(&d, 0, None)], ready_group(&d, 0));
    let action = reconcile(Arc::new(d), context(client, 1000)).await.unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
    let rec = rec.lock().unwrap();
    assert!(rec.lines().is_empty(), "{:?}", rec.lines());
    assert!(rec.events.is_empty());
}

#[tokio::test]
async fn a_failed_rank_restarts_its_whole_group_only() {
    let d = deployment(2, 2);
    let mut g1 = ready_group(&d, 1);
    g1[1].status.as_mut().unwrap().phase = Some("Failed".into());
    let (client, rec) = two_groups(&d, g1);
    let ctx = context(client, 1000);
    reconcile(Arc::new(d), ctx.clone()).await.unwrap();
    // Counted for the NeoXGroupRestarting alert.
    assert!(ctx
        .metrics
        .render()
        .contains(r#"neox_operator_group_restarts_total{name="llm",namespace="serving"} 1"#));
    let rec = rec.lock().unwrap();
    assert_eq!(
        rec.lines(),
        expect(&[
            // The headless Service its ranks find the leader through, restored if need be.
            format!("GET {SVC}/llm-1"),
            format!("PATCH {SVC}/llm-1"),
            format!("PATCH {BASE}/llm-1"),
            format!("DELETE {PODS}/llm-1-0"),
            format!("DELETE {PODS}/llm-1-1")
        ])
    );
    let ann = &rec.body_of(&format!("PATCH {BASE}/llm-1"))["metadata"]["annotations"];
    assert_eq!(
        (
            ann["serving.neox.dev/group-restarts"].as_str(),
            ann["serving.neox.dev/last-restart"].as_str()
        ),
        (Some("1"), Some("1000"))
    );
    assert_eq!(rec.events, vec!["RestartingGroup"]);
    let status = &rec.body_of(STATUS)["status"];
    assert_eq!(status["readyReplicas"], 1);
    assert_eq!(status["groups"][1]["phase"], "Restarting");
    let degraded = condition_of(status, "Degraded");
    assert_eq!(state(&degraded), (Some("True"), Some("GroupRestarting")));
}

#[tokio::test]
async fn ranks_that_restarted_and_formed_their_group_again_are_left_alone() {
    // After a wait for capacity every rank of group 1 restarted once, then the group formed:
    // all Ready. Restarting it again would only reload the model.
    let d = deployment(2, 2);
    let mut g1 = ready_group(&d, 1);
    for p in &mut g1 {
        p.status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0].restart_count = 1;
    }
    let (client, rec) = two_groups(&d, g1.clone());
    reconcile(Arc::new(d.clone()), context(client, 1000)).await.unwrap();
    assert_eq!(rec.lock().unwrap().lines(), expect(&[]));
    // Restarted, running again and not Ready: the ranks are forming the group anew (the
    // last one was placed after a wait for capacity, say). Restarting them would cost every
    // rank another model load.
    for p in &mut g1 {
        let st = p.status.as_mut().unwrap();
        st.conditions.as_mut().unwrap()[0].status = "False".into();
        st.container_statuses.as_mut().unwrap()[0].state = Some(ContainerState {
            running: Some(Default::default()),
            ..Default::default()
        });
    }
    let (client, rec) = two_groups(&d, g1.clone());
    reconcile(Arc::new(d.clone()), context(client, 1000)).await.unwrap();
    assert_eq!(rec.lock().unwrap().lines(), expect(&[]));
    // One of them crash-looping instead: its group has lost it, all ranks go.
    g1[1].status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0].state = Some(ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some("CrashLoopBackOff".into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    let (client, rec) = two_groups(&d, g1.clone());
    reconcile(Arc::new(d.clone()), context(client, 1000)).await.unwrap();
    assert_eq!(rec.lock().unwrap().events, vec!["RestartingGroup"]);
    // Its image missing instead: a restart would not help. Nothing is deleted, and Degraded
    // says why the group cannot start.
    g1[1].status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0] = Default::default();
    g1[1].status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0].state = Some(ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some("ImagePullBackOff".into()),
            message: Some("Back-off pulling image \"neox:typo\"".into()),
        }),
        ..Default::default()
    });
    let (client, rec) = two_groups(&d, g1);
    reconcile(Arc::new(d), context(client, 1000)).await.unwrap();
    let rec = rec.lock().unwrap();
    assert_eq!(rec.lines(), expect(&[]));
    let status = &rec.body_of(STATUS)["status"];
    let degraded = condition_of(status, "Degraded");
    assert_eq!(state(&degraded), (Some("True"), Some("GroupsCannotStart")));
    assert!(
        degraded["message"].as_str().unwrap().contains("ImagePullBackOff"),
        "{degraded}"
    );
    assert_eq!(status["groups"][1]["phase"], "Stuck");
}

#[tokio::test]
async fn scales_two_to_three_to_one_group() {
    // 2 -> 3: only group 2 is created.
    let d = deployment(3, 2);
    let rev = resources::revision(&d);
    let two = vec![existing_sts(&d, 0, Some(&rev)), existing_sts(&d, 1, Some(&rev))];
    let mut pods = ready_group(&d, 0);
    pods.extend(ready_group(&d, 1));
    let (client, rec) = fake(two, pods.clone());
    reconcile(Arc::new(d.clone()), context(client, 1000)).await.unwrap();
    assert_eq!(
        rec.lock().unwrap().lines(),
        expect(&[
            format!("GET {SVC}/llm-2"),
            format!("PATCH {SVC}/llm-2"),
            format!("GET {BASE}/llm-2"),
            format!("PATCH {BASE}/llm-2")
        ])
    );

    // 3 -> 1: groups 2 then 1 go, highest index first; group 0 untouched.
    let d1 = deployment(1, 2);
    let three = (0..3).map(|g| existing_sts(&d1, g, Some(&rev))).collect();
    pods.extend(ready_group(&d1, 2));
    let (client, rec) = fake(three, pods);
    reconcile(Arc::new(d1), context(client, 1000)).await.unwrap();
    let rec = rec.lock().unwrap();
    assert_eq!(
        rec.lines(),
        expect(&[
            format!("DELETE {BASE}/llm-2"),
            format!("DELETE {SVC}/llm-2"),
            format!("DELETE {BASE}/llm-1"),
            format!("DELETE {SVC}/llm-1"),
        ])
    );
    assert_eq!(rec.events, vec!["DeletedGroup", "DeletedGroup"]);
    assert_eq!(rec.body_of(STATUS)["status"]["replicas"], 1);
}

#[tokio::test]
async fn an_image_change_rolls_group_by_group() {
    let old = deployment(3, 2);
    let old_rev = resources::revision(&old);
    let mut new = old.clone();
    new.spec.worker.image = Some("registry.example/neox-worker:2".into());
    let new_rev = resources::revision(&new);
    assert_ne!(old_rev, new_rev);
    let all_pods = |ready0: bool| {
        let mut p: Vec<_> = (0..2).map(|r| pod(&new, 0, r, ready0)).collect();
        p.extend(ready_group(&new, 1));
        p.extend(ready_group(&new, 2));
        p
    };
    // Step 1: group 0 is replaced (new template applied, its pods deleted together).
    // The three groups' StatefulSets as they stand, at these revisions.
    let stss = |revs: [&str; 3]| -> Vec<_> {
        revs.iter()
            .enumerate()
            .map(|(g, r)| existing_sts(&new, g as i32, Some(r)))
            .collect()
    };
    // What replacing group g sends: its new template, then its two pods deleted together.
    let rolled = |g: i32| {
        expect(&[
            format!("GET {SVC}/llm-{g}"),
            format!("PATCH {SVC}/llm-{g}"),
            format!("GET {BASE}/llm-{g}"),
            format!("PATCH {BASE}/llm-{g}"),
            format!("DELETE {PODS}/llm-{g}-0"),
            format!("DELETE {PODS}/llm-{g}-1"),
        ])
    };
    let (client, rec) = fake(stss([&old_rev, &old_rev, &old_rev]), all_pods(true));
    reconcile(Arc::new(new.clone()), context(client, 1000)).await.unwrap();
    {
        let rec = rec.lock().unwrap();
        assert_eq!(rec.lines(), rolled(0));
        let body = rec.body_of(&format!("PATCH {BASE}/llm-0"));
        assert_eq!(
            body["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.example/neox-worker:2"
        );
        assert_eq!(
            body["spec"]["template"]["metadata"]["labels"]["serving.neox.dev/revision"],
            new_rev.as_str()
        );
        assert_eq!(rec.events, vec!["RollingGroup"]);
        assert_eq!(rec.body_of(STATUS)["status"]["updatedReplicas"], 0);
    }
    // Step 2: group 0 is new but its ranks are not ready yet: nothing else moves.
    let (client, rec) = fake(stss([&new_rev, &old_rev, &old_rev]), all_pods(false));
    reconcile(Arc::new(new.clone()), context(client, 1000)).await.unwrap();
    assert_eq!(rec.lock().unwrap().lines(), expect(&[]));
    // Step 3: group 0 ready: group 1 is next.
    let (client, rec) = fake(stss([&new_rev, &old_rev, &old_rev]), all_pods(true));
    reconcile(Arc::new(new.clone()), context(client, 1000)).await.unwrap();
    {
        let rec = rec.lock().unwrap();
        assert_eq!(rec.lines(), rolled(1));
        assert_eq!(rec.body_of(STATUS)["status"]["updatedReplicas"], 1);
    }
    // Step 4: that pass stopped after group 1's StatefulSet was applied, before its pods were
    // deleted: its pods still say the old revision, so it is replaced again, not counted.
    let mut pods = all_pods(true);
    for p in pods.iter_mut().filter(|p| p.labels()[resources::GROUP_LABEL] == "1") {
        p.labels_mut().insert(resources::REVISION_LABEL.into(), old_rev.clone());
    }
    let (client, rec) = fake(stss([&new_rev, &new_rev, &old_rev]), pods);
    reconcile(Arc::new(new.clone()), context(client, 1000)).await.unwrap();
    let rec = rec.lock().unwrap();
    assert_eq!(rec.lines(), rolled(1));
    assert_eq!(rec.body_of(STATUS)["status"]["updatedReplicas"], 1);
}

#[tokio::test]
async fn a_kueue_queued_group_is_replaced_by_a_new_statefulset_not_edited() {
    // Kueue refuses changes to an admitted StatefulSet's queue and ranks, and admitted it for
    // the resources it had: a new revision is a new StatefulSet, queued whole.
    let mut old = deployment(1, 2);
    old.spec.worker.queue_name = Some("gpu-queue".into());
    let old_rev = resources::revision(&old);
    let replaced = expect(&[
        format!("DELETE {BASE}/llm-0"),
        format!("DELETE {PODS}/llm-0-0"),
        format!("DELETE {PODS}/llm-0-1"),
        format!("GET {SVC}/llm-0"),
        format!("PATCH {SVC}/llm-0"),
        format!("GET {BASE}/llm-0"),
        format!("PATCH {BASE}/llm-0"),
    ]);
    let mut wider = old.clone();
    wider.spec.tensor_parallel_size = 4;
    let (client, rec) = fake(vec![existing_sts(&old, 0, None)], ready_group(&old, 0));
    reconcile(Arc::new(wider.clone()), context(client, 1000)).await.unwrap();
    {
        let rec = rec.lock().unwrap();
        assert_eq!(rec.lines(), replaced);
        // Deleted in the background: its pods go with it (deleted above without waiting).
        assert_eq!(
            rec.body_of(&format!("DELETE {BASE}/llm-0"))["propagationPolicy"],
            "Background"
        );
        let sts = rec.body_of(&format!("PATCH {BASE}/llm-0"));
        assert_eq!(sts["spec"]["replicas"], 4);
        assert_eq!(sts["metadata"]["labels"]["kueue.x-k8s.io/queue-name"], "gpu-queue");
        assert_eq!(rec.events, vec!["RollingGroup"]);
    }
    // Leaving Kueue: the old StatefulSet names the queue, which Kueue will not let go of.
    let mut unqueued = old.clone();
    unqueued.spec.worker.queue_name = None;
    let (client, rec) = fake(vec![existing_sts(&old, 0, None)], ready_group(&old, 0));
    reconcile(Arc::new(unqueued), context(client, 1000)).await.unwrap();
    {
        let rec = rec.lock().unwrap();
        assert_eq!(rec.lines(), replaced);
        let sts = rec.body_of(&format!("PATCH {BASE}/llm-0"));
        assert!(sts["metadata"]["labels"].get("kueue.x-k8s.io/queue-name").is_none());
    }
    // Up to date: nothing is touched.
    let (client, rec) = fake(vec![existing_sts(&old, 0, Some(&old_rev))], ready_group(&old, 0));
    reconcile(Arc::new(old.clone()), context(client, 1000)).await.unwrap();
    assert_eq!(rec.lock().unwrap().lines(), expect(&[]));
    // Waiting for Kueue to admit it: its pods are gated, which is neither a failure nor stuck.
    let gated: Vec<_> = (0..2)
        .map(|r| {
            let mut p = pod(&old, 0, r, false);
            let status = p.status.as_mut().unwrap();
            status.container_statuses = None;
            status.phase = Some("Pending".into());
            status.conditions = Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("SchedulingGated".into()),
                ..Default::default()
            }]);
            p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
                scheduling_gates: Some(vec![k8s_openapi::api::core::v1::PodSchedulingGate {
                    name: "kueue.x-k8s.io/admission".into(),
                }]),
                ..Default::default()
            });
            p
        })
        .collect();
    let (client, rec) = fake(vec![existing_sts(&old, 0, Some(&old_rev))], gated);
    reconcile(Arc::new(old), context(client, 1000)).await.unwrap();
    let rec = rec.lock().unwrap();
    assert_eq!(rec.lines(), expect(&[]));
    let group = &rec.body_of(STATUS)["status"]["groups"][0];
    assert_eq!(group["phase"], "Queued");
    assert_eq!(
        group["message"],
        "waiting for admission (scheduling gates: kueue.x-k8s.io/admission)"
    );
    assert_eq!(
        condition_of(&rec.body_of(STATUS)["status"], "Degraded")["status"],
        "False"
    );
}

/// Reconciles `d` with no groups yet: only the lists and a status saying InvalidSpec, with
/// `why` in its message. Returns the log.
async fn refused_as_invalid(d: &neox_operator::crd::NeoXDeployment, why: &str) -> Arc<std::sync::Mutex<Recorded>> {
    let (client, rec) = fake(vec![], vec![]);
    reconcile(Arc::new(d.clone()), context(client, 1000)).await.unwrap();
    {
        let rec = rec.lock().unwrap();
        assert_eq!(
            rec.lines(),
            vec![format!("GET {BASE}"), format!("GET {PODS}"), STATUS.to_owned()]
        );
        let degraded = condition_of(&rec.body_of(STATUS)["status"], "Degraded");
        assert_eq!(degraded["reason"], "InvalidSpec");
        assert!(degraded["message"].as_str().unwrap().contains(why), "{degraded}");
    }
    rec
}

#[tokio::test]
async fn a_host_path_the_operator_does_not_allow_is_refused_and_nothing_is_created() {
    let mut d = deployment(1, 2);
    d.spec.model.builtin = None;
    d.spec.model.host_path = Some("/var/lib/kubelet/pods".into());
    refused_as_invalid(&d, "NEOX_HOST_PATH_PREFIXES").await;
    // Inside a directory the admin allows, it is served.
    d.spec.model.host_path = Some("/models/pythia".into());
    let (client, rec) = fake(vec![], vec![]);
    let mut ctx = Arc::try_unwrap(context(client, 1000)).ok().unwrap();
    ctx.host_paths_allowed = vec!["/models".into()];
    reconcile(Arc::new(d), Arc::new(ctx)).await.unwrap();
    let rec = rec.lock().unwrap();
    let sts = rec.body_of(&format!("PATCH {BASE}/llm-0"));
    assert_eq!(
        sts["spec"]["template"]["spec"]["volumes"][1]["hostPath"]["path"],
        "/models/pythia"
    );
}

#[tokio::test]
async fn an_invalid_spec_is_reported_in_a_condition_and_nothing_is_created() {
    let mut d = deployment(1, 2);
    d.spec.worker.env.push(k8s_openapi::api::core::v1::EnvVar {
        name: "NEOX_RANK".into(),
        value: Some("3".into()),
        ..Default::default()
    });
    {
        let rec = refused_as_invalid(&d, "NEOX_RANK").await;
        let rec = rec.lock().unwrap();
        assert_eq!(rec.events, vec!["InvalidSpec"]);
    }
    // Groups made from the last valid spec go on serving, untouched, and the status says so
    // (it said 0 replicas).
    let valid = deployment(2, 2);
    let (client, rec) = two_groups(&valid, ready_group(&valid, 1));
    let mut invalid = d;
    invalid.spec.replicas = 2;
    let ctx = context(client, 1000);
    reconcile(Arc::new(invalid), ctx.clone()).await.unwrap();
    // The groups stay visible to the alerts, and the held spec is a series of its own.
    let metrics = ctx.metrics.render();
    for series in [
        r#"neox_operator_groups_ready{name="llm",namespace="serving"} 2"#,
        r#"neox_operator_groups_desired{name="llm",namespace="serving"} 2"#,
        r#"neox_operator_spec_invalid{name="llm",namespace="serving"} 1"#,
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
    let rec = rec.lock().unwrap();
    assert_eq!(
        rec.lines(),
        vec![format!("GET {BASE}"), format!("GET {PODS}"), STATUS.to_owned()]
    );
    let status = &rec.body_of(STATUS)["status"];
    assert_eq!(
        (status["replicas"].as_i64(), status["readyReplicas"].as_i64()),
        (Some(2), Some(2))
    );
    assert_eq!(status["groups"][1]["phase"], "Ready");
    assert_eq!(condition_of(status, "Available")["status"], "True");
    let progressing = condition_of(status, "Progressing");
    assert_eq!(state(&progressing), (Some("False"), Some("InvalidSpec")));
}

#[tokio::test]
async fn a_service_name_another_deployment_holds_is_never_taken_over() {
    // Deployment `llm-1` came first: its client Service is named as `llm`'s group 1 would be.
    let held_by = |owner: &str, uid: &str| {
        let mut s = k8s_openapi::api::core::v1::Service::default();
        s.metadata.name = Some(owner.into());
        s.metadata.owner_references = Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "serving.neox.dev/v1alpha1".into(),
            kind: "NeoXDeployment".into(),
            name: owner.into(),
            uid: uid.into(),
            controller: Some(true),
            ..Default::default()
        }]);
        s
    };
    let d = deployment(2, 2);
    // Our own group 0 Service is ours to update; group 1's name is taken.
    let mut ours = held_by("llm", "uid-1");
    ours.metadata.name = Some("llm-0".into());
    let named = [ours, held_by("llm-1", "uid-2")].map(|s| serde_json::to_value(s).unwrap());
    let (client, rec) = fake_with(vec![], vec![], named.into(), None);
    let err = reconcile(Arc::new(d), context(client, 1000)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Service llm-1 belongs to NeoXDeployment llm-1; rename this NeoXDeployment or that one"
    );
    let rec = rec.lock().unwrap();
    let mut want = preamble();
    want.extend([
        format!("GET {SVC}/llm-0"),
        format!("PATCH {SVC}/llm-0"),
        format!("GET {BASE}/llm-0"),
        format!("PATCH {BASE}/llm-0"),
        format!("GET {SVC}/llm-1"),
        STATUS.to_owned(),
    ]);
    assert_eq!(rec.lines(), want);
    assert_eq!(rec.events, vec!["CreatedGroup", "NameConflict"]);
    let degraded = condition_of(&rec.body_of(STATUS)["status"], "Degraded");
    assert_eq!(state(&degraded), (Some("True"), Some("NameConflict")));
}

#[tokio::test]
async fn an_object_made_outside_the_operator_is_never_taken_over() {
    // The user's own NetworkPolicy has the deployment's name: applying ours would replace its
    // pod selector and make it ours (deleted with the deployment).
    let d = deployment(1, 2);
    let theirs = serde_json::json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "llm", "namespace": NS}, "spec": {"podSelector": {"matchLabels": {"app": "web"}}}});
    let (client, rec) = fake_with(vec![], vec![], vec![theirs], None);
    let err = reconcile(Arc::new(d), context(client, 1000)).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("NetworkPolicy llm exists and no controller owns it (it was made outside this operator)"),
        "{err}"
    );
    let rec = rec.lock().unwrap();
    let lines = rec.lines();
    assert_eq!(lines[lines.len() - 2..], [format!("GET {NETPOL}"), STATUS.to_owned()]);
    assert!(!lines.contains(&format!("PATCH {NETPOL}")));
    assert_eq!(rec.events, vec!["NameConflict"]);
    let status = &rec.body_of(STATUS)["status"];
    assert_eq!(
        state(&condition_of(status, "Degraded")),
        (Some("True"), Some("NameConflict"))
    );
}

#[tokio::test]
async fn failed_reconciles_retry_with_backoff_until_one_succeeds() {
    use kube::runtime::controller::Action;
    use neox_operator::reconcile::error_policy;
    let d = Arc::new(deployment(1, 2));
    let refusal = Refusal {
        call: format!("PATCH {SVC}/llm"),
        code: 422,
        message: "Service \"llm\" is invalid".into(),
    };
    let (client, _rec) = fake_refusing(vec![], vec![], Some(refusal));
    let ctx = context(client, 1000);
    let mut waits = Vec::new();
    for _ in 0..3 {
        let err = reconcile(d.clone(), ctx.clone()).await.unwrap_err();
        waits.push(error_policy(d.clone(), &err, ctx.clone()));
    }
    let secs = |s| Action::requeue(std::time::Duration::from_secs(s));
    assert_eq!(waits, [secs(5), secs(10), secs(20)]);
    // Counted per deployment with the API server's reason, so an alert can say which and why.
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains(r#"neox_operator_reconcile_errors_total{name="llm",namespace="serving",reason="Invalid"} 3"#),
        "{metrics}"
    );
    // Once a pass goes through, the next failure starts over.
    let (client, _rec) = fake(vec![], vec![]);
    let mut ok_ctx = Arc::try_unwrap(ctx).ok().unwrap();
    ok_ctx.client = client;
    let ctx = Arc::new(ok_ctx);
    reconcile(d.clone(), ctx.clone()).await.unwrap();
    let err = neox_operator::reconcile::Error::NoNamespace("x".into());
    assert_eq!(error_policy(d, &err, ctx), secs(5));
    assert_eq!(neox_operator::reconcile::retry_secs(20), 300);
}

/// A condition's status and reason.
fn state(condition: &serde_json::Value) -> (Option<&str>, Option<&str>) {
    (condition["status"].as_str(), condition["reason"].as_str())
}

/// The status condition of type `type_`.
fn condition_of(status: &serde_json::Value, type_: &str) -> serde_json::Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
        .clone()
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

/// A stand-in Prometheus answering every instant query with `value`; returns its URL and the
/// queries it saw.
async fn fake_prometheus(value: &'static str) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/api/v1/query",
        axum::routing::get(move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
            let log = log.clone();
            async move {
                let q = uri
                    .query()
                    .unwrap_or_default()
                    .strip_prefix("query=")
                    .unwrap_or_default()
                    .to_owned();
                if let Some(auth) = headers.get("authorization") {
                    log.lock()
                        .unwrap()
                        .push(format!("authorization: {}", auth.to_str().unwrap()));
                }
                log.lock().unwrap().push(percent_decode(&q));
                serde_json::json!({"status": "success", "data": {"resultType": "vector",
                    "result": [{"metric": {}, "value": [1.0, value]}]}})
                .to_string()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

/// A deployment of two groups of two ranks with `autoscaling`, both groups existing at the
/// current revision and ready, behind the fake API server.
fn two_ready_groups_autoscaled(
    autoscaling: serde_json::Value,
) -> (
    neox_operator::crd::NeoXDeployment,
    kube::Client,
    Arc<std::sync::Mutex<Recorded>>,
) {
    let mut d = deployment(2, 2);
    d.spec.autoscaling = Some(serde_json::from_value(autoscaling).unwrap());
    let g1 = ready_group(&d, 1);
    let (client, rec) = two_groups(&d, g1);
    (d, client, rec)
}

/// Two groups existing at the deployment's current revision behind the fake API server:
/// group 0 ready, group 1 with the pods `g1`.
fn two_groups(
    d: &neox_operator::crd::NeoXDeployment,
    g1: Vec<k8s_openapi::api::core::v1::Pod>,
) -> (kube::Client, Arc<std::sync::Mutex<Recorded>>) {
    let rev = resources::revision(d);
    let mut pods = ready_group(d, 0);
    pods.extend(g1);
    fake(
        vec![existing_sts(d, 0, Some(&rev)), existing_sts(d, 1, Some(&rev))],
        pods,
    )
}

#[tokio::test]
async fn the_autoscaler_scales_groups_from_prometheus_hpa_style() {
    // 12 requests in flight over 2 groups, target 2 per group: ceil(2 × 6/2) = 6, capped at 5.
    let (url, seen) = fake_prometheus("12").await;
    let (d, client, rec) = two_ready_groups_autoscaled(serde_json::json!({
        "minReplicas": 1, "maxReplicas": 5, "target": 2.0, "prometheusUrl": url, "scaleUpStabilizationSeconds": 0
    }));
    let ctx = context_allowing(client, 1000, &[&url]);
    let action = reconcile(Arc::new(d), ctx.clone()).await.unwrap();
    let metrics = ctx.metrics.render();
    for series in [
        "neox_operator_autoscaler_value{name=\"llm\",namespace=\"serving\"} 6",
        "neox_operator_autoscaler_target{name=\"llm\",namespace=\"serving\"} 2",
        "neox_operator_autoscaler_desired_groups{name=\"llm\",namespace=\"serving\"} 5",
        "neox_operator_autoscaler_value_missing{name=\"llm\",namespace=\"serving\"} 0",
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
    let q = seen.lock().unwrap().clone();
    assert_eq!(
        q,
        vec![
            r#"(sum(neox_requests_running{namespace="serving",pod=~"llm-[0-9]+-0"}) + sum(neox_requests_waiting{namespace="serving",pod=~"llm-[0-9]+-0"}))"#
                .to_owned()
        ]
    );
    let rec = rec.lock().unwrap();
    let mut want = vec!["PATCH /apis/serving.neox.dev/v1alpha1/namespaces/serving/neoxdeployments/llm".to_owned()];
    want.extend(expect(&[
        format!("GET {SVC}/llm-2"),
        format!("PATCH {SVC}/llm-2"),
        format!("GET {BASE}/llm-2"),
        format!("PATCH {BASE}/llm-2"),
        format!("GET {SVC}/llm-3"),
        format!("PATCH {SVC}/llm-3"),
        format!("GET {BASE}/llm-3"),
        format!("PATCH {BASE}/llm-3"),
        format!("GET {SVC}/llm-4"),
        format!("PATCH {SVC}/llm-4"),
        format!("GET {BASE}/llm-4"),
        format!("PATCH {BASE}/llm-4"),
    ]));
    assert_eq!(rec.lines(), want);
    assert_eq!(rec.calls[0].body, serde_json::json!({"spec": {"replicas": 5}}));
    assert_eq!(rec.events[0], "Scaled");
    let status = &rec.body_of(STATUS)["status"];
    assert_eq!(status["lastScaleDecision"]["from"], 2);
    assert_eq!(status["lastScaleDecision"]["to"], 5);
    assert_eq!(status["lastScaleDecision"]["metricValue"], 6.0);
    assert_eq!(status["recommendations"][0]["replicas"], 5);
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(5))
    );
}

#[tokio::test]
async fn the_autoscaler_looks_once_a_period_however_often_it_is_woken() {
    // Each status write wakes the controller at once. Between looks the status must stay as it
    // is (or the writes would wake it in a loop), and Prometheus is asked once a period.
    let (url, seen) = fake_prometheus("4").await;
    let autoscaling = serde_json::json!({"minReplicas": 1, "maxReplicas": 5, "target": 2.0, "prometheusUrl": url});
    let pass = |status: Option<serde_json::Value>, now: i64| {
        let (mut d, client, rec) = two_ready_groups_autoscaled(autoscaling.clone());
        d.status = status.map(|s| serde_json::from_value(s).unwrap());
        let ctx = context_allowing(client, now, &[&url]);
        async move {
            let action = reconcile(Arc::new(d), ctx).await.unwrap();
            let status = rec.lock().unwrap().body_of(STATUS)["status"].clone();
            (action, status)
        }
    };
    let (_, first) = pass(None, 1000).await;
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(first["recommendations"].as_array().unwrap().len(), 1);
    // Woken 5 s later by its own write: no look, the same status, back when the period is up.
    let (action, again) = pass(Some(first.clone()), 1005).await;
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "asked Prometheus before the period was up"
    );
    assert_eq!(again["lastScaleDecision"], first["lastScaleDecision"]);
    assert_eq!(again["recommendations"], first["recommendations"]);
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(10))
    );
    // A period later it looks again.
    let (_, later) = pass(Some(first), 1015).await;
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_eq!(later["recommendations"].as_array().unwrap().len(), 2);

    // Woken by its own `spec.replicas` patch from a cache that has not seen the status write
    // yet: the operator remembers the look, so it neither looks nor scales again.
    let (d, client, _) = two_ready_groups_autoscaled(autoscaling.clone());
    let ctx = context_allowing(client, 2000, &[&url]);
    reconcile(Arc::new(d.clone()), ctx.clone()).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 3);
    let (_, client, rec) = two_ready_groups_autoscaled(autoscaling.clone());
    let mut woken = context_allowing(client, 2002, &[&url]);
    Arc::get_mut(&mut woken).unwrap().autoscaled_at = ctx.autoscaled_at.snapshot();
    reconcile(Arc::new(d), woken).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 3, "looked again from a stale cache");
    assert!(rec.lock().unwrap().events.is_empty());
}

#[tokio::test]
async fn credentials_in_the_prometheus_url_are_sent_as_basic_auth_and_never_shown() {
    let (url, seen) = fake_prometheus("4").await;
    let with_user = url.replace("http://", "http://neox:s3cret@");
    let (d, client, rec) = two_ready_groups_autoscaled(serde_json::json!({
        "minReplicas": 1, "maxReplicas": 5, "target": 2.0, "prometheusUrl": with_user
    }));
    reconcile(Arc::new(d), context_allowing(client, 1000, &[&url]))
        .await
        .unwrap();
    // base64("neox:s3cret")
    assert_eq!(seen.lock().unwrap()[0], "authorization: Basic bmVveDpzM2NyZXQ=");
    let status = rec.lock().unwrap().body_of(STATUS)["status"].to_string();
    assert!(status.contains("metric 2.000 per group"), "{status}");
    // Unreachable with credentials: the message names the server, not the password.
    let (d, client, rec) = two_ready_groups_autoscaled(serde_json::json!({
        "minReplicas": 1, "maxReplicas": 5, "target": 2.0, "prometheusUrl": "https://neox:s3cret@127.0.0.1:9"
    }));
    reconcile(Arc::new(d), context_allowing(client, 1000, &["https://127.0.0.1:9"]))
        .await
        .unwrap();
    let decision = rec.lock().unwrap().body_of(STATUS)["status"]["lastScaleDecision"]["message"].to_string();
    assert!(
        decision.contains("https://127.0.0.1:9") && !decision.contains("s3cret"),
        "{decision}"
    );
}

#[tokio::test]
async fn an_unreachable_prometheus_never_scales_and_says_why() {
    let (d, client, rec) = two_ready_groups_autoscaled(serde_json::json!({
        "minReplicas": 1, "maxReplicas": 5, "target": 2.0, "prometheusUrl": "http://127.0.0.1:9"
    }));
    let ctx = context_allowing(client, 1000, &["http://127.0.0.1:9"]);
    reconcile(Arc::new(d.clone()), ctx.clone()).await.unwrap();
    // Blind: flagged, and no value that would read as the load now.
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains(r#"neox_operator_autoscaler_value_missing{name="llm",namespace="serving"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains("neox_operator_autoscaler_value{"), "{metrics}");
    // Autoscaling turned off: its series go.
    let mut manual = d;
    manual.spec.autoscaling = None;
    let (client, _) = fake(vec![], vec![]);
    let mut ctx = Arc::try_unwrap(ctx).ok().unwrap();
    ctx.client = client;
    let ctx = Arc::new(ctx);
    reconcile(Arc::new(manual), ctx.clone()).await.unwrap();
    let metrics = ctx.metrics.render();
    assert!(!metrics.contains("neox_operator_autoscaler"), "{metrics}");
    let rec = rec.lock().unwrap();
    assert_eq!(rec.lines(), expect(&[]));
    let decision = &rec.body_of(STATUS)["status"]["lastScaleDecision"];
    assert_eq!((decision["from"].as_i64(), decision["to"].as_i64()), (Some(2), Some(2)));
    assert!(
        decision["message"].as_str().unwrap().contains("metric unavailable"),
        "{decision}"
    );
}

#[tokio::test]
async fn a_prometheus_url_the_operator_does_not_allow_is_never_asked() {
    // Whoever may create a NeoXDeployment must not make the operator fetch internal URLs.
    let (url, seen) = fake_prometheus("12").await;
    let with_user = url.replace("http://", "http://neox:s3cret@");
    let autoscaling =
        serde_json::json!({"minReplicas": 1, "maxReplicas": 5, "target": 2.0, "prometheusUrl": with_user});
    let (d, client, rec) = two_ready_groups_autoscaled(autoscaling);
    reconcile(
        Arc::new(d),
        context_allowing(client, 1000, &["http://prometheus.monitoring:9090"]),
    )
    .await
    .unwrap();
    assert!(seen.lock().unwrap().is_empty(), "asked a Prometheus it may not");
    {
        let rec = rec.lock().unwrap();
        assert_eq!(rec.lines(), expect(&[]));
        let decision = &rec.body_of(STATUS)["status"]["lastScaleDecision"];
        assert_eq!((decision["from"].as_i64(), decision["to"].as_i64()), (Some(2), Some(2)));
        let message = decision["message"].as_str().unwrap();
        assert!(
            message.contains("is not a Prometheus this operator may ask") && !message.contains("s3cret"),
            "{message}"
        );
    }

    // With no prometheusUrl the operator's own Prometheus is asked: no allow-list needed.
    let (d, client, _) =
        two_ready_groups_autoscaled(serde_json::json!({"minReplicas": 1, "maxReplicas": 5, "target": 2.0}));
    let mut ctx = Context::new(client, neox_operator::metrics::Metrics::new().unwrap());
    ctx.clock = Box::new(|| 1000);
    ctx.prometheus_url = Some(url);
    ctx.prometheus_allowed.clear();
    reconcile(Arc::new(d), Arc::new(ctx)).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_custom_query_is_asked_only_where_the_operator_allows_them() {
    // The value lands in the deployment's status: any PromQL, asked with the operator's
    // credentials, would let a namespace user read any metric.
    let (url, seen) = fake_prometheus("3").await;
    let autoscaling = serde_json::json!({"minReplicas": 1, "maxReplicas": 5, "target": 1.0, "prometheusUrl": url,
        "query": "sum(secret_metric{namespace=\"other-team\"})"});
    let (d, client, rec) = two_ready_groups_autoscaled(autoscaling.clone());
    reconcile(Arc::new(d), context_allowing(client, 1000, &[&url]))
        .await
        .unwrap();
    assert!(seen.lock().unwrap().is_empty(), "asked a custom query");
    let message = rec.lock().unwrap().body_of(STATUS)["status"]["lastScaleDecision"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("autoscaling.query is off"), "{message}");
    // Allowed: asked as written.
    let (d, client, _) = two_ready_groups_autoscaled(autoscaling);
    let mut ctx = Arc::into_inner(context_allowing(client, 1000, &[&url])).unwrap();
    ctx.custom_queries_allowed = true;
    reconcile(Arc::new(d), Arc::new(ctx)).await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![r#"sum(secret_metric{namespace="other-team"})"#.to_owned()]
    );
}

#[tokio::test]
async fn a_rollout_without_progress_past_its_deadline_is_reported_once() {
    let mut d = deployment(2, 2);
    d.metadata.generation = Some(2);
    // Group 0 runs the new template but never gets ready; group 1 waits its turn.
    let rev = resources::revision(&d);
    let stss = vec![existing_sts(&d, 0, Some(&rev)), existing_sts(&d, 1, Some("old"))];
    let mut pods: Vec<_> = (0..2).map(|r| pod(&d, 0, r, false)).collect();
    pods.extend(ready_group(&d, 1));
    let pass = |d: &neox_operator::crd::NeoXDeployment, now: i64| {
        let (client, rec) = fake(stss.clone(), pods.clone());
        let d = Arc::new(d.clone());
        async move {
            reconcile(d, context(client, now)).await.unwrap();
            let rec = rec.lock().unwrap();
            let status: neox_operator::crd::NeoXDeploymentStatus =
                serde_json::from_value(rec.body_of(STATUS)["status"].clone()).unwrap();
            (status, rec.events.clone())
        }
    };
    let progressing = |s: &neox_operator::crd::NeoXDeploymentStatus| {
        let c = s.conditions.iter().find(|c| c.type_ == "Progressing").unwrap();
        (c.status.clone(), c.reason.clone())
    };
    // The new generation starts the clock.
    let t0 = 1_000_000;
    let (status, events) = pass(&d, t0).await;
    assert_eq!(progressing(&status), ("True".into(), "RollingUpdate".into()));
    assert_eq!(status.last_progress_time.as_deref(), Some("1970-01-12T13:46:40Z"));
    assert!(events.is_empty(), "{events:?}");
    // Passes without progress keep it, up to the deadline (2400 s by default).
    d.status = Some(status);
    let (status, _) = pass(&d, t0 + 2400).await;
    assert_eq!(progressing(&status), ("True".into(), "RollingUpdate".into()));
    assert_eq!(status.last_progress_time.as_deref(), Some("1970-01-12T13:46:40Z"));
    // Past it, Progressing turns False and a Warning says so, once.
    d.status = Some(status);
    let (status, events) = pass(&d, t0 + 2401).await;
    assert_eq!(
        progressing(&status),
        ("False".into(), "ProgressDeadlineExceeded".into())
    );
    assert_eq!(events, vec!["ProgressDeadlineExceeded"]);
    d.status = Some(status);
    let (status, events) = pass(&d, t0 + 2500).await;
    assert_eq!(
        progressing(&status),
        ("False".into(), "ProgressDeadlineExceeded".into())
    );
    assert!(events.is_empty(), "{events:?}");
    // A group getting ready is progress: the clock starts again.
    d.status = Some(status);
    pods = (0..2).map(|r| pod(&d, 0, r, true)).collect();
    pods.extend(ready_group(&d, 1));
    let (client, rec) = fake(stss.clone(), pods.clone());
    reconcile(Arc::new(d.clone()), context(client, t0 + 2600))
        .await
        .unwrap();
    let status: neox_operator::crd::NeoXDeploymentStatus =
        serde_json::from_value(rec.lock().unwrap().body_of(STATUS)["status"].clone()).unwrap();
    assert_eq!(progressing(&status), ("True".into(), "RollingUpdate".into()));
    assert_eq!(status.ready_replicas, 2);
    assert_eq!(status.last_progress_time.as_deref(), Some("1970-01-12T14:30:00Z"));
}

/// A FailedCreate Event of the StatefulSet controller about `sts`, last seen at `seen`.
fn failed_create(sts: &str, uid: &str, seen: i64, message: &str) -> k8s_openapi::api::core::v1::Event {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    k8s_openapi::api::core::v1::Event {
        reason: Some("FailedCreate".into()),
        message: Some(message.into()),
        involved_object: k8s_openapi::api::core::v1::ObjectReference {
            kind: Some("StatefulSet".into()),
            name: Some(sts.into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        last_timestamp: Some(Time(k8s_openapi::jiff::Timestamp::from_second(seen).unwrap())),
        ..Default::default()
    }
}

#[tokio::test]
async fn pods_refused_at_creation_are_reported_with_the_refusal_not_restarted() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let at = |s: i64| Some(Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap()));
    let d = deployment(2, 2);
    let rev = resources::revision(&d);
    let quota = "create Pod llm-1-1 in StatefulSet llm-1 failed error: pods \"llm-1-1\" is forbidden: \
                 exceeded quota: gpus, requested: requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8";
    // Group 1's StatefulSet (made at 800) has its rank 0 (made at 900), whose leader gave up
    // waiting for rank 1 and crash-loops; rank 1 is refused by a ResourceQuota.
    let scenario = |sts_made: i64, pod_made: i64, events| {
        let mut sts = vec![existing_sts(&d, 0, Some(&rev)), existing_sts(&d, 1, Some(&rev))];
        sts[1].metadata.creation_timestamp = at(sts_made);
        sts[1].metadata.uid = Some("sts-1".into());
        let mut pods = ready_group(&d, 0);
        let mut rank0 = pod(&d, 1, 0, false);
        rank0.metadata.creation_timestamp = at(pod_made);
        rank0.status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0] =
            k8s_openapi::api::core::v1::ContainerStatus {
                restart_count: 1,
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("CrashLoopBackOff".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
        pods.push(rank0);
        fake_with_events(sts, pods, vec![], None, events)
    };
    let events = vec![
        // Older than rank 0: from before the group last made pods.
        failed_create("llm-1", "sts-1", 850, "an old refusal"),
        failed_create("llm-1", "sts-1", 990, quota),
        // About a StatefulSet of the same name deleted since (a queued group's replacement).
        failed_create("llm-1", "sts-old", 995, "a refusal of the StatefulSet replaced"),
        failed_create("llm-0", "sts-0", 995, "another group's refusal"),
    ];
    let (client, rec) = scenario(800, 900, events.clone());
    reconcile(Arc::new(d.clone()), context(client, 1000)).await.unwrap();
    {
        let rec = rec.lock().unwrap();
        // Nothing deleted: a restart brings no pod the quota refuses.
        let mut want = preamble();
        want.push("GET /api/v1/namespaces/serving/events".into());
        want.push(STATUS.into());
        assert_eq!(rec.lines(), want);
        let query = percent_decode(&rec.calls[want.len() - 2].query);
        assert!(
            query.contains("involvedObject.kind=StatefulSet") && query.contains("reason=FailedCreate"),
            "{query}"
        );
        assert!(rec.events.is_empty(), "{:?}", rec.events);
        let status = &rec.body_of(STATUS)["status"];
        assert_eq!(status["groups"][1]["phase"], "Stuck");
        let message = status["groups"][1]["message"].as_str().unwrap();
        assert_eq!(message, format!("pods cannot be created: {quota}"));
        let degraded = condition_of(status, "Degraded");
        assert_eq!(state(&degraded), (Some("True"), Some("GroupsCannotStart")));
        assert!(
            degraded["message"].as_str().unwrap().contains("exceeded quota"),
            "{degraded}"
        );
    }
    // Within moments of its StatefulSet's making, a missing pod is not looked into (nor are
    // Events read): the group is starting, and its failed rank restarts it as before.
    let (client, rec) = scenario(995, 995, events.clone());
    reconcile(Arc::new(d.clone()), context(client, 1000)).await.unwrap();
    {
        let rec = rec.lock().unwrap();
        assert!(!rec.lines().iter().any(|l| l.ends_with("/events")), "{:?}", rec.lines());
        assert_eq!(rec.events, vec!["RestartingGroup"]);
    }
    // Every refusal older than the group's newest pod: the quota let it be made since, so none
    // explains the missing rank.
    let (client, rec) = scenario(800, 999, events);
    reconcile(Arc::new(d), context(client, 1020)).await.unwrap();
    let rec = rec.lock().unwrap();
    assert!(rec.lines().iter().any(|l| l.ends_with("/events")));
    assert_eq!(rec.events, vec!["RestartingGroup"]);
    assert_ne!(rec.body_of(STATUS)["status"]["groups"][1]["phase"], "Stuck");
}

#[tokio::test]
async fn groups_that_never_served_are_left_out_of_the_disruption_budget() {
    // Group 0 serves; group 1 served and is restarting; group 2 was added past the cluster's
    // GPUs and has never been ready. Counting group 2's pods (expected, unhealthy) would use
    // up the budget and block every drain of group 0's nodes.
    let mut d = deployment(3, 2);
    let rev = resources::revision(&d);
    let group = |index: i32, phase: &str, served: bool| neox_operator::crd::GroupStatus {
        index,
        phase: phase.into(),
        revision: rev.clone(),
        served,
        ..Default::default()
    };
    d.status = Some(neox_operator::crd::NeoXDeploymentStatus {
        groups: vec![
            group(0, "Ready", true),
            group(1, "Ready", true),
            group(2, "Starting", false),
        ],
        ..Default::default()
    });
    let mut pods = ready_group(&d, 0);
    pods.extend((0..2).map(|r| pod(&d, 1, r, false)));
    pods.extend((0..2).map(|r| pod(&d, 2, r, false)));
    let sts = (0..3).map(|g| existing_sts(&d, g, Some(&rev))).collect();
    let (client, rec) = fake(sts, pods);
    reconcile(Arc::new(d.clone()), context(client, 1000)).await.unwrap();
    let rec = rec.lock().unwrap();
    let pdb = &rec.body_of(&format!("PATCH {PDB}"))["spec"];
    assert_eq!(pdb["maxUnavailable"], 1);
    assert_eq!(
        pdb["selector"],
        serde_json::json!({
            "matchLabels": {"serving.neox.dev/deployment": "llm"},
            "matchExpressions": [{"key": "serving.neox.dev/group", "operator": "NotIn", "values": ["2"]}],
        })
    );
    // Served stays served while the group is down; the new group has not served yet.
    let status = &rec.body_of(STATUS)["status"];
    let served: Vec<(i64, bool)> = status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["index"].as_i64().unwrap(), g["served"].as_bool().unwrap()))
        .collect();
    assert_eq!(served, vec![(0, true), (1, true), (2, false)]);
    // Once every group has served, the budget covers them all, as before.
    let mut all = d.clone();
    for g in &mut all.status.as_mut().unwrap().groups {
        g.served = true;
    }
    let selector = serde_json::to_value(resources::disruption_budget(&all)).unwrap()["spec"]["selector"].clone();
    assert_eq!(
        selector,
        serde_json::json!({"matchLabels": {"serving.neox.dev/deployment": "llm"}})
    );
}
