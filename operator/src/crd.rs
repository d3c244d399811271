//! The `NeoXDeployment` custom resource (`serving.neox.dev/v1alpha1`).
//!
//! Rules the API server can check are in the schema (types, ranges, CEL), so a bad object is
//! refused at `kubectl apply`; what only the operator can tell is reported in conditions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, Toleration, TopologySpreadConstraint};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Quantities as Kubernetes writes them (`500m`, `4Gi`, `1.5`).
pub const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// A GPT-NeoX model served by tensor-parallel worker groups.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "serving.neox.dev",
    version = "v1alpha1",
    kind = "NeoXDeployment",
    shortname = "nxd",
    namespaced,
    status = "NeoXDeploymentStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"TP","type":"integer","jsonPath":".spec.tensorParallelSize"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    // The name becomes Service names (DNS-1035 labels) and StatefulSet names `<name>-<group>`,
    // which Kubernetes caps at 52 characters (their pods' controller-revision-hash label).
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && self.metadata.name.size() <= 45")
        .message("metadata.name must be at most 45 characters of lower-case letters, digits and '-', starting with a letter: it names the groups' StatefulSets and Services")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.rollout) && has(self.rollout.progressDeadlineSeconds) ? self.rollout.progressDeadlineSeconds : 2400) > (has(self.worker) && has(self.worker.startupTimeoutSeconds) ? self.worker.startupTimeoutSeconds : 1800)").message("rollout.progressDeadlineSeconds (default 2400) must exceed worker.startupTimeoutSeconds (default 1800): a group may take that long to load before it counts as progress"))]
pub struct NeoXDeploymentSpec {
    /// Where the HuggingFace checkpoint comes from.
    pub model: ModelSpec,
    /// Ranks per group; each rank is one pod (and one GPU when `worker.resources.gpus` is 1).
    #[x_kube(validation = Rule::new("self in [1, 2, 4, 8]").message("tensorParallelSize must be 1, 2, 4 or 8"))]
    pub tensor_parallel_size: i32,
    /// Number of worker groups (each serves the whole model).
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    #[serde(default)]
    pub worker: WorkerSpec,
    #[serde(default)]
    pub engine: EngineSpec,
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Scale `replicas` (groups) from a Prometheus metric, HPA-style.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Who may reach the groups' ports through the NetworkPolicy the operator makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicyOptions>,
}

/// Sources allowed in by the deployment's NetworkPolicy, on top of its own pods (which reach
/// every port: rendezvous, collectives, NCCL). Kubernetes adds policies up, so only the
/// operator's own can narrow what it opens; each list is NetworkPolicy `from` peers.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyOptions {
    /// Who may reach the serving ports (gRPC 50051, HTTP 8000), say the ingress controller's
    /// namespace or the application's pods. Default: any source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub serving_from: Option<Vec<NetworkPolicyPeer>>,
    /// Who may reach the metrics port (9400), say Prometheus's namespace. Default: any source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub metrics_from: Option<Vec<NetworkPolicyPeer>>,
}

/// HPA-style autoscaling of groups from Prometheus: `desired = ceil(replicas × value / target)`
/// outside a tolerance band, held by stabilization windows, clamped to [min, max].
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed maxReplicas"))]
#[x_kube(validation = Rule::new("!(has(self.query) && has(self.metric))").message("set autoscaling.metric or autoscaling.query, not both"))]
#[x_kube(validation = Rule::new("self.minReplicas > 0 || has(self.query)").message("autoscaling.minReplicas 0 needs autoscaling.query: the built-in metrics come from the workers, so with none left they never ask for one again"))]
pub struct AutoscalingSpec {
    /// Fewest groups (0 only with `query`: scaling from zero needs a signal that does not come
    /// from the workers).
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// Prometheus base URL (default: the operator's `NEOX_PROMETHEUS_URL`). Any other must be
    /// under one of the operator's `NEOX_PROMETHEUS_ALLOWED_URLS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_url: Option<String>,
    /// A built-in signal (default concurrency).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<ScalingMetric>,
    /// A PromQL query giving the per-group value to hold at `target` (instead of `metric`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Value per group to hold: requests in flight (concurrency) or waiting (queueDepth) per
    /// group, or TTFT p90 seconds.
    #[x_kube(validation = Rule::new("self > 0.0").message("autoscaling.target must be positive"))]
    pub target: f64,
    /// Relative deviation from target that causes no scaling.
    #[serde(default = "default_tolerance")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tolerance: f64,
    /// Scale up only to the lowest recommendation of this window.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub scale_up_stabilization_seconds: i32,
    /// Scale down only to the highest recommendation of this window.
    #[serde(default = "default_down_window")]
    #[schemars(range(min = 0))]
    pub scale_down_stabilization_seconds: i32,
}

