//! Tensor parallelism across real processes over loopback sockets: TP=2 and TP=4 against
//! HF's goldens, dead and stuck ranks, bad rendezvous.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("config.json")).unwrap()).unwrap()
}

/// TP sizes among 2 and 4 that the fixture's heads, MLP width and vocabulary allow.
fn tp_sizes() -> Vec<usize> {
    let c = config();
    let dims = ["num_attention_heads", "intermediate_size", "vocab_size"].map(|k| c[k].as_u64().unwrap() as usize);
    [2, 4]
        .into_iter()
        .filter(|tp| dims.iter().all(|d| d % tp == 0))
        .collect()
}

#[test]
fn tp_logits_and_greedy_equal_hf() {
    let g = Goldens::load();
    let dir = fixture_dir();
    let sizes = tp_sizes();
    assert!(!sizes.is_empty(), "fixture allows no TP size");
    for tp in sizes {
        let tp_s = tp.to_string();
        for i in g.cases() {
            let ids = csv(&g.ids(&format!("case{i}.input_ids")));
            let v = run_json(&[
                "logits",
                "--model",
                dir.to_str().unwrap(),
                "--tp",
                &tp_s,
                "--prompt-ids",
                &ids,
                "--all-positions",
                "--json",
            ]);
            let got: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
            let d = max_abs_diff(&got, &g.f32_2d(&format!("case{i}.logits")));
            assert!(d <= 1e-4, "tp {tp} case{i}: logits differ from HF by {d}");

            let want = g.ids(&format!("case{i}.greedy"));
            let (_, got) = cli_greedy(&["--tp", &tp_s], &g.ids(&format!("case{i}.input_ids")), want.len());
            assert_eq!(got, want, "tp {tp} case{i}: greedy continuation differs from HF");
        }
    }
}

#[test]
fn rank_holds_its_share_of_the_sharded_weights() {
    let c = config();
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let (h, i, v, l) = (
        u("hidden_size"),
        u("intermediate_size"),
        u("vocab_size"),
        u("num_hidden_layers"),
    );
    // CPU f32 weights are packed in panels of PANEL output rows, the last one zero-padded.
    let pad = |n: usize| n.div_ceil(neox_kernels::PANEL) * neox_kernels::PANEL;
    // Sharded: qkv (w+b), attention.dense w, h_to_4h (w+b), 4h_to_h w, embed_out.
    let sharded = |tp: usize| {
        l * (pad(3 * h / tp) * h + 3 * h / tp + pad(h) * h / tp + pad(i / tp) * h + i / tp + pad(h) * i / tp)
            + pad(v / tp) * h
    };
    // Replicated: embed_in, 2 LayerNorms per layer + final, row-parallel biases.
    let replicated = v * h + l * (4 * h + 2 * h) + 2 * h;
    let dir = fixture_dir();
    for tp in [1].into_iter().chain(tp_sizes()) {
        let v = run_json(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--tp",
            &tp.to_string(),
            "--prompt-ids",
            "5",
            "--max-new-tokens",
            "1",
            "--json",
        ]);
        let bytes = v["rank0_weight_bytes"].as_u64().unwrap() as usize;
        assert_eq!(
            bytes,
            4 * (sharded(tp) + replicated),
            "tp {tp}: rank 0 holds {bytes} bytes"
        );
    }
}

/// Starts a `--tp 2` generation and returns it with its follower's pid once the group formed.
fn start_group(extra_env: &[(&str, &str)], timeout: &str) -> (Child, u32, BufReader<std::process::ChildStderr>) {
    let mut cmd = worker();
    cmd.args([
        "generate",
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "400",
        "--ignore-eos",
        "--tp",
        "2",
    ])
    .args(["--collective-timeout", timeout])
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut pid = None;
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "leader exited before the group formed"
        );
        if let Some(p) = line.trim().strip_prefix("neox-worker: follower rank 1 pid ") {
            pid = Some(p.parse().unwrap());
        }
        if line.contains("group of 2 ranks formed") {
            break;
        }
    }
    (child, pid.unwrap(), err)
}

fn rest(mut err: BufReader<std::process::ChildStderr>) -> String {
    let mut s = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut s);
    s
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.split_whitespace().nth(2).is_some_and(|st| st == "Z" || st == "X"),
        Err(_) => false,
    }
}

#[test]
fn killing_a_follower_fails_the_leader_within_the_timeout() {
    // 30 ms per step keeps the 400-token generation running for ~12 s.
    let (mut leader, follower, err) = start_group(&[("NEOX_DEBUG_STEP_DELAY_MS", "30")], "5");
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    Command::new("kill")
        .args(["-9", &follower.to_string()])
        .status()
        .unwrap();
    let status = wait_with_deadline(&mut leader, Duration::from_secs(8), "the leader");
    assert!(!status.success(), "leader must exit non-zero when a rank dies");
    assert!(t0.elapsed() < Duration::from_secs(6), "took {:?}", t0.elapsed());
    let msg = rest(err);
    assert!(msg.contains("rank 1"), "error should name the lost rank: {msg}");
}

