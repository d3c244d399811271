//! Speculative decoding by prompt lookup (`serve --speculative-tokens`), end to end: greedy
//! output against HF's goldens in every KV layout and at TP=2, and every kind of request
//! (seeded sampling with penalties, logprobs, stop sequences, short limits, batched, from the
//! prefix cache) against a server that does not speculate.

mod common;
mod serving;

use neox_proto::neox::v1 as pb;
use serving::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn speculative_greedy_output_is_hfs_in_fewer_steps() {
    let gold: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::shakespeare_dir().join("golden.json")).unwrap()).unwrap();
    let cases: Vec<(String, Vec<u32>)> = gold["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["prompt"].as_str().unwrap().to_owned(),
                serde_json::from_value(p["output_ids"].clone()).unwrap(),
            )
        })
        .collect();
    for args in [
        &["--speculative-tokens", "5"][..],
        &[
            "--speculative-tokens",
            "5",
            "--kv-layout",
            "paged",
            "--kv-block-size",
            "4",
        ],
        &["--speculative-tokens", "3", "--tp", "2"],
    ] {
        let server = start(args);
        let (mut steps, mut tokens) = (0.0, 0.0);
        rt().block_on(async {
            let mut c = server.client().await;
            let info = c.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
            assert_eq!(info.speculative_tokens.to_string(), args[1]);
            for (prompt, want) in &cases {
                let before = server.metric("neox_batch_size_count");
                let r = c
                    .generate(greedy(prompt, want.len() as u32))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(&r.token_ids, want, "{args:?}: {prompt:?} differs from HF");
                steps += server.metric("neox_batch_size_count") - before;
                tokens += want.len() as f64;
            }
        });
        let drafted = server.metric("neox_spec_decode_draft_tokens_total");
        let accepted = server.metric("neox_spec_decode_accepted_tokens_total");
        assert!(
            accepted > 0.0 && drafted >= accepted,
            "{args:?}: {accepted} of {drafted} drafts kept"
        );
        // One request at a time: each step gave one token plus the drafts it kept.
        assert_eq!(steps, tokens - accepted, "{args:?}: steps vs tokens and kept drafts");
        eprintln!("{args:?}: {tokens} tokens in {steps} steps, {accepted} of {drafted} drafts kept");
    }
}

/// Requests of every kind: greedy with logprobs and alternatives, seeded sampling with every
/// filter and penalty, stop sequences, limits shorter than a draft.
fn mixed_requests() -> Vec<pb::GenerateRequest> {
    let mut reqs = Vec::new();
    for (i, p) in prompts(8).iter().enumerate() {
        let mut g = greedy(p, 48);
        if let Some(params) = g.parameters.as_mut() {
            params.logprobs = true;
            params.top_n_tokens = 2;
        }
        reqs.push(g);
        reqs.push(sampled(p, i as u64));
        let mut loose = sampled(p, 100 + i as u64);
        if let Some(params) = loose.parameters.as_mut() {
            // Few filters and a low temperature: the sampler often agrees with a loop.
            params.temperature = Some(0.3);
            params.repetition_penalty = None;
            params.presence_penalty = 0.0;
            params.max_new_tokens = 40;
        }
        reqs.push(loose);
    }
    let mut stopped = greedy("ROMEO:\n", 40);
    stopped.parameters.as_mut().unwrap().stop_sequences = vec!["SCENE III.".into()];
    reqs.push(stopped);
    for n in 1..=3 {
        reqs.push(greedy("To be, or not to be", n));
    }
    reqs
}

async fn run(server: &Server, reqs: &[pb::GenerateRequest], concurrent: bool) -> Vec<pb::GenerateResponse> {
    let c = server.client().await;
    let mut out = Vec::new();
    if !concurrent {
        for r in reqs {
            out.push(c.clone().generate(r.clone()).await.unwrap().into_inner());
        }
        return out;
    }
    let tasks: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|r| {
            let mut c = c.clone();
            tokio::spawn(async move { c.generate(r).await })
        })
        .collect();
    for t in tasks {
        out.push(t.await.unwrap().unwrap().into_inner());
    }
    out
}