fn default_tolerance() -> f64 {
    0.1
}

fn default_down_window() -> i32 {
    300
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ScalingMetric {
    /// Requests in flight (`neox_requests_running` + `neox_requests_waiting`) averaged over
    /// the groups' leaders: it grows with the load whatever the number of groups, so groups
    /// follow the load both ways. Target: the requests a group should hold, below
    /// `engine.maxBatchSize`.
    Concurrency,
    /// `neox_requests_waiting` averaged over the groups' leaders: nothing waits once there are
    /// enough groups, so it scales in to `minReplicas` then, and out again when a queue
    /// forms; for bursts and batch work, where that is wanted.
    QueueDepth,
    /// p90 of `neox_time_to_first_token_seconds` over the last 2 minutes; 0 when nothing is
    /// in flight, so an idle deployment scales in; no value (hold) while requests are in
    /// flight but none got a first token.
    TtftP90,
}

fn one() -> i32 {
    1
}

/// The checkpoint source: exactly one of `pvc`, `hostPath`, `imagePath`, `builtin`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.pvc) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + (has(self.imagePath) ? 1 : 0) + (has(self.builtin) ? 1 : 0) == 1").message("set exactly one model source: pvc, hostPath, imagePath or builtin"))]
pub struct ModelSpec {
    /// A PersistentVolumeClaim holding the checkpoint (mounted read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    /// A directory on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// A directory inside the worker image (a checkpoint baked into a custom image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_path: Option<String>,
    /// A model compiled into the worker binary (`shakespeare`: the CPU demo model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<String>,
    /// Compute dtype of the workers (default: fp16 with GPUs, fp32 on CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    #[x_kube(validation = Rule::new("self != ''").message("claimName must not be empty"))]
    pub claim_name: String,
    /// Directory of the checkpoint inside the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Fp32,
    Fp16,
    Bf16,
}

impl Dtype {
    pub fn as_str(&self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Fp16 => "fp16",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// The worker pods of every group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Worker image (default: the operator's own version of `neox-worker`, or of
    /// `neox-worker-cuda` when the workers request GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    #[serde(default)]
    pub resources: RankResources,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Spreads groups (or ranks) over zones or nodes; select pods with
    /// `serving.neox.dev/deployment` (and `serving.neox.dev/group` for one group's ranks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// The RuntimeClass of the ranks' pods (`nvidia` where the NVIDIA runtime is not the
    /// node's default, as on k3s or RKE2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// The scheduler placing the ranks (Volcano, scheduler-plugins...; default: the cluster's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,
    /// Kueue LocalQueue admitting each group whole: a group is one Kueue workload (its
    /// StatefulSet, through Kueue's `statefulset` integration), so no rank holds a GPU while
    /// another waits for quota. Changing it replaces the groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub queue_name: Option<String>,
    /// Extra labels on every rank's pod (cost allocation, mesh opt-outs). Keys the operator or
    /// Kueue set are refused. Changing them replaces the groups.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('serving.neox.dev/') && !k.startsWith('kueue.x-k8s.io/') && !(k in ['app.kubernetes.io/name', 'app.kubernetes.io/instance', 'app.kubernetes.io/managed-by', 'apps.kubernetes.io/pod-index']))").message("worker.podLabels must not set serving.neox.dev/*, kueue.x-k8s.io/* (use worker.queueName), apps.kubernetes.io/pod-index or app.kubernetes.io/{name,instance,managed-by}: the operator and Kueue set them"))]
    pub pod_labels: BTreeMap<String, String>,
    /// Extra annotations on every rank's pod. Keys the operator or Kueue set are refused.
    /// Changing them replaces the groups.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('serving.neox.dev/') && !k.startsWith('kueue.x-k8s.io/'))").message("worker.podAnnotations must not set serving.neox.dev/* or kueue.x-k8s.io/* keys: the operator and Kueue set them"))]
    pub pod_annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    /// Seconds a rank may take to load its weights before it counts as failed (20B: minutes).
    #[serde(default = "default_startup")]
    #[schemars(range(min = 10))]
    pub startup_timeout_seconds: i32,
    /// Seconds a rank has to stop once its pod is deleted (default 60): 5 s still admitting
    /// while traffic moves away, then in-flight requests get all but the last 10 s to finish
    /// (`NEOX_SHUTDOWN_GRACE`; 30 s by default). Raise it for long generations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30, max = 86400))]
    pub termination_grace_period_seconds: Option<i64>,
    /// The user and groups the ranks run as. Unset: 65532 (the image's non-root user) for all
    /// three. Set: exactly the IDs it names, so `{}` leaves them to the platform, as
    /// OpenShift's restricted SCC requires (it assigns them from the namespace's range).
    /// Ranks never run as root either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<WorkerIds>,
}

/// The IDs worker pods run as (`runAsUser` 0, root, is refused).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerIds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2147483647))]
    pub run_as_user: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub run_as_group: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub fs_group: Option<i64>,
}

fn default_startup() -> i32 {
    1800
}

// By hand, not derived: a derived default would set `startupTimeoutSeconds` to 0, below the
// schema's minimum, and the default of `worker` is written into the CRD, which the API server
// refuses whole for one invalid default.
impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            image: None,
            image_pull_policy: None,
            resources: RankResources::default(),
            env: Vec::new(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            priority_class_name: None,
            topology_spread_constraints: Vec::new(),
            runtime_class_name: None,
            scheduler_name: None,
            queue_name: None,
            pod_labels: BTreeMap::new(),
            pod_annotations: BTreeMap::new(),
            image_pull_secrets: Vec::new(),
            startup_timeout_seconds: default_startup(),
            termination_grace_period_seconds: None,
            security_context: None,
        }
    }
}

