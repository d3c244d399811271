//! The shipped manifests: the CRD is current, samples are valid NeoXDeployments that the
//! CRD's own schema and CEL rules accept, bad objects are refused, and the objects the
//! operator creates match reviewed golden YAML.

mod admission;

use admission::{admission_errors, default_errors, read};

use neox_operator::crd::NeoXDeployment;
use neox_operator::{reconcile, resources};
use serde_json::Value;

#[test]
fn every_default_in_the_crd_passes_its_own_schema() {
    // The API server refuses a CRD whose defaults break its own rules, so one bad default
    // would make `kubectl apply -f deploy/` and `helm install` fail before anything runs.
    let errs = default_errors();
    assert!(
        errs.is_empty(),
        "defaults the API server would refuse:\n{}",
        errs.join("\n")
    );
}

#[test]
fn deploy_crd_yaml_is_current() {
    let want = neox_operator::crd_yaml().unwrap();
    assert!(
        read("deploy/crd.yaml") == want,
        "deploy/crd.yaml is stale: run `cargo run -p neox-operator --bin crdgen > deploy/crd.yaml`"
    );
}

/// A shipped sample as `kubectl apply` in namespace `default` would create it (the samples name
/// no namespace, so they land in the current one).
fn sample(rel: &str) -> Value {
    let mut v: Value = serde_yaml::from_str(&read(rel)).unwrap();
    assert!(v["metadata"].get("namespace").is_none(), "{rel} names a namespace");
    v["metadata"]["namespace"] = "default".into();
    v
}

#[test]
fn samples_are_valid_neoxdeployments() {
    for rel in [
        "deploy/samples/gpt-neox-20b-tp4-gpu.yaml",
        "deploy/samples/shakespeare-cpu.yaml",
    ] {
        let v = sample(rel);
        let d: NeoXDeployment = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert!(neox_operator::reconcile::spec_problems(&d).is_empty(), "{rel}");
        assert_eq!(admission_errors(&v), Vec::<String>::new(), "{rel}");
    }
    let big: NeoXDeployment = serde_json::from_value(sample("deploy/samples/gpt-neox-20b-tp4-gpu.yaml")).unwrap();
    assert_eq!(big.spec.tensor_parallel_size, 4);
    assert_eq!(big.spec.worker.resources.gpus, 1);
}

