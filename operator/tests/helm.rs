//! The Helm chart with the real Helm CLI: lint, render (defaults and every option), bad values
//! refused by values.schema.json, CRDs identical to deploy/, versions tied to the crate, and
//! the rendered objects valid (Kubernetes schemas; the sample through the CRD's own schema).
//! Skipped with a printed reason when no `helm` is found, except under CI.

mod admission;

use std::process::Command;

use admission::{admission_errors, read, root};
use neox_operator::crd::NeoXDeployment;
use serde_json::Value;

fn helm() -> Option<String> {
    let bin = std::env::var("NEOX_HELM").unwrap_or_else(|_| "helm".into());
    Command::new(&bin)
        .arg("version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| bin)
}

fn chart() -> String {
    root().join("helm/neox-operator").display().to_string()
}

fn run(helm: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(helm).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const ALL_OPTIONS: &[&str] = &[
    "--set",
    "rbac.namespaced=true",
    "--set",
    "serviceMonitor.enabled=true",
    "--set",
    "podMonitor.enabled=true",
    "--set",
    "prometheusRule.enabled=true",
    "--set",
    "sample.enabled=true",
    // A number, as `--set` makes it: the template quotes it (the CRD wants a quantity string).
    "--set",
    "sample.resources.cpu=2",
    "--set",
    "prometheus.url=http://prometheus.monitoring:9090",
    "--set",
    "prometheus.allowedUrls={http://thanos.monitoring:9090,https://prom.example/tenant}",
    "--set",
    "prometheus.customQueries=true",
    "--set",
    "workerImage=registry.example/neox-worker:1",
    "--set",
    "workerCudaImage=registry.example/neox-worker-cuda:1",
    "--set",
    "imagePullSecrets[0]=regcred",
    "--set",
    "nodeSelector.pool=system",
    "--set",
    "leaderElection.leaseDurationSeconds=30",
    "--set",
    "hostPathPrefixes={/models,/mnt/ckpt}",
    // OpenShift: the platform assigns the IDs of the operator and the sample's workers.
    "--set",
    "podSecurityContext.runAsUser=null",
    "--set",
    "podSecurityContext.runAsGroup=null",
    "--set-json",
    "sample.securityContext={}",
];

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn helm_chart_lints_renders_and_validates() {
    let Some(helm) = helm() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide helm (NEOX_HELM, see .ci/run)"
        );
        eprintln!("SKIPPED: no helm CLI (set NEOX_HELM or put helm on PATH)");
        return;
    };
    let chart = chart();
    let meta: Value = serde_yaml::from_str(&read("helm/neox-operator/Chart.yaml")).unwrap();
    assert_eq!(meta["apiVersion"], "v2");
    assert_eq!(
        meta["appVersion"],
        env!("CARGO_PKG_VERSION"),
        "Chart appVersion must follow the crate version"
    );
    assert_eq!(meta["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        read("helm/neox-operator/crds/neoxdeployments.yaml") == read("deploy/crd.yaml"),
        "helm/neox-operator/crds/ differs from deploy/crd.yaml: copy it over"
    );
    assert!(
        read("helm/neox-operator/files/neox-alerts.yaml") == read("deploy/monitoring/neox-alerts.yaml"),
        "helm/neox-operator/files/neox-alerts.yaml differs from deploy/monitoring/: copy it over"
    );

    let (ok, out, err) = run(&helm, &["lint", &chart, "--strict"]);
    assert!(ok, "helm lint: {out}{err}");
    let (ok, out, err) = run(
        &helm,
        &["lint", &chart, "--strict"]
            .iter()
            .copied()
            .chain(ALL_OPTIONS.iter().copied())
            .collect::<Vec<_>>(),
    );
    assert!(ok, "helm lint with every option: {out}{err}");

    let (ok, default, err) = run(&helm, &["template", "neox", &chart, "--namespace", "neox-system"]);
    assert!(ok, "{err}");
    let kinds: Vec<String> = docs(&default)
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_owned())
        .collect();
    for k in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.iter().any(|x| x == k), "default render lacks a {k}: {kinds:?}");
    }
    // The operator's own role is exactly deploy/'s: one least-privilege rule set, two ways to
    // install it.
    let shipped = docs(&read("deploy/rbac.yaml"));
    let operator_rules = |all: &[Value]| -> Value {
        let found: Vec<Value> = all
            .iter()
            .filter(|d| {
                d["kind"] == "ClusterRole"
                    && d["metadata"]["labels"]
                        .get("rbac.authorization.k8s.io/aggregate-to-edit")
                        .is_none()
                    && d["metadata"]["labels"]
                        .get("rbac.authorization.k8s.io/aggregate-to-view")
                        .is_none()
            })
            .cloned()
            .collect();
        assert_eq!(found.len(), 1, "one operator ClusterRole: {found:?}");
        found[0]["rules"].clone()
    };
    assert_eq!(
        operator_rules(&docs(&default)),
        operator_rules(&shipped),
        "the chart's operator role and deploy/rbac.yaml's differ"
    );
    // Namespace users get NeoXDeployments through Kubernetes' own roles (aggregation), with
    // the rules deploy/rbac.yaml gives them.
    for label in ["aggregate-to-edit", "aggregate-to-view"] {
        let key = format!("rbac.authorization.k8s.io/{label}");
        let find = |all: &[Value]| -> Value {
            let found: Vec<Value> = all
                .iter()
                .filter(|d| d["kind"] == "ClusterRole" && d["metadata"]["labels"][&key] == "true")
                .cloned()
                .collect();
            assert_eq!(found.len(), 1, "one ClusterRole {label}");
            found[0]["rules"].clone()
        };
        let rules = find(&docs(&default));
        assert_eq!(rules, find(&shipped), "{label}: the chart and deploy/rbac.yaml differ");
        let verbs: Vec<&str> = rules[0]["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            verbs.contains(&"create"),
            label == "aggregate-to-edit",
            "{label}: {verbs:?}"
        );
    }
    // A bare log level keeps the Kubernetes client quiet; a filter is taken as written.
    let rust_log = |sets: &[&str]| -> String {
        let (_, dep) = rendered_deployment(&helm, &chart, sets);
        let env = &dep["spec"]["template"]["spec"]["containers"][0]["env"];
        let e = env
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "RUST_LOG")
            .unwrap();
        e["value"].as_str().unwrap().to_owned()
    };
    // The operator keeps a replica through drains and node loss, installed either way.
    operator_replicas_are_spread_and_kept_through_drains(&docs(&default));
    operator_replicas_are_spread_and_kept_through_drains(&docs(&read("deploy/operator.yaml")));
    let (ok, out, err) = run(&helm, &["template", "x", &chart, "--set", "replicaCount=1"]);
    assert!(ok, "{err}");
    assert!(
        !docs(&out).iter().any(|d| d["kind"] == "PodDisruptionBudget"),
        "a budget over one replica blocks every drain of its node"
    );
    assert_eq!(rust_log(&[]), "info,kube=warn");
    assert_eq!(rust_log(&["logLevel=debug"]), "debug,kube=warn");
    assert_eq!(rust_log(&["logLevel=debug\\,kube=debug"]), "debug,kube=debug");
    for d in docs(&default) {
        let labels = &d["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/instance"], "neox", "{}", d["kind"]);
        assert!(
            labels["helm.sh/chart"]
                .as_str()
                .is_some_and(|c| c.starts_with("neox-operator-")),
            "{}",
            d["kind"]
        );
    }

    let args: Vec<&str> = ["template", "neox", &chart, "--namespace", "team-a", "--include-crds"]
        .iter()
        .copied()
        .chain(ALL_OPTIONS.iter().copied())
        .collect();
    let (ok, all, err) = run(&helm, &args);
    assert!(ok, "{err}");
    let all_docs = docs(&all);
    let kinds: Vec<&str> = all_docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in [
        "CustomResourceDefinition",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "NeoXDeployment",
        "Role",
    ] {
        assert!(kinds.contains(&k), "full render lacks a {k}: {kinds:?}");
    }
    // The PrometheusRule carries exactly the alert groups of deploy/monitoring/.
    let rule = all_docs.iter().find(|d| d["kind"] == "PrometheusRule").unwrap();
    let shipped: Value = serde_yaml::from_str(&read("deploy/monitoring/neox-alerts.yaml")).unwrap();
    assert_eq!(rule["spec"]["groups"], shipped["groups"]);
    // The operator's series name their NeoXDeployment's namespace, which must survive scraping.
    let sm = all_docs.iter().find(|d| d["kind"] == "ServiceMonitor").unwrap();
    assert_eq!(sm["spec"]["endpoints"][0]["honorLabels"], true);
    // Only leaders (rank 0) serve /metrics: the PodMonitor must not scrape followers, and it
    // selects the labels the operator really puts on worker pods.
    let pm = all_docs.iter().find(|d| d["kind"] == "PodMonitor").unwrap();
    let sel = &pm["spec"]["selector"]["matchLabels"];
    assert_eq!(sel[neox_operator::resources::POD_INDEX_LABEL], "0");
    let d: NeoXDeployment = serde_yaml::from_str(&read("deploy/samples/shakespeare-cpu.yaml")).unwrap();
    let sts = neox_operator::resources::statefulset(&d, 0);
    let pod_labels = sts.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    for (k, v) in sel.as_object().unwrap() {
        if k != neox_operator::resources::POD_INDEX_LABEL {
            assert_eq!(
                pod_labels.get(k).map(String::as_str),
                v.as_str(),
                "worker pods lack {k}={v}"
            );
        }
    }
    assert!(
        !kinds.contains(&"ClusterRole"),
        "namespaced mode must not need cluster-wide roles"
    );
    assert!(all.contains("WATCH_NAMESPACE") && all.contains("registry.example/neox-worker:1"));
    assert!(all.contains("NEOX_WORKER_CUDA_IMAGE") && all.contains("registry.example/neox-worker-cuda:1"));
    assert!(all.contains("NEOX_PROMETHEUS_URL") && all.contains("http://prometheus.monitoring:9090"));
    assert!(all.contains("NEOX_HOST_PATH_PREFIXES") && all.contains("\"/models,/mnt/ckpt\""));
    assert!(
        !default.contains("NEOX_HOST_PATH_PREFIXES"),
        "no host path is allowed by default"
    );
    assert!(all.contains("NEOX_PROMETHEUS_CUSTOM_QUERIES"));
    assert!(
        !default.contains("NEOX_PROMETHEUS_CUSTOM_QUERIES"),
        "custom queries are off by default"
    );
    assert!(
        all.contains("NEOX_PROMETHEUS_ALLOWED_URLS")
            && all.contains("http://thanos.monitoring:9090,https://prom.example/tenant"),
        "{all}"
    );
    // The sample is a valid NeoXDeployment by the operator's types and the CRD's schema.
    let sample = all_docs.iter().find(|d| d["kind"] == "NeoXDeployment").unwrap();
    let typed: NeoXDeployment = serde_json::from_value(sample.clone()).unwrap();
    assert_eq!(admission_errors(sample), Vec::<String>::new());
    // IDs: the image's non-root user by default; left to the platform where unset.
    let operator_ids = |docs: &[Value]| {
        let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        let pod = &dep["spec"]["template"]["spec"]["securityContext"];
        assert_eq!(pod["runAsNonRoot"], true);
        (pod["runAsUser"].as_i64(), pod["runAsGroup"].as_i64())
    };
    assert_eq!(operator_ids(&docs(&default)), (Some(65532), Some(65532)));
    assert_eq!(operator_ids(&all_docs), (None, None));
    assert_eq!(typed.spec.worker.security_context, Some(Default::default()));

    // NOTES: in namespaced mode, the next steps work in the watched namespace (the samples
    // name none, so they land where kubectl points).
    // The demo is inline: a chart installed from a repository comes without deploy/.
    for (namespaced, want) in [
        ("true", "kubectl -n team-a apply -f - <<'EOF'\n"),
        ("false", "kubectl apply -f - <<'EOF'\n"),
    ] {
        let notes = install_notes(&helm, &chart, &[&format!("rbac.namespaced={namespaced}")]);
        assert!(notes.contains(want), "{notes}");
        let demo = notes
            .split_once(want)
            .and_then(|(_, rest)| rest.split_once("\nEOF\n"))
            .map(|(yaml, _)| yaml)
            .unwrap_or_else(|| panic!("no demo manifest in {notes}"));
        let demo: Value = serde_yaml::from_str(demo).unwrap();
        assert_eq!(admission_errors(&demo), Vec::<String>::new(), "{demo}");
        assert!(serde_json::from_value::<NeoXDeployment>(demo).is_ok());
        assert_eq!(
            notes.contains("kubectl -n team-a port-forward svc/"),
            namespaced == "true",
            "{notes}"
        );
        assert!(notes.contains("helm uninstall x -n team-a"), "{notes}");
    }
    // With the release's own sample: no second one to apply, and its name where it is used.
    let notes = install_notes(&helm, &chart, &["sample.enabled=true", "sample.name=chat"]);
    assert!(!notes.contains("apply -f -"), "{notes}");
    assert!(notes.contains("kubectl -n team-a port-forward svc/chat "), "{notes}");

    // The longest release names still give valid Service names (DNS labels).
    let long = "x".repeat(53);
    let (ok, out, err) = run(&helm, &["template", &long, &chart]);
    assert!(ok, "{err}");
    for d in docs(&out).into_iter().filter(|d| d["kind"] == "Service") {
        let name = d["metadata"]["name"].as_str().unwrap();
        assert!(name.len() <= 63, "{name}");
    }

    // A Prometheus URL with credentials comes from a Secret, never as a plain value.
    let (out, dep) = rendered_deployment(
        &helm,
        &chart,
        &[
            "prometheus.url=http://plain:9090",
            "prometheus.urlSecret.name=prom-creds",
        ],
    );
    let env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    let url = env.iter().find(|e| e["name"] == "NEOX_PROMETHEUS_URL").unwrap();
    assert_eq!(
        url["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "prom-creds", "key": "url"})
    );
    assert!(!out.contains("http://plain:9090"));

    // A secured Prometheus: the token file as given; the CA from a ConfigMap mounted read-only
    // where the env points (it wins over a CA file).
    let token = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    let (_, dep) = rendered_deployment(
        &helm,
        &chart,
        &[
            &format!("prometheus.bearerTokenFile={token}"),
            "prometheus.caFile=/ignored.crt",
            "prometheus.caConfigMap.name=prom-ca",
            "prometheus.caConfigMap.key=service-ca.crt",
        ],
    );
    let pod = &dep["spec"]["template"]["spec"];
    let env = pod["containers"][0]["env"].as_array().unwrap();
    let value = |name: &str| {
        let found: Vec<_> = env.iter().filter(|e| e["name"] == name).collect();
        assert_eq!(found.len(), 1, "{name} once: {env:?}");
        found[0]["value"].as_str().unwrap().to_owned()
    };
    assert_eq!(value("NEOX_PROMETHEUS_BEARER_TOKEN_FILE"), token);
    let ca = value("NEOX_PROMETHEUS_CA_FILE");
    let mount = &pod["containers"][0]["volumeMounts"][0];
    assert_eq!(mount["readOnly"], true);
    assert_eq!(ca, format!("{}/service-ca.crt", mount["mountPath"].as_str().unwrap()));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["configMap"]["name"], "prom-ca");
    let (ok, out, err) = run(
        &helm,
        &["template", "x", &chart, "--set", "prometheus.caFile=/etc/ssl/prom.crt"],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("NEOX_PROMETHEUS_CA_FILE") && out.contains("\"/etc/ssl/prom.crt\""),
        "{out}"
    );
    assert!(
        !out.contains("volumeMounts"),
        "nothing to mount for a file already in the pod"
    );
    assert!(!default.contains("NEOX_PROMETHEUS_BEARER_TOKEN_FILE") && !default.contains("NEOX_PROMETHEUS_CA_FILE"));

    // Every built-in object against the Kubernetes 1.33 schemas.
    let builtin: Vec<String> = docs(&default)
        .into_iter()
        .chain(all_docs)
        .filter(|d| {
            !matches!(
                d["kind"].as_str(),
                Some("ServiceMonitor" | "PodMonitor" | "PrometheusRule" | "NeoXDeployment")
            )
        })
        .map(|d| serde_yaml::to_string(&d).unwrap())
        .collect();
    let validator = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if validator {
        let dir = tempfile_dir();
        let file = dir.join("rendered.yaml");
        std::fs::write(&file, builtin.join("---\n")).unwrap();
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "-k", "1.33.0"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        assert!(std::env::var_os("CI").is_none(), "CI must install kubernetes-validate");
        eprintln!("SKIPPED part: kubernetes-validate not installed");
    }
}

