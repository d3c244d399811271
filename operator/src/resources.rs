//! The Kubernetes objects a NeoXDeployment should own, as pure functions of its spec.
//!
//! Per group `g`: a StatefulSet `<name>-<g>` (one pod per rank, all started at once) and a
//! headless Service `<name>-<g>` that gives rank 0 a stable DNS name for the rendezvous.
//! Per deployment: a client Service over the leaders and a PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, GRPCAction,
    HostPathVolumeSource, LocalObjectReference, ObjectFieldSelector, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::crd::{NeoXDeployment, WorkerIds};

pub const DEPLOYMENT_LABEL: &str = "serving.neox.dev/deployment";
pub const GROUP_LABEL: &str = "serving.neox.dev/group";
pub const REVISION_LABEL: &str = "serving.neox.dev/revision";
/// Set by the StatefulSet controller on every pod (Kubernetes ≥ 1.28): the rank.
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
pub const RESTARTS_ANNOTATION: &str = "serving.neox.dev/group-restarts";
pub const LAST_RESTART_ANNOTATION: &str = "serving.neox.dev/last-restart";
/// Kueue admits a StatefulSet carrying this label as one workload (all its pods or none).
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";

pub const GRPC_PORT: i32 = 50051;
pub const METRICS_PORT: i32 = 9400;
/// The OpenAI-compatible HTTP API.
pub const HTTP_PORT: i32 = 8000;
pub const GROUP_PORT: i32 = 50052;
pub const COLLECTIVE_PORT: i32 = 50053;
const MODEL_MOUNT: &str = "/model";
/// The non-root user of the worker image.
const WORKER_UID: i64 = 65532;

/// The worker image used when the spec names none. CPU groups: `NEOX_WORKER_IMAGE` (the Helm
/// chart's `workerImage`), else this operator's own version of the CPU image. GPU groups need
/// the CUDA build: `NEOX_WORKER_CUDA_IMAGE` (`workerCudaImage`), else the CUDA image of the
/// same version.
pub fn default_image(gpu: bool) -> String {
    let (var, name) = if gpu {
        ("NEOX_WORKER_CUDA_IMAGE", "neox-worker-cuda")
    } else {
        ("NEOX_WORKER_IMAGE", "neox-worker")
    };
    std::env::var(var)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("ghcr.io/neox-serve/{name}:{}", env!("CARGO_PKG_VERSION")))
}

pub fn group_name(d: &NeoXDeployment, g: i32) -> String {
    format!("{}-{g}", d.name_any())
}

fn owner(d: &NeoXDeployment) -> Option<Vec<OwnerReference>> {
    d.controller_owner_ref(&()).map(|o| vec![o])
}

/// Labels every object of the deployment carries.
pub fn common_labels(d: &NeoXDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "neox-worker".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), d.name_any()),
        ("app.kubernetes.io/managed-by".to_owned(), "neox-operator".to_owned()),
        (DEPLOYMENT_LABEL.to_owned(), d.name_any()),
    ])
}

fn group_selector(d: &NeoXDeployment, g: i32) -> BTreeMap<String, String> {
    BTreeMap::from([
        (DEPLOYMENT_LABEL.to_owned(), d.name_any()),
        (GROUP_LABEL.to_owned(), g.to_string()),
    ])
}

