//! Errors as OpenAI's API answers them: an HTTP status and `{"error": {message, type, param,
//! code}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::schema::{ErrorBody, ErrorDetail};
use crate::engine::{Failure, SubmitError, ENGINE_STOPPED};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            param: None,
            code: None,
            message: message.into(),
        }
    }

    /// A bad request naming the parameter at fault.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_owned()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// A body that is no valid request (bad JSON, a wrong type, an unknown field).
    pub fn malformed(param: Option<String>, message: impl Into<String>) -> Self {
        ApiError {
            param,
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
    }

    pub fn model_not_found(asked: &str, served: &str) -> Self {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("model: {asked:?} is not served here; this server serves {served:?}"),
            )
        }
    }

    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "no route {method} {path}: this server offers POST /v1/completions, GET /v1/models, \
                 GET /v1/models/{{model}}, POST /tokenize, \
                 POST /detokenize and GET /health \
                 (GPT-NeoX is a base model with no chat template, so there is no /v1/chat/completions)"
            ),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{path} does not take {method}"),
        )
    }

    pub fn internal(message: String) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    pub fn engine_stopped() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", ENGINE_STOPPED)
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        // In OpenAI's names (`max_tokens`), as the request validation's messages are.
        let message = super::convert::openai_message(&e.to_string());
        match e {
            SubmitError::QueueFull(_) => ApiError {
                code: Some("queue_full"),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            },
            SubmitError::Unavailable(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message),
            SubmitError::TooLarge { prompt: true, .. } => Self::invalid("prompt", format!("prompt: {message}")),
            SubmitError::TooLarge { .. } => Self::invalid("max_tokens", format!("max_tokens: {message}")),
        }
    }
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        let message = f.to_string();
        match f {
            Failure::DeadlineExceeded => Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message),
            Failure::Unavailable(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message),
            Failure::Internal(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message),
        }
    }
}

impl ApiError {
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param.clone(),
                code: self.code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut r = (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_refusal_names_openais_parameter_in_its_message_too() {
        let e = ApiError::from(SubmitError::TooLarge {
            prompt: false,
            message: "prompt + max_new_tokens needs 9 KV blocks but the server has 8 (16 tokens each)".into(),
        });
        assert_eq!(
            (e.status, e.param.as_deref()),
            (StatusCode::BAD_REQUEST, Some("max_tokens"))
        );
        assert!(
            e.message.starts_with("max_tokens: prompt + max_tokens needs 9"),
            "{}",
            e.message
        );
    }
}