fn assert_same(got: &[pb::GenerateResponse], want: &[pb::GenerateResponse], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.token_ids, w.token_ids, "{what}: request {i}");
        assert_eq!(g.text, w.text, "{what}: request {i}");
        assert_eq!(g.finish_reason, w.finish_reason, "{what}: request {i}");
        for (a, b) in g.tokens.iter().zip(&w.tokens) {
            if let (Some(x), Some(y)) = (a.logprob, b.logprob) {
                assert!((x - y).abs() < 1e-4, "{what}: request {i}: logprob {x} vs {y}");
            }
            let ids = |t: &pb::Token| t.top_tokens.iter().map(|t| t.id).collect::<Vec<_>>();
            assert_eq!(ids(a), ids(b), "{what}: request {i}: alternatives");
        }
    }
}

#[test]
fn speculation_changes_no_output_of_any_request() {
    let reqs = mixed_requests();
    let off = start(&[]);
    let want = rt().block_on(run(&off, &reqs, false));
    assert_eq!(off.metric("neox_spec_decode_draft_tokens_total"), 0.0);
    drop(off);
    assert_eq!(
        want[want.len() - 4].finish_reason,
        pb::FinishReason::StopSequence as i32
    );
    // Generation stopped inside the text (the stop text is left out).
    let stopped = &want[want.len() - 4];
    assert!(stopped.token_ids.len() < 40 && !stopped.text.contains("SCENE III."));

    for args in [
        &["--speculative-tokens", "4"][..],
        &[
            "--speculative-tokens",
            "4",
            "--sampling",
            "device",
            "--kv-layout",
            "paged",
        ],
    ] {
        let on = start(args);
        // The low-temperature sampled requests alone first: drafts must have been kept for
        // them, or seeded rows after a kept draft were never tested.
        let loose: Vec<_> = reqs.iter().skip(2).step_by(3).cloned().collect();
        let loose_want: Vec<_> = want.iter().skip(2).step_by(3).cloned().collect();
        assert_same(&rt().block_on(run(&on, &loose, false)), &loose_want, "sampled");
        let kept = on.metric("neox_spec_decode_accepted_tokens_total");
        assert!(kept > 0.0, "{args:?}: no draft was kept for a sampled request");
        assert_same(&rt().block_on(run(&on, &reqs, false)), &want, "sequential");
        // Batched: up to 4 decoding sequences speculate, more decode plainly.
        assert_same(&rt().block_on(run(&on, &reqs, true)), &want, "concurrent");
        assert_same(&rt().block_on(run(&on, &reqs[..4], true)), &want[..4], "four at once");
        // The KV a verification kept (and the rejected drafts it overwrote) is exact: a
        // prompt that is an earlier prompt plus its output starts from that cache.
        let follow: Vec<_> = rt().block_on(async {
            let mut c = on.client().await;
            let mut follow = Vec::new();
            for (r, w) in reqs[..6].iter().zip(&want) {
                let text = pb::TokenizeRequest { text: r.prompt.clone() };
                let mut ids = c.tokenize(text).await.unwrap().into_inner().ids;
                ids.extend(&w.token_ids);
                let mut f = r.clone();
                f.prompt.clear();
                f.prompt_ids = ids;
                follow.push(f);
            }
            follow
        });
        let reusable: usize = follow.iter().map(|f| f.prompt_ids.len() - 1).sum();
        let hits = on.metric("neox_prefix_cache_hits_total");
        let got = rt().block_on(run(&on, &follow, false));
        assert_eq!(on.metric("neox_prefix_cache_hits_total") - hits, reusable as f64);
        drop(on);
        let off = start(&["--prefix-caching", "false"]);
        assert_same(
            &got,
            &rt().block_on(run(&off, &follow, false)),
            "continued from the cache",
        );
    }
}
