//! Reconciler cost: reconciles/s and memory for 200 NeoXDeployments against the mocked API
//! server (`cargo bench -p neox-operator --bench reconcile --profile dev`).

#[path = "../tests/fake_api/mod.rs"]
mod fake_api;

use std::sync::Arc;
use std::time::Instant;

use fake_api::*;
use neox_operator::reconcile::reconcile;
use neox_operator::resources;

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l.to_owned()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    const N: usize = 200;
    let before = rss_mib();
    // Steady state: every deployment has 2 ready groups of TP=4 (8 pods), so each reconcile
    // observes, decides "nothing to do" and patches status — the common case at scale.
    let cases: Vec<_> = (0..N)
        .map(|i| {
            let mut d = deployment(2, 4);
            d.metadata.name = Some(format!("llm-{i}"));
            let rev = resources::revision(&d);
            let stss = vec![existing_sts(&d, 0, Some(&rev)), existing_sts(&d, 1, Some(&rev))];
            let mut pods = ready_group(&d, 0);
            pods.extend(ready_group(&d, 1));
            (d, stss, pods)
        })
        .collect();
    let rounds = 5;
    let t0 = Instant::now();
    let mut calls = 0usize;
    rt.block_on(async {
        for _ in 0..rounds {
            for (d, stss, pods) in &cases {
                let (client, rec) = fake(stss.clone(), pods.clone());
                reconcile(Arc::new(d.clone()), context(client, 1000))
                    .await
                    .expect("reconcile");
                calls += rec.lock().map(|r| r.calls.len()).unwrap_or(0);
            }
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    let n = (N * rounds) as f64;
    println!("{N} NeoXDeployments (2 groups x TP=4 each), {rounds} rounds against the mocked API server");
    println!("reconciles/s          {:.0}", n / secs);
    println!(
        "per reconcile         {:.2} ms, {:.1} API calls",
        secs * 1e3 / n,
        calls as f64 / n
    );
    println!(
        "resident memory       {:.1} MiB (was {before:.1} MiB before the objects were built)",
        rss_mib()
    );
    Ok(())
}
