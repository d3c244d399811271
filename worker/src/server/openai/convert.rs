//! An OpenAI completions request as the gRPC API's requests (one per choice), so both APIs
//! share one validation; and the gRPC API's field names as OpenAI's in error messages.

use neox_proto::neox::v1 as pb;

use super::error::ApiError;
use super::schema::{CompletionRequest, OnePrompt};
use crate::server::validate::{Limits, MAX_LOGIT_BIAS};

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: u32 = 16;
/// Choices per prompt (`n`), at most.
pub const MAX_N: u32 = 16;
/// Prompts in one request, at most.
pub const MAX_PROMPTS: usize = 64;

/// What a completions request asks for: one gRPC request per prompt (validated once each),
/// run `n` times.
#[derive(Debug)]
pub struct Plan {
    pub prompts: Vec<pb::GenerateRequest>,
    pub n: usize,
    /// The prompt (as the model saw it, after truncation) comes before each completion.
    pub echo: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// Every chunk carries the usage so far (only with `include_usage`, as vLLM has it).
    pub continuous_usage: bool,
    pub logprobs: bool,
    /// `max_tokens: 0`: the prompt is only scored (with echo) and the one token the engine
    /// generates is dropped.
    pub score_only: bool,
}

impl Plan {
    pub fn choices(&self) -> usize {
        self.prompts.len() * self.n
    }
}

/// A 400 naming `param`, its message prefixed with it as every other error is.
fn bad(param: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(param, format!("{param}: {why}"))
}

/// The request's plan, or the first parameter OpenAI's API would reject (the ones the gRPC
/// API shares are checked by `validate` afterwards). Lists are counted before anything is
/// copied per prompt, and a request never asks for more choices than the engine can hold
/// (`max_choices`), so no request can make the server allocate much beyond its body.
pub fn plan(req: CompletionRequest, lim: &Limits, max_choices: usize) -> Result<Plan, ApiError> {
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(bad("suffix", "not supported (GPT-NeoX is not trained to fill in text)"));
    }
    // Keys are token ids as strings (JSON object keys); values are checked with the rest.
    let bias = req.logit_bias.unwrap_or_default();
    if bias.len() > MAX_LOGIT_BIAS {
        return Err(bad(
            "logit_bias",
            format!("{} entries given, at most {MAX_LOGIT_BIAS}", bias.len()),
        ));
    }
    let logit_bias = bias
        .into_iter()
        .map(|(k, v)| match k.trim().parse::<u32>() {
            Ok(id) => Ok((id, v)),
            Err(_) => Err(bad("logit_bias", format!("key {k:?} is not a token id"))),
        })
        .collect::<Result<_, _>>()?;
    let n = req.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(bad("n", format!("must be in [1, {MAX_N}], got {n}")));
    }
    if let Some(b) = req.best_of {
        if b != n {
            return Err(bad("best_of", "only best_of equal to n is supported"));
        }
    }
    let stream = req.stream.unwrap_or(false);
    if req.stream_options.is_some() && !stream {
        return Err(bad("stream_options", "only allowed when stream is true"));
    }
    let top_k = match req.top_k {
        None | Some(0) | Some(-1) => 0,
        Some(k) if k > 0 => k as u32,
        Some(k) => return Err(bad("top_k", format!("must be -1 (off) or positive, got {k}"))),
    };
    let stop = req.stop.map(|s| s.into_vec()).unwrap_or_default();
    let stop_token_ids = req.stop_token_ids.unwrap_or_default();
    for (param, given, most) in [
        ("stop", stop.len(), lim.max_stop_sequences),
        ("stop_token_ids", stop_token_ids.len(), lim.max_stop_token_ids),
    ] {
        if given > most {
            return Err(bad(param, format!("{given} given, at most {most}")));
        }
    }
    let prompts = req.prompt.into_list();
    if prompts.is_empty() {
        return Err(bad("prompt", "must not be empty"));
    }
    if prompts.len() > MAX_PROMPTS {
        return Err(bad(
            "prompt",
            format!("{} prompts given, at most {MAX_PROMPTS}", prompts.len()),
        ));
    }
    let choices = prompts.len() * n as usize;
    if choices > max_choices {
        // Blame what the client can lower to fit: `n` if it asks for several, else the prompts.
        return Err(bad(
            if n > 1 { "n" } else { "prompt" },
            format!(
                "{} prompts x n {n} = {choices} choices, more than this server holds at once ({max_choices})",
                prompts.len()
            ),
        ));
    }
    let score_only = req.max_tokens == Some(0);
    let echo = req.echo.unwrap_or(false);
    if score_only && !echo {
        return Err(bad(
            "max_tokens",
            "0 generates nothing; it is only allowed with echo (to score the prompt)",
        ));
    }
    let max_tokens = match req.max_tokens {
        None => DEFAULT_MAX_TOKENS.min(lim.max_new_tokens.max(1) as u32),
        Some(0) => 1,
        Some(m) => m,
    };
    // Temperature 0 is greedy whatever filters come with it, as OpenAI and vLLM take it (the
    // gRPC API refuses the mix as contradictory); so is top_p 0, which OpenAI accepts: it keeps
    // only the likeliest token.
    let greedy = req.temperature == Some(0.0) || req.top_p == Some(0.0);
    let parameters = pb::GenerationParameters {
        max_new_tokens: max_tokens,
        // OpenAI samples at temperature 1 unless told otherwise.
        temperature: Some(if greedy { 0.0 } else { req.temperature.unwrap_or(1.0) }),
        top_k: if greedy { 0 } else { top_k },
        top_p: req.top_p.filter(|_| !greedy),
        typical_p: req.typical_p.filter(|_| !greedy),
        repetition_penalty: req.repetition_penalty,
        frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
        presence_penalty: req.presence_penalty.unwrap_or(0.0),
        seed: req.seed.map(|s| s as u64),
        stop_sequences: stop,
        stop_token_ids,
        ignore_eos: req.ignore_eos.unwrap_or(false),
        logprobs: req.logprobs.is_some(),
        top_n_tokens: req.logprobs.unwrap_or(0),
        prompt_logprobs: echo && req.logprobs.is_some(),
        truncate: req.truncate_prompt_tokens.unwrap_or(0),
        logit_bias,
    };
    let prompts = prompts
        .into_iter()
        .map(|prompt| {
            let (text, ids) = match prompt {
                OnePrompt::Text(t) => (t, Vec::new()),
                OnePrompt::Ids(ids) => (String::new(), ids),
            };
            pb::GenerateRequest {
                prompt: text,
                prompt_ids: ids,
                parameters: Some(parameters.clone()),
                request_id: String::new(),
            }
        })
        .collect();
    Ok(Plan {
        prompts,
        n: n as usize,
        echo,
        stream,
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        continuous_usage: req
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage && o.continuous_usage_stats),
        logprobs: req.logprobs.is_some(),
        score_only,
    })
}

