//! The gRPC server end to end with a Rust (tonic) client: continuous batching against
//! sequential runs, cancellation, queue limits, preemption, fuzzed parameters, draining.

mod common;
mod serving;

use std::time::{Duration, Instant};

use neox_proto::neox::v1 as pb;
use serving::*;

/// Runs `n` greedy prompts one by one, then all at once, and checks each concurrent stream
/// against its own sequential run.
async fn sequential_then_concurrent(server: &Server, n: usize, tokens: u32, what: &str) {
    let ps = prompts(n);
    let (sequential, concurrent) = sequential_and_concurrent(server, &ps, tokens).await;
    for (i, got) in concurrent.iter().enumerate() {
        assert_eq!(got, &sequential[i], "stream {i} ({:?}) differs from {what}", ps[i]);
    }
}

#[test]
fn concurrent_streams_equal_their_sequential_runs() {
    let server = start(&["--max-batch-size", "32"]);
    rt().block_on(sequential_then_concurrent(&server, 32, 24, "its sequential run"));
    // Continuous batching really batched: some step ran many sequences at once.
    let text = server.metrics_text();
    let over8: f64 = text
        .lines()
        .find(|l| l.starts_with("neox_batch_size_bucket{le=\"8\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap();
    let total = server.metric("neox_batch_size_count");
    assert!(total > over8, "no step ran more than 8 sequences");
}

#[test]
fn model_info_reports_the_kv_budget_default_and_flagged() {
    for (args, mib, block) in [
        (&[][..], 1024usize, 16usize),
        (&["--kv-cache-mib", "3", "--kv-block-size", "8"][..], 3, 8),
    ] {
        let server = start(args);
        let info = rt().block_on(async {
            let mut c = server.client().await;
            c.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner()
        });
        // fp32 K and V for every layer and hidden unit (this is a TP=1 CPU server: 1024 MiB).
        let per_token = 2 * info.num_layers as usize * info.hidden_size as usize * 4;
        assert_eq!(info.kv_block_size as usize, block);
        assert_eq!(
            info.kv_cache_blocks as usize,
            (mib << 20) / (block * per_token),
            "{args:?}"
        );
    }
}

/// A request that can never fit the KV budget (1 MiB: 128 tokens of this model) is refused
/// with INVALID_ARGUMENT naming the field to blame: the prompt when it alone is too long, else
/// max_new_tokens. The server advertises that limit, not the model's longer context.
#[test]
fn a_request_larger_than_the_kv_budget_names_the_field_to_blame() {
    let server = start(&["--kv-cache-mib", "1"]);
    rt().block_on(async {
        let mut c = server.client().await;
        let info = c.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert!(info.max_position_embeddings > 128);
        assert_eq!(info.max_total_tokens, info.kv_cache_blocks * info.kv_block_size);
        assert_eq!(info.max_total_tokens, 128);
        let long = pb::GenerateRequest {
            prompt_ids: (0..200u32).map(|i| (i * 7 + 3) % 2000).collect(),
            ..greedy("", 1)
        };
        for (req, field) in [
            (long, "prompt: "),
            (greedy("ROMEO:", 300), "parameters.max_new_tokens: "),
        ] {
            let e = c.generate(req).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            assert!(e.message().starts_with(field), "{}", e.message());
            assert!(e.message().contains("128"), "{}", e.message());
        }
        // The server's default max_new_tokens shrinks to the room the budget leaves: a prompt
        // that fits is answered, never refused over a number the client did not choose.
        let fits = pb::GenerateRequest {
            prompt_ids: (0..100u32).map(|i| (i * 7 + 3) % 2000).collect(),
            ..greedy("", 0)
        };
        let r = c.generate(fits).await.unwrap().into_inner();
        let n = r.token_ids.len();
        assert!(
            n > 0 && n <= 28,
            "{n} tokens after a 100-token prompt in a 128-token budget"
        );
        // Within the budget, the same server answers.
        c.generate(greedy("ROMEO:", 8)).await.unwrap();
    });
}

#[test]
fn cancelling_half_the_streams_frees_their_kv_blocks() {
    let server = start(&["--max-batch-size", "16"]);
    rt().block_on(async {
        let c = server.client().await;
        let mut streams = Vec::new();
        for p in prompts(16) {
            let mut c = c.clone();
            let mut s = c.generate_stream(greedy(&p, 300)).await.unwrap().into_inner();
            s.message().await.unwrap().unwrap();
            streams.push(s);
        }
        assert!(server.metric("neox_kv_cache_usage_ratio") > 0.0);
        let keep: Vec<_> = streams.drain(..8).collect();
        drop(streams);
        server.wait_metrics(Duration::from_secs(10), "8 cancellations", |s| {
            s.metric("neox_requests_total{finish_reason=\"cancelled\"}") >= 8.0
        });
        let running = server.metric("neox_requests_running");
        assert!(running <= 8.0, "{running} still running");
        drop(keep);
    });
    server.wait_metrics(Duration::from_secs(10), "KV back to baseline", |s| {
        s.metric("neox_kv_cache_usage_ratio") == 0.0 && s.metric("neox_requests_running") == 0.0
    });
    assert_eq!(server.metric("neox_requests_total{finish_reason=\"cancelled\"}"), 16.0);
}

#[test]
fn a_full_queue_answers_resource_exhausted_and_keeps_serving() {
    let server = start(&["--max-batch-size", "1", "--max-waiting-requests", "2"]);
    rt().block_on(async {
        let c = server.client().await;
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let mut c = c.clone();
                tokio::spawn(async move { c.generate(greedy("ROMEO:\n", 120)).await })
            })
            .collect();
        let (mut ok, mut full) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    assert!(s.message().contains("queue is full"), "{}", s.message());
                    full += 1;
                }
                Err(s) => panic!("unexpected {s:?}"),
            }
        }
        assert!(ok >= 3 && full >= 1, "ok {ok}, rejected {full}");
        // Each refusal is counted for alerting, and only those.
        let counted = server.metric("neox_requests_rejected_total{reason=\"queue_full\"}");
        assert_eq!(counted, f64::from(full));
        assert_eq!(
            server.metric("neox_requests_rejected_total{reason=\"unavailable\"}"),
            0.0
        );
        let mut c = c.clone();
        let r = c.generate(greedy("ROMEO:\n", 5)).await.unwrap().into_inner();
        assert_eq!(r.token_ids.len(), 5);
    });
}