/// `key=value,...` selecting the leaders of every group (the scale subresource's selector).
pub fn leader_selector(d: &NeoXDeployment) -> String {
    format!("{DEPLOYMENT_LABEL}={},{POD_INDEX_LABEL}=0", d.name_any())
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn port(name: &str, p: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: p,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn grpc_probe(period: i32, failures: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction {
            port: GRPC_PORT,
            service: Some(String::new()),
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Default::default()
    }
}

/// The pod template of every group: everything that, when it changes, rolls the groups.
pub fn pod_template(d: &NeoXDeployment) -> PodSpec {
    let s = &d.spec;
    let tp = s.tensor_parallel_size;
    let ids = s.worker.security_context.clone().unwrap_or(WorkerIds {
        run_as_user: Some(WORKER_UID),
        run_as_group: Some(WORKER_UID),
        fs_group: Some(WORKER_UID),
    });
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..Default::default()
    }];
    let model_arg = if let Some(pvc) = &s.model.pvc {
        volumes.push(Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.claim_name.clone(),
                read_only: Some(true),
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "model".into(),
            mount_path: MODEL_MOUNT.into(),
            read_only: Some(true),
            sub_path: pvc.sub_path.clone(),
            ..Default::default()
        });
        MODEL_MOUNT.to_owned()
    } else if let Some(path) = &s.model.host_path {
        volumes.push(Volume {
            name: "model".into(),
            host_path: Some(HostPathVolumeSource {
                path: path.clone(),
                type_: Some("Directory".into()),
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "model".into(),
            mount_path: MODEL_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        });
        MODEL_MOUNT.to_owned()
    } else if let Some(path) = &s.model.image_path {
        path.clone()
    } else {
        format!(
            "builtin:{}",
            s.model.builtin.clone().unwrap_or_else(|| "shakespeare".into())
        )
    };
    let gpus = s.worker.resources.gpus;
    if gpus > 0 {
        // NCCL moves data through shared memory; the container default of 64 MiB is too small.
        volumes.push(Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..Default::default()
        });
    }
    let mut envs = vec![
        field_env("NEOX_RANK", &format!("metadata.labels['{POD_INDEX_LABEL}']")),
        env("NEOX_WORLD_SIZE", tp.to_string()),
        // Rank 0's stable name through the group's headless Service; set per group below.
        field_env("NEOX_ADVERTISE_HOST", "status.podIP"),
        // The IPv6 wildcard takes IPv4 too (and the worker falls back to the IPv4 one where
        // the node has no IPv6): IPv4, IPv6 and dual-stack clusters alike.
        env("NEOX_GRPC_ADDR", format!("[::]:{GRPC_PORT}")),
        env("NEOX_METRICS_ADDR", format!("[::]:{METRICS_PORT}")),
        env("NEOX_HTTP_ADDR", format!("[::]:{HTTP_PORT}")),
        // OpenAI API requests name the model as clients know it: the NeoXDeployment (as KServe
        // names an InferenceService's model), not the path it is mounted at.
        env("NEOX_SERVED_MODEL_NAME", d.name_any()),
        env("NEOX_COLLECTIVE_PORT", COLLECTIVE_PORT.to_string()),
        env("NEOX_MODEL", model_arg),
        // The leader waits for the other ranks as long as a rank may take to start: a rank
        // pending for a node the cluster autoscaler is adding is not a reason to give up.
        env("NEOX_RENDEZVOUS_TIMEOUT", s.worker.startup_timeout_seconds.to_string()),
        env("NEOX_LOG", "info"),
        env("NEOX_LOG_FORMAT", "json"),
    ];
    if gpus > 0 {
        // The device plugin exposes the pod's GPU as device 0; NCCL collectives follow from it.
        envs.push(env("NEOX_DEVICE", "cuda"));
    }
    // GPUs serve fp16 unless told otherwise (fp32 would double the weights' memory: 20B at
    // TP=1 would not fit); CPUs keep the worker's default, fp32.
    match (s.model.dtype, gpus > 0) {
        (Some(dt), _) => envs.push(env("NEOX_DTYPE", dt.as_str())),
        (None, true) => envs.push(env("NEOX_DTYPE", "fp16")),
        (None, false) => {}
    }
    let e = &s.engine;
    for (name, v) in [
        ("NEOX_MAX_BATCH_SIZE", e.max_batch_size),
        ("NEOX_MAX_TOKENS_PER_STEP", e.max_tokens_per_step),
        ("NEOX_MAX_WAITING_REQUESTS", e.max_waiting_requests),
        ("NEOX_MAX_TOTAL_TOKENS", e.max_total_tokens),
        ("NEOX_KV_CACHE_MIB", e.kv_cache_mib),
        ("NEOX_SPECULATIVE_TOKENS", e.speculative_tokens),
    ] {
        if let Some(v) = v {
            envs.push(env(name, v.to_string()));
        }
    }
    if let Some(on) = e.prefix_caching {
        envs.push(env("NEOX_PREFIX_CACHING", on.to_string()));
    }
    if let Some(t) = s.worker.termination_grace_period_seconds {
        // The worker's drain delay (5 s) first, and 10 s kept for closing before SIGKILL.
        envs.push(env("NEOX_SHUTDOWN_GRACE", (t - 15).max(0).to_string()));
    }
    // The user's env wins over the operator's defaults of the same name (NEOX_DEVICE=cuda:1,
    // say) and never duplicates one: env is a list keyed by name under server-side apply.
    for e in &s.worker.env {
        match envs.iter_mut().find(|o| o.name == e.name) {
            Some(o) => *o = e.clone(),
            None => envs.push(e.clone()),
        }
    }
    let r = &s.worker.resources;
    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(c) = &r.cpu {
        requests.insert("cpu".to_owned(), Quantity(c.clone()));
    }
    if let Some(c) = &r.cpu_limit {
        limits.insert("cpu".to_owned(), Quantity(c.clone()));
    }
    for (name, q) in [("memory", &r.memory), ("ephemeral-storage", &r.ephemeral_storage)] {
        if let Some(q) = q {
            requests.insert(name.to_owned(), Quantity(q.clone()));
            limits.insert(name.to_owned(), Quantity(q.clone()));
        }
    }
    if gpus > 0 {
        let name = r.gpu_resource_name.clone().unwrap_or_else(|| "nvidia.com/gpu".into());
        requests.insert(name.clone(), Quantity(gpus.to_string()));
        limits.insert(name, Quantity(gpus.to_string()));
    }
    let startup_failures = (s.worker.startup_timeout_seconds / 10).max(1);
    let container = Container {
        name: "worker".into(),
        image: Some(s.worker.image.clone().unwrap_or_else(|| default_image(gpus > 0))),
        image_pull_policy: s.worker.image_pull_policy.clone(),
        args: Some(vec!["serve".into()]),
        env: Some(envs),
        ports: Some(vec![
            port("grpc", GRPC_PORT),
            port("http", HTTP_PORT),
            port("metrics", METRICS_PORT),
            port("group", GROUP_PORT),
            port("collective", COLLECTIVE_PORT),
        ]),
        resources: Some(ResourceRequirements {
            requests: (!requests.is_empty()).then_some(requests),
            limits: (!limits.is_empty()).then_some(limits),
            ..Default::default()
        }),
        // Every rank answers gRPC health: SERVING once weights are loaded and the group formed.
        startup_probe: Some(grpc_probe(10, startup_failures)),
        readiness_probe: Some(grpc_probe(5, 2)),
        liveness_probe: Some(grpc_probe(10, 6)),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        node_selector: (!s.worker.node_selector.is_empty()).then(|| s.worker.node_selector.clone()),
        tolerations: (!s.worker.tolerations.is_empty()).then(|| s.worker.tolerations.clone()),
        affinity: s.worker.affinity.clone(),
        priority_class_name: s.worker.priority_class_name.clone(),
        topology_spread_constraints: (!s.worker.topology_spread_constraints.is_empty())
            .then(|| s.worker.topology_spread_constraints.clone()),
        scheduler_name: s.worker.scheduler_name.clone(),
        runtime_class_name: s.worker.runtime_class_name.clone(),
        image_pull_secrets: (!s.worker.image_pull_secrets.is_empty()).then(|| {
            s.worker
                .image_pull_secrets
                .iter()
                .map(|n| LocalObjectReference { name: n.clone() })
                .collect()
        }),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(s.worker.termination_grace_period_seconds.unwrap_or(60)),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: ids.run_as_user,
            run_as_group: ids.run_as_group,
            fs_group: ids.fs_group,
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A short hash of the pod template: groups whose StatefulSet carries another are outdated.
pub fn revision(d: &NeoXDeployment) -> String {
    let mut hash = Sha256::new();
    hash.update(serde_json::to_vec(&pod_template(d)).unwrap_or_default());
    // The pod's own labels and annotations, and the Kueue queue (immutable on an admitted
    // StatefulSet), count too; hashed only when set, so the groups of a spec without them keep
    // the revision they had before these fields existed and an operator upgrade rolls nothing.
    let w = &d.spec.worker;
    if !w.pod_labels.is_empty() || !w.pod_annotations.is_empty() || w.queue_name.is_some() {
        let extra = (&w.pod_labels, &w.pod_annotations, &w.queue_name);
        hash.update(serde_json::to_vec(&extra).unwrap_or_default());
    }
    hash.finalize().iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// The StatefulSet of group `g` at the current revision.
pub fn statefulset(d: &NeoXDeployment, g: i32) -> StatefulSet {
    let name = group_name(d, g);
    let ns = d.namespace().unwrap_or_else(|| "default".into());
    let rev = revision(d);
    let mut labels = common_labels(d);
    labels.insert(GROUP_LABEL.into(), g.to_string());
    // The user's labels first: the operator's own (which the schema keeps them from naming)
    // are what selectors and the rollout go by.
    let mut pod_labels = d.spec.worker.pod_labels.clone();
    pod_labels.extend(labels.clone());
    pod_labels.insert(REVISION_LABEL.into(), rev.clone());
    let mut pod_annotations = BTreeMap::from([(
        "cluster-autoscaler.kubernetes.io/safe-to-evict".to_owned(),
        "false".to_owned(),
    )]);
    pod_annotations.extend(d.spec.worker.pod_annotations.clone());
    let mut spec = pod_template(d);
    if let Some(c) = spec.containers.first_mut() {
        let env = c.env.get_or_insert_with(Vec::new);
        env.insert(
            1,
            self::env("NEOX_LEADER_ADDR", format!("{name}-0.{name}.{ns}.svc:{GROUP_PORT}")),
        );
    }
    let mut sts_labels = labels.clone();
    sts_labels.insert(REVISION_LABEL.into(), rev);
    if let Some(q) = &d.spec.worker.queue_name {
        sts_labels.insert(KUEUE_QUEUE_LABEL.into(), q.clone());
    }
    StatefulSet {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns),
            labels: Some(sts_labels),
            owner_references: owner(d),
            ..Default::default()
        },
        spec: Some(StatefulSetSpec {
            replicas: Some(d.spec.tensor_parallel_size),
            service_name: Some(name),
            pod_management_policy: Some("Parallel".into()),
            // The operator replaces a group's pods all at once; never a mix of revisions.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                ..Default::default()
            }),
            selector: LabelSelector {
                match_labels: Some(group_selector(d, g)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..Default::default()
                }),
                spec: Some(spec),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The headless Service giving group `g`'s pods stable names (ready or not: ranks must find
/// each other before any is ready).
pub fn headless_service(d: &NeoXDeployment, g: i32) -> Service {
    let mut labels = common_labels(d);
    labels.insert(GROUP_LABEL.into(), g.to_string());
    Service {
        metadata: ObjectMeta {
            name: Some(group_name(d, g)),
            namespace: d.namespace(),
            labels: Some(labels),
            owner_references: owner(d),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(group_selector(d, g)),
            ports: Some(vec![
                svc_port("group", GROUP_PORT),
                svc_port("collective", COLLECTIVE_PORT),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn svc_port(name: &str, p: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: p,
        target_port: Some(IntOrString::Int(p)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// Metadata of the objects a deployment has one of (named after it, owned by it).
fn deployment_meta(d: &NeoXDeployment) -> ObjectMeta {
    ObjectMeta {
        name: Some(d.name_any()),
        namespace: d.namespace(),
        labels: Some(common_labels(d)),
        owner_references: owner(d),
        ..Default::default()
    }
}

/// Every worker pod of the deployment, whatever its group.
fn deployment_pods(d: &NeoXDeployment) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(DEPLOYMENT_LABEL.to_owned(), d.name_any())])),
        ..Default::default()
    }
}

/// Whether `path` is `base` or below it, component-wise (`/models/x` is under `/models/`, not
/// under `/mod`): the one rule for the host paths and Prometheus URLs the operator allows.
pub fn path_under(path: &str, base: &str) -> bool {
    path.strip_prefix(base.trim_end_matches('/'))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// A Kubernetes quantity's value (`500m` is 0.5, `2Ki` 2048), for comparing two of a kind;
/// `None` where it is not one.
pub fn quantity(q: &str) -> Option<f64> {
    // The binary ones first: `Pi` must not read as `P`.
    const SUFFIXES: [(&str, f64); 15] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, scale) = SUFFIXES
        .iter()
        .find_map(|(s, f)| q.strip_suffix(s).map(|n| (n, *f)))
        .unwrap_or((q, 1.0));
    // Plain numbers and exponents (`1e3`) parse as floats.
    number.parse::<f64>().ok().filter(|v| v.is_finite()).map(|v| v * scale)
}

/// The Service clients use: rank 0 of every group, only while ready.
pub fn client_service(d: &NeoXDeployment) -> Service {
    Service {
        metadata: deployment_meta(d),
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([
                (DEPLOYMENT_LABEL.to_owned(), d.name_any()),
                (POD_INDEX_LABEL.to_owned(), "0".to_owned()),
            ])),
            ports: Some(vec![
                svc_port("grpc", GRPC_PORT),
                svc_port("http", HTTP_PORT),
                svc_port("metrics", METRICS_PORT),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Voluntary disruptions (drains) may take `maxUnavailable` pods at once. Losing any rank
/// stops its group, so each evicted pod may cost a whole group: a budget of groups × ranks
/// would let one drain evict a rank of several groups before any of them reads unready. Once
/// a rank is gone the rest of its group turns unready and holds further evictions until the
/// group is back. Pods that are not Ready may always be evicted (a broken group must not
/// block a drain). Groups that never served (status says so) are left out: their pods, Pending
/// for capacity, gated by Kueue or refused by a quota, count as expected but unhealthy and
/// would use up the budget, blocking every drain of the groups that do serve.
pub fn disruption_budget(d: &NeoXDeployment) -> PodDisruptionBudget {
    let pods = d.spec.rollout.max_unavailable.max(1);
    let mut selector = deployment_pods(d);
    let unserved: Vec<String> = d
        .status
        .iter()
        .flat_map(|s| &s.groups)
        .filter(|g| !g.served)
        .map(|g| g.index.to_string())
        .collect();
    if !unserved.is_empty() {
        selector.match_expressions = Some(vec![LabelSelectorRequirement {
            key: GROUP_LABEL.into(),
            operator: "NotIn".into(),
            values: Some(unserved),
        }]);
    }
    PodDisruptionBudget {
        metadata: deployment_meta(d),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(pods)),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            selector: Some(selector),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Ingress to the workers: clients and Prometheus reach the serving ports (gRPC, HTTP,
/// metrics) from anywhere, or only from the sources `spec.networkPolicy` names; everything
/// else (the group's rendezvous and collectives, unauthenticated and carrying activations,
/// and NCCL's own ports) only from the deployment's own pods: any other pod could otherwise
/// join with a wrong rank and stop a group from forming. Policies add up, so a cluster that
/// needs more ingress adds its own; a CNI without NetworkPolicy ignores it.
pub fn network_policy(d: &NeoXDeployment) -> NetworkPolicy {
    let own_pods = deployment_pods(d);
    let ports = |ps: &[i32]| {
        ps.iter()
            .map(|&p| NetworkPolicyPort {
                port: Some(IntOrString::Int(p)),
                protocol: Some("TCP".into()),
                ..Default::default()
            })
            .collect()
    };
    let options = d.spec.network_policy.clone().unwrap_or_default();
    // No list: any source. Serving and metrics share a rule while neither is narrowed.
    let mut rules = match (options.serving_from, options.metrics_from) {
        (None, None) => vec![NetworkPolicyIngressRule {
            from: None,
            ports: Some(ports(&[GRPC_PORT, HTTP_PORT, METRICS_PORT])),
        }],
        (serving, metrics) => vec![
            NetworkPolicyIngressRule {
                from: serving,
                ports: Some(ports(&[GRPC_PORT, HTTP_PORT])),
            },
            NetworkPolicyIngressRule {
                from: metrics,
                ports: Some(ports(&[METRICS_PORT])),
            },
        ],
    };
    rules.push(NetworkPolicyIngressRule {
        from: Some(vec![NetworkPolicyPeer {
            pod_selector: Some(own_pods.clone()),
            ..Default::default()
        }]),
        // Every port: NCCL's bootstrap and transports listen on ports of their own choosing,
        // besides the group's rendezvous and TCP collectives.
        ports: None,
    });
    NetworkPolicy {
        metadata: deployment_meta(d),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(own_pods),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(rules),
            ..Default::default()
        }),
    }
}