#[test]
fn bad_neoxdeployments_are_refused_with_a_reason() {
    let base = sample("deploy/samples/shakespeare-cpu.yaml");
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "tensorParallelSize must be 1, 2, 4 or 8",
            Box::new(|v| v["spec"]["tensorParallelSize"] = 3.into()),
        ),
        (
            "exactly one model source",
            Box::new(|v| v["spec"]["model"] = serde_json::json!({})),
        ),
        (
            "exactly one model source",
            Box::new(|v| v["spec"]["model"]["hostPath"] = "/models/x".into()),
        ),
        ("< minimum", Box::new(|v| v["spec"]["replicas"] = (-1).into())),
        (
            "> maximum",
            Box::new(|v| v["spec"]["worker"]["resources"]["gpus"] = 2.into()),
        ),
        (
            // An empty `from` would mean any source: say nothing to mean that.
            "fewer than minItems 1",
            Box::new(|v| v["spec"]["networkPolicy"] = serde_json::json!({"servingFrom": []})),
        ),
        (
            "metadata.name must be",
            Box::new(|v| v["metadata"]["name"] = "9-lives".into()),
        ),
        (
            "metadata.name must be",
            Box::new(|v| v["metadata"]["name"] = "a".repeat(46).into()),
        ),
        (
            "does not match",
            Box::new(|v| v["spec"]["worker"]["resources"]["memory"] = "lots".into()),
        ),
        (
            "does not match",
            Box::new(|v| v["spec"]["worker"]["resources"]["cpuLimit"] = "2 cores".into()),
        ),
        (
            "does not match",
            Box::new(|v| v["spec"]["worker"]["resources"]["ephemeralStorage"] = "10GB".into()),
        ),
        ("not in", Box::new(|v| v["spec"]["model"]["dtype"] = "int8".into())),
        (
            "< minimum",
            Box::new(|v| v["spec"]["rollout"] = serde_json::json!({"maxUnavailable": 0})),
        ),
        (
            "minReplicas must not exceed maxReplicas",
            Box::new(|v| {
                v["spec"]["autoscaling"] = serde_json::json!({"minReplicas": 4, "maxReplicas": 2, "target": 1.0})
            }),
        ),
        (
            "minReplicas 0 needs autoscaling.query",
            Box::new(|v| {
                v["spec"]["autoscaling"] =
                    serde_json::json!({"minReplicas": 0, "maxReplicas": 2, "target": 1.0, "metric": "queueDepth"})
            }),
        ),
        (
            "target must be positive",
            Box::new(|v| v["spec"]["autoscaling"] = serde_json::json!({"maxReplicas": 2, "target": 0.0})),
        ),
        (
            "not both",
            Box::new(|v| {
                v["spec"]["autoscaling"] =
                    serde_json::json!({"maxReplicas": 2, "target": 1.0, "metric": "queueDepth", "query": "up"})
            }),
        ),
        (
            "maxTokensPerStep (default 512) must be at least engine.maxBatchSize",
            Box::new(|v| v["spec"]["engine"] = serde_json::json!({"maxTokensPerStep": 16})),
        ),
        (
            "maxTokensPerStep (default 512) must be at least engine.maxBatchSize",
            Box::new(|v| v["spec"]["engine"] = serde_json::json!({"maxBatchSize": 600})),
        ),
        (
            "rollout.progressDeadlineSeconds (default 2400) must exceed worker.startupTimeoutSeconds",
            Box::new(|v| {
                v["spec"]["rollout"] = serde_json::json!({"progressDeadlineSeconds": 600});
                v["spec"]["worker"]
                    .as_object_mut()
                    .unwrap()
                    .remove("startupTimeoutSeconds");
            }),
        ),
        (
            "rollout.progressDeadlineSeconds (default 2400) must exceed worker.startupTimeoutSeconds",
            Box::new(|v| v["spec"]["worker"]["startupTimeoutSeconds"] = 3600.into()),
        ),
        (
            "< minimum",
            Box::new(|v| v["spec"]["worker"]["securityContext"] = serde_json::json!({"runAsUser": 0})),
        ),
        (
            "missing required",
            Box::new(|v| {
                v["spec"].as_object_mut().unwrap().remove("model");
            }),
        ),
        (
            "worker.podLabels must not set serving.neox.dev/*",
            Box::new(|v| v["spec"]["worker"]["podLabels"] = serde_json::json!({"serving.neox.dev/group": "7"})),
        ),
        (
            "worker.podLabels must not set",
            Box::new(|v| v["spec"]["worker"]["podLabels"] = serde_json::json!({"app.kubernetes.io/instance": "x"})),
        ),
        (
            "(use worker.queueName)",
            Box::new(|v| v["spec"]["worker"]["podLabels"] = serde_json::json!({"kueue.x-k8s.io/queue-name": "q"})),
        ),
        (
            "worker.podAnnotations must not set",
            Box::new(|v| {
                v["spec"]["worker"]["podAnnotations"] = serde_json::json!({"serving.neox.dev/group-restarts": "0"})
            }),
        ),
        (
            "more than maxProperties 64",
            Box::new(|v| {
                let many: serde_json::Map<_, _> = (0..65).map(|i| (format!("k{i}"), Value::from("v"))).collect();
                v["spec"]["worker"]["podAnnotations"] = Value::Object(many);
            }),
        ),
        (
            "does not match",
            Box::new(|v| v["spec"]["worker"]["queueName"] = "GPU_Queue".into()),
        ),
        (
            "longer than maxLength 63",
            Box::new(|v| v["spec"]["worker"]["queueName"] = "q".repeat(64).into()),
        ),
    ];
    for (want, mutate) in cases {
        let mut v = base.clone();
        mutate(&mut v);
        let errs = admission_errors(&v).join("\n");
        assert!(errs.contains(want), "expected {want:?}, got {errs:?} for {}", v["spec"]);
    }
}