/// Release `x` rendered with `sets` (each a `--set`): the whole output and its Deployment.
fn rendered_deployment(helm: &str, chart: &str, sets: &[&str]) -> (String, Value) {
    let mut args = vec!["template", "x", chart];
    for s in sets {
        args.extend(["--set", s]);
    }
    let (ok, out, err) = run(helm, &args);
    assert!(ok, "{err}");
    let dep = docs(&out).into_iter().find(|d| d["kind"] == "Deployment").unwrap();
    (out, dep)
}

/// A PodDisruptionBudget letting one operator pod go at a time, and a soft spread over nodes,
/// both selecting the operator's pods.
fn operator_replicas_are_spread_and_kept_through_drains(all: &[Value]) {
    let dep = all.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    let selects = |sel: &Value, what: &str| {
        let sel = sel.as_object().unwrap_or_else(|| panic!("{what}: no matchLabels"));
        assert!(!sel.is_empty(), "{what}");
        for (k, v) in sel {
            assert_eq!(&labels[k], v, "{what} selects {k}={v}, which the operator pods lack");
        }
    };
    let pdb = all
        .iter()
        .find(|d| d["kind"] == "PodDisruptionBudget")
        .expect("a PodDisruptionBudget for the operator");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(pdb["metadata"]["namespace"], dep["metadata"]["namespace"]);
    selects(&pdb["spec"]["selector"]["matchLabels"], "the budget");
    let spread = &dep["spec"]["template"]["spec"]["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        spread["whenUnsatisfiable"], "ScheduleAnyway",
        "a one-node cluster must run both"
    );
    selects(&spread["labelSelector"]["matchLabels"], "the spread");
}