/// Resources of one rank (one pod).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RankResources {
    /// CPU request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub cpu: Option<String>,
    /// CPU limit, unset by default: a limit throttles decode steps under CFS quotas. Set it
    /// where a ResourceQuota on `limits.cpu` asks for one; at least `cpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub cpu_limit: Option<String>,
    /// Memory request and limit (the same: a rank over its request would be the first evicted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub memory: Option<String>,
    /// Ephemeral storage request and limit (logs, `/tmp`), where a ResourceQuota or the
    /// scheduler asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub ephemeral_storage: Option<String>,
    /// GPUs per rank: 0 for CPU workers, 1 for GPU ones (each rank drives one GPU; more GPUs
    /// means more ranks, `tensorParallelSize`).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1))]
    pub gpus: i32,
    /// Extended resource name of the GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_resource_name: Option<String>,
}

/// Engine limits, passed to every leader. Every running sequence feeds a token each step, so
/// the step budget must cover the batch (the worker refuses to start otherwise); the rule
/// applies the worker's defaults, 512 and 32, to whichever is unset.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.maxTokensPerStep) ? self.maxTokensPerStep : 512) >= (has(self.maxBatchSize) ? self.maxBatchSize : 32)").message("engine.maxTokensPerStep (default 512) must be at least engine.maxBatchSize (default 32)"))]
pub struct EngineSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_batch_size: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_tokens_per_step: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_waiting_requests: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_total_tokens: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub kv_cache_mib: Option<i32>,
    /// Keep finished requests' KV while blocks are free and start prompts that share their
    /// tokens from it (the worker's default: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_caching: Option<bool>,
    /// Speculative decoding by prompt lookup: draft tokens a decoding sequence may verify per
    /// step (the worker's default: 0, off). Changes speed, never output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16))]
    pub speculative_tokens: Option<i32>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Groups that may be unavailable at once during a rolling update.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
    /// Seconds a rollout or scale-out may go without progress (a group becoming ready or
    /// current) before Progressing turns False with reason ProgressDeadlineExceeded, as a
    /// Deployment's does. The operator keeps trying; the condition is for people and alerts.
    #[serde(default = "default_progress_deadline")]
    #[schemars(range(min = 60))]
    pub progress_deadline_seconds: i32,
}

fn default_progress_deadline() -> i32 {
    2400
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_unavailable: 1,
            progress_deadline_seconds: default_progress_deadline(),
        }
    }
}

/// Observed state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NeoXDeploymentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Groups that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Groups whose every rank is ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Groups running the current pod template.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Selects the leaders (rank 0) of the groups: for the scale subresource and HPAs.
    #[serde(default)]
    pub selector: String,
    #[serde(default)]
    pub groups: Vec<GroupStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// While groups are rolling or scaling: when the last one became ready or current (or the
    /// spec changed), RFC 3339. Null once every group is; a merge patch clears it so.
    #[serde(default)]
    pub last_progress_time: Option<String>,
    /// The autoscaler's last look at its metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_decision: Option<ScaleDecision>,
    /// Recent recommendations (unix seconds, groups), for the stabilization windows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recommendations: Vec<Recommendation>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDecision {
    /// RFC 3339.
    pub time: String,
    pub from: i32,
    pub to: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_value: Option<f64>,
    pub message: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    pub time: i64,
    pub replicas: i32,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    pub index: i32,
    /// Pending, Starting, Ready, Updating, Restarting, BackingOff, Queued,
    /// InsufficientCapacity, Unschedulable, Stuck.
    pub phase: String,
    pub ready_ranks: i32,
    pub revision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The group has been Ready since it was created: the disruption budget protects its
    /// pods. A group that never served (waiting for capacity, quota or admission) is left
    /// out, so it cannot use up the budget and block drains of the groups that serve.
    #[serde(default)]
    pub served: bool,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Available, Progressing or Degraded.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
}
