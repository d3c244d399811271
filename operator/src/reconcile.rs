//! One level-triggered pass over a NeoXDeployment: observe, decide, apply, report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::autoscale;
use crate::crd::{
    AutoscalingSpec, Condition, GroupStatus, NeoXDeployment, NeoXDeploymentStatus, Recommendation, ScaleDecision,
};
use crate::decisions::{self, Action, ObservedGroup, Plan};
use crate::metrics::Metrics;
use crate::observe::observe_groups;
use crate::per_deployment::PerDeployment;
use crate::prometheus::{self, Prometheus, QueryError};
use crate::resources::{self, LAST_RESTART_ANNOTATION, RESTARTS_ANNOTATION};

/// Field manager of every server-side apply.
pub const MANAGER: &str = "neox-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0} has no namespace")]
    NoNamespace(String),
    /// An object this deployment does not control holds a name it needs.
    #[error("{kind} {name} {why}")]
    NameTaken { kind: String, name: String, why: String },
}

impl Error {
    /// A short name for the metric: the API server's reason (a fixed set: `Forbidden`,
    /// `Invalid`, `Conflict`, ...) or ours.
    pub fn reason(&self) -> &str {
        match self {
            Error::Kube(kube::Error::Api(s)) if !s.reason.is_empty() => &s.reason,
            Error::Kube(kube::Error::Api(_)) => "ApiError",
            Error::Kube(_) => "Unreachable",
            Error::NoNamespace(_) => "NoNamespace",
            Error::NameTaken { .. } => "NameTaken",
        }
    }
}

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    /// One recorder for the controller's life: it remembers the Events it sent, so a repeated
    /// one updates its series (a count) instead of creating another Event object.
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Unix seconds; injectable so tests are deterministic.
    pub clock: Box<dyn Fn() -> i64 + Send + Sync>,
    /// When the autoscaler last looked, per NeoXDeployment uid. The status says so too, but a
    /// reconcile woken by the look's own `spec.replicas` patch may start from a cached object
    /// that predates the status write, and would look (and scale) again at once.
    pub autoscaled_at: PerDeployment<i64>,
    /// Failed reconciles in a row, per NeoXDeployment uid: the retry backs off.
    pub failures: PerDeployment<u32>,
    /// How the autoscaler reaches Prometheus (trusted CA, bearer token).
    pub prometheus: Prometheus,
    /// The Prometheus the autoscaler asks unless a deployment names its own
    /// (`NEOX_PROMETHEUS_URL`).
    pub prometheus_url: Option<String>,
    /// The URLs a deployment's `prometheusUrl` may be under (`NEOX_PROMETHEUS_ALLOWED_URLS`,
    /// comma-separated); none by default.
    pub prometheus_allowed: Vec<String>,
    /// The node directories a deployment's `model.hostPath` may be in
    /// (`NEOX_HOST_PATH_PREFIXES`, comma-separated); none by default.
    pub host_paths_allowed: Vec<String>,
    /// Whether a deployment may give its own PromQL (`autoscaling.query`;
    /// `NEOX_PROMETHEUS_CUSTOM_QUERIES=true`). Off by default: the operator asks with its own
    /// credentials and writes the value to the deployment's status, so any query would let
    /// whoever may create a NeoXDeployment read any metric, other namespaces' included.
    pub custom_queries_allowed: bool,
}

impl Context {
    /// Counts a failed reconcile of `d`; returns how many in a row.
    fn failed(&self, d: &NeoXDeployment) -> u32 {
        self.failures.update(d, |n| *n = n.saturating_add(1)).unwrap_or(1)
    }

    pub fn new(client: Client, metrics: Metrics) -> Self {
        let reporter = Reporter {
            controller: "neox-operator".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let clock = Box::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            clock,
            autoscaled_at: Default::default(),
            failures: Default::default(),
            prometheus: Prometheus::from_env(),
            prometheus_url: env("NEOX_PROMETHEUS_URL"),
            prometheus_allowed: env("NEOX_PROMETHEUS_ALLOWED_URLS").map(comma_list).unwrap_or_default(),
            host_paths_allowed: env("NEOX_HOST_PATH_PREFIXES").map(comma_list).unwrap_or_default(),
            custom_queries_allowed: env("NEOX_PROMETHEUS_CUSTOM_QUERIES")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true")),
        }
    }
}