fn golden(name: &str, actual: &str) {
    let path = admission::root().join("operator/tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        want == actual,
        "{} differs from the operator's output; review and rerun with UPDATE_GOLDEN=1\n{actual}",
        path.display()
    );
}

#[test]
fn desired_objects_match_golden_yaml() {
    for (rel, out) in [
        ("deploy/samples/shakespeare-cpu.yaml", "shakespeare-cpu.yaml"),
        ("deploy/samples/gpt-neox-20b-tp4-gpu.yaml", "gpt-neox-20b-tp4-gpu.yaml"),
    ] {
        let mut d: NeoXDeployment = serde_json::from_value(sample(rel)).unwrap();
        d.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
        let docs = [
            serde_yaml::to_string(&resources::statefulset(&d, 0)).unwrap(),
            serde_yaml::to_string(&resources::headless_service(&d, 0)).unwrap(),
            serde_yaml::to_string(&resources::client_service(&d)).unwrap(),
            serde_yaml::to_string(&resources::disruption_budget(&d)).unwrap(),
            serde_yaml::to_string(&resources::network_policy(&d)).unwrap(),
        ];
        golden(out, &docs.join("---\n"));
    }
}

#[test]
fn worker_env_overrides_operator_defaults_without_duplicates() {
    let mut v = sample("deploy/samples/gpt-neox-20b-tp4-gpu.yaml");
    v["spec"]["worker"]["env"] = serde_json::json!([
        {"name": "NEOX_DEVICE", "value": "cuda:0"},
        {"name": "NEOX_DTYPE", "value": "bf16"},
        {"name": "EXTRA", "value": "1"},
    ]);
    let mut d: NeoXDeployment = serde_json::from_value(v).unwrap();
    d.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    let sts = serde_json::to_value(resources::statefulset(&d, 0)).unwrap();
    let env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    let value = |name: &str| -> Vec<String> {
        env.iter()
            .filter(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(value("NEOX_DEVICE"), ["cuda:0"], "the user's device wins, once");
    assert_eq!(
        value("NEOX_DTYPE"),
        ["bf16"],
        "the user's dtype wins over spec.model.dtype, once"
    );
    assert_eq!(value("EXTRA"), ["1"]);
    // A CPU deployment gets no device variable: the worker's default is the CPU.
    let cpu: NeoXDeployment = serde_json::from_value(sample("deploy/samples/shakespeare-cpu.yaml")).unwrap();
    let sts = serde_json::to_value(resources::statefulset(&cpu, 0)).unwrap();
    let env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    assert!(env.iter().all(|e| e["name"] != "NEOX_DEVICE"));
}

#[test]
fn ranks_run_as_the_image_user_unless_the_spec_leaves_ids_to_the_platform() {
    let pod_ids = |worker_ids: Option<Value>| {
        let mut v = sample("deploy/samples/shakespeare-cpu.yaml");
        if let Some(ids) = worker_ids {
            v["spec"]["worker"]["securityContext"] = ids;
        }
        assert!(admission_errors(&v).is_empty(), "{:?}", admission_errors(&v));
        let d: NeoXDeployment = serde_json::from_value(v).unwrap();
        let sts = serde_json::to_value(resources::statefulset(&d, 0)).unwrap();
        let pod = sts["spec"]["template"]["spec"]["securityContext"].clone();
        let ids = ["runAsUser", "runAsGroup", "fsGroup"].map(|k| pod[k].as_i64());
        assert_eq!(pod["runAsNonRoot"], true, "never root, whatever the IDs");
        (ids, resources::revision(&d))
    };
    let (default_ids, default_rev) = pod_ids(None);
    assert_eq!(default_ids, [Some(65532); 3]);
    // OpenShift's restricted SCC assigns IDs from the namespace's range and refuses others.
    let (platform_ids, platform_rev) = pod_ids(Some(serde_json::json!({})));
    assert_eq!(platform_ids, [None; 3]);
    assert_ne!(platform_rev, default_rev, "a change of IDs rolls the groups");
    let (own_ids, _) = pod_ids(Some(serde_json::json!({"runAsUser": 1000, "fsGroup": 2000})));
    assert_eq!(own_ids, [Some(1000), None, Some(2000)]);
}

#[test]
fn pod_labels_annotations_scheduling_and_the_kueue_queue_reach_the_groups() {
    let base = sample("deploy/samples/shakespeare-cpu.yaml");
    let parse = |v: &Value| -> NeoXDeployment {
        assert!(admission_errors(v).is_empty(), "{:?}", admission_errors(v));
        serde_json::from_value(v.clone()).unwrap()
    };
    let plain = parse(&base);
    let mut v = base.clone();
    v["spec"]["worker"]["podLabels"] = serde_json::json!({"team": "search", "sidecar.istio.io/inject": "false"});
    v["spec"]["worker"]["podAnnotations"] = serde_json::json!({"example.com/cost-center": "42"});
    v["spec"]["worker"]["schedulerName"] = "volcano".into();
    v["spec"]["worker"]["runtimeClassName"] = "nvidia".into();
    v["spec"]["worker"]["topologySpreadConstraints"] = serde_json::json!([{
        "maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": {"serving.neox.dev/deployment": "shakespeare"}}}]);
    v["spec"]["worker"]["queueName"] = "gpu-queue".into();
    let d = parse(&v);
    let sts = serde_json::to_value(resources::statefulset(&d, 0)).unwrap();
    let meta = &sts["spec"]["template"]["metadata"];
    assert_eq!(meta["labels"]["team"], "search");
    assert_eq!(meta["labels"]["sidecar.istio.io/inject"], "false");
    assert_eq!(
        meta["labels"]["serving.neox.dev/group"], "0",
        "the operator's labels stay"
    );
    assert_eq!(meta["annotations"]["example.com/cost-center"], "42");
    assert_eq!(
        meta["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"],
        "false"
    );
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["schedulerName"], "volcano");
    assert_eq!(pod["runtimeClassName"], "nvidia");
    assert_eq!(
        pod["topologySpreadConstraints"][0]["topologyKey"],
        "topology.kubernetes.io/zone"
    );
    // Kueue's statefulset integration reads the queue from the StatefulSet itself (and copies
    // it to the pods with the group's name and size); the pods do not name it themselves.
    assert_eq!(sts["metadata"]["labels"]["kueue.x-k8s.io/queue-name"], "gpu-queue");
    assert!(meta["labels"].get("kueue.x-k8s.io/queue-name").is_none());
    let plain_sts = serde_json::to_value(resources::statefulset(&plain, 0)).unwrap();
    assert!(plain_sts["metadata"]["labels"]
        .get("kueue.x-k8s.io/queue-name")
        .is_none());
    assert!(plain_sts["spec"]["template"]["spec"].get("schedulerName").is_none());
    // Each of them is part of the revision (a StatefulSet's template labels and its Kueue queue
    // only reach pods it makes anew), and a spec naming none keeps the revision it had.
    assert_eq!(
        resources::revision(&plain),
        "928019f499",
        "the revision from before these fields"
    );
    for (field, value) in [
        ("podLabels", serde_json::json!({"team": "search"})),
        ("podAnnotations", serde_json::json!({"example.com/cost-center": "42"})),
        ("schedulerName", "volcano".into()),
        ("runtimeClassName", "nvidia".into()),
        ("queueName", "gpu-queue".into()),
    ] {
        let mut one = base.clone();
        one["spec"]["worker"][field] = value;
        assert_ne!(
            resources::revision(&parse(&one)),
            resources::revision(&plain),
            "{field}"
        );
    }
}

