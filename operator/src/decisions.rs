//! Restart, scale and rollout decisions as pure functions of observed state.

use crate::crd::GroupStatus;

/// A pod of a group, as far as decisions need it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObservedPod {
    pub name: String,
    pub ready: bool,
    /// Phase Failed, or a container that has restarted and is not Ready: the group's
    /// collective state is lost.
    pub failed: bool,
    pub terminating: bool,
    /// Pending because no node fits (the scheduler's message); not a failure.
    pub unschedulable: Option<String>,
    /// Held back from scheduling by the gates it names (Kueue's admission: the group waits
    /// for quota); not a failure.
    pub gated: Option<String>,
    /// A container that cannot start and will not by itself retrying into a restart
    /// (ImagePullBackOff, CreateContainerConfigError, ...): its reason and message.
    pub waiting: Option<String>,
    /// The revision of the template the pod was made from, where it says.
    pub revision: Option<String>,
}

/// A group that exists (its StatefulSet), with its pods.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObservedGroup {
    pub index: i32,
    pub revision: String,
    /// The ranks its StatefulSet runs (`spec.replicas`), where it says.
    pub ranks: Option<i32>,
    /// Restarts since the group was last Ready (for back-off).
    pub restarts: i32,
    /// Unix seconds of the last restart.
    pub last_restart: Option<i64>,
    /// Its StatefulSet is queued through Kueue, which refuses changes to its queue and its
    /// number of ranks: an update replaces the StatefulSet instead.
    pub queued: bool,
    pub pods: Vec<ObservedPod>,
    /// Why its StatefulSet cannot make the pods it lacks (a ResourceQuota, Pod Security
    /// admission, a webhook): the StatefulSet controller's message.
    pub cannot_create: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    CreateGroup(i32),
    /// Removes a group beyond `replicas` (the least useful first: not ready, outdated, highest index).
    DeleteGroup(i32),
    /// Deletes every pod of the group so all ranks start together; `restarts` is the new count.
    RestartGroup {
        index: i32,
        restarts: i32,
        reason: String,
    },
    /// Applies the current pod template and replaces all the group's pods at once.
    UpdateGroup(i32),
    /// The group is Ready again: forget its restart back-off.
    ClearRestarts(i32),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub groups: Vec<GroupStatus>,
    /// Seconds until the next look (back-off expiry, progress checks).
    pub requeue_secs: u64,
    pub ready: i32,
    pub updated: i32,
    pub existing: i32,
    /// Why some group is waiting for capacity (the scheduler's message).
    pub insufficient_capacity: Option<String>,
    /// Groups restarting or backing off, for the Degraded condition.
    pub unhealthy: Vec<String>,
    /// Groups that cannot start: containers stuck waiting, or pods no node can ever take
    /// (a selector, taint or volume; not a lack of capacity the autoscaler can add).
    pub stuck: Vec<String>,
}

/// `first` seconds doubled `n` times, at most `most`.
pub fn doubling_secs(first: u64, n: u32, most: u64) -> u64 {
    first.saturating_mul(1u64 << n.min(32)).min(most)
}

/// Seconds to wait after the `n`-th consecutive restart before the next: 10 s doubling, at
/// most 5 minutes.
pub fn backoff_secs(n: i32) -> i64 {
    doubling_secs(10, n.max(0) as u32, 300) as i64
}

/// The ranks a group is made of: the spec's for one of the current revision, its own
/// StatefulSet's for an older one, which may predate a change of `tensorParallelSize` and
/// serves until the rollout replaces it.
fn ranks_of(g: &ObservedGroup, tp: i32, revision: &str) -> i32 {
    if g.revision == revision {
        tp
    } else {
        g.ranks.unwrap_or(tp)
    }
}

/// What a group looks like now.
struct Assessment {
    ready: bool,
    ready_ranks: i32,
    /// The scheduler's message for a pod no node takes.
    capacity: Option<String>,
    /// A pod's scheduling gates, while any is gated.
    gated: Option<String>,
    /// A live rank that failed.
    failure: Option<String>,
    /// A live rank's container stuck waiting for a fix.
    waiting: Option<String>,
}