fn comma_list(v: String) -> Vec<String> {
    v.split(',')
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect()
}

/// Why `model.hostPath` may not be mounted, if it may not: it must be in one of the directories
/// the operator's admin allows. Whoever may create a NeoXDeployment could otherwise read any
/// node file (kubelet's secret volumes, say) through pods the operator makes for them.
pub fn host_path_problem(d: &NeoXDeployment, allowed: &[String]) -> Option<String> {
    let path = d.spec.model.host_path.as_deref()?;
    let plain = path.starts_with('/') && !path.split('/').any(|c| c == "..");
    if plain && allowed.iter().any(|dir| resources::path_under(path, dir)) {
        return None;
    }
    let dirs = if allowed.is_empty() {
        "none".to_owned()
    } else {
        allowed.join(", ")
    };
    Some(format!(
        "model.hostPath {path:?} is not in a node directory the operator allows (NEOX_HOST_PATH_PREFIXES: {dirs}): \
         use a PVC, or ask the operator's admin to allow it"
    ))
}

/// Problems the schema cannot catch; reported in the Degraded condition.
pub fn spec_problems(d: &NeoXDeployment) -> Vec<String> {
    let mut out = Vec::new();
    for e in &d.spec.worker.env {
        if matches!(
            e.name.as_str(),
            "NEOX_RANK" | "NEOX_WORLD_SIZE" | "NEOX_LEADER_ADDR" | "NEOX_ADVERTISE_HOST"
        ) {
            out.push(format!(
                "worker.env sets {}, which the operator owns (group rendezvous)",
                e.name
            ));
        }
    }
    if let Some(p) = &d.spec.worker.image_pull_policy {
        if !matches!(p.as_str(), "Always" | "IfNotPresent" | "Never") {
            out.push(format!(
                "worker.imagePullPolicy {p:?} is not Always, IfNotPresent or Never"
            ));
        }
    }
    if let Some(b) = &d.spec.model.builtin {
        if b != "shakespeare" {
            out.push(format!("model.builtin {b:?} is not a built-in model (shakespeare)"));
        }
    }
    let r = &d.spec.worker.resources;
    if r.gpus > 1 {
        out.push("worker.resources.gpus must be 0 or 1: each rank drives one GPU".into());
    }
    if let (Some(req), Some(lim)) = (&r.cpu, &r.cpu_limit) {
        let (q, l) = (resources::quantity(req), resources::quantity(lim));
        if q.zip(l).is_some_and(|(q, l)| l < q) {
            out.push(format!(
                "worker.resources.cpuLimit {lim} is below worker.resources.cpu {req}: no pod could be created"
            ));
        }
    }
    out
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, old: &[Condition], now: &str) -> Condition {
    let status = if ok { "True" } else { "False" }.to_owned();
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_owned());
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        last_transition_time: since,
    }
}

