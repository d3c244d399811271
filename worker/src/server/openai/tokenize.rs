//! `POST /tokenize` and `POST /detokenize`, as vLLM serves them beside OpenAI's API: clients
//! count and inspect tokens with the model's own tokenizer before they send a prompt.

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::OpenAiApi;
use crate::server::validate::encode_prompt;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    /// Optional; when given, it must name the served model.
    pub model: Option<String>,
    pub prompt: String,
    /// Accepted for vLLM's clients; GPT-NeoX's tokenizer adds no special tokens either way.
    #[allow(dead_code)]
    pub add_special_tokens: Option<bool>,
    /// Also return each token as the tokenizer spells it.
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    /// Prompt + generated tokens of a request, at most.
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

impl OpenAiApi {
    pub(super) fn tokenize(&self, req: TokenizeRequest) -> Result<TokenizeResponse, ApiError> {
        if let Some(m) = &req.model {
            self.check_model(m)?;
        }
        let tokens = encode_prompt(&req.prompt, &self.tokenizer, &self.limits)
            .map_err(|e| ApiError::invalid("prompt", format!("prompt: {}", e.message)))?;
        let token_strs = req.return_token_strs.unwrap_or(false).then(|| {
            tokens
                .iter()
                .map(|&id| self.tokenizer.id_to_token(id).unwrap_or_default())
                .collect()
        });
        Ok(TokenizeResponse {
            count: tokens.len(),
            max_model_len: self.limits.max_total_tokens,
            tokens,
            token_strs,
        })
    }

    pub(super) fn detokenize(&self, req: DetokenizeRequest) -> Result<DetokenizeResponse, ApiError> {
        if let Some(m) = &req.model {
            self.check_model(m)?;
        }
        let vocab = self.tokenizer.vocab_size();
        if let Some((i, id)) = req.tokens.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return Err(ApiError::invalid(
                "tokens",
                format!("tokens[{i}]: {id} is not a token id (the vocabulary has {vocab})"),
            ));
        }
        let prompt = self
            .tokenizer
            .decode(&req.tokens)
            .map_err(|e| ApiError::invalid("tokens", format!("tokens: {e}")))?;
        Ok(DetokenizeResponse { prompt })
    }
}
