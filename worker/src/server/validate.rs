//! Turning a `neox.v1.GenerateRequest` into an engine request, or an INVALID_ARGUMENT whose
//! message names the field (TGI's rules as the baseline).

use std::time::Instant;

use neox_proto::neox::v1 as pb;
use tonic::Status;

use crate::engine::{SamplingParams, StopCriteria};
use crate::model::NeoXTokenizer;

/// Limits requests are checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Prompt + generated tokens, at most (≤ the model's context).
    pub max_total_tokens: usize,
    /// Cap on max_new_tokens, and the default when a request leaves it 0.
    pub max_new_tokens: usize,
    pub default_max_new_tokens: usize,
    pub max_prompt_bytes: usize,
    pub max_stop_sequences: usize,
    pub max_stop_sequence_chars: usize,
    pub max_stop_token_ids: usize,
    pub max_top_n_tokens: u32,
    /// Rows of the vocabulary a token id may name.
    pub vocab_size: usize,
}

/// Entries of a request's `logit_bias`, at most (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

/// A request that passed validation, before it is handed to the engine.
#[derive(Debug, Clone)]
pub struct Validated {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopCriteria,
    pub logprobs: bool,
    pub prompt_logprobs: bool,
}

/// A request field that fails validation: which one (as the gRPC API names it, e.g.
/// `parameters.top_p` or `stop_sequences[2]`) and why. Each API turns it into its own error.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl From<Invalid> for Status {
    fn from(e: Invalid) -> Status {
        Status::invalid_argument(format!("{}: {}", e.field, e.message))
    }
}

fn bad(field: &str, msg: impl std::fmt::Display) -> Invalid {
    Invalid {
        field: field.to_owned(),
        message: msg.to_string(),
    }
}

fn unit_interval(field: &str, v: Option<f32>) -> Result<f32, Invalid> {
    match v {
        None => Ok(1.0),
        Some(x) if x > 0.0 && x <= 1.0 => Ok(x),
        Some(x) => Err(bad(field, format!("must be in (0, 1], got {x}"))),
    }
}

/// A text prompt's token ids, refusing one over the byte limit (empty text gives none).
pub fn encode_prompt(text: &str, tok: &NeoXTokenizer, lim: &Limits) -> Result<Vec<u32>, Invalid> {
    if text.len() > lim.max_prompt_bytes {
        return Err(bad(
            "prompt",
            format!(
                "{} bytes exceeds the limit of {} bytes",
                text.len(),
                lim.max_prompt_bytes
            ),
        ));
    }
    tok.encode(text).map_err(|e| bad("prompt", e))
}