#[test]
fn a_longer_termination_grace_period_gives_in_flight_requests_the_time() {
    let mut v = sample("deploy/samples/shakespeare-cpu.yaml");
    let d: NeoXDeployment = serde_json::from_value(v.clone()).unwrap();
    let grace = |d: &NeoXDeployment| resources::pod_template(d).termination_grace_period_seconds;
    // Default: 60 s for the worker's 5 s drain delay, its 30 s shutdown grace and closing.
    assert_eq!((grace(&d), env_value(&d, "NEOX_SHUTDOWN_GRACE")), (Some(60), None));
    v["spec"]["worker"]["terminationGracePeriodSeconds"] = 600.into();
    assert!(admission_errors(&v).is_empty(), "{:?}", admission_errors(&v));
    let long: NeoXDeployment = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(
        (grace(&long), env_value(&long, "NEOX_SHUTDOWN_GRACE").as_deref()),
        (Some(600), Some("585"))
    );
    assert_ne!(resources::revision(&long), resources::revision(&d));
    // The user's own NEOX_SHUTDOWN_GRACE still wins.
    v["spec"]["worker"]["env"] = serde_json::json!([{"name": "NEOX_SHUTDOWN_GRACE", "value": "100"}]);
    let own: NeoXDeployment = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(env_value(&own, "NEOX_SHUTDOWN_GRACE").as_deref(), Some("100"));
    v["spec"]["worker"]["terminationGracePeriodSeconds"] = 5.into();
    assert!(
        admission_errors(&v).join("\n").contains("< minimum 30"),
        "{:?}",
        admission_errors(&v)
    );
}