fn rfc3339(secs: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";

/// The message of a Progressing condition that has just passed its deadline.
fn newly_stalled(d: &NeoXDeployment, new: &NeoXDeploymentStatus) -> Option<String> {
    let stalled = |conditions: &[Condition]| {
        conditions
            .iter()
            .find(|c| c.type_ == "Progressing" && c.reason == PROGRESS_DEADLINE_EXCEEDED)
            .map(|c| c.message.clone())
    };
    let before = d.status.as_ref().and_then(|s| stalled(&s.conditions));
    stalled(&new.conditions).filter(|_| before.is_none())
}

fn parse_rfc3339(s: &str) -> Option<i64> {
    s.parse::<k8s_openapi::jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// The status that `plan` implies.
pub fn status_for(d: &NeoXDeployment, plan: &Plan, problems: &[String], now: i64) -> NeoXDeploymentStatus {
    let old_status = d.status.clone().unwrap_or_default();
    let old = &old_status.conditions;
    let now_s = rfc3339(now);
    let replicas = d.spec.replicas;
    let needed = (replicas - d.spec.rollout.max_unavailable).max(1);
    let available = replicas == 0 || plan.ready >= needed;
    // Every group exists, runs the current template and is ready: the last branch below.
    let settled =
        problems.is_empty() && plan.updated >= replicas && plan.existing == replicas && plan.ready >= replicas;
    // Progress: a new spec, or a group more ready or current than at the last look.
    let progressed = old_status.observed_generation != d.metadata.generation
        || plan.updated > old_status.updated_replicas
        || plan.ready > old_status.ready_replicas;
    let last_progress = match old_status.last_progress_time.as_deref().and_then(parse_rfc3339) {
        _ if settled || !problems.is_empty() => None,
        Some(t) if !progressed => Some(t),
        _ => Some(now),
    };
    let deadline = i64::from(d.spec.rollout.progress_deadline_seconds);
    let (progressing, p_reason, p_msg) = if !problems.is_empty() {
        (
            false,
            "InvalidSpec",
            format!(
                "held until the spec is fixed: {} groups keep the template they run",
                plan.existing
            ),
        )
    } else if let Some(stalled) = last_progress.map(|t| now - t).filter(|&s| s > deadline) {
        (
            false,
            PROGRESS_DEADLINE_EXCEEDED,
            format!(
                "no group became ready or current for {stalled}s (deadline {deadline}s): {} of \
                 {replicas} groups current, {} ready; see the groups' phases and the Events",
                plan.updated, plan.ready
            ),
        )
    } else if plan.updated < replicas {
        (
            true,
            "RollingUpdate",
            format!("{} of {replicas} groups run the current template", plan.updated),
        )
    } else if !settled {
        (true, "Scaling", format!("{} of {replicas} groups ready", plan.ready))
    } else {
        (false, "Complete", format!("all {replicas} groups ready and current"))
    };
    let (degraded, d_reason, d_msg) = if !problems.is_empty() {
        (true, "InvalidSpec", problems.join("; "))
    } else if !plan.unhealthy.is_empty() {
        (true, "GroupRestarting", plan.unhealthy.join("; "))
    } else if !plan.stuck.is_empty() {
        (true, "GroupsCannotStart", plan.stuck.join("; "))
    } else if let Some(m) = &plan.insufficient_capacity {
        (true, "InsufficientCapacity", m.clone())
    } else {
        (false, "AsExpected", "every group is healthy or starting".to_owned())
    };
    NeoXDeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: plan.existing,
        ready_replicas: plan.ready,
        updated_replicas: plan.updated,
        selector: resources::leader_selector(d),
        groups: plan
            .groups
            .iter()
            .map(|g| GroupStatus {
                served: g.served || old_status.groups.iter().any(|o| o.index == g.index && o.served),
                ..g.clone()
            })
            .collect(),
        last_scale_decision: old_status.last_scale_decision,
        recommendations: old_status.recommendations,
        last_progress_time: last_progress.map(rfc3339),
        conditions: vec![
            condition(
                "Available",
                available,
                if available {
                    "MinimumGroupsReady"
                } else {
                    "NotEnoughGroupsReady"
                },
                format!("{} of {replicas} groups ready (at least {needed} needed)", plan.ready),
                old,
                &now_s,
            ),
            condition("Progressing", progressing, p_reason, p_msg, old, &now_s),
            condition("Degraded", degraded, d_reason, d_msg, old, &now_s),
        ],
    }
}

async fn publish(ctx: &Context, d: &NeoXDeployment, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &d.object_ref(&())).await {
        tracing::warn!(name = %d.name_any(), "could not publish event {reason}: {e}");
    }
}

/// Reconciles one NeoXDeployment.
pub async fn reconcile(d: Arc<NeoXDeployment>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&d, &ctx).await;
    match &result {
        Err(Error::Kube(kube::Error::Api(refusal))) if refused_until_changed(refusal.code) => {
            let note = format!(
                "the API server refused an object made from this spec: {}",
                refusal.message
            );
            report_blocked(&d, &ctx, "ApplyRefused", note).await;
        }
        Err(e @ Error::NameTaken { .. }) => report_blocked(&d, &ctx, "NameConflict", e.to_string()).await,
        _ => {}
    }
    let (ns, name) = (d.namespace().unwrap_or_default(), d.name_any());
    let failed = result.as_ref().err().map(Error::reason);
    ctx.metrics.observe_reconcile(&ns, &name, started.elapsed(), failed);
    if result.is_ok() {
        ctx.failures.remove(&d);
    }
    result
}