#[test]
fn paged_kv_serves_the_same_text_under_batching_and_preemption() {
    // The GPU layout, forced on the CPU: 24 concurrent streams equal their sequential runs.
    let server = start(&["--kv-layout", "paged", "--max-batch-size", "24"]);
    rt().block_on(sequential_then_concurrent(
        &server,
        24,
        24,
        "its sequential run (paged KV)",
    ));
    drop(server);
    // A pool of 1 MiB (128 tokens): the engine's block accounting must preempt before the pool
    // runs dry.
    assert_preemption_keeps_outputs_exact(&["--kv-layout", "paged"], "(paged KV)");
    // TP=2: the follower gets the same pool through the group protocol.
    let server = start(&["--tp", "2", "--kv-layout", "paged", "--max-batch-size", "8"]);
    rt().block_on(sequential_then_concurrent(
        &server,
        8,
        24,
        "its sequential run (paged KV, TP=2)",
    ));
}

#[test]
fn preemption_under_a_tiny_kv_budget_keeps_outputs_exact() {
    assert_preemption_keeps_outputs_exact(&[], "");
}

#[test]
fn prompt_logprobs_survive_preemption_mid_prefill() {
    // 128 tokens of KV, prompts prefilled a few tokens a step: younger requests are preempted
    // while their prompts are half scored, and must not report any prompt token twice.
    let server = start(&[
        "--kv-cache-mib",
        "1",
        "--max-batch-size",
        "4",
        "--max-tokens-per-step",
        "4",
    ]);
    rt().block_on(async {
        let mut c = server.client().await;
        let req = |p: &str| {
            let mut r = greedy(p, 40);
            if let Some(params) = r.parameters.as_mut() {
                params.prompt_logprobs = true;
            }
            r
        };
        let ps: Vec<String> = prompts(4).into_iter().map(|p| p.repeat(4)).collect();
        let mut alone = Vec::new();
        for p in &ps {
            alone.push(c.generate(req(p)).await.unwrap().into_inner());
        }
        let tasks: Vec<_> = ps
            .iter()
            .map(|p| {
                let mut c = c.clone();
                let r = req(p);
                tokio::spawn(async move { c.generate(r).await })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let got = t.await.unwrap().unwrap().into_inner();
            let ids = |r: &pb::GenerateResponse| r.prompt_tokens.iter().map(|t| t.id).collect::<Vec<_>>();
            assert_eq!(ids(&got), ids(&alone[i]), "request {i}: prompt tokens");
            assert_eq!(
                got.usage.map(|u| u.prompt_tokens as usize),
                Some(got.prompt_tokens.len())
            );
            assert_eq!(got.token_ids, alone[i].token_ids, "request {i}: generated tokens");
        }
    });
    assert!(
        server.metric("neox_preemptions_total") > 0.0,
        "the budget should have forced preemption"
    );
    // Each of the 8 requests' whole prompt once: not again for the preempted ones, and the
    // runs served partly from the prefix cache count in full.
    let prompts_len: usize = prompts(4)
        .iter()
        .map(|p| p.repeat(4))
        .map(|p| token_count(&server, &p))
        .sum();
    assert_eq!(server.metric("neox_prompt_tokens_total"), (2 * prompts_len) as f64);
}

/// The number of tokens `text` encodes to, by the server's own Tokenize.
fn token_count(server: &Server, text: &str) -> usize {
    rt().block_on(async {
        let mut c = server.client().await;
        let req = pb::TokenizeRequest { text: text.into() };
        c.tokenize(req).await.unwrap().into_inner().ids.len()
    })
}

#[test]
fn a_younger_request_short_of_kv_gives_way_to_the_older_one() {
    // 128 tokens of KV for two requests that each grow to about 90: one must be preempted.
    // First come, first served: it is always the younger, whichever of them runs short first
    // (that depends on how their lengths fall on block boundaries, varied by the prompts).
    let server = start(&[
        "--kv-cache-mib",
        "1",
        "--max-batch-size",
        "2",
        "--prefix-caching",
        "false",
    ]);
    let ps = prompts(8);
    rt().block_on(async {
        let c = server.client().await;
        for pair in ps.chunks(2) {
            let mut older = c
                .clone()
                .generate_stream(greedy(&pair[0], 80))
                .await
                .unwrap()
                .into_inner();
            // Admitted (its first token is out) before the younger one is sent.
            assert!(older.message().await.unwrap().is_some());
            let older = tokio::spawn(async move {
                while older.message().await.unwrap().is_some() {}
                Instant::now()
            });
            let mut c = c.clone();
            let req = greedy(&pair[1], 88);
            let younger = tokio::spawn(async move {
                stream_all(&mut c, req).await.unwrap();
                Instant::now()
            });
            let (older, younger) = (older.await.unwrap(), younger.await.unwrap());
            assert!(
                older < younger,
                "{:?} was preempted for the younger {:?}: it finished after it",
                pair[0],
                pair[1]
            );
        }
    });
    assert!(
        server.metric("neox_preemptions_total") >= 4.0,
        "every pair should need a preemption"
    );
    server.wait_kv_freed();
}

/// 1 MiB of KV holds 128 tokens of this model: four 110-token requests cannot all fit, so the
/// engine preempts; every output still equals its run without preemption, and all KV is freed.
fn assert_preemption_keeps_outputs_exact(extra: &[&str], what: &str) {
    let mut args = vec!["--kv-cache-mib", "1", "--max-batch-size", "4"];
    args.extend_from_slice(extra);
    let server = start(&args);
    let label = format!("its run without preemption {what}");
    rt().block_on(sequential_then_concurrent(&server, 4, 100, &label));
    assert!(
        server.metric("neox_preemptions_total") > 0.0,
        "the budget should have forced preemption {what}"
    );
    server.wait_kv_freed();
}

/// A long shared prompt (a "system prompt") and different endings.
fn shared_prefix_prompts(n: usize) -> (String, Vec<String>) {
    let prefix = "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to \
                  suffer\nThe slings and arrows of outrageous fortune,\nOr to take arms against a sea of \
                  troubles\nAnd by opposing end them. To die: to sleep;\nNo more; and by a sleep to say we end\n"
        .to_owned();
    let endings = prompts(n);
    let all = endings.iter().map(|e| format!("{prefix}{e}")).collect();
    (prefix, all)
}

/// Greedy streams of `ps`, one by one, then all at once.
async fn sequential_and_concurrent(server: &Server, ps: &[String], tokens: u32) -> (Vec<StreamOut>, Vec<StreamOut>) {
    let mut c = server.client().await;
    let mut sequential = Vec::new();
    for p in ps {
        sequential.push(stream_all(&mut c, greedy(p, tokens)).await.unwrap());
    }
    let tasks: Vec<_> = ps
        .iter()
        .map(|p| {
            let mut c = c.clone();
            let req = greedy(p, tokens);
            tokio::spawn(async move { stream_all(&mut c, req).await })
        })
        .collect();
    let mut concurrent = Vec::new();
    for t in tasks {
        concurrent.push(t.await.unwrap().unwrap());
    }
    (sequential, concurrent)
}

type StreamOut = (Vec<u32>, String, i32);

#[test]
fn prefix_caching_reuses_a_shared_prompt_and_keeps_outputs_exact() {
    let (prefix, ps) = shared_prefix_prompts(6);
    let off = start(&["--prefix-caching", "false"]);
    let (want, _) = rt().block_on(sequential_and_concurrent(&off, &ps, 16));
    let info = |s: &Server| rt().block_on(async { s.client().await.model_info(pb::ModelInfoRequest {}).await });
    assert!(!info(&off).unwrap().into_inner().prefix_caching);
    assert_eq!(off.metric("neox_prefix_cache_hits_total"), 0.0);
    assert_eq!(off.metric("neox_prefix_cache_blocks"), 0.0);
    drop(off);

    let on = start(&[]);
    assert!(
        info(&on).unwrap().into_inner().prefix_caching,
        "prefix caching is on by default"
    );
    let (prefix_len, prompt_lens) = rt().block_on(async {
        let c = on.client().await;
        let count = |text: &str| {
            let mut c = c.clone();
            let req = pb::TokenizeRequest { text: text.into() };
            async move { c.tokenize(req).await.unwrap().into_inner().ids.len() as f64 }
        };
        let prefix_len = count(&prefix).await;
        let mut prompt_lens = Vec::new();
        for p in &ps {
            prompt_lens.push(count(p).await);
        }
        (prefix_len, prompt_lens)
    });
    let (sequential, concurrent) = rt().block_on(sequential_and_concurrent(&on, &ps, 16));
    assert_eq!(sequential, want, "cached prefixes changed the sequential outputs");
    assert_eq!(concurrent, want, "cached prefixes changed the concurrent outputs");
    // Every prompt after the first found at least the shared prefix (less the token where the
    // prefix and its ending may merge); the concurrent round found each whole prompt.
    let hits = on.metric("neox_prefix_cache_hits_total");
    let least = (ps.len() - 1) as f64 * (prefix_len - 1.0) + prompt_lens.iter().map(|n| n - 1.0).sum::<f64>();
    assert!(
        hits >= least,
        "{hits} prompt tokens came from the cache, expected at least {least}"
    );
    let queried = on.metric("neox_prefix_cache_queries_total");
    assert_eq!(queried, 2.0 * prompt_lens.iter().sum::<f64>());
    // Prompt logprobs score every prompt token: such a request computes its prompt itself,
    // although the cache holds all of it.
    let scored = rt().block_on(async {
        let mut scored = greedy(&ps[1], 4);
        scored.parameters.as_mut().unwrap().prompt_logprobs = true;
        on.client().await.generate(scored).await.unwrap().into_inner()
    });
    assert_eq!(scored.prompt_tokens.len() as f64, prompt_lens[1]);
    assert!(scored.prompt_tokens[1..].iter().all(|t| t.logprob.is_some()));
    assert_eq!(
        on.metric("neox_prefix_cache_hits_total"),
        hits,
        "a prompt-logprobs request used the cache"
    );
    assert_eq!(on.metric("neox_prefix_cache_queries_total"), queried);
    // Usage tells the client how much of its prompt came from the cache.
    let again = rt().block_on(async { on.client().await.generate(greedy(&ps[2], 2)).await });
    let usage = again.unwrap().into_inner().usage.unwrap();
    assert_eq!(usage.prompt_tokens as f64, prompt_lens[2]);
    assert_eq!(usage.cached_prompt_tokens as f64, prompt_lens[2] - 1.0);
    assert_eq!(scored.usage.unwrap().cached_prompt_tokens, 0);
    // Kept prefixes hold blocks, but are not "in use": the autoscaling signal stays honest.
    on.wait_kv_freed();
    assert!(on.metric("neox_prefix_cache_blocks") > 0.0);
    drop(on);

    // The paged layout (the GPU default) through the engine: forks copy blocks of one pool.
    // TP=2: the follower copies the same prefixes under the same ids (it checks every step's
    // start position against its own caches, so a missed copy fails the group).
    for args in [["--kv-layout", "paged"], ["--tp", "2"]] {
        let server = start(&args);
        let (sequential, concurrent) = rt().block_on(sequential_and_concurrent(&server, &ps, 16));
        assert_eq!(sequential, want, "{args:?} with cached prefixes differs (sequential)");
        assert_eq!(concurrent, want, "{args:?} with cached prefixes differs (concurrent)");
        assert!(
            server.metric("neox_prefix_cache_hits_total") >= least,
            "{args:?}: too few hits"
        );
    }
}

#[test]
fn a_running_request_shares_its_prompt_with_a_later_one() {
    let (_, ps) = shared_prefix_prompts(2);
    let later = format!("{}{}", ps[0], " my lord");
    let run = |args: &[&str]| {
        let server = start(args);
        let out = rt().block_on(async {
            let mut c = server.client().await;
            let req = pb::TokenizeRequest { text: ps[0].clone() };
            let prompt_len = c.tokenize(req).await.unwrap().into_inner().ids.len() as f64;
            let mut first = c.generate_stream(greedy(&ps[0], 200)).await.unwrap().into_inner();
            // Once the first request streams, its prompt's KV is computed.
            first.message().await.unwrap().unwrap();
            let second = stream_all(&mut c, greedy(&later, 8)).await.unwrap();
            let mut rest = 1;
            while first.message().await.unwrap().is_some() {
                rest += 1;
            }
            (second, rest, prompt_len)
        });
        (server, out)
    };
    let (off, (want, _, _)) = run(&["--prefix-caching", "false"]);
    drop(off);
    let (on, (got, streamed, prompt_len)) = run(&[]);
    assert_eq!(got, want);
    assert!(streamed >= 200, "the first stream ended early ({streamed} messages)");
    // The whole first prompt (less a token where it and the ending may merge).
    let hits = on.metric("neox_prefix_cache_hits_total");
    assert!(
        hits >= prompt_len - 1.0,
        "the second request copied {hits} of the running one's {prompt_len} prompt tokens"
    );
}

#[test]
fn a_waiting_request_keeps_the_prefix_it_will_start_from() {
    // 1 MiB of KV per rank at TP=2: 16 blocks of 16 tokens. A finished 34-token prompt stays cached (3 blocks);
    // a long stream then holds up to the other 13. A request sharing the cached prompt arrives
    // needing 8 blocks: evicting the cache would not make it fit, so it waits and the cached
    // prefix stays; when the stream ends, it starts from that prefix.
    let p = "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer";
    let w = format!(
        "{p}\nThe slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n\
         And by opposing end them. To die: to sleep;\nNo more; and by a sleep to say we end\n\
         The heart-ache and the thousand natural shocks\nThat flesh is heir to"
    );
    // Slow steps (a follower that sleeps 5 ms a step) so the stream is still running when
    // the request arrives.
    let server = start_env(
        &["--tp", "2", "--kv-cache-mib", "1"],
        &[("NEOX_DEBUG_STEP_DELAY_MS", "5")],
    );
    rt().block_on(async {
        let mut c = server.client().await;
        let info = c.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert_eq!((info.kv_cache_blocks, info.kv_block_size), (16, 16));
        let count = |text: &str| {
            let mut c = c.clone();
            let req = pb::TokenizeRequest { text: text.into() };
            async move { c.tokenize(req).await.unwrap().into_inner().ids.len() }
        };
        let (p_len, w_len) = (count(p).await, count(&w).await);
        assert_eq!(
            (p_len, w_len),
            (34, 116),
            "the demo tokenizer changed: resize this test"
        );
        stream_all(&mut c, greedy(p, 8)).await.unwrap();
        let mut long = c.generate_stream(greedy("ROMEO:\n", 200)).await.unwrap().into_inner();
        for _ in 0..130 {
            long.message().await.unwrap().unwrap();
        }
        let waiting = tokio::spawn({
            let mut c = c.clone();
            async move { stream_all(&mut c, greedy(&w, 8)).await }
        });
        let mut streamed = 130;
        while long.message().await.unwrap().is_some() {
            streamed += 1;
        }
        assert!(streamed >= 200, "the long stream ended early");
        waiting.await.unwrap().unwrap();
        let hits = server.metric("neox_prefix_cache_hits_total");
        assert!(
            hits >= (p_len - 1) as f64,
            "the waiting request started from {hits} cached tokens, not the {p_len}-token prefix"
        );
    });
}

#[test]
fn request_ids_are_echoed_and_logged_without_the_prompt() {
    let server = start_env(&[], &[("NEOX_LOG", "info")]);
    let secret = "HAMLET:\nmy-secret-prompt-text";
    rt().block_on(async {
        let mut c = server.client().await;
        let mut req = greedy(secret, 5);
        req.request_id = "order-42/a".into();
        let r = c.generate(req).await.unwrap();
        assert_eq!(r.metadata().get("x-request-id").unwrap(), "order-42/a");
        assert_eq!(r.into_inner().request_id, "order-42/a");
        // From the x-request-id header when the field is empty; made up when both are.
        let mut req = tonic::Request::new(greedy(secret, 3));
        req.metadata_mut()
            .insert("x-request-id", "from-header".parse().unwrap());
        let s = c.generate_stream(req).await.unwrap();
        assert_eq!(s.metadata().get("x-request-id").unwrap(), "from-header");
        let mut s = s.into_inner();
        let mut last = None;
        while let Some(m) = s.message().await.unwrap() {
            last = Some(m);
        }
        let last = last.unwrap();
        assert_eq!(last.request_id, "from-header");
        assert!(last.finish_reason.is_some());
        let made_up = c.generate(greedy(secret, 1)).await.unwrap().into_inner().request_id;
        assert_eq!(made_up.len(), 16, "{made_up:?}");
        // An id that could break a log line is refused, naming the field.
        let mut req = greedy(secret, 1);
        req.request_id = "two\nlines".into();
        let e = c.generate(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("request_id: "), "{}", e.message());
        let mut req = greedy(secret, 1);
        req.request_id = "bad-params".into();
        req.parameters.as_mut().unwrap().temperature = Some(-1.0);
        let e = c.generate(req).await.unwrap_err();
        assert_eq!(e.metadata().get("x-request-id").unwrap(), "bad-params");
    });
    // Every request has one log line with its id, counts and timings, and never its text.
    let log = server.wait_log("three requests' log lines", |log| {
        log.matches("request ended").count() >= 3 && log.contains("request_id=bad-params")
    });
    let line = |id: &str| {
        log.lines()
            .find(|l| l.contains("request ended") && l.contains(&format!("request_id={id} ")))
            .unwrap_or_else(|| panic!("no log line for {id}:\n{log}"))
            .to_owned()
    };
    let first = line("order-42/a");
    for field in [
        "finish_reason=\"length\"",
        "prompt_tokens=",
        "generated_tokens=5",
        "ttft_ms=",
        "total_ms=",
    ] {
        assert!(first.contains(field), "{field} missing from {first}");
    }
    line("from-header");
    assert!(
        log.lines()
            .any(|l| l.contains("request rejected") && l.contains("request_id=bad-params")),
        "{log}"
    );
    assert!(
        !log.contains("my-secret-prompt-text"),
        "the prompt reached the log:\n{log}"
    );
    drop(server);

    // NEOX_LOG_FORMAT=json: one object a line, the request's fields as fields.
    let server = start_env(&[], &[("NEOX_LOG", "info"), ("NEOX_LOG_FORMAT", "json")]);
    rt().block_on(async {
        let mut req = greedy(secret, 2);
        req.request_id = "json-1".into();
        server.client().await.generate(req).await.unwrap();
    });
    let log = server.wait_log("the request's log line", |log| log.contains("request ended"));
    let ended: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "request ended")
        .unwrap_or_else(|| panic!("no JSON line for the request:\n{log}"));
    assert_eq!(ended["fields"]["request_id"], "json-1");
    assert_eq!(ended["fields"]["generated_tokens"], 2);
    for timing in ["queue_ms", "ttft_ms", "total_ms"] {
        assert!(ended["fields"][timing].is_number(), "{timing} is not a number: {ended}");
    }
    assert_eq!(ended["level"], "INFO");
}