#[test]
fn a_stuck_follower_times_out_instead_of_hanging() {
    // The follower sleeps 4 s per step; the collective deadline is 1 s.
    let (mut leader, follower, err) = start_group(&[("NEOX_DEBUG_STEP_DELAY_MS", "4000")], "1");
    let t0 = Instant::now();
    let status = wait_with_deadline(&mut leader, Duration::from_secs(10), "the leader");
    assert!(!status.success());
    assert!(t0.elapsed() < Duration::from_secs(4), "took {:?}", t0.elapsed());
    let msg = rest(err);
    assert!(msg.contains("timed out") && msg.contains("rank 1"), "{msg}");
    // The launcher does not leave the stuck follower behind.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!alive(follower), "follower {follower} left running");
}

#[test]
fn killing_the_leader_makes_followers_exit() {
    let (mut leader, follower, _err) = start_group(&[("NEOX_DEBUG_STEP_DELAY_MS", "30")], "5");
    std::thread::sleep(Duration::from_millis(300));
    leader.kill().unwrap();
    leader.wait().unwrap();
    let t0 = Instant::now();
    while alive(follower) {
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "follower {follower} still running without its leader"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn leader_cmd(world: usize, addr: &str) -> Command {
    let mut c = worker();
    c.args(["generate", "--prompt", "ROMEO:", "--max-new-tokens", "4"])
        .args(["--rank", "0", "--world-size", &world.to_string(), "--leader-addr", addr])
        .args(["--rendezvous-timeout", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn follower_cmd(rank: usize, world: usize, addr: &str) -> Command {
    follower_cmd_t(rank, world, addr, "20")
}

fn follower_cmd_t(rank: usize, world: usize, addr: &str, rendezvous_secs: &str) -> Command {
    let mut c = worker();
    c.args([
        "follower",
        "--rank",
        &rank.to_string(),
        "--world-size",
        &world.to_string(),
        "--leader-addr",
        addr,
    ])
    .args(["--rendezvous-timeout", rendezvous_secs])
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

fn finish(mut c: Child, limit: Duration) -> (bool, String) {
    let status = wait_with_deadline(&mut c, limit, "the rank");
    let mut s = String::new();
    let _ = std::io::Read::read_to_string(&mut c.stderr.take().unwrap(), &mut s);
    (status.success(), s)
}

#[test]
fn multi_host_style_rendezvous_by_rank_and_leader_addr() {
    let addr = format!("127.0.0.1:{}", free_port());
    let leader = leader_cmd(2, &addr).spawn().unwrap();
    let follower = follower_cmd(1, 2, &addr).spawn().unwrap();
    let (ok, msg) = finish(leader, Duration::from_secs(30));
    assert!(ok, "{msg}");
    let (ok, msg) = finish(follower, Duration::from_secs(10));
    assert!(ok, "follower should exit 0 on the leader's shutdown: {msg}");
}

#[test]
fn wrong_world_size_is_a_clear_error_on_both_sides() {
    let addr = format!("127.0.0.1:{}", free_port());
    let leader = leader_cmd(2, &addr).spawn().unwrap();
    let follower = follower_cmd(1, 4, &addr).spawn().unwrap();
    let (ok, f) = finish(follower, Duration::from_secs(15));
    assert!(!ok && f.contains("world size mismatch"), "{f}");
    let (ok, l) = finish(leader, Duration::from_secs(15));
    assert!(!ok && l.contains("world size mismatch"), "{l}");
}

#[test]
fn duplicate_rank_is_rejected() {
    let addr = format!("127.0.0.1:{}", free_port());
    let leader = leader_cmd(4, &addr).spawn().unwrap();
    let a = follower_cmd(1, 4, &addr).spawn().unwrap();
    let b = follower_cmd(1, 4, &addr).spawn().unwrap();
    let (ok, l) = finish(leader, Duration::from_secs(15));
    assert!(!ok && l.contains("duplicate rank 1"), "{l}");
    let (_, fa) = finish(a, Duration::from_secs(15));
    let (_, fb) = finish(b, Duration::from_secs(15));
    assert!(
        fa.contains("duplicate rank 1") || fb.contains("duplicate rank 1"),
        "{fa}\n{fb}"
    );
}

#[test]
fn unreachable_leader_and_bad_sizes_are_clear_errors() {
    let addr = format!("127.0.0.1:{}", free_port());
    let (ok, msg) = finish(
        follower_cmd_t(1, 2, &addr, "1").spawn().unwrap(),
        Duration::from_secs(15),
    );
    assert!(!ok && msg.contains("cannot reach the leader"), "{msg}");

    // A size that does not divide the fixture's heads: every rank refuses at start-up.
    let heads = config()["num_attention_heads"].as_u64().unwrap();
    let bad = (2..=8).find(|t| !heads.is_multiple_of(*t)).unwrap().to_string();
    let out = worker()
        .args([
            "generate",
            "--model",
            fixture_dir().to_str().unwrap(),
            "--tp",
            &bad,
            "--prompt-ids",
            "1",
        ])
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && msg.contains("does not divide num_attention_heads"),
        "{msg}"
    );
    let out = follower_cmd(1, bad.parse().unwrap(), &addr)
        .args(["--model", fixture_dir().to_str().unwrap()])
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && msg.contains("does not divide"), "{msg}");
}

/// A `neox-worker serve` rank of a 2-rank group configured as in Kubernetes (the NEOX_*
/// variables), its API on `api`.
fn serve_rank(rank: &str, api: u16, group_port: u16, extra: &[&str]) -> Child {
    serve_rank_at(rank, api, &format!("127.0.0.1:{group_port}"), "127.0.0.1", extra)
}

/// [`serve_rank`] with the leader at `leader` and this rank advertising `host` to its peers.
fn serve_rank_at(rank: &str, api: u16, leader: &str, host: &str, extra: &[&str]) -> Child {
    worker()
        .arg("serve")
        .args([
            "--grpc-addr",
            &format!("127.0.0.1:{api}"),
            "--metrics-addr",
            "127.0.0.1:0",
            "--http-addr",
            "off",
        ])
        .args(extra)
        .env("NEOX_RANK", rank)
        .env("NEOX_WORLD_SIZE", "2")
        .env("NEOX_LEADER_ADDR", leader)
        .env("NEOX_ADVERTISE_HOST", host)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Whether gRPC health on `port` says SERVING within 20 s.
fn serving(port: u16) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let t0 = Instant::now();
        loop {
            let ok = async {
                let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
                let r = h
                    .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                    .await
                    .ok()?;
                Some(r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
            }
            .await;
            if ok == Some(true) {
                return true;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// As in a Kubernetes group: every rank runs `neox-worker serve` with the NEOX_* variables;
/// rank 0 serves the API, every rank answers gRPC health once the group has formed.
#[test]
fn every_rank_runs_serve_from_env_and_answers_health() {
    let group_port = free_port();
    let (api0, api1) = (free_port(), free_port());
    let mut leader = serve_rank("0", api0, group_port, &[]);
    let mut follower = serve_rank("1", api1, group_port, &[]);
    assert!(serving(api0), "leader never SERVING");
    assert!(serving(api1), "follower never SERVING");
    // Killing the follower takes the leader down (heartbeat within the collective timeout).
    follower.kill().unwrap();
    follower.wait().unwrap();
    let status = wait_with_deadline(&mut leader, Duration::from_secs(40), "the leader");
    assert!(!status.success());
}

/// A leader that stops answering without closing its connections (a lost node, a partition:
/// no FIN reaches the follower; SIGSTOP here) is noticed by an idle follower, which exits
/// instead of waiting, and reporting SERVING, forever.
#[test]
fn a_follower_leaves_a_leader_that_went_silent() {
    let group_port = free_port();
    let (api0, api1) = (free_port(), free_port());
    let timeout = ["--collective-timeout", "2"];
    let mut leader = serve_rank("0", api0, group_port, &timeout);
    let mut follower = serve_rank("1", api1, group_port, &timeout);
    assert!(serving(api0) && serving(api1), "the group never formed");
    let stop = |sig: &str| {
        Command::new("kill")
            .args([sig, &leader.id().to_string()])
            .status()
            .unwrap()
    };
    stop("-STOP");
    let t0 = Instant::now();
    // The collective timeout plus the 5 s margin for the leader's next plan.
    let status = wait_with_deadline(&mut follower, Duration::from_secs(20), "the follower");
    let waited = t0.elapsed();
    stop("-CONT");
    leader.kill().unwrap();
    leader.wait().unwrap();
    assert!(!status.success(), "the follower must fail without its leader");
    assert!(
        waited >= Duration::from_secs(2),
        "left after {waited:?}, before the timeout"
    );
}

/// On an IPv6 cluster the leader's address and every pod IP are IPv6: the group forms over
/// them (bracketed where an address is made of host and port).
#[test]
fn a_group_forms_over_ipv6() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: no IPv6 loopback here");
        return;
    }
    let leader = format!("[::1]:{}", free_port());
    let (api0, api1) = (free_port(), free_port());
    let mut ranks = [
        serve_rank_at("0", api0, &leader, "::1", &[]),
        serve_rank_at("1", api1, &leader, "::1", &[]),
    ];
    let formed = serving(api0) && serving(api1);
    for r in &mut ranks {
        r.kill().unwrap();
        r.wait().unwrap();
    }
    assert!(formed, "no group over IPv6");
}
