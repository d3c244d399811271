//! Speculative decoding by prompt lookup (`serve --speculative-tokens`), end to end: greedy
//! output against HF's goldens in every KV layout and at TP=2, and every kind of request
//! (seeded sampling with penalties, logprobs, stop sequences, short limits, batched, from the
//! prefix cache) against a server that does not speculate.

mod common;
mod serving;

use neox_proto::neox::v1 as pb;
use serving::*;

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
            // Each golden case, then the first one ended by each token of its output in turn:
            // some of those ends fall among kept drafts, whose rest is dropped, uncounted.
            let (prompt0, want0) = &cases[0];
            let stopped = want0.iter().map(|&stop| {
                let upto = want0.iter().position(|&t| t == stop).unwrap_or(0) + 1;
                let mut req = greedy(prompt0, want0.len() as u32);
                req.parameters.as_mut().unwrap().stop_token_ids = vec![stop];
                (req, want0[..upto].to_vec())
            });
            let runs = cases
                .iter()
                .map(|(p, w)| (greedy(p, w.len() as u32), w.clone()))
                .chain(stopped);
            for (req, want) in runs {
                let before = server.metric("neox_batch_size_count");
                let r = c.generate(req).await.unwrap().into_inner();
                assert_eq!(r.token_ids, want, "{args:?}: differs from HF");
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

/// Requests of every kind, in groups: greedy with logprobs and alternatives; seeded sampling
/// with every filter and penalty; low-temperature sampling (which often agrees with a loop);
/// greedy under penalties (every row's penalties must see the drafts before it); and one-offs:
/// a stop sequence, eos left on, prompt logprobs, limits shorter than a draft.
fn mixed_requests() -> Vec<Vec<pb::GenerateRequest>> {
    let ps = prompts(8);
    let with = |mut r: pb::GenerateRequest, f: &dyn Fn(&mut pb::GenerationParameters)| {
        if let Some(params) = r.parameters.as_mut() {
            f(params);
        }
        r
    };
    let greedy_lp = ps
        .iter()
        .map(|p| {
            with(greedy(p, 48), &|g| {
                g.logprobs = true;
                g.top_n_tokens = 2;
            })
        })
        .collect();
    let sampled_all = ps.iter().enumerate().map(|(i, p)| sampled(p, i as u64)).collect();
    let loose = ps
        .iter()
        .enumerate()
        .map(|(i, p)| {
            with(sampled(p, 100 + i as u64), &|g| {
                g.temperature = Some(0.3);
                g.repetition_penalty = None;
                g.presence_penalty = 0.0;
                g.max_new_tokens = 40;
            })
        })
        .collect();
    let penalised = ps
        .iter()
        .map(|p| {
            with(greedy(p, 48), &|g| {
                g.repetition_penalty = Some(1.05);
                g.frequency_penalty = 0.3;
            })
        })
        .collect();
    let mut one_offs = vec![
        with(greedy("ROMEO:\n", 40), &|g| {
            g.stop_sequences = vec!["SCENE III.".into()]
        }),
        with(greedy("KING LEAR:\nBlow, winds,", 100), &|g| g.ignore_eos = false),
        with(greedy("To be, or not to be", 24), &|g| g.prompt_logprobs = true),
    ];
    for n in 1..=3 {
        one_offs.push(greedy("To be, or not to be", n));
    }
    vec![greedy_lp, sampled_all, loose, penalised, one_offs]
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
        let prompt_ids = |r: &pb::GenerateResponse| r.prompt_tokens.iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(prompt_ids(g), prompt_ids(w), "{what}: request {i}: prompt tokens");
        let pairs = g.tokens.iter().zip(&w.tokens);
        for (a, b) in pairs.chain(g.prompt_tokens.iter().zip(&w.prompt_tokens)) {
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
    let groups = mixed_requests();
    let reqs: Vec<_> = groups.concat();
    let off = start(&[]);
    let want = rt().block_on(run(&off, &reqs, false));
    assert_eq!(off.metric("neox_spec_decode_draft_tokens_total"), 0.0);
    drop(off);
    // Where each group's answers are in `want`.
    let mut at = Vec::new();
    let mut i = 0;
    for g in &groups {
        at.push(i..i + g.len());
        i += g.len();
    }
    let one_offs = &want[at[4].clone()];
    // Generation stopped inside the text (the stop text is left out).
    assert_eq!(one_offs[0].finish_reason, pb::FinishReason::StopSequence as i32);
    assert!(one_offs[0].token_ids.len() < 40 && !one_offs[0].text.contains("SCENE III."));
    assert!(one_offs[2].prompt_tokens.len() > 4);

    for (args, pressure) in [
        (&["--speculative-tokens", "4"][..], false),
        // TP=2 with the GPU's layout and sampler: the follower verifies the same drafts.
        (
            &[
                "--speculative-tokens",
                "4",
                "--sampling",
                "device",
                "--kv-layout",
                "paged",
                "--tp",
                "2",
            ],
            false,
        ),
        // Room for 128 tokens and small steps: drafts compete with prefill chunks, cached
        // prefixes and preemption.
        (
            &[
                "--speculative-tokens",
                "4",
                "--kv-cache-mib",
                "1",
                "--kv-block-size",
                "32",
                "--max-batch-size",
                "4",
                "--max-tokens-per-step",
                "24",
            ],
            true,
        ),
    ] {
        let on = start(args);
        // Drafts must have been kept for the low-temperature sampled and the penalised
        // requests, or their rows after a kept draft were never tested.
        for (g, what) in [(2, "sampled"), (3, "penalised")] {
            let kept = on.metric("neox_spec_decode_accepted_tokens_total");
            assert_same(&rt().block_on(run(&on, &groups[g], false)), &want[at[g].clone()], what);
            let kept = on.metric("neox_spec_decode_accepted_tokens_total") - kept;
            assert!(kept > 0.0, "{args:?}: no draft was kept for a {what} request");
        }
        assert_same(&rt().block_on(run(&on, &reqs, false)), &want, "sequential");
        // Batched: up to 4 decoding sequences speculate, more decode plainly.
        assert_same(&rt().block_on(run(&on, &reqs, true)), &want, "concurrent");
        assert_same(&rt().block_on(run(&on, &reqs[..4], true)), &want[..4], "four at once");
        if pressure {
            assert!(on.metric("neox_preemptions_total") > 0.0, "{args:?}: no preemption");
            continue;
        }
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

/// A verification row is sampled as plain decoding would have sampled that position, so its
/// penalties count the drafts before it as generated. The fixture's random weights repeat one
/// token for long runs, where a frequency penalty decides when a run ends: rows that forgot
/// the drafts ahead (a mutant of `Scheduler::sample`) ended 19 of these 72 runs elsewhere.
#[test]
fn a_draft_rows_penalties_count_the_drafts_before_it() {
    let model = common::fixture_dir();
    let model = model.to_str().unwrap();
    let words = [
        "the", "a", "and", "of", "to", "my", "lord", "king", "O", "I", "you", "is",
    ];
    let mut reqs = Vec::new();
    for i in 0..12 {
        let (w, v) = (words[i], words[(i * 5 + 3) % words.len()]);
        let prompt = match i % 3 {
            0 => format!("{w} {w} {w} {w} {w} {w} {w} {w}"),
            1 => format!("{w} {v} {w} {v} {w} {v} {w} {v}"),
            _ => format!("{w} {v} {w} {w} {v} {w} {w} {v}"),
        };
        for f in [0.05, 0.1, 0.2, 0.3, 0.5, 0.8] {
            let mut r = greedy(&prompt, 48);
            if let Some(p) = r.parameters.as_mut() {
                p.frequency_penalty = f;
            }
            reqs.push(r);
        }
    }
    let off = start(&["--model", model]);
    let want = rt().block_on(run(&off, &reqs, false));
    drop(off);
    let on = start(&["--model", model, "--speculative-tokens", "4"]);
    let got = rt().block_on(run(&on, &reqs, false));
    assert_same(&got, &want, "greedy with a frequency penalty");
    let kept = on.metric("neox_spec_decode_accepted_tokens_total");
    assert!(
        kept >= 100.0,
        "only {kept} drafts kept: the rows after them were hardly tested"
    );
}
