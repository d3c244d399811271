//! The OpenAI-compatible HTTP API over real sockets: HF goldens unary, streamed, batched and
//! from token ids; prompt scoring equal to the gRPC API's prompt logprobs; seeded samples
//! equal to gRPC's; errors that name the parameter; a client that leaves mid-stream.

mod common;
mod serving;

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use neox_proto::neox::v1 as pb;
use serde_json::{json, Value};
use serving::{rt, Server};

const MODEL: &str = "builtin:shakespeare";

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(common::shakespeare_dir().join("golden.json")).unwrap()).unwrap()
}

fn server() -> Server {
    serving::start(&["--max-prompt-bytes", "4096"])
}

fn complete(s: &Server, body: Value) -> Value {
    let r = s.http("POST", "/v1/completions", &[], &body.to_string());
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.json()
}

/// A JSON array of non-negative integers (token ids, offsets).
fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn greedy(prompt: Value, max_tokens: u64) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

#[test]
fn greedy_completions_equal_hf_goldens_whole_streamed_batched_and_from_ids() {
    let s = server();
    let gold = golden();
    let prompts = gold["prompts"].as_array().unwrap();
    for p in prompts {
        let want = p["output_text"].as_str().unwrap();
        let c = complete(&s, greedy(p["prompt"].clone(), 40));
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["model"], MODEL);
        assert_eq!(c["choices"][0]["text"], want);
        assert_eq!(c["choices"][0]["finish_reason"], "length");
        let prompt_len = p["input_ids"].as_array().unwrap().len();
        let usage = &c["usage"];
        assert_eq!(usage["prompt_tokens"], prompt_len);
        assert_eq!(usage["completion_tokens"], 40);
        assert_eq!(usage["total_tokens"], prompt_len + 40);
        // The same from token ids.
        let c = complete(&s, greedy(p["input_ids"].clone(), 40));
        assert_eq!(c["choices"][0]["text"], want);

        // Streamed: text pieces, a chunk with the finish reason, usage, then [DONE].
        let mut body = greedy(p["prompt"].clone(), 40);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let r = s.http(
            "POST",
            "/v1/completions",
            &[("x-request-id", "stream-1")],
            &body.to_string(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        assert_eq!(r.header("x-request-id"), Some("stream-1"));
        let data = r.sse_data();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let (usage, chunks) = chunks.split_last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 40);
        assert!(chunks.iter().all(|c| c["id"] == "cmpl-stream-1"));
        // As OpenAI does: the chunks before the usage chunk carry `usage: null`.
        assert!(
            chunks.iter().all(|c| c.get("usage") == Some(&Value::Null)),
            "{chunks:?}"
        );
        let text: String = chunks
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, want);
        let finishes: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).collect();
        assert_eq!(finishes.last().unwrap().as_str(), Some("length"));
        assert!(finishes[..finishes.len() - 1].iter().all(|f| f.is_null()));
    }
    // Every golden prompt in one request: one choice each, in order, prompt tokens counted once.
    let batch: Vec<Value> = prompts.iter().map(|p| p["prompt"].clone()).collect();
    let c = complete(&s, greedy(json!(batch), 40));
    let choices = c["choices"].as_array().unwrap();
    assert_eq!(choices.len(), prompts.len());
    for (i, (choice, p)) in choices.iter().zip(prompts).enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["text"], p["output_text"]);
    }
    let prompt_tokens: usize = prompts.iter().map(|p| p["input_ids"].as_array().unwrap().len()).sum();
    assert_eq!(c["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(c["usage"]["completion_tokens"], 40 * prompts.len());
}

#[test]
fn usage_counts_the_prompt_tokens_that_came_from_the_prefix_cache() {
    let s = server();
    let prompt = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer";
    let first = complete(&s, greedy(json!(prompt), 4));
    let len = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(len > 16, "the prompt is {len} tokens, too short to be cached");
    assert_eq!(first["usage"]["prompt_tokens_details"], json!({"cached_tokens": 0}));
    // The same prompt again starts from the cache: all of it but what the first new token needs
    // computed (whole blocks, by the layout).
    let again = complete(&s, greedy(json!(prompt), 4));
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= 16 && cached < len,
        "{cached} of {len} prompt tokens from the cache"
    );
    assert_eq!(again["choices"][0]["text"], first["choices"][0]["text"]);
}