pub fn validate(req: &pb::GenerateRequest, tok: &NeoXTokenizer, lim: &Limits) -> Result<Validated, Invalid> {
    let mut ids = match (req.prompt.is_empty(), req.prompt_ids.is_empty()) {
        (true, true) => return Err(bad("prompt", "must not be empty (set prompt or prompt_ids)")),
        (false, false) => return Err(bad("prompt_ids", "set either prompt or prompt_ids, not both")),
        (false, true) => {
            let ids = encode_prompt(&req.prompt, tok, lim)?;
            if ids.is_empty() {
                return Err(bad("prompt", "encodes to no tokens"));
            }
            ids
        }
        (true, false) => {
            if let Some((i, id)) = req
                .prompt_ids
                .iter()
                .enumerate()
                .find(|(_, &id)| id as usize >= lim.vocab_size)
            {
                return Err(bad(
                    &format!("prompt_ids[{i}]"),
                    format!("token id {id} is outside the vocabulary of {}", lim.vocab_size),
                ));
            }
            req.prompt_ids.clone()
        }
    };
    let d = pb::GenerationParameters::default();
    let p = req.parameters.as_ref().unwrap_or(&d);
    if p.truncate > 0 && ids.len() > p.truncate as usize {
        ids.drain(..ids.len() - p.truncate as usize);
    }
    // The server default shrinks to the room the prompt leaves (as TGI's does): a prompt that
    // fits is never refused over a number the client did not choose.
    let max_new = if p.max_new_tokens == 0 {
        lim.default_max_new_tokens
            .min(lim.max_total_tokens.saturating_sub(ids.len()))
            .max(1)
    } else {
        p.max_new_tokens as usize
    };
    if max_new > lim.max_new_tokens {
        return Err(bad(
            "parameters.max_new_tokens",
            format!("{max_new} exceeds the limit of {}", lim.max_new_tokens),
        ));
    }
    if ids.len() + max_new > lim.max_total_tokens {
        // The prompt is to blame when it leaves no room at all, whatever max_new_tokens says.
        let field = if p.max_new_tokens == 0 || ids.len() >= lim.max_total_tokens {
            "prompt"
        } else {
            "parameters.max_new_tokens"
        };
        return Err(bad(
            field,
            format!(
                "prompt ({} tokens) + max_new_tokens ({max_new}) exceeds the context of {} tokens; shorten the prompt, lower max_new_tokens or set truncate",
                ids.len(),
                lim.max_total_tokens
            ),
        ));
    }
    let temperature = match p.temperature {
        Some(t) if !(t.is_finite() && t >= 0.0) => {
            return Err(bad("parameters.temperature", format!("must be >= 0, got {t}")))
        }
        Some(t) => Some(t),
        None => None,
    };
    let top_p = unit_interval("parameters.top_p", p.top_p)?;
    let typical_p = unit_interval("parameters.typical_p", p.typical_p)?;
    let repetition_penalty = match p.repetition_penalty {
        None => 1.0,
        // Bounded so a penalised logit stays finite (1e-39 would make it infinite, and the
        // samplers' softmax NaN).
        Some(r) if (0.01..=100.0).contains(&r) => r,
        Some(r) => {
            return Err(bad(
                "parameters.repetition_penalty",
                format!("must be in [0.01, 100], got {r}"),
            ))
        }
    };
    for (field, v) in [
        ("parameters.frequency_penalty", p.frequency_penalty),
        ("parameters.presence_penalty", p.presence_penalty),
    ] {
        if !(-2.0..=2.0).contains(&v) {
            return Err(bad(field, format!("must be in [-2, 2], got {v}")));
        }
    }
    if p.top_n_tokens > lim.max_top_n_tokens {
        return Err(bad(
            "parameters.top_n_tokens",
            format!("{} exceeds the limit of {}", p.top_n_tokens, lim.max_top_n_tokens),
        ));
    }
    if p.stop_sequences.len() > lim.max_stop_sequences {
        return Err(bad(
            "parameters.stop_sequences",
            format!("{} given, at most {}", p.stop_sequences.len(), lim.max_stop_sequences),
        ));
    }
    for (i, s) in p.stop_sequences.iter().enumerate() {
        if s.is_empty() || s.chars().count() > lim.max_stop_sequence_chars {
            return Err(bad(
                &format!("parameters.stop_sequences[{i}]"),
                format!("must have 1 to {} characters", lim.max_stop_sequence_chars),
            ));
        }
    }
    if p.stop_token_ids.len() > lim.max_stop_token_ids {
        return Err(bad(
            "parameters.stop_token_ids",
            format!("{} given, at most {}", p.stop_token_ids.len(), lim.max_stop_token_ids),
        ));
    }
    for (i, &id) in p.stop_token_ids.iter().enumerate() {
        if id as usize >= lim.vocab_size {
            return Err(bad(
                &format!("parameters.stop_token_ids[{i}]"),
                format!("unknown stop token id {id} (vocabulary of {})", lim.vocab_size),
            ));
        }
    }
    if p.logit_bias.len() > MAX_LOGIT_BIAS {
        return Err(bad(
            "parameters.logit_bias",
            format!("{} entries given, at most {MAX_LOGIT_BIAS}", p.logit_bias.len()),
        ));
    }
    let mut logit_bias = Vec::with_capacity(p.logit_bias.len());
    for (&id, &bias) in &p.logit_bias {
        let field = format!("parameters.logit_bias[{id}]");
        if id as usize >= lim.vocab_size {
            return Err(bad(
                &field,
                format!("unknown token id {id} (vocabulary of {})", lim.vocab_size),
            ));
        }
        if !(bias.is_finite() && (-100.0..=100.0).contains(&bias)) {
            return Err(bad(&field, format!("must be in [-100, 100], got {bias}")));
        }
        logit_bias.push((id, bias));
    }
    logit_bias.sort_unstable_by_key(|&(id, _)| id);
    // Sampling options without a temperature mean sampling at temperature 1 (as in TGI's do_sample).
    let samples = p.top_k > 0 || top_p < 1.0 || typical_p < 1.0;
    if temperature == Some(0.0) && samples {
        return Err(bad(
            "parameters.temperature",
            "0 means greedy decoding, which top_k, top_p and typical_p would not change; leave temperature unset \
             (sampling at 1) or set it above 0, or leave those options unset",
        ));
    }
    let temperature = temperature.unwrap_or(if samples { 1.0 } else { 0.0 });
    let seed = p.seed.unwrap_or_else(rand::random);
    Ok(Validated {
        prompt_ids: ids,
        sampling: SamplingParams {
            temperature,
            top_k: p.top_k as usize,
            top_p,
            typical_p,
            repetition_penalty,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            seed,
            top_n_tokens: p.top_n_tokens as usize,
            logit_bias: logit_bias.into(),
        },
        stop: StopCriteria {
            max_new_tokens: max_new,
            stop_sequences: p.stop_sequences.clone(),
            stop_token_ids: p.stop_token_ids.clone(),
            eos_token_id: if p.ignore_eos { None } else { tok.eos_token_id() },
        },
        logprobs: p.logprobs || p.top_n_tokens > 0,
        prompt_logprobs: p.prompt_logprobs,
    })
}

