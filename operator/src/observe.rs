//! The deployment's groups as they exist: its StatefulSets, their pods, and why pods that
//! should exist do not (the StatefulSet controller's FailedCreate Events).

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod};
use kube::api::{Api, ListParams};
use kube::ResourceExt;

use crate::crd::NeoXDeployment;
use crate::decisions::{ObservedGroup, ObservedPod};
use crate::reconcile::Error;
use crate::resources::{
    DEPLOYMENT_LABEL, GROUP_LABEL, KUEUE_QUEUE_LABEL, LAST_RESTART_ANNOTATION, RESTARTS_ANNOTATION, REVISION_LABEL,
};

/// Container waiting reasons that last until someone fixes the image, Secret or ConfigMap.
const STUCK_REASONS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
];

fn observe_pod(p: &Pod) -> ObservedPod {
    let status = p.status.clone().unwrap_or_default();
    let conds = status.conditions.unwrap_or_default();
    let ready = conds.iter().any(|c| c.type_ == "Ready" && c.status == "True");
    let not_scheduled = conds
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .and_then(|c| Some((c.reason.as_deref()?, c)));
    let unschedulable = not_scheduled
        .filter(|(reason, _)| *reason == "Unschedulable")
        .map(|(_, c)| c.message.clone().unwrap_or_else(|| "unschedulable".into()));
    let gated = not_scheduled
        .filter(|(reason, _)| *reason == "SchedulingGated")
        .map(|_| {
            let gates = p.spec.as_ref().and_then(|s| s.scheduling_gates.as_ref());
            let names: Vec<&str> = gates.into_iter().flatten().map(|g| g.name.as_str()).collect();
            if names.is_empty() {
                "unnamed".to_owned()
            } else {
                names.join(", ")
            }
        });
    // A rank whose container restarted and is not running now (crash-looping, or exited):
    // one that restarted and runs again is forming its group anew (every rank is NOT_SERVING
    // until then), as after a wait for capacity when the last rank is placed; its startup
    // probe ends it if the group never forms.
    let containers = status.container_statuses.unwrap_or_default();
    let down_after_restart = containers
        .iter()
        .any(|c| c.restart_count > 0 && c.state.as_ref().is_none_or(|s| s.running.is_none()));
    // Waiting for something only a fix provides (CrashLoopBackOff is a failure, counted above).
    let waiting = containers.iter().find_map(|c| {
        let w = c.state.as_ref()?.waiting.as_ref()?;
        let reason = w.reason.as_deref()?;
        STUCK_REASONS.contains(&reason).then(|| match &w.message {
            Some(m) => format!("{reason}: {m}"),
            None => reason.to_owned(),
        })
    });
    ObservedPod {
        name: p.name_any(),
        ready,
        failed: status.phase.as_deref() == Some("Failed") || (down_after_restart && !ready),
        terminating: p.metadata.deletion_timestamp.is_some(),
        unschedulable,
        gated,
        waiting,
        revision: p.labels().get(REVISION_LABEL).cloned(),
    }
}

fn label_i32(m: &std::collections::BTreeMap<String, String>, key: &str) -> Option<i32> {
    m.get(key).and_then(|v| v.parse().ok())
}

/// Groups as they exist: this deployment's StatefulSets and their pods.
pub fn observe(d: &NeoXDeployment, stss: &[StatefulSet], pods: &[Pod]) -> Vec<ObservedGroup> {
    let uid = d.uid();
    let mut groups: Vec<ObservedGroup> = stss
        .iter()
        .filter(|s| uid.is_none() || s.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref()))
        .filter_map(|s| {
            let index = label_i32(s.labels(), GROUP_LABEL)?;
            let ann = s.annotations();
            Some(ObservedGroup {
                index,
                revision: s.labels().get(REVISION_LABEL).cloned().unwrap_or_default(),
                ranks: s.spec.as_ref().and_then(|spec| spec.replicas),
                restarts: label_i32(ann, RESTARTS_ANNOTATION).unwrap_or(0),
                last_restart: ann.get(LAST_RESTART_ANNOTATION).and_then(|v| v.parse().ok()),
                queued: s.labels().contains_key(KUEUE_QUEUE_LABEL),
                pods: Vec::new(),
                cannot_create: None,
            })
        })
        .collect();
    for p in pods {
        let Some(g) = label_i32(p.labels(), GROUP_LABEL) else {
            continue;
        };
        if let Some(group) = groups.iter_mut().find(|x| x.index == g) {
            group.pods.push(observe_pod(p));
        }
    }
    groups.sort_by_key(|g| g.index);
    groups
}

/// Seconds a StatefulSet has to make its missing pods before their absence is looked into:
/// the StatefulSet controller creates them within moments when it can.
const CREATE_GRACE_SECS: i64 = 10;