#[test]
fn stop_sequences_end_the_text_before_them() {
    let s = server();
    let gold = golden();
    let p = &gold["prompts"][0];
    let want = p["output_text"].as_str().unwrap();
    let mut body = greedy(p["prompt"].clone(), 40);
    body["stop"] = json!(["\n\n", "never"]);
    let c = complete(&s, body);
    assert_eq!(c["choices"][0]["text"], want.split("\n\n").next().unwrap());
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
}

#[test]
fn text_held_back_for_a_stop_sequence_is_released_when_a_stop_token_ends_the_choice() {
    let s = server();
    let gold = golden();
    let p = &gold["prompts"][0];
    // The first full stop ends the choice, as a stop token.
    let want = p["output_text"].as_str().unwrap().split('.').next().unwrap();
    let r = s.http(
        "POST",
        "/tokenize",
        &[],
        &json!({"model": MODEL, "prompt": "."}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let full_stop = u64s(&r.json()["tokens"]);
    assert_eq!(full_stop.len(), 1);
    // A stop sequence that never matches but that the text's last word could begin: that word
    // is held back until it is known not to start it, and must still reach the client.
    let last_word = want.rsplit(' ').next().unwrap();
    let never = format!(" {last_word}!");
    assert!(!want.contains(&never));
    for stop in [json!([]), json!([never])] {
        let mut body = greedy(p["prompt"].clone(), 40);
        body["stop_token_ids"] = json!(full_stop);
        body["stop"] = stop.clone();
        body["logprobs"] = json!(0);
        let c = complete(&s, body);
        assert_eq!(c["choices"][0]["text"], want, "stop {stop}");
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
        // Each token's offset is where its text is, held back or not; the stop token's own
        // text is not in the choice, so its offset is the text's end.
        let lp = &c["choices"][0]["logprobs"];
        let offsets = u64s(&lp["text_offset"]);
        let (stop_at, generated) = offsets.split_last().unwrap();
        assert_eq!(*stop_at as usize, want.chars().count(), "stop {stop}");
        assert_tokens_at_offsets(want, lp, generated, &format!("stop {stop}"));
    }
}

/// Each of the first `offsets.len()` tokens of `lp` is found in `text` at its offset (in
/// characters).
fn assert_tokens_at_offsets(text: &str, lp: &Value, offsets: &[u64], what: &str) {
    let chars: Vec<char> = text.chars().collect();
    for (j, &o) in offsets.iter().enumerate() {
        let token = lp["tokens"][j].as_str().unwrap();
        let at: String = chars[o as usize..].iter().take(token.chars().count()).collect();
        assert_eq!(at, token, "{what}: token {j} at offset {o}");
    }
}

#[test]
fn scoring_a_prompt_gives_the_grpc_apis_prompt_logprobs() {
    let s = server();
    let prompt = "ROMEO:\nWhat light through yonder window breaks?";
    let c = complete(
        &s,
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 2}),
    );
    let choice = &c["choices"][0];
    assert_eq!(choice["text"], prompt);
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(c["usage"]["completion_tokens"], 0);
    let lp = &choice["logprobs"];
    let got: Vec<Option<f64>> = lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(Value::as_f64)
        .collect();

    let want = rt().block_on(async {
        let mut client = s.client().await;
        let req = pb::GenerateRequest {
            prompt: prompt.into(),
            parameters: Some(pb::GenerationParameters {
                max_new_tokens: 1,
                prompt_logprobs: true,
                top_n_tokens: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        client.generate(req).await.unwrap().into_inner().prompt_tokens
    });
    assert_eq!(got.len(), want.len());
    assert_eq!(c["usage"]["prompt_tokens"], want.len());
    assert_eq!(got[0], None, "the first token has no context");
    let mut greedy = 0;
    for (j, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(lp["tokens"][j], w.text.as_str());
        if j > 0 {
            assert!((g.unwrap() - w.logprob.unwrap() as f64).abs() < 1e-6, "token {j}");
            // The top 2 alternatives and the token itself, each at its own log-probability.
            let top = lp["top_logprobs"][j].as_object().unwrap();
            assert_eq!(w.top_tokens.len(), 2);
            let among = w.top_tokens.iter().any(|t| t.id == w.id);
            assert_eq!(top.len(), if among { 2 } else { 3 }, "token {j}: {top:?}");
            for t in &w.top_tokens {
                assert!((top[&t.text].as_f64().unwrap() - t.logprob as f64).abs() < 1e-6);
            }
            if among {
                // Exactly its own entry among the alternatives: lm-eval's is_greedy tests
                // `logprob == max(top_logprobs)` with ==, as do greedy-match metrics.
                greedy += 1;
                let own = w.top_tokens.iter().find(|t| t.id == w.id).unwrap();
                assert_eq!(own.logprob, w.logprob.unwrap(), "gRPC token {j}");
                let best = top.values().filter_map(Value::as_f64).fold(f64::MIN, f64::max);
                assert_eq!(g.unwrap(), top[&w.text].as_f64().unwrap(), "OpenAI token {j}");
                if w.top_tokens[0].id == w.id {
                    assert_eq!(g.unwrap(), best, "OpenAI token {j}: greedy, yet not the best");
                }
            }
        }
    }
    assert!(
        greedy > 0,
        "no prompt token was among its top 2: the check above never ran"
    );
    // Generated tokens likewise: greedy ones are exactly the best of their alternatives.
    let generated = complete(
        &s,
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3}),
    );
    let glp = &generated["choices"][0]["logprobs"];
    for (j, g) in glp["token_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = glp["top_logprobs"][j].as_object().unwrap();
        let best = top.values().filter_map(Value::as_f64).fold(f64::MIN, f64::max);
        assert_eq!(g.as_f64(), Some(best), "generated token {j}: {top:?}");
    }
    // Offsets point into the returned text.
    assert_tokens_at_offsets(prompt, lp, &u64s(&lp["text_offset"]), "scored prompt");
}

#[test]
fn several_choices_share_one_scoring_of_their_echoed_prompt() {
    let s = server();
    let prompt = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.";
    let body = |n: u64, stream: bool| {
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 6, "echo": true, "logprobs": 2, "n": n,
               "temperature": 1.0, "seed": 3, "stream": stream})
    };
    let one = complete(&s, body(1, false));
    let lp1 = &one["choices"][0]["logprobs"];
    let prompt_len = one["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let hits = s.metric("neox_prefix_cache_hits_total");
    let three = complete(&s, body(3, false));
    assert_eq!(three["usage"]["prompt_tokens"], prompt_len, "the prompt counted once");
    assert_eq!(three["choices"].as_array().unwrap().len(), 3);
    // Every choice carries the prompt's log-probabilities as one request scores them.
    for (i, c) in three["choices"].as_array().unwrap().iter().enumerate() {
        let text = c["text"].as_str().unwrap();
        assert!(text.starts_with(prompt), "choice {i}: {text:?}");
        let lp = &c["logprobs"];
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let got = &lp[key].as_array().unwrap()[..prompt_len];
            assert_eq!(got, &lp1[key].as_array().unwrap()[..prompt_len], "choice {i}: {key}");
        }
        assert_eq!(lp["tokens"].as_array().unwrap().len(), prompt_len + 6, "choice {i}");
    }
    // Seeds: choice 0 is the single request's sample.
    assert_eq!(three["choices"][0]["text"], one["choices"][0]["text"]);
    // Choices after the first started from its KV (all but the last prompt token each)
    // instead of scoring the prompt again.
    let copied = s.metric("neox_prefix_cache_hits_total") - hits;
    assert!(
        copied >= 2.0 * (prompt_len as f64 - 1.0),
        "{copied} prompt tokens copied for 2 choices of a {prompt_len}-token prompt"
    );
    // Streamed: each choice's first chunk is its echoed prompt with its log-probabilities.
    let r = s.http("POST", "/v1/completions", &[], &body(3, true).to_string());
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let mut texts = vec![String::new(); 3];
    let mut tokens = [0; 3];
    for d in &data[..data.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        let piece = choice["text"].as_str().unwrap();
        if texts[i].is_empty() {
            assert_eq!(piece, prompt, "choice {i}'s first chunk");
            assert_eq!(
                choice["logprobs"]["token_logprobs"],
                json!(lp1["token_logprobs"].as_array().unwrap()[..prompt_len])
            );
        }
        texts[i].push_str(piece);
        tokens[i] += choice["logprobs"]["tokens"].as_array().map_or(0, Vec::len);
    }
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(three["choices"][i]["text"], text.as_str(), "streamed choice {i}");
        assert_eq!(tokens[i], prompt_len + 6, "streamed choice {i}");
    }
}