/// NOTES.txt of release `x` installed (dry run) in namespace `team-a` with `sets`.
fn install_notes(helm: &str, chart: &str, sets: &[&str]) -> String {
    let mut args = vec!["install", "x", chart, "-n", "team-a", "--dry-run=client"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let (ok, out, err) = run(helm, &args);
    assert!(ok, "helm install --dry-run: {err}");
    out[out.find("NOTES:").unwrap()..].to_owned()
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("neox-helm-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn bad_values_are_refused_by_the_values_schema() {
    let Some(helm) = helm() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide helm (NEOX_HELM, see .ci/run)"
        );
        eprintln!("SKIPPED: no helm CLI");
        return;
    };
    let chart = chart();
    for (set, want) in [
        ("replicaCount=-1", "minimum"),
        ("replicaCount=two", "want integer"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("logFormat=xml", "/logFormat"),
        (
            "leaderElection.leaseDurationSeconds=1",
            "/leaderElection/leaseDurationSeconds",
        ),
        ("sample.tensorParallelSize=3", "/sample/tensorParallelSize"),
        ("metrics.port=70000", "/metrics/port"),
        ("prometheus.url=prometheus:9090", "/prometheus/url"),
        ("prometheus.allowedUrls={prometheus:9090}", "/prometheus/allowedUrls/0"),
        ("prometheus.bearerTokenFile=token", "/prometheus/bearerTokenFile"),
        ("prometheus.caConfigMap.key=../ca.crt", "/prometheus/caConfigMap/key"),
        ("hostPathPrefixes={models}", "/hostPathPrefixes/0"),
        ("replicas=3", "additional properties"),
        // Helm merges a model source into the default builtin: two sources, which the CRD
        // refuses at apply time; the values schema says so at install.
        ("sample.model.pvc.claimName=ckpt", "/sample/model"),
        ("sample.name=9lives", "/sample/name"),
        // Root, for the operator or the workers.
        ("podSecurityContext.runAsUser=0", "/podSecurityContext/runAsUser"),
        (
            "sample.securityContext.runAsUser=0",
            "/sample/securityContext/runAsUser",
        ),
        // A ServiceMonitor needs the metrics Service it selects.
        (
            "serviceMonitor.enabled=true,metrics.service.enabled=false",
            "/metrics/service/enabled",
        ),
        // Binding the operator's rights to the namespace's default ServiceAccount.
        ("serviceAccount.create=false", "/serviceAccount"),
        // Two operators without leader election would reconcile the same objects at once.
        ("leaderElection.enabled=false", "/replicaCount"),
    ] {
        let (ok, _, err) = run(&helm, &["template", "neox", &chart, "--set", set]);
        assert!(!ok, "{set} should be refused");
        assert!(err.contains(want), "{set}: expected {want:?} in {err}");
    }
}