#[test]
fn a_host_path_is_mounted_only_inside_the_directories_the_operator_allows() {
    use neox_operator::reconcile::host_path_problem;
    let mut v = sample("deploy/samples/shakespeare-cpu.yaml");
    v["spec"]["model"] = serde_json::json!({"hostPath": "/models/pythia"});
    let with = |path: &str| {
        let mut v = v.clone();
        v["spec"]["model"]["hostPath"] = path.into();
        serde_json::from_value::<NeoXDeployment>(v).unwrap()
    };
    let allowed = vec!["/models/".to_owned(), "/mnt/ckpt".to_owned()];
    for ok in ["/models/pythia", "/models", "/mnt/ckpt/gpt-neox-20b"] {
        assert_eq!(host_path_problem(&with(ok), &allowed), None, "{ok}");
    }
    for refused in [
        "/var/lib/kubelet",
        "/models-evil",
        "/models/../etc",
        "/mnt/ckpt2",
        "models/x",
    ] {
        let why = host_path_problem(&with(refused), &allowed).unwrap_or_default();
        assert!(
            why.contains("NEOX_HOST_PATH_PREFIXES: /models/, /mnt/ckpt"),
            "{refused}: {why:?}"
        );
    }
    // None allowed by default: a hostPath is refused however plain.
    let why = host_path_problem(&with("/models/pythia"), &[]).unwrap_or_default();
    assert!(
        why.contains("model.hostPath \"/models/pythia\"") && why.contains(": none)"),
        "{why}"
    );
    // Other sources never are.
    let pvc: NeoXDeployment = serde_json::from_value(sample("deploy/samples/gpt-neox-20b-tp4-gpu.yaml")).unwrap();
    assert_eq!(host_path_problem(&pvc, &[]), None);
}