#[test]
fn several_choices_stream_each_with_its_own_index_and_finish_and_count_each_prompt_once() {
    let s = server();
    let gold = golden();
    let prompts: Vec<Value> = gold["prompts"].as_array().unwrap()[..2].to_vec();
    let body = json!({"model": MODEL, "prompt": [prompts[0]["prompt"], prompts[1]["prompt"]], "n": 2,
                      "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let whole = complete(&s, body.clone());
    let prompt_tokens: usize = prompts.iter().map(|p| p["input_ids"].as_array().unwrap().len()).sum();
    // The metrics count as usage does: a request per prompt, each prompt once, every token.
    s.wait_kv_freed();
    let ended = "neox_requests_total{finish_reason=\"length\"}";
    assert_eq!(s.metric(ended), 2.0, "one request per prompt, not per choice");
    assert_eq!(s.metric("neox_prompt_tokens_total"), prompt_tokens as f64);
    assert_eq!(s.metric("neox_generation_tokens_total"), 48.0);
    assert_eq!(s.metric("neox_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(s.metric("neox_request_duration_seconds_count"), 2.0);
    let usage = &whole["usage"];
    assert_eq!(
        (
            &usage["prompt_tokens"],
            &usage["completion_tokens"],
            &usage["total_tokens"]
        ),
        (&json!(prompt_tokens), &json!(48), &json!(prompt_tokens + 48)),
        "each prompt counted once, each choice's tokens"
    );
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let r = s.http("POST", "/v1/completions", &[], &streamed.to_string());
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let mut texts = vec![String::new(); 4];
    let mut finishes = vec![0; 4];
    for d in &data[..data.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        let choices = c["choices"].as_array().unwrap();
        assert_eq!(
            choices.len(),
            1,
            "one choice per chunk, and no usage chunk unless asked: {d}"
        );
        assert!(c.get("usage").is_none(), "{d}");
        let i = choices[0]["index"].as_u64().unwrap() as usize;
        assert_eq!(finishes[i], 0, "choice {i} went on after its finish");
        texts[i].push_str(choices[0]["text"].as_str().unwrap());
        if !choices[0]["finish_reason"].is_null() {
            finishes[i] += 1;
        }
    }
    assert_eq!(finishes, [1, 1, 1, 1]);
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(whole["choices"][i]["text"], text.as_str(), "choice {i}");
        let golden = prompts[i / 2]["output_text"].as_str().unwrap();
        assert!(
            golden.starts_with(text.as_str()),
            "choice {i}: greedy, so the golden text"
        );
    }
}

#[test]
fn seeded_samples_repeat_and_choice_0_equals_the_grpc_apis() {
    let s = server();
    let body = json!({"model": MODEL, "prompt": "JULIET:\n", "max_tokens": 24, "n": 3, "seed": 11,
                      "temperature": 0.9, "top_p": 0.95, "ignore_eos": true});
    let a = complete(&s, body.clone());
    let b = complete(&s, body);
    assert_eq!(a["choices"], b["choices"], "seeded requests repeat");
    let texts: Vec<&str> = a["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 3);
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "n samples share a seed: {texts:?}"
    );
    // Choice 0 uses the seed itself, as the gRPC API does.
    rt().block_on(async {
        let mut client = s.client().await;
        let req = pb::GenerateRequest {
            prompt: "JULIET:\n".into(),
            parameters: Some(pb::GenerationParameters {
                max_new_tokens: 24,
                temperature: Some(0.9),
                top_p: Some(0.95),
                seed: Some(11),
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(client.generate(req).await.unwrap().into_inner().text, texts[0]);
    });
}

#[test]
fn bad_requests_get_openai_errors_naming_the_parameter_and_lose_nothing() {
    let s = server();
    let base = json!({"model": MODEL, "prompt": "ROMEO:", "max_tokens": 4});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b.to_string()
    };
    let cases: Vec<(String, u16, Option<&str>)> = vec![
        (with("temperature", json!(-1)), 400, Some("temperature")),
        (with("top_p", json!(1.5)), 400, Some("top_p")),
        (with("max_tokens", json!(100_000)), 400, Some("max_tokens")),
        (with("logprobs", json!(9)), 400, Some("logprobs")),
        (with("stop", json!(vec!["x"; 9])), 400, Some("stop")),
        (with("stop_token_ids", json!([99_999])), 400, Some("stop_token_ids")),
        (with("prompt", json!([[1, 99_999]])), 400, Some("prompt")),
        (with("prompt", json!("x".repeat(5000))), 400, Some("prompt")),
        (with("n", json!(0)), 400, Some("n")),
        (with("max_token", json!(4)), 400, Some("max_token")),
        (with("temperature", json!("hot")), 400, Some("temperature")),
        (with("model", json!("gpt-4")), 404, Some("model")),
        (with("logit_bias", json!({"1": 101})), 400, Some("logit_bias")),
        (with("logit_bias", json!({"99999": 1})), 400, Some("logit_bias")),
        (with("logit_bias", json!({"one": 1})), 400, Some("logit_bias")),
        ("not json".into(), 400, None),
        ("{\"model\": ".into(), 400, Some("model")),
        (
            format!("{{\"model\": \"{MODEL}\", \"prompt\": \"{}\"}}", "y".repeat(300_000)),
            413,
            None,
        ),
    ];
    for (body, status, param) in cases {
        let r = s.http("POST", "/v1/completions", &[("x-request-id", "bad-1")], &body);
        let shown = &body[..body.len().min(80)];
        assert_eq!(r.status, status, "{shown}: {}", r.body);
        assert_eq!(r.header("x-request-id"), Some("bad-1"));
        let e = &r.json()["error"];
        assert_eq!(e["param"].as_str(), param, "{shown}: {e}");
        let message = e["message"].as_str().unwrap();
        assert!(!message.is_empty());
        if let Some(p) = param {
            assert!(message.contains(p), "{shown}: {message}");
        }
    }
    let r = s.http("POST", "/v1/chat/completions", &[], &base.to_string());
    assert_eq!(r.status, 404);
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    // It lists every route the server has.
    for route in ["/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health"] {
        assert!(message.contains(route), "{route} missing from: {message}");
    }
    let r = s.http("GET", "/v1/completions", &[], "");
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("GET"));
    // Nothing was lost: the server still answers.
    let models = s.http("GET", "/v1/models", &[], "").json();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["max_model_len"], 512);
    let one = s.http("GET", &format!("/v1/models/{MODEL}"), &[], "");
    assert_eq!(one.status, 200);
    assert_eq!(
        (&one.json()["id"], &one.json()["max_model_len"]),
        (&json!(MODEL), &json!(512))
    );
    let other = s.http("GET", "/v1/models/EleutherAI/gpt-neox-20b", &[], "");
    assert_eq!(other.status, 404);
    assert_eq!(other.json()["error"]["code"], "model_not_found");
    assert_eq!(s.http("GET", "/health", &[], "").status, 200);
    complete(&s, base);
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_kv() {
    let s = server();
    let body = json!({"model": MODEL, "prompt": "ROMEO:\n", "max_tokens": 500, "temperature": 0,
                      "ignore_eos": true, "stream": true})
    .to_string();
    let mut conn = std::net::TcpStream::connect(&s.http).unwrap();
    write!(
        conn,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended early");
    }
    assert!(s.metric("neox_kv_cache_usage_ratio") > 0.0);
    drop(reader);
    drop(conn);
    s.wait_metrics(Duration::from_secs(10), "the request retired", |s| {
        s.metric("neox_requests_running") == 0.0
    });
    s.wait_kv_freed();
    assert!(
        s.metric("neox_generation_tokens_total") < 500.0,
        "the request ran to its end"
    );
}

/// `neox bench` with `--api openai` and `--api grpc` on the same server: the same requests
/// count the same tokens, prompt tokens and prefix-cache hits through either API.
#[test]
fn neox_bench_loads_the_http_api_as_it_loads_grpc() {
    let s = server();
    let bench = |api: &str, addr: &str, extra: &[&str]| -> Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_neox"))
            .args(["--addr", addr, "bench", "--api", api, "--json", "--concurrency", "2"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let long = "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind";
    let args = [
        "--prompt",
        long,
        "--distinct",
        "--requests",
        "6",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
    ];
    let http = bench("openai", &format!("http://{}", s.http), &args);
    let grpc = bench("grpc", &format!("http://{}", s.grpc), &args);
    for b in [&http, &grpc] {
        assert_eq!(
            (&b["requests"], &b["errors"], &b["generated_tokens"]),
            (&json!(6), &json!(0), &json!(48)),
            "{b}"
        );
        assert!(b["ttft_ms"]["p50"].as_f64().unwrap() > 0.0, "{b}");
        assert!(b["tpot_ms"]["p50"].as_f64().unwrap() > 0.0, "{b}");
    }
    assert_eq!(http["api"], "OpenAI");
    assert_eq!(http["prompt_tokens"], grpc["prompt_tokens"]);
    // The HTTP run filled the cache with the shared beginning; both report what it saved.
    let cached = |b: &Value| b["cached_prompt_tokens"].as_u64().unwrap();
    assert!(cached(&http) >= 16 && cached(&grpc) >= cached(&http), "{http} {grpc}");
    // A request the server refuses is counted with the server's message, not a panic.
    let refused = bench(
        "openai",
        &format!("http://{}", s.http),
        &["--requests", "2", "--max-new-tokens", "100000"],
    );
    assert_eq!((&refused["requests"], &refused["errors"]), (&json!(0), &json!(2)));
    assert!(
        refused["first_error"].as_str().unwrap().contains("max_tokens"),
        "{refused}"
    );
}

/// vLLM's `/tokenize` and `/detokenize`: the HF tokenizer's ids for every golden prompt and
/// back, with errors that name the field.
#[test]
fn tokenize_and_detokenize_agree_with_the_hf_tokenizer() {
    let s = server();
    let post = |path: &str, body: Value| {
        let r = s.http("POST", path, &[], &body.to_string());
        (r.status, r.json())
    };
    for p in golden()["prompts"].as_array().unwrap() {
        let (status, t) = post("/tokenize", json!({"model": MODEL, "prompt": p["prompt"]}));
        assert_eq!(status, 200, "{t}");
        assert_eq!(t["tokens"], p["input_ids"]);
        assert_eq!(t["count"], p["input_ids"].as_array().unwrap().len());
        assert!(t["max_model_len"].as_u64().unwrap() > 0);
        assert!(t.get("token_strs").is_none());
        let (status, d) = post("/detokenize", json!({"tokens": p["input_ids"]}));
        assert_eq!(status, 200, "{d}");
        assert_eq!(d["prompt"], p["prompt"]);
    }
    // Token strings as the tokenizer spells them (byte-level BPE: a space is "Ġ").
    let (_, t) = post("/tokenize", json!({"prompt": "To be", "return_token_strs": true}));
    assert_eq!(t["token_strs"], json!(["To", "Ġbe"]));

    let refused = |path: &str, body: Value, status: u16, param: &str| {
        let (got, e) = post(path, body);
        assert_eq!(got, status, "{e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    };
    refused("/tokenize", json!({"prompt": "x".repeat(5000)}), 400, "prompt");
    refused("/tokenize", json!({"prompt": "x", "model": "gpt-4"}), 404, "model");
    refused("/tokenize", json!({"text": "x"}), 400, "text");
    refused("/detokenize", json!({"tokens": [1, 99999999]}), 400, "tokens");
    refused("/detokenize", json!({"tokens": [-1]}), 400, "tokens");
}

/// OpenAI's `logit_bias`: -100 bans a token, 100 forces one; logprobs stay the model's.
/// Through both APIs (the gRPC one takes it as a map of token ids).
#[test]
fn logit_bias_bans_and_forces_tokens() {
    let s = server();
    let gold = golden();
    let p = &gold["prompts"][0];
    let want = u64s(&p["output_ids"]);
    let first = want[0];
    let ids_of = |c: &Value| -> Vec<u64> {
        let text = format!(
            "{}{}",
            p["prompt"].as_str().unwrap(),
            c["choices"][0]["text"].as_str().unwrap()
        );
        let r = s.http("POST", "/tokenize", &[], &json!({"prompt": text}).to_string());
        let all = u64s(&r.json()["tokens"]);
        all[p["input_ids"].as_array().unwrap().len()..].to_vec()
    };
    // Banned: the golden first token never comes.
    let mut body = greedy(p["prompt"].clone(), 12);
    body["logit_bias"] = json!({ first.to_string(): -100 });
    let banned = complete(&s, body);
    let got = ids_of(&banned);
    assert!(!got.is_empty() && !got.contains(&first), "{got:?} still has {first}");
    // Forced: every token is the favoured one, and its logprob is the model's, not 0.
    let forced_id = want[3];
    let mut body = greedy(p["prompt"].clone(), 6);
    body["logit_bias"] = json!({ forced_id.to_string(): 100 });
    body["logprobs"] = json!(0);
    let forced = complete(&s, body);
    assert_eq!(ids_of(&forced), vec![forced_id; 6]);
    let lps = forced["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
    assert!(
        lps.iter().any(|l| l.as_f64().unwrap() < -0.5),
        "logprobs of the biased sampler: {lps:?}"
    );
    // The gRPC API: the same ban, the same text.
    let text = rt().block_on(async {
        let mut req = serving::greedy(p["prompt"].as_str().unwrap(), 12);
        req.parameters.as_mut().unwrap().logit_bias = [(first as u32, -100.0)].into();
        s.client().await.generate(req).await.unwrap().into_inner().text
    });
    assert_eq!(text, banned["choices"][0]["text"]);
}