/// How old a FailedCreate Event may be and still explain a missing pod: the StatefulSet
/// controller's retries back off to about 17 minutes, and each refresh the Event.
const CREATE_FAILURE_MAX_AGE_SECS: i64 = 20 * 60;

/// Since when a group has had fewer pods than its StatefulSet runs, as far as anyone can tell:
/// the latest of its StatefulSet's creation, its last restart and its newest pod's creation.
/// None while it has them all, or when its StatefulSet says no creation time.
fn short_of_pods_since(s: &StatefulSet, group: &ObservedGroup, pods: &[&Pod]) -> Option<i64> {
    let ranks = group.ranks?;
    if pods.len() as i32 >= ranks {
        return None;
    }
    let created = s.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second())?;
    let newest_pod = pods
        .iter()
        .filter_map(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()))
        .max();
    Some(
        created
            .max(group.last_restart.unwrap_or(0))
            .max(newest_pod.unwrap_or(0)),
    )
}

/// When an Event was last seen: its series, its last timestamp, or its own time.
fn event_seen(e: &CoreEvent) -> Option<i64> {
    e.series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref())
        .map(|t| t.0.as_second())
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0.as_second()))
        .or_else(|| e.event_time.as_ref().map(|t| t.0.as_second()))
}

/// The newest FailedCreate message about StatefulSet `s` seen since `since` (and recently):
/// why it could not make a pod. A ResourceQuota, Pod Security admission or a webhook refuses
/// the pods themselves, so no pod, condition or StatefulSet status says it; only these do.
fn create_failure(s: &StatefulSet, since: i64, events: &[CoreEvent], now: i64) -> Option<String> {
    let name = s.metadata.name.as_deref()?;
    let uid = s.metadata.uid.as_deref();
    events
        .iter()
        .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
        .filter(|e| e.involved_object.kind.as_deref() == Some("StatefulSet"))
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        // One of a StatefulSet deleted since (a queued group's replacement) is not about it.
        .filter(|e| uid.is_none() || e.involved_object.uid.is_none() || e.involved_object.uid.as_deref() == uid)
        .filter_map(|e| Some((event_seen(e)?, e.message.clone()?)))
        .filter(|&(seen, _)| seen >= since && now - seen <= CREATE_FAILURE_MAX_AGE_SECS)
        .max_by_key(|(seen, _)| *seen)
        .map(|(_, message)| message)
}

/// Groups short of pods for longer than the grace: their position in `groups`, their
/// StatefulSet and since when.
fn short_groups<'a>(
    groups: &[ObservedGroup],
    stss: &'a [StatefulSet],
    pods: &[Pod],
    now: i64,
) -> Vec<(usize, &'a StatefulSet, i64)> {
    groups
        .iter()
        .enumerate()
        .filter_map(|(i, g)| {
            let s = stss
                .iter()
                .find(|s| label_i32(s.labels(), GROUP_LABEL) == Some(g.index))?;
            let mine: Vec<&Pod> = pods
                .iter()
                .filter(|p| label_i32(p.labels(), GROUP_LABEL) == Some(g.index))
                .collect();
            let since = short_of_pods_since(s, g, &mine)?;
            (now - since >= CREATE_GRACE_SECS).then_some((i, s, since))
        })
        .collect()
}

/// The deployment's groups as they exist now. The namespace's FailedCreate Events are read
/// only when a group has been short of pods past the grace; where they cannot be (an operator
/// upgraded without its new RBAC), the group is judged without them.
pub async fn observe_groups(
    d: &NeoXDeployment,
    stss: &Api<StatefulSet>,
    pods: &Api<Pod>,
    events: &Api<CoreEvent>,
    now: i64,
) -> Result<Vec<ObservedGroup>, Error> {
    let lp = ListParams::default().labels(&format!("{DEPLOYMENT_LABEL}={}", d.name_any()));
    let sts_list = stss.list(&lp).await?.items;
    let pod_list = pods.list(&lp).await?.items;
    let mut groups = observe(d, &sts_list, &pod_list);
    let short = short_groups(&groups, &sts_list, &pod_list, now);
    if !short.is_empty() {
        let failures = ListParams::default().fields("involvedObject.kind=StatefulSet,reason=FailedCreate");
        match events.list(&failures).await {
            Ok(list) => {
                for (g, s, since) in short {
                    groups[g].cannot_create = create_failure(s, since, &list.items, now);
                }
            }
            Err(e) => tracing::warn!(
                name = %d.name_any(),
                "could not read FailedCreate Events (the operator's role needs list on events): {e}"
            ),
        }
    }
    Ok(groups)
}