/// Answers the API server gives again until the spec changes (invalid, forbidden, too
/// large), as opposed to conflicts, time-outs and outages that a retry may get past.
fn refused_until_changed(code: u16) -> bool {
    matches!(code, 400 | 403 | 413 | 422)
}

/// Says in the Degraded condition, and once in an Event, why the deployment's objects cannot
/// be written: the CRD holds Kubernetes types (tolerations, env, affinity) whose own rules
/// only the API server checks, on the objects made from them; or a name it needs is another
/// deployment's. Progressing turns False for the same reason: this generation is observed
/// but will not roll out, and a check waiting for the rollout must not read the previous
/// one's "Complete" as this one's. Written only when it changes, so the retries that follow
/// do not write (and wake the controller) again.
async fn report_blocked(d: &NeoXDeployment, ctx: &Context, reason: &str, note: String) {
    let Some(ns) = d.namespace() else { return };
    let old = d.status.clone().unwrap_or_default().conditions;
    let now = rfc3339((ctx.clock)());
    let degraded = condition("Degraded", true, reason, note.clone(), &old, &now);
    let progressing = condition(
        "Progressing",
        false,
        reason,
        "held until the objects this spec makes can be written (see Degraded)".into(),
        &old,
        &now,
    );
    if old.contains(&degraded) && old.contains(&progressing) {
        return;
    }
    publish(ctx, d, EventType::Warning, reason, note).await;
    let mut conditions: Vec<Condition> = old
        .into_iter()
        .filter(|c| c.type_ != "Degraded" && c.type_ != "Progressing")
        .collect();
    conditions.extend([progressing, degraded]);
    let api: Api<NeoXDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = Patch::Merge(json!({ "status": {
        "conditions": conditions, "observedGeneration": d.metadata.generation } }));
    if let Err(e) = api.patch_status(&d.name_any(), &PatchParams::default(), &patch).await {
        tracing::warn!(name = %d.name_any(), "could not report the refusal in status: {e}");
    }
}

