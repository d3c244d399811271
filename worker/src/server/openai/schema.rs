//! The JSON of OpenAI's legacy completions API (`POST /v1/completions`), with the sampling
//! extensions vLLM accepts under the same names (top_k, typical_p, repetition_penalty,
//! stop_token_ids, ignore_eos, truncate_prompt_tokens).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A completions request. Unknown fields are rejected, as OpenAI does: a misspelt parameter
/// must not be silently ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub best_of: Option<u32>,
    pub logit_bias: Option<BTreeMap<String, f32>>,
    /// OpenAI's end-user id for abuse monitoring: accepted, not used (nor logged).
    #[allow(dead_code)]
    pub user: Option<String>,
    /// Signed, as OpenAI's: its 64 bits seed the sampler as they are.
    pub seed: Option<i64>,
    pub suffix: Option<String>,
    pub top_k: Option<i32>,
    pub typical_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub truncate_prompt_tokens: Option<u32>,
}

/// The four shapes OpenAI accepts for `prompt`.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, an array of strings, an array of token ids or an array of arrays of token ids"
)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdBatches(Vec<Vec<u32>>),
}

/// What one prompt of a (possibly batched) request is.
#[derive(Debug, Clone, PartialEq)]
pub enum OnePrompt {
    Text(String),
    Ids(Vec<u32>),
}

impl Prompt {
    pub fn into_list(self) -> Vec<OnePrompt> {
        match self {
            Prompt::Text(t) => vec![OnePrompt::Text(t)],
            Prompt::Texts(ts) => ts.into_iter().map(OnePrompt::Text).collect(),
            Prompt::Ids(ids) => vec![OnePrompt::Ids(ids)],
            Prompt::IdBatches(b) => b.into_iter().map(OnePrompt::Ids).collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
    /// vLLM's: with `include_usage`, every chunk carries the usage so far.
    #[serde(default)]
    pub continuous_usage_stats: bool,
}

/// A whole response, or (with `object` the same) one chunk of a streamed one.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    /// Absent (`None`), `null` (`Some(None)`: the chunks before the usage chunk of a stream
    /// that asked for usage, as OpenAI sends them) or counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<Logprobs>,
    /// `stop` (eos, a stop sequence or stop token) or `length`; null in a stream until the end.
    pub finish_reason: Option<&'static str>,
}

/// Per-token log-probabilities in the completions API's column layout.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Logprobs {
    pub tokens: Vec<String>,
    /// Null for a prompt's first token, which has no context to be predicted from.
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<TopLogprobs>>,
    /// Where each token's text starts in the choice's `text`, in characters.
    pub text_offset: Vec<usize>,
}

/// A token's most likely alternatives as a JSON object, most likely first (objects keep their
/// order in JavaScript and Python clients).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobs(pub Vec<(String, f32)>);

impl Serialize for TopLogprobs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache rather than being computed.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Prompt + generated tokens of a request, at most (vLLM's name).
    pub max_model_len: usize,
}

/// OpenAI's error body: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}