#[test]
fn paged_forks_share_prefix_blocks_so_more_requests_fit() {
    // 8 blocks of 32 tokens per rank (1 MiB at TP=2). A finished request leaves a 128-token
    // prefix (4 blocks) in the cache; four requests that extend it each need 5 blocks. Paged
    // caches share the prefix's full blocks: three run at once (4 shared + 1 own each).
    // Per-sequence caches copy it: one at a time. The outputs are the same.
    let prefix: Vec<u32> = (0..128u32).map(|i| 100 + i * 7 % 1900).collect();
    let ids = |tail: &[u32]| [prefix.as_slice(), tail].concat();
    let req = |tail: &[u32], n: u32| pb::GenerateRequest {
        prompt_ids: ids(tail),
        parameters: Some(pb::GenerationParameters {
            max_new_tokens: n,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let run = |layout: &str| {
        let args = [
            "--tp",
            "2",
            "--kv-cache-mib",
            "1",
            "--kv-block-size",
            "32",
            "--kv-layout",
            layout,
        ];
        // Slow steps (10 ms a step on the follower), so the four requests, sent at once, are
        // all there while the first of them runs.
        let server = start_env(&args, &[("NEOX_DEBUG_STEP_DELAY_MS", "10")]);
        let outs = rt().block_on(async {
            let mut c = server.client().await;
            c.generate(req(&[5, 6, 7, 8], 4)).await.unwrap();
            let tasks: Vec<_> = (0..4u32)
                .map(|i| {
                    let mut c = c.clone();
                    let r = req(&[9 + i, 10 + i, 11 + i, 12 + i], 8);
                    tokio::spawn(async move { c.generate(r).await.map(|r| r.into_inner().token_ids) })
                })
                .collect();
            let mut outs = Vec::new();
            for t in tasks {
                outs.push(t.await.unwrap().unwrap());
            }
            outs
        });
        let at_most_two = server.metric("neox_batch_size_bucket{le=\"2\"}");
        let steps = server.metric("neox_batch_size_count");
        (outs, steps - at_most_two, server.metric("neox_preemptions_total"))
    };
    let (copied, copied_big_steps, _) = run("per-sequence");
    let (shared, shared_big_steps, preempted) = run("paged");
    assert_eq!(shared, copied);
    assert_eq!(
        copied_big_steps, 0.0,
        "copied prefixes left room for 3 requests at once"
    );
    assert!(
        shared_big_steps > 0.0,
        "shared prefix blocks never let 3 requests run at once"
    );
    assert_eq!(preempted, 0.0);
}

#[test]
fn a_stalled_log_pipe_never_stalls_serving() {
    use std::io::BufRead;
    // Info logs to a stderr pipe that nobody reads once the server is up: the pipe fills after
    // a few hundred request lines, and serving must go on.
    let mut child = common::worker()
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--http-addr",
            "off",
        ])
        .env("NEOX_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let grpc = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "server exited before serving");
        if let Some(rest) = line.trim().strip_prefix("neox-worker: serving gRPC on ") {
            break rest.split_once(' ').unwrap().0.to_owned();
        }
    };
    let served = rt().block_on(async {
        let mut c = pb::text_generation_client::TextGenerationClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let all = async {
            for i in 0..1500 {
                let mut req = greedy("ROMEO:\n", 1);
                req.request_id = format!("stalled-pipe-request-{i:04}-{}", "x".repeat(80));
                c.generate(req).await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(40), all).await.is_ok()
    });
    let _ = child.kill();
    let _ = child.wait();
    drop(err);
    assert!(served, "serving stalled behind a full log pipe");
}

#[test]
fn cached_prefixes_give_way_to_requests_that_need_the_blocks() {
    // 1 MiB of KV holds 128 tokens (8 blocks). Finished requests fill it with cached
    // prefixes; a request that needs nearly every block must evict them, not wait or preempt:
    // a few blocks when it is admitted, the rest as it grows while decoding.
    let big = prompts(5)[4].clone();
    let run = |args: &[&str]| {
        let server = start(args);
        let requests = async {
            let mut c = server.client().await;
            for p in prompts(8) {
                stream_all(&mut c, greedy(&format!("{p}{p}"), 8)).await.unwrap();
            }
            let filled = server.metric("neox_prefix_cache_blocks");
            (filled, stream_all(&mut c, greedy(&big, 100)).await.unwrap())
        };
        let out = rt()
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), requests).await })
            .expect("requests never finished: cached prefixes kept the blocks they needed");
        (server, out)
    };
    let (off, (_, want)) = run(&["--kv-cache-mib", "1", "--prefix-caching", "false"]);
    drop(off);
    let (on, (filled, got)) = run(&["--kv-cache-mib", "1"]);
    assert!(filled >= 4.0, "only {filled} blocks were cached before the big request");
    assert_eq!(got, want);
    on.wait_kv_freed();
}