async fn reconcile_inner(d: &NeoXDeployment, ctx: &Context) -> Result<Requeue, Error> {
    if d.metadata.deletion_timestamp.is_some() {
        // Being deleted: the garbage collector removes what it owns. Re-creating the groups its
        // deletions wake us for would start pods (and GPU node scale-ups) for nothing.
        return Ok(Requeue::await_change());
    }
    let name = d.name_any();
    let ns = d.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let client = ctx.client.clone();
    let deployments: Api<NeoXDeployment> = Api::namespaced(client.clone(), &ns);
    let now = (ctx.clock)();

    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let events: Api<CoreEvent> = Api::namespaced(client.clone(), &ns);
    let mut problems = spec_problems(d);
    problems.extend(host_path_problem(d, &ctx.host_paths_allowed));
    if !problems.is_empty() {
        // Nothing is changed until the spec is fixed; the groups go on serving the template
        // they run, and the status says how they are (judged against that template).
        let observed = observe_groups(d, &stss, &pods, &events, now).await?;
        let held = observed.first().map(|g| g.revision.clone()).unwrap_or_default();
        let ranks = observed.first().and_then(|g| g.ranks);
        let count = observed.len() as i32;
        let plan = decisions::plan(
            count,
            ranks.unwrap_or(d.spec.tensor_parallel_size),
            &held,
            1,
            &observed,
            now,
        );
        let status = status_for(d, &plan, &problems, now);
        if d.status.as_ref().map(|s| &s.conditions) != Some(&status.conditions) {
            publish(ctx, d, EventType::Warning, "InvalidSpec", problems.join("; ")).await;
        }
        patch_status(&deployments, &name, &status).await?;
        // The groups are still watched: alerts on them keep working while the spec is held.
        ctx.metrics.set_groups(&ns, &name, d.spec.replicas, plan.ready, true);
        return Ok(Requeue::requeue(Duration::from_secs(300)));
    }

    // Autoscaling first: the groups below follow the replicas it settles on.
    if d.spec.autoscaling.is_none() {
        ctx.metrics.not_autoscaled(&ns, &name);
    }
    let mut replicas = d.spec.replicas;
    let mut scaled = None;
    let autoscale_wait = d
        .spec
        .autoscaling
        .as_ref()
        .map(|_| autoscale_due_in(d, ctx.autoscaled_at.get(d), now))
        .filter(|&wait| wait > 0);
    if let Some(a) = d.spec.autoscaling.as_ref().filter(|_| autoscale_wait.is_none()) {
        let (desired, decision, recs) = autoscale_step(ctx, d, a, now).await;
        ctx.autoscaled_at.set(d, now);
        ctx.metrics
            .autoscaled(&ns, &name, decision.metric_value, a.target, desired);
        if desired != replicas {
            let patch = Patch::Merge(json!({ "spec": { "replicas": desired } }));
            deployments.patch(&name, &PatchParams::default(), &patch).await?;
            publish(
                ctx,
                d,
                EventType::Normal,
                "Scaled",
                format!("{replicas} -> {desired} groups: {}", decision.message),
            )
            .await;
            replicas = desired;
        }
        scaled = Some((decision, recs));
    }

    let pp = PatchParams::apply(MANAGER).force();
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    apply_owned(&services, d, &name, resources::client_service(d), &pp).await?;
    apply_owned(&pdbs, d, &name, resources::disruption_budget(d), &pp).await?;
    apply_owned(&policies, d, &name, resources::network_policy(d), &pp).await?;

    let observed = observe_groups(d, &stss, &pods, &events, now).await?;
    let revision = resources::revision(d);
    let spec = &d.spec;
    let plan = decisions::plan(
        replicas,
        spec.tensor_parallel_size,
        &revision,
        spec.rollout.max_unavailable,
        &observed,
        now,
    );

    for action in &plan.actions {
        match action {
            Action::CreateGroup(g) => {
                apply_group(&services, &stss, d, *g, &pp).await?;
                publish(
                    ctx,
                    d,
                    EventType::Normal,
                    "CreatedGroup",
                    format!(
                        "created group {g} ({} ranks, revision {revision})",
                        spec.tensor_parallel_size
                    ),
                )
                .await;
            }
            Action::DeleteGroup(g) => {
                let gname = resources::group_name(d, *g);
                delete_ignoring_missing(&stss, &gname).await?;
                delete_ignoring_missing(&services, &gname).await?;
                publish(
                    ctx,
                    d,
                    EventType::Normal,
                    "DeletedGroup",
                    format!("removed group {g} (replicas {replicas})"),
                )
                .await;
            }
            Action::RestartGroup {
                index,
                restarts,
                reason,
            } => {
                let gname = resources::group_name(d, *index);
                apply_group_service(&services, d, *index, &pp).await?;
                let ann = json!({ "metadata": { "annotations": {
                    RESTARTS_ANNOTATION: restarts.to_string(), LAST_RESTART_ANNOTATION: now.to_string() } } });
                stss.patch(&gname, &PatchParams::default(), &Patch::Merge(ann)).await?;
                delete_group_pods(&pods, &observed, *index).await?;
                ctx.metrics.group_restarted(&ns, &name);
                let next = decisions::backoff_secs(*restarts);
                publish(
                    ctx,
                    d,
                    EventType::Warning,
                    "RestartingGroup",
                    format!(
                        "restarting all ranks of group {index}: {reason} (restart {restarts}; next back-off {next}s)"
                    ),
                )
                .await;
            }
            Action::UpdateGroup(g) => {
                let queued = observed.iter().any(|o| o.index == *g && o.queued);
                if queued || spec.worker.queue_name.is_some() {
                    // Kueue admitted the old StatefulSet as it was (queue, ranks, resources):
                    // the new revision is a new workload, queued for admission whole.
                    delete_ignoring_missing(&stss, &resources::group_name(d, *g)).await?;
                    delete_group_pods(&pods, &observed, *g).await?;
                    apply_group(&services, &stss, d, *g, &pp).await?;
                } else {
                    apply_group(&services, &stss, d, *g, &pp).await?;
                    delete_group_pods(&pods, &observed, *g).await?;
                }
                publish(
                    ctx,
                    d,
                    EventType::Normal,
                    "RollingGroup",
                    format!("replacing group {g} with revision {revision}"),
                )
                .await;
            }
            Action::ClearRestarts(g) => {
                let ann = json!({ "metadata": { "annotations": { RESTARTS_ANNOTATION: "0" } } });
                stss.patch(
                    &resources::group_name(d, *g),
                    &PatchParams::default(),
                    &Patch::Merge(ann),
                )
                .await?;
            }
        }
    }

    let mut scaled_spec = d.clone();
    scaled_spec.spec.replicas = replicas;
    let mut status = status_for(&scaled_spec, &plan, &[], now);
    let mut requeue = plan.requeue_secs;
    if let Some((decision, recs)) = scaled {
        status.last_scale_decision = Some(decision);
        status.recommendations = recs;
        requeue = requeue.min(AUTOSCALE_PERIOD_SECS);
    }
    if let Some(wait) = autoscale_wait {
        requeue = requeue.min(wait);
    }
    if let Some(stalled) = newly_stalled(d, &status) {
        publish(ctx, d, EventType::Warning, PROGRESS_DEADLINE_EXCEEDED, stalled).await;
    }
    patch_status(&deployments, &name, &status).await?;
    ctx.metrics.set_groups(&ns, &name, replicas, plan.ready, false);
    Ok(Requeue::requeue(Duration::from_secs(requeue)))
}