#[test]
fn gpu_groups_without_an_image_get_the_cuda_build() {
    let mut v = sample("deploy/samples/gpt-neox-20b-tp4-gpu.yaml");
    v["spec"]["worker"].as_object_mut().unwrap().remove("image");
    let gpu: NeoXDeployment = serde_json::from_value(v).unwrap();
    let cpu: NeoXDeployment = serde_json::from_value(sample("deploy/samples/shakespeare-cpu.yaml")).unwrap();
    let image = |d: &NeoXDeployment| {
        let sts = serde_json::to_value(resources::statefulset(d, 0)).unwrap();
        sts["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(image(&gpu), format!("ghcr.io/neox-serve/neox-worker-cuda:{version}"));
    assert_eq!(image(&cpu), format!("ghcr.io/neox-serve/neox-worker:{version}"));
}

#[test]
fn a_cpu_limit_and_ephemeral_storage_reach_every_rank_only_when_asked_for() {
    let mut d: NeoXDeployment = serde_json::from_value(sample("deploy/samples/shakespeare-cpu.yaml")).unwrap();
    let resources_of = |d: &NeoXDeployment| {
        let sts = serde_json::to_value(resources::statefulset(d, 0)).unwrap();
        sts["spec"]["template"]["spec"]["containers"][0]["resources"].clone()
    };
    // No CPU limit by default: CFS quotas would throttle decode steps.
    let plain = resources_of(&d);
    assert!(plain["limits"].get("cpu").is_none(), "{plain}");
    assert!(plain["requests"].get("ephemeral-storage").is_none(), "{plain}");
    let r = &mut d.spec.worker.resources;
    (r.cpu, r.cpu_limit, r.ephemeral_storage) = (Some("2".into()), Some("2500m".into()), Some("10Gi".into()));
    let asked = resources_of(&d);
    assert_eq!(asked["requests"]["cpu"], "2");
    assert_eq!(asked["limits"]["cpu"], "2500m");
    assert_eq!(asked["requests"]["ephemeral-storage"], "10Gi");
    assert_eq!(asked["limits"]["ephemeral-storage"], "10Gi");
    assert_eq!(reconcile::spec_problems(&d), Vec::<String>::new());
    // A limit below the request: the API server would refuse every pod.
    d.spec.worker.resources.cpu_limit = Some("1500m".into());
    let problems = reconcile::spec_problems(&d);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("cpuLimit 1500m is below worker.resources.cpu 2"),
        "{problems:?}"
    );
    d.spec.worker.resources.cpu_limit = Some("2".into());
    assert_eq!(reconcile::spec_problems(&d), Vec::<String>::new());
}

#[test]
fn quantities_read_as_kubernetes_reads_them() {
    for (q, v) in [
        ("500m", 0.5),
        ("2", 2.0),
        ("1.5", 1.5),
        ("2Ki", 2048.0),
        ("1G", 1e9),
        ("3Mi", 3145728.0),
        ("1e3", 1000.0),
        ("2P", 2e15),
    ] {
        assert_eq!(resources::quantity(q), Some(v), "{q}");
    }
    for bad in ["", "lots", "m", "2 cores"] {
        assert_eq!(resources::quantity(bad), None, "{bad}");
    }
}

fn env_value(d: &NeoXDeployment, name: &str) -> Option<String> {
    let sts = serde_json::to_value(resources::statefulset(d, 0)).unwrap();
    sts["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e["value"].as_str().unwrap_or("").to_owned())
}

#[test]
fn gpu_groups_default_to_fp16_and_leaders_wait_as_long_as_ranks_may_start() {
    let mut v = sample("deploy/samples/gpt-neox-20b-tp4-gpu.yaml");
    v["spec"]["model"].as_object_mut().unwrap().remove("dtype");
    v["spec"]["worker"]["startupTimeoutSeconds"] = 2400.into();
    let gpu: NeoXDeployment = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(env_value(&gpu, "NEOX_DTYPE").as_deref(), Some("fp16"));
    assert_eq!(env_value(&gpu, "NEOX_RENDEZVOUS_TIMEOUT").as_deref(), Some("2400"));
    v["spec"]["model"]["dtype"] = "bf16".into();
    let gpu: NeoXDeployment = serde_json::from_value(v).unwrap();
    assert_eq!(env_value(&gpu, "NEOX_DTYPE").as_deref(), Some("bf16"));
    // CPUs keep the worker's default (fp32).
    let cpu: NeoXDeployment = serde_json::from_value(sample("deploy/samples/shakespeare-cpu.yaml")).unwrap();
    assert_eq!(env_value(&cpu, "NEOX_DTYPE"), None);
    // A spec without `worker` gets the documented 1800 s, in the wait and in the startup probe.
    let mut v = sample("deploy/samples/shakespeare-cpu.yaml");
    v["spec"].as_object_mut().unwrap().remove("worker");
    let bare: NeoXDeployment = serde_json::from_value(v).unwrap();
    assert_eq!(env_value(&bare, "NEOX_RENDEZVOUS_TIMEOUT").as_deref(), Some("1800"));
    let sts = serde_json::to_value(resources::statefulset(&bare, 0)).unwrap();
    let probe = &sts["spec"]["template"]["spec"]["containers"][0]["startupProbe"];
    assert_eq!(
        probe["failureThreshold"].as_i64().unwrap() * probe["periodSeconds"].as_i64().unwrap(),
        1800
    );
}

#[test]
fn only_the_deployments_own_pods_reach_anything_but_the_serving_ports() {
    let d: NeoXDeployment = serde_json::from_value(sample("deploy/samples/shakespeare-cpu.yaml")).unwrap();
    let np = serde_json::to_value(resources::network_policy(&d)).unwrap();
    let spec = &np["spec"];
    let own = serde_json::json!({"matchLabels": {"serving.neox.dev/deployment": "shakespeare"}});
    assert_eq!(spec["podSelector"], own);
    assert_eq!(spec["policyTypes"], serde_json::json!(["Ingress"]));
    let port_list = |rule: &Value| -> Vec<i64> {
        rule["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_i64().unwrap())
            .collect()
    };
    let rules = spec["ingress"].as_array().unwrap();
    let open: Vec<&Value> = rules.iter().filter(|r| r.get("from").is_none()).collect();
    let closed: Vec<&Value> = rules.iter().filter(|r| r.get("from").is_some()).collect();
    // Clients, probes and Prometheus: the serving ports, from anywhere.
    let serving = [resources::GRPC_PORT, resources::HTTP_PORT, resources::METRICS_PORT].map(i64::from);
    assert_eq!(open.len(), 1);
    assert_eq!(port_list(open[0]), serving);
    // Rendezvous, collectives and NCCL (which listens on ports of its own choosing, declared
    // nowhere): any port, from this deployment's pods only.
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0]["from"], serde_json::json!([{"podSelector": own}]));
    assert!(closed[0].get("ports").is_none(), "{}", closed[0]);
}

#[test]
fn the_serving_and_metrics_ports_open_only_to_the_sources_the_spec_names() {
    let mut v = sample("deploy/samples/shakespeare-cpu.yaml");
    let ingress =
        serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]);
    let prometheus =
        serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]);
    v["spec"]["networkPolicy"] = serde_json::json!({"servingFrom": ingress, "metricsFrom": prometheus});
    let d: NeoXDeployment = serde_json::from_value(v.clone()).unwrap();
    let errors = admission::admission_errors(&v);
    assert!(errors.is_empty(), "{errors:?}");
    let rules = |d: &NeoXDeployment| -> Vec<(Value, Vec<i64>)> {
        let np = serde_json::to_value(resources::network_policy(d)).unwrap();
        np["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let ports = r["ports"]
                    .as_array()
                    .map_or(vec![], |ps| ps.iter().map(|p| p["port"].as_i64().unwrap()).collect());
                (r.get("from").cloned().unwrap_or(Value::Null), ports)
            })
            .collect()
    };
    let (grpc, http, metrics) = (
        i64::from(resources::GRPC_PORT),
        i64::from(resources::HTTP_PORT),
        i64::from(resources::METRICS_PORT),
    );
    let own = serde_json::json!([{"podSelector": {"matchLabels": {"serving.neox.dev/deployment": "shakespeare"}}}]);
    assert_eq!(
        rules(&d),
        vec![
            (ingress.clone(), vec![grpc, http]),
            (prometheus, vec![metrics]),
            (own.clone(), vec![]),
        ]
    );
    // Only serving narrowed: Prometheus still reaches the metrics from anywhere.
    let mut only_serving = d.clone();
    only_serving.spec.network_policy.as_mut().unwrap().metrics_from = None;
    assert_eq!(
        rules(&only_serving),
        vec![(ingress, vec![grpc, http]), (Value::Null, vec![metrics]), (own, vec![])]
    );
    // The policy is no part of the pods: changing it rolls no group.
    let pod_template = serde_json::to_value(resources::statefulset(&d, 0)).unwrap();
    let plain: NeoXDeployment = serde_json::from_value(sample("deploy/samples/shakespeare-cpu.yaml")).unwrap();
    assert_eq!(
        pod_template,
        serde_json::to_value(resources::statefulset(&plain, 0)).unwrap(),
        "a policy change rolls no group"
    );
}