#[test]
fn device_sampling_matches_host_sampling() {
    // The GPU's batched tensor sampler, forced on the CPU, against the host sampler.
    let host = start(&[]);
    let device = start(&["--sampling", "device", "--max-batch-size", "16"]);
    rt().block_on(async {
        let (mut h, mut d) = (host.client().await, device.client().await);
        for p in prompts(4) {
            // Greedy with logprobs and alternatives: the same tokens and numbers.
            let mut req = greedy(&p, 12);
            if let Some(params) = req.parameters.as_mut() {
                params.logprobs = true;
                params.top_n_tokens = 4;
                params.repetition_penalty = Some(1.3);
            }
            let a = h.generate(req.clone()).await.unwrap().into_inner();
            let b = d.generate(req).await.unwrap().into_inner();
            assert_eq!(a.token_ids, b.token_ids, "{p:?}");
            for (x, y) in a.tokens.iter().zip(&b.tokens) {
                let (lx, ly) = (x.logprob.unwrap(), y.logprob.unwrap());
                assert!((lx - ly).abs() < 1e-4, "{p:?}: logprob {lx} vs {ly}");
                let ids = |t: &pb::Token| t.top_tokens.iter().map(|t| t.id).collect::<Vec<_>>();
                assert_eq!(ids(x), ids(y), "{p:?}: top tokens");
            }
        }
        // Seeded sampling: the same seed gives the same text, alone or batched with others,
        // and every chosen token's reported logprob is one the host assigns it too.
        let ps = prompts(12);
        let mut alone = Vec::new();
        for (i, p) in ps.iter().enumerate() {
            alone.push(d.generate(sampled(p, i as u64)).await.unwrap().into_inner());
        }
        let tasks: Vec<_> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut d = d.clone();
                let req = sampled(p, i as u64);
                tokio::spawn(async move { d.generate(req).await })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let batched = t.await.unwrap().unwrap().into_inner();
            assert_eq!(batched.token_ids, alone[i].token_ids, "seed {i} batched vs alone");
        }
        let distinct: std::collections::HashSet<_> = alone.iter().map(|r| r.token_ids.clone()).collect();
        assert!(distinct.len() > 6, "sampling should vary across prompts and seeds");
        // Each sampled token's reported logprob is the model's: the host server scores the
        // same text as a prompt.
        for (i, r) in alone.iter().enumerate() {
            let prompt = h
                .tokenize(pb::TokenizeRequest { text: ps[i].clone() })
                .await
                .unwrap()
                .into_inner()
                .ids;
            let scored = h
                .generate(pb::GenerateRequest {
                    prompt_ids: prompt.iter().chain(&r.token_ids).copied().collect(),
                    parameters: Some(pb::GenerationParameters {
                        max_new_tokens: 1,
                        prompt_logprobs: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            for (j, t) in r.tokens.iter().enumerate() {
                let want = scored.prompt_tokens[prompt.len() + j].logprob.unwrap();
                let got = t.logprob.unwrap();
                assert!((got - want).abs() < 1e-4, "seed {i} token {j}: logprob {got} vs {want}");
            }
        }
    });
}

#[test]
fn fuzzed_parameters_never_break_the_server() {
    fuzz_parameters(&[]);
    // The same requests through the GPU's tensor sampler.
    fuzz_parameters(&["--sampling", "device"]);
}

fn fuzz_parameters(extra: &[&str]) {
    use rand::{Rng, SeedableRng};
    let mut args = vec!["--max-prompt-bytes", "2048"];
    args.extend_from_slice(extra);
    let server = start(&args);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let reqs: Vec<pb::GenerateRequest> = (0..150)
        .map(|_| {
            let words = ["ROMEO", ":", "\n", "thee", "é", "🎭", "", "  ", "\u{0}"];
            let prompt: String = (0..rng.random_range(0..20))
                .map(|_| words[rng.random_range(0..words.len())])
                .collect();
            let f = |rng: &mut rand::rngs::StdRng| -> Option<f32> {
                // Mostly unset or valid; sometimes negative, NaN or zero.
                match rng.random_range(0..12) {
                    0 => Some(rng.random_range(-2.0..3.0)),
                    1 => Some(f32::NAN),
                    2 => Some(0.0),
                    3..=5 => Some(rng.random_range(0.05..1.0)),
                    _ => None,
                }
            };
            pb::GenerateRequest {
                prompt,
                prompt_ids: if rng.random_bool(0.1) {
                    (0..rng.random_range(0..5)).map(|_| rng.random_range(0..5000)).collect()
                } else {
                    vec![]
                },
                parameters: Some(pb::GenerationParameters {
                    max_new_tokens: rng.random_range(0..600),
                    temperature: f(&mut rng),
                    top_k: rng.random_range(0..100),
                    top_p: f(&mut rng),
                    typical_p: f(&mut rng),
                    repetition_penalty: f(&mut rng),
                    frequency_penalty: rng.random_range(-2.2..2.2),
                    presence_penalty: rng.random_range(-2.2..2.2),
                    seed: rng.random_bool(0.5).then(|| rng.random()),
                    stop_sequences: (0..rng.random_range(0..10))
                        .map(|i| ["\n", "the", "x", "", "é"][i % 5].to_owned())
                        .collect(),
                    stop_token_ids: (0..rng.random_range(0..3)).map(|_| rng.random_range(0..3000)).collect(),
                    ignore_eos: rng.random(),
                    logprobs: rng.random(),
                    top_n_tokens: rng.random_range(0..7),
                    prompt_logprobs: rng.random(),
                    truncate: rng.random_range(0..8),
                    logit_bias: (0..if rng.random_bool(0.2) {
                        rng.random_range(1..4)
                    } else {
                        0
                    })
                        .map(|_| (rng.random_range(0..3200), rng.random_range(-110.0..110.0)))
                        .collect(),
                }),
                request_id: String::new(),
            }
        })
        .collect();
    rt().block_on(async {
        let c = server.client().await;
        let (mut ok, mut rejected) = (0, 0);
        for chunk in reqs.chunks(8) {
            let tasks: Vec<_> = chunk
                .iter()
                .cloned()
                .map(|r| {
                    let mut c = c.clone();
                    tokio::spawn(async move {
                        let mut r = r;
                        if let Some(p) = r.parameters.as_mut() {
                            p.max_new_tokens = p.max_new_tokens.min(40);
                        }
                        c.generate(r).await
                    })
                })
                .collect();
            for t in tasks {
                match t.await.unwrap() {
                    Ok(_) => ok += 1,
                    Err(s) => {
                        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
                        assert!(!s.message().is_empty());
                        rejected += 1;
                    }
                }
            }
        }
        assert!(ok > 10 && rejected > 10, "ok {ok}, rejected {rejected}");
        let mut c = c.clone();
        assert_eq!(
            c.generate(greedy("ROMEO:\n", 3))
                .await
                .unwrap()
                .into_inner()
                .token_ids
                .len(),
            3
        );
    });
}

#[test]
fn after_sigterm_health_says_not_serving_while_requests_are_still_admitted_for_the_drain_delay() {
    // Kubernetes takes a terminating pod out of its Services as it sends SIGTERM, and
    // proxies learn of it seconds later: until then a new request must still be served.
    let mut server = start(&["--drain-delay", "3", "--shutdown-grace", "30"]);
    let pid = server.child.id().to_string();
    rt().block_on(async {
        let mut c = server.client().await;
        let mut health = tonic_health::pb::health_client::HealthClient::new(
            tonic::transport::Channel::from_shared(format!("http://{}", server.grpc))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
        let status = |h: tonic_health::pb::HealthCheckResponse| h.status;
        let check = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        assert_eq!(status(health.check(check.clone()).await.unwrap().into_inner()), serving);
        let sent = Instant::now();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        // Health flips at once (the readiness probe and load balancers read it) ...
        let mut flipped = false;
        while !flipped && sent.elapsed() < Duration::from_secs(2) {
            flipped = status(health.check(check.clone()).await.unwrap().into_inner()) != serving;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(flipped, "health still SERVING 2 s after SIGTERM");
        // So does the HTTP API's, which load balancers in front of it probe.
        let http_health = server.http("GET", "/health", &[], "");
        assert_eq!((http_health.status, http_health.body.as_str()), (503, "draining"));
        // ... while a request arriving meanwhile is still served, whole.
        let r = c.generate(greedy("ROMEO:\n", 5)).await.unwrap().into_inner();
        assert_eq!(r.token_ids.len(), 5);
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "the check came too late to mean anything"
        );
        // Once the delay is over, new requests are refused (the server drains, then exits).
        while sent.elapsed() < Duration::from_millis(3500) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let late = c.generate(greedy("ROMEO:\n", 5)).await;
        assert!(late.is_err(), "a request after the drain delay was admitted");
    });
    let status = common::wait_with_deadline(
        &mut server.child,
        Duration::from_secs(10),
        "server did not exit after the drain delay",
    );
    assert!(status.success(), "{status}: {}", server.stderr.lock().unwrap());
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let mut server = start(&["--shutdown-grace", "30", "--drain-delay", "0.5"]);
    let pid = server.child.id().to_string();
    sigterm_mid_stream_then_drained(&mut server, &[&pid]);
}

/// Sends SIGTERM to `pids` once a 200-token stream has started: the stream must still end
/// whole, and the server exit 0.
fn sigterm_mid_stream_then_drained(server: &mut Server, pids: &[&str]) {
    rt().block_on(async {
        let mut c = server.client().await;
        let mut s = c.generate_stream(greedy("ROMEO:\n", 200)).await.unwrap().into_inner();
        s.message().await.unwrap().unwrap();
        std::process::Command::new("kill")
            .arg("-TERM")
            .args(pids)
            .status()
            .unwrap();
        let mut n = 1;
        let mut fin = None;
        while let Some(m) = s.message().await.unwrap() {
            n += m.token.is_some() as usize;
            fin = fin.or(m.finish_reason);
        }
        assert_eq!(
            (n, fin),
            (200, Some(pb::FinishReason::Length as i32)),
            "in-flight stream cut short"
        );
    });
    let status = common::wait_with_deadline(
        &mut server.child,
        Duration::from_secs(10),
        "server did not exit after draining",
    );
    assert!(status.success(), "{status}: {}", server.stderr.lock().unwrap());
}

#[test]
fn sigterm_to_every_rank_at_once_still_drains_a_tp2_group() {
    // As Ctrl-C in a terminal, or systemd stopping the unit: leader and follower get SIGTERM
    // together. The follower must stay for the leader's drain, then leave with it.
    let mut server = start(&["--tp", "2", "--shutdown-grace", "30", "--drain-delay", "0.5"]);
    let follower = {
        let log = server.stderr.lock().unwrap();
        let line = log
            .lines()
            .find_map(|l| l.trim().strip_prefix("neox-worker: follower rank 1 pid "));
        line.expect("the launcher names its follower's pid").trim().to_owned()
    };
    let leader = server.child.id().to_string();
    sigterm_mid_stream_then_drained(&mut server, &[&follower, &leader]);
    let t0 = Instant::now();
    while std::path::Path::new(&format!("/proc/{follower}")).exists()
        && !std::fs::read_to_string(format!("/proc/{follower}/stat")).is_ok_and(|st| st.contains(") Z "))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "follower {follower} left running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tp2_server_matches_hf_and_a_dead_rank_takes_the_group_down() {
    let mut server = start(&["--tp", "2", "--collective-timeout", "3"]);
    let gold: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::shakespeare_dir().join("golden.json")).unwrap()).unwrap();
    let p = &gold["prompts"][0];
    let want: Vec<u32> = serde_json::from_value(p["output_ids"].clone()).unwrap();
    rt().block_on(async {
        let mut c = server.client().await;
        let r = c
            .generate(greedy(p["prompt"].as_str().unwrap(), want.len() as u32))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.token_ids, want);
        let info = c.model_info(pb::ModelInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.tensor_parallel_size, 2);
    });
    let log = server.stderr.lock().unwrap().clone();
    let pid = log
        .lines()
        .find_map(|l| l.strip_prefix("neox-worker: follower rank 1 pid "))
        .unwrap()
        .trim()
        .to_owned();
    std::process::Command::new("kill").args(["-9", &pid]).status().unwrap();
    // Idle heartbeats notice the lost rank; the leader leaves with a failure.
    let status = common::wait_with_deadline(
        &mut server.child,
        Duration::from_secs(10),
        "leader kept running without its follower",
    );
    assert!(!status.success());
    assert!(
        server.stderr.lock().unwrap().contains("group failed"),
        "{}",
        server.stderr.lock().unwrap()
    );
}

#[test]
fn the_neox_cli_talks_to_the_server() {
    let server = start(&[]);
    let addr = format!("http://{}", server.grpc);
    let neox = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_neox"))
            .arg("--addr")
            .arg(&addr)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "neox {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(neox(&["health"]).trim(), "SERVING");
    assert!(neox(&["info"]).contains("builtin:shakespeare"));
    let gold: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::shakespeare_dir().join("golden.json")).unwrap()).unwrap();
    let p = &gold["prompts"][0];
    let prompt = p["prompt"].as_str().unwrap();
    let text = neox(&["generate", prompt, "--max-new-tokens", "40", "--ignore-eos"]);
    assert_eq!(text.trim_end_matches('\n'), p["full_text"].as_str().unwrap());
    let streamed = neox(&["generate", prompt, "--max-new-tokens", "40", "--ignore-eos", "--stream"]);
    assert_eq!(streamed, p["full_text"].as_str().unwrap());
    let v: serde_json::Value = serde_json::from_str(&neox(&["tokenize", prompt])).unwrap();
    assert_eq!(v["ids"], p["input_ids"]);
    let b: serde_json::Value = serde_json::from_str(&neox(&[
        "bench",
        "--concurrency",
        "4",
        "--requests",
        "8",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        (
            b["requests"].as_u64(),
            b["errors"].as_u64(),
            b["generated_tokens"].as_u64()
        ),
        (Some(8), Some(0), Some(64))
    );
    assert!(b["tokens_per_second"].as_f64().unwrap() > 0.0);
    // Prompts that share a long beginning: the bench reports how much came from the cache.
    let long = "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind";
    let b: serde_json::Value = serde_json::from_str(&neox(&[
        "bench",
        "--prompt",
        long,
        "--distinct",
        "--concurrency",
        "1",
        "--requests",
        "4",
        "--max-new-tokens",
        "2",
        "--json",
    ]))
    .unwrap();
    let (prompt, cached) = (
        b["prompt_tokens"].as_u64().unwrap(),
        b["cached_prompt_tokens"].as_u64().unwrap(),
    );
    assert!(prompt >= 4 * 20, "{b}");
    // The first request computes it all; the later three reuse the shared beginning.
    assert!(cached >= 3 * 16 && cached < prompt, "{b}");
    // A stopped server is a clear error, not a panic.
    drop(server);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_neox"))
        .args(["--addr", &addr, "health"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("error"));
}