/// The seed of choice `j` of a request seeded `seed`: choice 0 has the seed itself (as the
/// gRPC API would use it), the others a splitmix64 mix of both, so the n samples of one seed
/// share nothing with those of a neighbouring seed.
pub fn choice_seed(seed: u64, j: usize) -> u64 {
    if j == 0 {
        return seed;
    }
    let mut z = seed.wrapping_add((j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A gRPC field path (`parameters.stop_sequences[1]`) as OpenAI names the parameter (`stop`)
/// and as the message shows it (`stop[1]`).
pub fn openai_field(field: &str) -> (String, String) {
    let f = field.strip_prefix("parameters.").unwrap_or(field);
    let (base, index) = match f.find('[') {
        Some(i) => f.split_at(i),
        None => (f, ""),
    };
    let name = match base {
        "max_new_tokens" => "max_tokens",
        "top_n_tokens" => "logprobs",
        "stop_sequences" => "stop",
        "truncate" => "truncate_prompt_tokens",
        "prompt_ids" => "prompt",
        other => other,
    };
    (name.to_owned(), format!("{name}{index}"))
}

/// A validation message with the gRPC API's names in its text replaced by OpenAI's.
pub fn openai_message(message: &str) -> String {
    message
        .replace("max_new_tokens", "max_tokens")
        .replace("set truncate", "set truncate_prompt_tokens")
        .replace("set prompt or prompt_ids", "set prompt")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_total_tokens: 512,
            max_new_tokens: 1024,
            default_max_new_tokens: 64,
            max_prompt_bytes: 4096,
            max_stop_sequences: 8,
            max_stop_sequence_chars: 256,
            max_stop_token_ids: 64,
            max_top_n_tokens: 5,
            vocab_size: 2048,
        }
    }

    fn plan_of(json: serde_json::Value) -> Result<Plan, ApiError> {
        plan(serde_json::from_value(json).unwrap(), &limits(), 160)
    }

    fn params(p: &Plan) -> pb::GenerationParameters {
        p.prompts[0].parameters.clone().unwrap()
    }

    #[test]
    fn every_prompt_shape_becomes_one_request_each() {
        let cases = [
            (serde_json::json!("ROMEO:"), 1),
            (serde_json::json!(["ROMEO:", "JULIET:"]), 2),
            (serde_json::json!([1, 2, 3]), 1),
            (serde_json::json!([[1, 2], [3]]), 2),
        ];
        for (prompt, prompts) in cases {
            let p = plan_of(serde_json::json!({"model": "m", "prompt": prompt, "n": 3})).unwrap();
            assert_eq!(p.prompts.len(), prompts);
            assert_eq!((p.n, p.choices()), (3, prompts * 3));
        }
        let ids = plan_of(serde_json::json!({"model": "m", "prompt": [[5, 6]]})).unwrap();
        assert_eq!(ids.prompts[0].prompt_ids, vec![5, 6]);
        assert!(ids.prompts[0].prompt.is_empty());
    }

    #[test]
    fn choice_seeds_are_the_seed_then_mixed() {
        assert_eq!(choice_seed(11, 0), 11);
        let seeds: std::collections::HashSet<u64> = (0..4u64)
            .flat_map(|s| (0..16).map(move |j| choice_seed(10 + s, j)))
            .collect();
        assert_eq!(
            seeds.len(),
            64,
            "no two (seed, choice) pairs of neighbouring seeds share a seed"
        );
    }

    #[test]
    fn openai_defaults_apply() {
        let p = plan_of(serde_json::json!({"model": "m", "prompt": "x"})).unwrap();
        let g = params(&p);
        assert_eq!(g.max_new_tokens, 16);
        assert_eq!(g.temperature, Some(1.0), "OpenAI samples unless temperature is 0");
        assert_eq!(g.seed, None);
        assert!(!p.stream && !p.logprobs && !p.echo && p.n == 1);
        // A server capped below 16 tokens still answers a request that sets no max_tokens.
        let lim = Limits {
            max_new_tokens: 4,
            ..limits()
        };
        let capped = plan(
            serde_json::from_value(serde_json::json!({"model": "m", "prompt": "x"})).unwrap(),
            &lim,
            1,
        );
        assert_eq!(params(&capped.unwrap()).max_new_tokens, 4);
    }

    #[test]
    fn extensions_and_logprobs_map_to_the_grpc_parameters() {
        let p = plan_of(serde_json::json!({
            "model": "m", "prompt": "x", "max_tokens": 5, "temperature": 0.7, "top_k": 40, "top_p": 0.9,
            "typical_p": 0.8, "repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": -0.5,
            "stop": "\n", "stop_token_ids": [0], "ignore_eos": true, "logprobs": 2, "echo": true,
            "truncate_prompt_tokens": 8, "stream": true, "stream_options": {"include_usage": true}, "seed": 3,
            "logit_bias": {"7": 5.0, " 11": -100}
        }))
        .unwrap();
        assert_eq!(
            params(&p),
            pb::GenerationParameters {
                max_new_tokens: 5,
                temperature: Some(0.7),
                top_k: 40,
                top_p: Some(0.9),
                typical_p: Some(0.8),
                repetition_penalty: Some(1.2),
                frequency_penalty: 0.5,
                presence_penalty: -0.5,
                seed: Some(3),
                stop_sequences: vec!["\n".into()],
                stop_token_ids: vec![0],
                ignore_eos: true,
                logprobs: true,
                top_n_tokens: 2,
                prompt_logprobs: true,
                truncate: 8,
                logit_bias: [(7, 5.0), (11, -100.0)].into(),
            }
        );
        assert!(p.stream && p.include_usage && p.echo && p.logprobs);
        let off = plan_of(serde_json::json!({"model": "m", "prompt": "x", "top_k": -1})).unwrap();
        assert_eq!(params(&off).top_k, 0);
        // Temperature 0 is greedy: the filters that came with it are dropped.
        let greedy = plan_of(
            serde_json::json!({"model": "m", "prompt": "x", "temperature": 0, "top_k": 40,
                                                "top_p": 0.9, "typical_p": 0.8}),
        )
        .unwrap();
        let g = params(&greedy);
        assert_eq!(
            (g.temperature, g.top_k, g.top_p, g.typical_p),
            (Some(0.0), 0, None, None)
        );
        // So is top_p 0 (OpenAI accepts it; the gRPC API's top_p is in (0, 1]).
        let top_p_zero =
            plan_of(serde_json::json!({"model": "m", "prompt": "x", "temperature": 0.7, "top_p": 0})).unwrap();
        let g = params(&top_p_zero);
        assert_eq!((g.temperature, g.top_p), (Some(0.0), None));
        // A negative seed seeds as its 64 bits.
        let seeded = plan_of(serde_json::json!({"model": "m", "prompt": "x", "seed": -1})).unwrap();
        assert_eq!(params(&seeded).seed, Some(u64::MAX));
    }

    #[test]
    fn max_tokens_zero_scores_the_prompt_with_echo_only() {
        let p = plan_of(serde_json::json!({"model": "m", "prompt": "x", "max_tokens": 0, "echo": true, "logprobs": 0}))
            .unwrap();
        assert!(p.score_only);
        assert_eq!(params(&p).max_new_tokens, 1);
        let e = plan_of(serde_json::json!({"model": "m", "prompt": "x", "max_tokens": 0})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn what_is_not_supported_or_too_much_is_refused_by_name() {
        for (json, param) in [
            (serde_json::json!({"suffix": "end"}), "suffix"),
            (serde_json::json!({"logit_bias": {"fifty": -100}}), "logit_bias"),
            (serde_json::json!({"n": 0}), "n"),
            (serde_json::json!({"n": 17}), "n"),
            (serde_json::json!({"n": 2, "best_of": 3}), "best_of"),
            (
                serde_json::json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (serde_json::json!({"top_k": -2}), "top_k"),
            (serde_json::json!({"prompt": []}), "prompt"),
            (serde_json::json!({"prompt": vec!["a"; MAX_PROMPTS + 1]}), "prompt"),
            // More choices than the engine holds at once (160 here).
            (serde_json::json!({"prompt": vec!["a"; 11], "n": 16}), "n"),
            (serde_json::json!({"stop": vec!["a"; 9]}), "stop"),
            (serde_json::json!({"stop_token_ids": vec![1; 65]}), "stop_token_ids"),
        ] {
            let mut req = serde_json::json!({"model": "m", "prompt": "x"});
            for (k, v) in json.as_object().unwrap() {
                req[k] = v.clone();
            }
            let e = plan_of(req).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{json}");
            assert!(e.message.starts_with(param), "{}", e.message);
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
        // More prompts than a small engine holds, one choice each: the prompts are to blame.
        let many = serde_json::json!({"model": "m", "prompt": vec!["a"; 20]});
        let e = plan(serde_json::from_value(many).unwrap(), &limits(), 16).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"), "{}", e.message);
        // Empty suffix and logit_bias, and best_of == n, are what OpenAI's clients send by default.
        plan_of(serde_json::json!({"model": "m", "prompt": "x", "suffix": "", "logit_bias": {}, "n": 2, "best_of": 2}))
            .unwrap();
    }

    #[test]
    fn grpc_field_names_become_openai_parameters() {
        for (grpc, param, shown) in [
            ("parameters.max_new_tokens", "max_tokens", "max_tokens"),
            ("parameters.top_n_tokens", "logprobs", "logprobs"),
            ("parameters.stop_sequences[1]", "stop", "stop[1]"),
            ("parameters.stop_token_ids[0]", "stop_token_ids", "stop_token_ids[0]"),
            ("parameters.temperature", "temperature", "temperature"),
            (
                "parameters.truncate",
                "truncate_prompt_tokens",
                "truncate_prompt_tokens",
            ),
            ("prompt_ids[3]", "prompt", "prompt[3]"),
            ("prompt", "prompt", "prompt"),
        ] {
            assert_eq!(openai_field(grpc), (param.to_owned(), shown.to_owned()));
        }
        assert_eq!(
            openai_message("prompt (9 tokens) + max_new_tokens (8) exceeds the context; set truncate"),
            "prompt (9 tokens) + max_tokens (8) exceeds the context; set truncate_prompt_tokens"
        );
    }
}