/// Assesses a group against the ranks it is made of.
fn assess(g: &ObservedGroup, ranks: i32) -> Assessment {
    let live: Vec<&ObservedPod> = g.pods.iter().filter(|p| !p.terminating).collect();
    let ready_ranks = live.iter().filter(|p| p.ready && !p.failed).count() as i32;
    Assessment {
        ready: ranks > 0 && ready_ranks == ranks && live.len() as i32 == ranks,
        ready_ranks,
        capacity: g.pods.iter().find_map(|p| p.unschedulable.clone()),
        gated: g.pods.iter().find_map(|p| p.gated.clone()),
        // A failed rank already being deleted is on its way out (this restart's, or an
        // eviction's): counting it again would restart the group's fresh ranks at every
        // back-off while it terminates.
        failure: live.iter().find(|p| p.failed).map(|p| format!("pod {} failed", p.name)),
        waiting: live
            .iter()
            .find_map(|p| p.waiting.as_ref().map(|w| format!("pod {}: {w}", p.name))),
    }
}

/// Decides what to do about a NeoXDeployment's groups.
pub fn plan(
    replicas: i32,
    tp: i32,
    revision: &str,
    max_unavailable: i32,
    observed: &[ObservedGroup],
    now: i64,
) -> Plan {
    let mut actions = Vec::new();
    let mut statuses = Vec::new();
    let mut requeue = 30u64;
    let mut insufficient = None;
    let mut unhealthy = Vec::new();
    let mut stuck = Vec::new();
    let (mut ready_count, mut updated, mut existing) = (0, 0, 0);

    // Scale-in removes the groups that serve least: those not ready first (a broken or
    // loading group, not a serving one), then those on an older template, then the highest
    // index. Scale-out fills the lowest free indices.
    let mut by_worth: Vec<&ObservedGroup> = observed.iter().collect();
    by_worth.sort_by_cached_key(|g| {
        let ready = assess(g, ranks_of(g, tp, revision)).ready;
        (ready, g.revision == revision, std::cmp::Reverse(g.index))
    });
    let excess = observed.len().saturating_sub(replicas.max(0) as usize);
    let removed: Vec<i32> = by_worth[..excess].iter().map(|g| g.index).collect();
    actions.extend(removed.iter().copied().map(Action::DeleteGroup));
    let mut indices: Vec<i32> = observed
        .iter()
        .map(|g| g.index)
        .filter(|i| !removed.contains(i))
        .collect();
    let mut free = (0..).filter(|i| !observed.iter().any(|g| g.index == *i));
    while indices.len() < replicas.max(0) as usize {
        indices.extend(free.next());
    }
    indices.sort_unstable();

    // Groups that are down count against the rollout budget.
    let mut unavailable = 0;
    let mut outdated = Vec::new();
    for g in indices {
        let Some(o) = observed.iter().find(|o| o.index == g) else {
            actions.push(Action::CreateGroup(g));
            statuses.push(GroupStatus {
                index: g,
                phase: "Pending".into(),
                ready_ranks: 0,
                revision: revision.into(),
                message: None,
                served: false,
            });
            unavailable += 1;
            requeue = requeue.min(5);
            continue;
        };
        existing += 1;
        let Assessment {
            ready,
            ready_ranks,
            capacity,
            gated,
            failure,
            waiting,
        } = assess(o, ranks_of(o, tp, revision));
        // The StatefulSet is applied before the group's pods are deleted: a pass that stopped
        // between the two left pods of the old template, so the group is not updated yet.
        let stale_pods = o
            .pods
            .iter()
            .any(|p| !p.terminating && p.revision.as_deref().is_some_and(|r| r != revision));
        // A StatefulSet scaled by hand (`kubectl scale`) is applied again, as an outdated one is.
        let resized = o.ranks.is_some_and(|r| r != tp);
        let current = o.revision == revision && !stale_pods && !resized;
        let mut status = GroupStatus {
            index: g,
            phase: String::new(),
            ready_ranks,
            revision: o.revision.clone(),
            message: None,
            // Ready now; whether it served before is the last status's to say.
            served: ready,
        };
        if ready {
            ready_count += 1;
        } else {
            unavailable += 1;
        }
        if current {
            updated += 1;
        }
        if !current {
            status.phase = "Updating".into();
            outdated.push((g, ready));
        } else if let Some(why) = waiting {
            // Restarting would not help (the image, a Secret or ConfigMap is missing): say so
            // until the spec or the cluster is fixed.
            status.phase = "Stuck".into();
            status.message = Some(why.clone());
            stuck.push(format!("group {g}: {why}"));
        } else if let Some(why) = &o.cannot_create {
            // Refused by admission, not by a node: no restart brings the missing ranks, and the
            // ranks that exist wait for them in vain.
            status.phase = "Stuck".into();
            let why = format!("pods cannot be created: {why}");
            stuck.push(format!("group {g}: {why}"));
            status.message = Some(why);
        } else if let Some(gates) = gated {
            // Queued for admission (Kueue: quota), all ranks together: nothing to restart,
            // and nothing stuck; the progress deadline reports a wait that never ends.
            status.phase = "Queued".into();
            status.message = Some(format!("waiting for admission (scheduling gates: {gates})"));
            requeue = requeue.min(10);
        } else if let Some(msg) = capacity.clone().filter(|m| !m.contains("Insufficient")) {
            status.phase = "Unschedulable".into();
            status.message = Some(msg.clone());
            stuck.push(format!("group {g}: {msg}"));
        } else if let Some(msg) = capacity {
            // Pending for capacity is not failure: wait for the cluster autoscaler. Ranks that
            // gave up waiting for the pending one meanwhile are no reason to restart the group:
            // it could not form anyway, and a restart would reload the ranks that are up.
            status.phase = "InsufficientCapacity".into();
            status.message = Some(match &failure {
                Some(why) => format!("{msg} (meanwhile {why})"),
                None => msg.clone(),
            });
            insufficient.get_or_insert(format!("group {g}: {msg}"));
        } else if let Some(why) = failure {
            let wait = o
                .last_restart
                .map(|t| t + backoff_secs(o.restarts - 1) - now)
                .unwrap_or(0);
            if o.restarts == 0 || wait <= 0 {
                actions.push(Action::RestartGroup {
                    index: g,
                    restarts: o.restarts + 1,
                    reason: why.clone(),
                });
                status.phase = "Restarting".into();
                requeue = requeue.min(5);
            } else {
                status.phase = "BackingOff".into();
                requeue = requeue.min(wait as u64);
            }
            status.message = Some(why.clone());
            unhealthy.push(format!("group {g}: {why}"));
        } else if ready {
            status.phase = "Ready".into();
            if o.restarts > 0 {
                actions.push(Action::ClearRestarts(g));
            }
        } else {
            status.phase = "Starting".into();
            requeue = requeue.min(10);
        }
        statuses.push(status);
    }

    // Roll outdated groups in index order: a group that is down anyway costs nothing to
    // replace; a serving one only while fewer than maxUnavailable groups are down.
    for (g, ready) in outdated {
        if !ready || unavailable < max_unavailable.max(1) {
            actions.push(Action::UpdateGroup(g));
            if ready {
                unavailable += 1;
            }
            requeue = requeue.min(5);
        } else {
            requeue = requeue.min(10);
        }
    }

    Plan {
        actions,
        groups: statuses,
        requeue_secs: requeue,
        ready: ready_count,
        updated,
        existing,
        insufficient_capacity: insufficient,
        unhealthy,
        stuck,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(n: usize, ready: bool) -> Vec<ObservedPod> {
        (0..n)
            .map(|r| ObservedPod {
                name: format!("p-{r}"),
                ready,
                ..Default::default()
            })
            .collect()
    }

    fn group(index: i32, rev: &str, ready: bool) -> ObservedGroup {
        ObservedGroup {
            index,
            revision: rev.into(),
            ranks: Some(2),
            pods: pods(2, ready),
            ..Default::default()
        }
    }

    #[test]
    fn creates_missing_groups_and_deletes_extra_ones_highest_first() {
        let p = plan(2, 2, "r1", 1, &[], 0);
        assert_eq!(p.actions, vec![Action::CreateGroup(0), Action::CreateGroup(1)]);
        let obs = [
            group(0, "r1", true),
            group(1, "r1", true),
            group(2, "r1", true),
            group(3, "r1", true),
        ];
        let p = plan(2, 2, "r1", 1, &obs, 0);
        assert_eq!(p.actions, vec![Action::DeleteGroup(3), Action::DeleteGroup(2)]);
        assert_eq!((p.ready, p.updated, p.existing), (2, 2, 2));
        assert!(p.groups.iter().all(|g| g.phase == "Ready"));
    }

    #[test]
    fn a_failed_rank_restarts_its_whole_group_with_backoff() {
        let mut g = group(0, "r1", true);
        g.pods[1].failed = true;
        g.pods[1].ready = false;
        let p = plan(1, 2, "r1", 1, std::slice::from_ref(&g), 1000);
        assert!(matches!(
            &p.actions[..],
            [Action::RestartGroup {
                index: 0,
                restarts: 1,
                ..
            }]
        ));
        assert_eq!(p.groups[0].phase, "Restarting");
        // Failed again 5 s after the first restart: back off (10 s) instead.
        g.restarts = 1;
        g.last_restart = Some(1000);
        let p = plan(1, 2, "r1", 1, std::slice::from_ref(&g), 1005);
        assert!(p.actions.is_empty());
        assert_eq!(p.groups[0].phase, "BackingOff");
        assert_eq!(p.requeue_secs, 5);
        let p = plan(1, 2, "r1", 1, std::slice::from_ref(&g), 1010);
        assert!(matches!(&p.actions[..], [Action::RestartGroup { restarts: 2, .. }]));
        // Past the back-off with the failed rank still terminating (a slow exit) and its
        // replacement starting: the restart is under way, nothing to restart again.
        g.pods[1].terminating = true;
        g.pods.push(ObservedPod {
            name: "g0-1-new".into(),
            ready: false,
            ..Default::default()
        });
        let p = plan(1, 2, "r1", 1, std::slice::from_ref(&g), 1010);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(backoff_secs(0), 10);
        assert_eq!(backoff_secs(1), 20);
        assert_eq!(backoff_secs(10), 300);
    }

    #[test]
    fn pending_for_capacity_is_reported_never_restarted() {
        let mut g = group(0, "r1", false);
        g.pods[0].unschedulable = Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into());
        let p = plan(1, 2, "r1", 1, &[g], 0);
        assert!(p.actions.is_empty());
        assert_eq!(p.groups[0].phase, "InsufficientCapacity");
        assert!(p.insufficient_capacity.unwrap().contains("Insufficient nvidia.com/gpu"));
        assert_eq!(p.ready, 0);
    }

    #[test]
    fn groups_that_cannot_start_are_stuck_not_starting() {
        // A mistyped image: never restarted (it would not help), reported.
        let mut g = group(0, "r1", false);
        g.pods[1].waiting = Some("ImagePullBackOff: Back-off pulling image \"neox:typo\"".into());
        let p = plan(1, 2, "r1", 1, std::slice::from_ref(&g), 0);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.groups[0].phase, "Stuck");
        assert_eq!(
            p.stuck,
            ["group 0: pod p-1: ImagePullBackOff: Back-off pulling image \"neox:typo\""]
        );
        // No node can ever take it (a selector, not capacity): not a wait for the autoscaler.
        let mut g = group(0, "r1", false);
        g.pods[0].unschedulable =
            Some("0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector.".into());
        let p = plan(1, 2, "r1", 1, &[g], 0);
        assert_eq!(p.groups[0].phase, "Unschedulable");
        assert!(p.insufficient_capacity.is_none());
        assert_eq!(p.stuck.len(), 1);
        // An outdated group is replaced whatever blocks it.
        let mut g = group(0, "old", false);
        g.pods[0].waiting = Some("ErrImagePull: not found".into());
        assert_eq!(plan(1, 2, "new", 1, &[g], 0).actions, vec![Action::UpdateGroup(0)]);
    }

    #[test]
    fn a_group_queued_for_admission_is_reported_never_restarted() {
        let mut g = group(0, "r1", false);
        for p in &mut g.pods {
            p.gated = Some("kueue.x-k8s.io/admission".into());
        }
        // A rank that gave up waiting meanwhile is no reason either: the group never formed.
        g.pods[0].failed = true;
        let p = plan(1, 2, "r1", 1, &[g], 0);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.groups[0].phase, "Queued");
        assert_eq!(
            p.groups[0].message.as_deref(),
            Some("waiting for admission (scheduling gates: kueue.x-k8s.io/admission)")
        );
        assert!(p.stuck.is_empty() && p.unhealthy.is_empty() && p.insufficient_capacity.is_none());
    }

    #[test]
    fn ranks_that_gave_up_waiting_for_a_pending_one_do_not_restart_the_group() {
        // The leader timed out waiting for rank 1, which no node fits yet: still a capacity wait.
        let mut g = group(0, "r1", false);
        g.pods[0].failed = true;
        g.pods[1].unschedulable = Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into());
        let p = plan(1, 2, "r1", 1, std::slice::from_ref(&g), 0);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.groups[0].phase, "InsufficientCapacity");
        assert!(p.unhealthy.is_empty());
        assert!(p.groups[0]
            .message
            .as_deref()
            .unwrap()
            .contains("meanwhile pod p-0 failed"));
        // Once the pending rank is placed, the failed rank restarts the group as usual.
        g.pods[1].unschedulable = None;
        let p = plan(1, 2, "r1", 1, &[g], 0);
        assert!(matches!(&p.actions[..], [Action::RestartGroup { index: 0, .. }]));
    }

    #[test]
    fn rollout_replaces_one_ready_group_at_a_time() {
        let obs = [group(0, "old", true), group(1, "old", true), group(2, "old", true)];
        let p = plan(3, 2, "new", 1, &obs, 0);
        assert_eq!(p.actions, vec![Action::UpdateGroup(0)]);
        // Group 0 is new but not ready yet: nothing else moves.
        let obs = [group(0, "new", false), group(1, "old", true), group(2, "old", true)];
        assert!(plan(3, 2, "new", 1, &obs, 0).actions.is_empty());
        // Group 0 ready: next one.
        let obs = [group(0, "new", true), group(1, "old", true), group(2, "old", true)];
        assert_eq!(plan(3, 2, "new", 1, &obs, 0).actions, vec![Action::UpdateGroup(1)]);
        // maxUnavailable 2: two at once.
        let obs = [group(0, "old", true), group(1, "old", true), group(2, "old", true)];
        assert_eq!(
            plan(3, 2, "new", 2, &obs, 0).actions,
            vec![Action::UpdateGroup(0), Action::UpdateGroup(1)]
        );
    }

    #[test]
    fn scale_in_removes_the_groups_that_serve_least_and_scale_out_fills_the_gaps() {
        // Group 0 is down: going to 2 removes it, not the serving group 2.
        let obs = [group(0, "r1", false), group(1, "r1", true), group(2, "r1", true)];
        let p = plan(2, 2, "r1", 1, &obs, 0);
        assert_eq!(p.actions, vec![Action::DeleteGroup(0)]);
        assert_eq!(p.groups.iter().map(|g| g.index).collect::<Vec<_>>(), [1, 2]);
        assert_eq!((p.ready, p.existing), (2, 2));
        // Then an outdated one before a current one.
        let obs = [group(1, "old", true), group(2, "r1", true)];
        assert_eq!(plan(1, 2, "r1", 1, &obs, 0).actions, vec![Action::DeleteGroup(1)]);
        // Back to 3: index 0 is free again.
        let obs = [group(1, "r1", true), group(2, "r1", true)];
        assert_eq!(plan(3, 2, "r1", 1, &obs, 0).actions, vec![Action::CreateGroup(0)]);
        // Gaps are kept as they are when the count is right.
        let obs = [group(0, "r1", true), group(5, "r1", true)];
        assert!(plan(2, 2, "r1", 1, &obs, 0).actions.is_empty());
        // To zero: every group goes.
        assert_eq!(plan(0, 2, "r1", 1, &obs, 0).actions.len(), 2);
    }

    #[test]
    fn a_group_whose_pods_still_run_the_old_template_is_not_updated() {
        // The new template was applied but deleting the pods failed: replace them again.
        let mut g = group(0, "new", true);
        g.pods[1].revision = Some("old".into());
        let p = plan(1, 2, "new", 1, &[g.clone()], 0);
        assert_eq!((p.actions.clone(), p.updated), (vec![Action::UpdateGroup(0)], 0));
        // Once the old pod is on its way out, the group counts as updated.
        g.pods[1].terminating = true;
        g.pods[0].revision = Some("new".into());
        let p = plan(1, 2, "new", 1, &[g], 0);
        assert_eq!((p.actions, p.updated), (vec![], 1));
    }

    #[test]
    fn a_new_tensor_parallel_size_rolls_groups_judged_by_the_ranks_they_run() {
        // TP 2 -> 4: the old groups still serve with their 2 ranks, so they roll one at a time.
        let obs = [group(0, "tp2", true), group(1, "tp2", true), group(2, "tp2", true)];
        let p = plan(3, 4, "tp4", 1, &obs, 0);
        assert_eq!(p.actions, vec![Action::UpdateGroup(0)]);
        assert_eq!((p.ready, p.updated), (3, 0));
        assert!(p.groups.iter().all(|g| g.ready_ranks == 2 && g.phase == "Updating"));
        // The replaced group is judged by the new size: 2 of its 4 ranks is not ready.
        let mut new = group(0, "tp4", true);
        new.ranks = Some(4);
        let p = plan(3, 4, "tp4", 1, &[new.clone(), obs[1].clone(), obs[2].clone()], 0);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!((p.ready, p.updated, p.groups[0].phase.as_str()), (2, 1, "Starting"));
        new.pods = pods(4, true);
        let p = plan(3, 4, "tp4", 1, &[new, obs[1].clone(), obs[2].clone()], 0);
        assert_eq!(p.actions, vec![Action::UpdateGroup(1)]);
    }

    #[test]
    fn a_statefulset_scaled_by_hand_is_applied_again() {
        // `kubectl scale --replicas=0` on a current group: not ready, and put back.
        let mut g = group(0, "r1", true);
        g.ranks = Some(0);
        g.pods.clear();
        let p = plan(1, 2, "r1", 1, &[g], 0);
        assert_eq!(p.actions, vec![Action::UpdateGroup(0)]);
        assert_eq!((p.ready, p.updated), (0, 0));
        // Scaled up past its ranks while serving: put back too.
        let mut g = group(0, "r1", true);
        g.ranks = Some(3);
        assert_eq!(plan(1, 2, "r1", 1, &[g], 0).actions, vec![Action::UpdateGroup(0)]);
    }

    #[test]
    fn rollout_never_deadlocks_on_groups_that_are_down_anyway() {
        // Every old group unready (e.g. a bad image): all may be replaced at once.
        let obs = [group(0, "old", false), group(1, "old", false)];
        assert_eq!(
            plan(2, 2, "new", 1, &obs, 0).actions,
            vec![Action::UpdateGroup(0), Action::UpdateGroup(1)]
        );
        // A single replica still updates (no surge needed).
        assert_eq!(
            plan(1, 2, "new", 1, &[group(0, "old", true)], 0).actions,
            vec![Action::UpdateGroup(0)]
        );
    }

    #[test]
    fn a_ready_group_forgets_its_restarts_and_missing_ranks_mean_not_ready() {
        let mut g = group(0, "r1", true);
        g.restarts = 3;
        assert_eq!(
            plan(1, 2, "r1", 1, &[g.clone()], 0).actions,
            vec![Action::ClearRestarts(0)]
        );
        g.pods.truncate(1);
        let p = plan(1, 2, "r1", 1, &[g], 0);
        assert_eq!((p.ready, p.groups[0].phase.as_str()), (0, "Starting"));
    }
}