/// The group's Service, then its StatefulSet at the deployment's current spec.
async fn apply_group(
    services: &Api<Service>,
    stss: &Api<StatefulSet>,
    d: &NeoXDeployment,
    g: i32,
    pp: &PatchParams,
) -> Result<(), Error> {
    apply_group_service(services, d, g, pp).await?;
    let name = resources::group_name(d, g);
    apply_owned(stss, d, &name, resources::statefulset(d, g), pp).await
}

/// The group's headless Service, through which its ranks find the leader: applied whenever the
/// group's pods are (re)made, so one deleted or edited meanwhile is restored before they start.
async fn apply_group_service(
    services: &Api<Service>,
    d: &NeoXDeployment,
    g: i32,
    pp: &PatchParams,
) -> Result<(), Error> {
    let name = resources::group_name(d, g);
    apply_owned(services, d, &name, resources::headless_service(d, g), pp).await
}

/// Force-applies `obj` as `name`, unless an object this deployment does not control holds the
/// name. A forced server-side apply would take it over: replace a user's Service selector or
/// NetworkPolicy, and make it ours, so deleting the deployment would delete it. Names can
/// collide between deployments too: `x-1`'s client Service is named as `x`'s group 1 headless
/// Service. The first to hold a name keeps it.
async fn apply_owned<K>(api: &Api<K>, d: &NeoXDeployment, name: &str, obj: K, pp: &PatchParams) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    if let Some(existing) = api.get_opt(name).await? {
        let controller = existing.owner_references().iter().find(|o| o.controller == Some(true));
        let why = match controller {
            Some(o) if d.uid().as_ref() == Some(&o.uid) => None,
            Some(o) => Some(format!(
                "belongs to {} {}; rename this NeoXDeployment or that one",
                o.kind, o.name
            )),
            None => Some(
                "exists and no controller owns it (it was made outside this operator); delete or rename it, \
                 or rename this NeoXDeployment"
                    .to_owned(),
            ),
        };
        if let Some(why) = why {
            return Err(Error::NameTaken {
                kind: K::kind(&()).into_owned(),
                name: name.to_owned(),
                why,
            });
        }
    }
    api.patch(name, pp, &Patch::Apply(obj)).await?;
    Ok(())
}

async fn patch_status(api: &Api<NeoXDeployment>, name: &str, status: &NeoXDeploymentStatus) -> Result<(), Error> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// How often an autoscaled deployment looks at its metric.
const AUTOSCALE_PERIOD_SECS: u64 = 15;

/// Seconds until the autoscaler's next look at its metric: 0 when it is due (no look yet, or
/// the last one a period ago). The reconciles in between (each status write wakes the
/// controller again) keep the last decision, so the status settles instead of changing on
/// every pass, and Prometheus is asked once a period.
fn autoscale_due_in(d: &NeoXDeployment, remembered: Option<i64>, now: i64) -> u64 {
    let in_status = d
        .status
        .as_ref()
        .and_then(|s| s.last_scale_decision.as_ref())
        .and_then(|dec| parse_rfc3339(&dec.time));
    let last = in_status.max(remembered);
    let period = AUTOSCALE_PERIOD_SECS as i64;
    match last {
        Some(t) if t <= now && now - t < period => (period - (now - t)) as u64,
        _ => 0,
    }
}

