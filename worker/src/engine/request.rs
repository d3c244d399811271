//! What a client asks the engine for, and what the engine sends back.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::sampling::SamplingParams;

/// When a sequence stops.
#[derive(Debug, Clone, Default)]
pub struct StopCriteria {
    pub max_new_tokens: usize,
    /// Text that ends generation; matched across token boundaries, never included.
    pub stop_sequences: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// `None` when the client asked to ignore EOS.
    pub eos_token_id: Option<u32>,
}

/// A validated generation request.
#[derive(Debug)]
pub struct Request {
    /// The caller's (or a made-up) id, for logs.
    pub id: String,
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopCriteria,
    pub logprobs: bool,
    pub prompt_logprobs: bool,
    pub deadline: Option<Instant>,
    pub received: Instant,
    pub events: UnboundedSender<Event>,
    /// Counts in the per-request metrics (requests, prompt tokens, time to first token,
    /// duration). False for an OpenAI request's second and later choices of a prompt: they
    /// share the first's prompt and are one request to the client, as vLLM counts them.
    pub counted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    EosToken,
    StopSequence,
    StopToken,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::EosToken => "eos_token",
            FinishReason::StopSequence => "stop_sequence",
            FinishReason::StopToken => "stop_token",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub id: u32,
    /// The token as the tokenizer spells it.
    pub text: String,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, String, f32)>,
}

#[derive(Debug, Clone)]
pub struct Finish {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV was copied from the prefix cache.
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    pub queue_secs: f64,
    pub ttft_secs: f64,
    pub total_secs: f64,
}

/// Why a request ended without finishing; its message is the one every API shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("the request's deadline passed before it finished")]
    DeadlineExceeded,
    /// The group can no longer run steps (a rank died, a collective timed out).
    #[error("worker group unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// What every API answers when a request's events end without a last word.
pub const ENGINE_STOPPED: &str = "the engine stopped before the request finished";

#[derive(Debug, Clone)]
pub enum Event {
    /// Once, before any token, when prompt logprobs were asked for.
    PromptTokens(Vec<TokenInfo>),
    /// One generated token and the text it releases (whole UTF-8 characters only; text a
    /// stop sequence may start with is held back until it cannot).
    Token {
        token: TokenInfo,
        delta: String,
        /// Characters of the generated text before this token's own, held-back text counted.
        offset: usize,
    },
    Finished(Finish),
    Failed(Failure),
}