/// The client's deadline from the `grpc-timeout` header (e.g. `100m`, `5S`), if any.
pub fn deadline(meta: &tonic::metadata::MetadataMap, now: Instant) -> Option<Instant> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => std::time::Duration::from_secs(n.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    };
    // Finish a hair before tonic's own timer (which answers CANCELLED) so the client gets
    // DEADLINE_EXCEEDED from us.
    let margin = (d / 10).min(std::time::Duration::from_millis(10));
    now.checked_add(d - margin)
}

/// Longest request id accepted.
const MAX_REQUEST_ID: usize = 128;

/// The request's id: the `request_id` field (printable ASCII without spaces, at most 128
/// bytes, else invalid), else the `x-request-id` header when it is such an id (a proxy's
/// header is never a reason to fail a request), else a made-up one. So an id can never forge
/// or break a log line.
pub fn request_id(field: &str, header: Option<&str>) -> Result<String, Invalid> {
    if !field.is_empty() {
        if !valid_request_id(field) {
            return Err(bad(
                "request_id",
                format!("must be at most {MAX_REQUEST_ID} printable ASCII characters without spaces"),
            ));
        }
        return Ok(field.to_owned());
    }
    Ok(header_request_id(header))
}

/// The `x-request-id` header when it is a valid id (a proxy's header is never a reason to fail
/// a request), else a made-up one.
pub fn header_request_id(header: Option<&str>) -> String {
    match header {
        Some(h) if valid_request_id(h) => h.to_owned(),
        _ => format!("{:016x}", rand::random::<u64>()),
    }
}

fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_come_from_the_field_the_header_or_are_made_up() {
        assert_eq!(request_id("order-42/a", None).unwrap(), "order-42/a");
        let made_up = request_id("", None).unwrap();
        assert_eq!(made_up.len(), 16);
        assert_ne!(made_up, request_id("", None).unwrap());
        let header = Some("from-header");
        assert_eq!(request_id("", header).unwrap(), "from-header");
        assert_eq!(request_id("field-wins", header).unwrap(), "field-wins");
        for bad in ["a b", "line\nbreak", "ünï", &"x".repeat(129)] {
            let e = Status::from(request_id(bad, header).unwrap_err());
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with("request_id: "), "{}", e.message());
        }
        // A header that is no valid id is ignored, not a failure.
        assert_eq!(request_id("", Some("has space")).unwrap().len(), 16);
    }
}
