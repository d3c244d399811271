//! The operator's pod template runs the real worker: every rank is started exactly as the
//! StatefulSet describes it (args, NEOX_* environment, downward-API rank and pod IP), with
//! only cluster addresses mapped onto loopback ports. The group must form, every rank must
//! report SERVING (the probes), and the leader must serve the demo model's golden text over
//! gRPC and over the OpenAI-compatible HTTP API, under the NeoXDeployment's name.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use neox_operator::crd::NeoXDeployment;
use neox_operator::resources;
use neox_tests::{binary, free_port, post_json, repo_root, Killed};

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap()
}

#[test]
fn the_statefulset_pod_template_brings_up_a_serving_group() {
    let mut d: NeoXDeployment = serde_yaml::from_str(&read("deploy/samples/shakespeare-cpu.yaml")).unwrap();
    d.metadata.namespace = Some("default".into());
    let tp = d.spec.tensor_parallel_size;
    let sts = resources::statefulset(&d, 0);
    let pod = sts.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap_or_default();
    let group_port = free_port();
    let grpc: Vec<u16> = (0..tp).map(|_| free_port()).collect();
    let http = free_port();
    let neox = |port: u16, extra: &[&str]| {
        Command::new(binary("neox"))
            .args(["--addr", &format!("http://127.0.0.1:{port}")])
            .args(extra)
            .output()
            .unwrap()
    };
    let mut ranks = Vec::new();
    // Followers first: until the leader forms the group they must read NOT_SERVING, or
    // Kubernetes would count a rank ready that serves nothing.
    for r in (0..tp).rev() {
        if r == 0 {
            for &port in &grpc[1..] {
                let t0 = Instant::now();
                loop {
                    let out = neox(port, &["health"]);
                    let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                    if said == "NOT_SERVING" {
                        assert!(!out.status.success());
                        break;
                    }
                    assert_ne!(said, "SERVING", "follower on :{port} serving before its group formed");
                    assert!(
                        t0.elapsed() < Duration::from_secs(30),
                        "follower on :{port} never answered health"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let mut env: HashMap<String, String> = HashMap::new();
        for e in c.env.clone().unwrap_or_default() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(src)) => match src.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                    Some(p) if p.contains(resources::POD_INDEX_LABEL) => r.to_string(),
                    Some("status.podIP") => "127.0.0.1".into(),
                    other => panic!("unexpected downward-API field {other:?} for {}", e.name),
                },
                _ => panic!("env {} has no value", e.name),
            };
            env.insert(e.name, value);
        }
        // Cluster addresses onto loopback: the leader's DNS name, the pod's own ports.
        let leader = env.get("NEOX_LEADER_ADDR").cloned().unwrap();
        assert!(
            leader.starts_with("shakespeare-0-0.shakespeare-0.")
                && leader.ends_with(&format!(":{}", resources::GROUP_PORT))
        );
        env.insert("NEOX_LEADER_ADDR".into(), format!("127.0.0.1:{group_port}"));
        assert_eq!(env["NEOX_GRPC_ADDR"], format!("[::]:{}", resources::GRPC_PORT));
        env.insert("NEOX_GRPC_ADDR".into(), format!("127.0.0.1:{}", grpc[r as usize]));
        env.insert("NEOX_METRICS_ADDR".into(), "127.0.0.1:0".into());
        assert_eq!(env["NEOX_HTTP_ADDR"], format!("[::]:{}", resources::HTTP_PORT));
        env.insert("NEOX_HTTP_ADDR".into(), format!("127.0.0.1:{http}"));
        env.insert("NEOX_COLLECTIVE_PORT".into(), free_port().to_string());
        let child = Command::new(binary("neox-worker"))
            .args(&args)
            .env_clear()
            .envs(&env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        ranks.push(Killed(child));
    }
    // The probes: every rank SERVING once the group formed.
    for &port in &grpc {
        let t0 = Instant::now();
        loop {
            let out = neox(port, &["health"]);
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "SERVING" {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "rank on :{port} never SERVING");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let gold: serde_json::Value = serde_json::from_str(&read("worker/assets/shakespeare-neox/golden.json")).unwrap();
    let p = &gold["prompts"][0];
    let out = neox(
        grpc[0],
        &[
            "generate",
            p["prompt"].as_str().unwrap(),
            "--max-new-tokens",
            "40",
            "--ignore-eos",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end_matches('\n'),
        p["full_text"].as_str().unwrap()
    );
    // The HTTP port the client Service exposes answers OpenAI requests for the
    // NeoXDeployment's name.
    let body = serde_json::json!({
        "model": d.metadata.name.clone().unwrap(),
        "prompt": p["prompt"],
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": true,
    });
    let (status, reply) = post_json(&format!("127.0.0.1:{http}"), "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["choices"][0]["text"], p["output_text"]);
    // The engine settings reached the leader.
    let info = String::from_utf8_lossy(&neox(grpc[0], &["info"]).stdout).into_owned();
    let spec = d.spec.engine.speculative_tokens.unwrap();
    assert!(info.contains(&format!("up to {spec} draft tokens")), "{info}");
}