/// One autoscaler look: the replicas to run, what was decided and why, and the recent
/// recommendations. A metric that cannot be read leaves the replicas as they are (clamped).
async fn autoscale_step(
    ctx: &Context,
    d: &NeoXDeployment,
    a: &AutoscalingSpec,
    now: i64,
) -> (i32, ScaleDecision, Vec<Recommendation>) {
    let current = d.spec.replicas;
    let history = d.status.as_ref().map(|s| s.recommendations.clone()).unwrap_or_default();
    let bounded = current.clamp(a.min_replicas, a.max_replicas);
    let url = match a.prometheus_url.as_deref().filter(|u| !u.is_empty()) {
        Some(u) if ctx.prometheus_url.as_deref() == Some(u) || prometheus::url_allowed(u, &ctx.prometheus_allowed) => {
            Ok(u.to_owned())
        }
        Some(u) => Err(QueryError::NotAllowed(prometheus::redact(u))),
        None => ctx.prometheus_url.clone().ok_or(QueryError::NoUrl),
    };
    let (promql, per_group) = autoscale::query_for(d, a);
    let url = url.and_then(|u| match &a.query {
        Some(_) if !ctx.custom_queries_allowed => Err(QueryError::QueryNotAllowed),
        _ => Ok(u),
    });
    let value = match url {
        Err(e) => Err(e.to_string()),
        Ok(u) => ctx.prometheus.query(&u, &promql).await.map_err(|e| e.to_string()),
    };
    let decision = |to: i32, metric_value: Option<f64>, message: String| ScaleDecision {
        time: rfc3339(now),
        from: current,
        to,
        metric_value,
        message,
    };
    match value {
        Ok(Some(v)) => {
            let v = if per_group { v / f64::from(current.max(1)) } else { v };
            let fresh = autoscale::recommend(current, v, a);
            let (desired, recs) = autoscale::stabilize(current, fresh, &history, now, a);
            let ready = d.status.as_ref().map_or(0, |s| s.ready_replicas);
            let mut msg = format!(
                "metric {v:.3} per group against target {} (recommended {fresh})",
                a.target
            );
            let desired = if autoscale::waits_for_ready(per_group, bounded, ready, desired) {
                msg.push_str(&format!(
                    "; holding at {bounded} until the groups added are ready ({ready} of {current})"
                ));
                bounded
            } else {
                desired
            };
            (desired, decision(desired, Some(v), msg), recs)
        }
        Ok(None) => (
            bounded,
            decision(bounded, None, format!("no samples for {promql}")),
            history,
        ),
        Err(e) => {
            tracing::warn!(name = %d.name_any(), "autoscaler: {e}");
            (
                bounded,
                decision(bounded, None, format!("metric unavailable: {e}")),
                history,
            )
        }
    }
}

async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn delete_group_pods(pods: &Api<Pod>, observed: &[ObservedGroup], g: i32) -> Result<(), Error> {
    if let Some(group) = observed.iter().find(|o| o.index == g) {
        for p in group.pods.iter().filter(|p| !p.terminating) {
            delete_ignoring_missing(pods, &p.name).await?;
        }
    }
    Ok(())
}

/// Seconds before the `n`-th retry in a row: 5 s doubling, at most 5 minutes. A refusal that
/// lasts until the spec changes is retried rarely (the change itself wakes the controller);
/// an outage or conflict soon.
pub fn retry_secs(n: u32) -> u64 {
    decisions::doubling_secs(5, n.saturating_sub(1), 300)
}

/// On errors: log, retry with back-off.
pub fn error_policy(d: Arc<NeoXDeployment>, err: &Error, ctx: Arc<Context>) -> Requeue {
    let wait = retry_secs(ctx.failed(&d));
    tracing::warn!(name = %d.name_any(), retry_in_secs = wait, "reconcile failed: {err}");
    Requeue::requeue(Duration::from_secs(wait))
}
