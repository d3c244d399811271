//! An OpenAI-compatible HTTP API beside the gRPC one: `POST /v1/completions` (unary and
//! server-sent events), `GET /v1/models`, `GET /health`, and vLLM's `POST /tokenize` and
//! `POST /detokenize`, so OpenAI's SDKs and the tools
//! built on them (evaluation harnesses, LangChain, load generators) work unchanged. Requests
//! become the gRPC API's requests and go through the same validation, engine and metrics.

mod assemble;
mod convert;
mod error;
mod schema;
mod tokenize;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::{StreamExt, StreamMap};

use self::assemble::{finish_reason, Assembler, Piece};
use self::convert::{choice_seed, openai_field, openai_message, plan, Plan};
use self::error::ApiError;
use self::schema::{Completion, CompletionRequest, ModelCard, ModelList, Usage};
use super::off_runtime;
use super::submit::submit;
use super::validate::{header_request_id, validate, Limits};
use crate::engine::{EngineHandle, Event, TokenInfo, ENGINE_STOPPED};
use crate::model::{IncrementalDecoder, NeoXTokenizer};

/// What the HTTP API needs.
#[derive(Clone)]
pub struct OpenAiApi {
    pub engine: EngineHandle,
    pub tokenizer: Arc<NeoXTokenizer>,
    pub limits: Limits,
    /// The name requests must give as `model`.
    pub model: String,
    /// Request bodies larger than this are refused (413).
    pub max_body_bytes: usize,
}

pub fn router(api: OpenAiApi) -> Router {
    let limit = api.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        // Served names may hold slashes (`EleutherAI/gpt-neox-20b`).
        .route("/v1/models/{*model}", get(model))
        .route("/tokenize", post(tokenize_handler))
        .route("/detokenize", post(detokenize_handler))
        .route("/health", get(health))
        .fallback(|method: Method, uri: Uri| async move { ApiError::no_route(method.as_str(), uri.path()) })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::method_not_allowed(method.as_str(), uri.path())
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(Arc::new(api))
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(b) => (status, [(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn tokenize_handler(State(api): State<Arc<OpenAiApi>>, body: Result<Bytes, BytesRejection>) -> Response {
    answer(api, body, OpenAiApi::tokenize).await
}

async fn detokenize_handler(State(api): State<Arc<OpenAiApi>>, body: Result<Bytes, BytesRejection>) -> Response {
    answer(api, body, OpenAiApi::detokenize).await
}

/// A JSON request answered at once: parsed, handled (off the runtime), its answer or error as
/// JSON.
async fn answer<Req: serde::de::DeserializeOwned + 'static, Res: Serialize + Send + 'static>(
    api: Arc<OpenAiApi>,
    body: Result<Bytes, BytesRejection>,
    handle: fn(&OpenAiApi, Req) -> Result<Res, ApiError>,
) -> Response {
    let answered = off_runtime(move || {
        read_body(&api, body)
            .and_then(|b| parse(&b))
            .and_then(|r| handle(&api, r))
    })
    .await;
    match answered.map_err(ApiError::internal).and_then(|r| r) {
        Ok(r) => json(StatusCode::OK, &r),
        Err(e) => e.into_response(),
    }
}

/// The request body, or 413 past the body limit.
fn read_body(api: &OpenAiApi, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rej| match rej.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(api.max_body_bytes),
        _ => ApiError::malformed(None, format!("cannot read the request body: {rej}")),
    })
}

/// Ready for requests: 503 once the group broke or the server is stopping (from the signal
/// on, as gRPC health), so a load balancer probing it stops sending work while what it still
/// sends is served.
async fn health(State(api): State<Arc<OpenAiApi>>) -> Response {
    if api.engine.is_ready() {
        (StatusCode::OK, "ok").into_response()
    } else if api.engine.is_healthy() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "worker group unhealthy").into_response()
    }
}

async fn models(State(api): State<Arc<OpenAiApi>>) -> Response {
    json(
        StatusCode::OK,
        &ModelList {
            object: "list",
            data: vec![api.card()],
        },
    )
}

/// One model (the OpenAI SDK's `models.retrieve`): the served one, or 404 naming it.
async fn model(State(api): State<Arc<OpenAiApi>>, Path(name): Path<String>) -> Response {
    match api.check_model(&name) {
        Ok(()) => json(StatusCode::OK, &api.card()),
        Err(e) => e.into_response(),
    }
}

async fn completions(
    State(api): State<Arc<OpenAiApi>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let received = Instant::now();
    let header = headers.get("x-request-id").and_then(|v| v.to_str().ok());
    let id = header_request_id(header);
    let started = {
        let (api, id) = (api.clone(), id.clone());
        off_runtime(move || api.start(&id, body, received)).await
    };
    let mut response = match started.map_err(ApiError::internal).and_then(|r| r) {
        Err(e) => {
            // Debug-quoted: the message may quote the client's JSON keys, which must not be able
            // to forge log lines.
            tracing::info!(request_id = %id, error = ?e.message, "request rejected");
            e.into_response()
        }
        Ok(run) if run.plan.stream => run.stream(),
        Ok(run) => match run.whole().await {
            Ok(c) => json(StatusCode::OK, &c),
            Err(e) => e.into_response(),
        },
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// Spells a token and its alternatives as OpenAI does: a token that ends inside a UTF-8
/// character is `bytes:\xe2\x80` rather than its text (which reads U+FFFD), so such tokens
/// say what they are and stay apart in `top_logprobs`.
fn spell(tok: &NeoXTokenizer, t: &mut TokenInfo) {
    let spelled = |id: u32, text: &mut String| {
        if let Ok(bytes) = tok.token_bytes(id) {
            if std::str::from_utf8(&bytes).is_err() {
                *text = bytes.iter().fold("bytes:".to_owned(), |mut s, b| {
                    s.push_str(&format!("\\x{b:02x}"));
                    s
                });
            }
        }
    };
    spelled(t.id, &mut t.text);
    for (id, text, _) in &mut t.top {
        spelled(*id, text);
    }
}

/// Where each prompt token's text starts in the decoded prompt, in characters: decoded
/// incrementally, as the echoed text is, so a character split over tokens does not shift the
/// offsets after it.
fn prompt_offsets(tok: &NeoXTokenizer, tokens: &[TokenInfo]) -> Vec<usize> {
    let mut decoder = IncrementalDecoder::new();
    let mut chars = 0;
    tokens
        .iter()
        .map(|t| {
            let at = chars;
            chars += decoder.push(tok, t.id).map(|s| s.chars().count()).unwrap_or(0);
            at
        })
        .collect()
}

/// The parameter a JSON error names: the path's first segment, or the field in a root-level
/// message such as "unknown field `max_token`" or "missing field `model`".
fn json_error_param(path: &str, message: &str) -> Option<String> {
    if path != "." {
        let end = path.find(['.', '[']).unwrap_or(path.len());
        return Some(path[..end].to_owned());
    }
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let req: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        let param = json_error_param(&path, &message);
        let shown = if path == "." {
            message
        } else {
            format!("{path}: {message}")
        };
        ApiError::malformed(param, format!("invalid request body: {shown}"))
    })?;
    de.end()
        .map_err(|e| ApiError::malformed(None, format!("invalid request body: {e}")))?;
    Ok(req)
}

/// A request in the engine: its choices' events, merged.
struct Run {
    id: String,
    model: String,
    tokenizer: Arc<NeoXTokenizer>,
    plan: Plan,
    events: StreamMap<usize, UnboundedReceiverStream<Event>>,
    choices: Vec<Choice>,
    /// Per prompt whose log-probabilities are asked for: the events of its choices after the
    /// first, read once the first's scored prompt tokens came (their echo goes first).
    held: Vec<Vec<(usize, UnboundedReceiverStream<Event>)>>,
    /// Steps due before the next event: those choices' echoed prompts.
    ready: VecDeque<Step>,
    /// Every prompt's tokens (after truncation), for the usage of chunks before the end.
    prompt_tokens: usize,
}

impl OpenAiApi {
    /// The served model, as `/v1/models` lists it.
    fn card(&self) -> ModelCard {
        ModelCard {
            id: self.model.clone(),
            object: "model",
            created: now_secs(),
            owned_by: "neox-serve",
            max_model_len: self.limits.max_total_tokens,
        }
    }

    /// A request's `model` must be the one served (404 otherwise, as OpenAI answers).
    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model {
            Ok(())
        } else {
            Err(ApiError::model_not_found(model, &self.model))
        }
    }

    /// Parses and validates a request, then queues every choice: nothing is queued unless
    /// every prompt is valid.
    fn start(&self, id: &str, body: Result<Bytes, BytesRejection>, received: Instant) -> Result<Run, ApiError> {
        let body = read_body(self, body)?;
        let req: CompletionRequest = parse(&body)?;
        self.check_model(&req.model)?;
        let engine = self.engine.config();
        let plan = plan(req, &self.limits, engine.max_waiting_requests + engine.max_batch_size)?;
        let mut validated = Vec::with_capacity(plan.prompts.len());
        for (p, r) in plan.prompts.iter().enumerate() {
            validated.push(validate(r, &self.tokenizer, &self.limits).map_err(|e| {
                let (param, shown) = openai_field(&e.field);
                let mut message = format!("{shown}: {}", openai_message(&e.message));
                if plan.score_only && param == "max_tokens" {
                    message.push_str(" (a scored prompt needs room for the one token the engine computes after it)");
                }
                if plan.prompts.len() > 1 {
                    message.push_str(&format!(" (prompt {p})"));
                }
                ApiError::invalid(&param, message)
            })?);
        }
        let mut events = StreamMap::new();
        let mut held: Vec<Vec<_>> = (0..plan.prompts.len()).map(|_| Vec::new()).collect();
        let mut choices = Vec::with_capacity(plan.choices());
        let prompt_tokens = validated.iter().map(|v| v.prompt_ids.len()).sum();
        for (p, v) in validated.into_iter().enumerate() {
            // Only the first choice scores the prompt; the others are given its log-probabilities
            // (and start from its KV, which the engine copies), rather than each recomputing
            // every position's.
            let scored = v.prompt_logprobs;
            let echo = plan.echo.then(|| {
                self.tokenizer
                    .decode(&v.prompt_ids)
                    .unwrap_or_else(|_| plan.prompts[p].prompt.clone())
            });
            for j in 0..plan.n {
                let index = p * plan.n + j;
                let mut v = v.clone();
                v.sampling.seed = choice_seed(v.sampling.seed, j);
                v.prompt_logprobs = scored && j == 0;
                choices.push(Choice {
                    asm: Assembler::new(echo.clone(), plan.logprobs, !plan.score_only),
                    counts_prompt: j == 0,
                });
                let sub_id = if plan.choices() > 1 {
                    format!("{id}/{index}")
                } else {
                    id.to_owned()
                };
                // A refusal drops the choices queued so far, which cancels them.
                let rx = UnboundedReceiverStream::new(submit(&self.engine, v, sub_id, None, received, j == 0)?);
                if scored && j > 0 {
                    held[p].push((index, rx));
                } else {
                    events.insert(index, rx);
                }
            }
        }
        Ok(Run {
            id: format!("cmpl-{id}"),
            model: self.model.clone(),
            tokenizer: self.tokenizer.clone(),
            plan,
            events,
            held,
            ready: VecDeque::new(),
            choices,
            prompt_tokens,
        })
    }
}

/// One choice's state.
struct Choice {
    asm: Assembler,
    /// The first choice of its prompt counts the prompt's tokens in `usage`.
    counts_prompt: bool,
}

/// What one engine event adds to a choice.
enum Step {
    Piece(usize, Piece),
    Finished(usize, &'static str),
}

impl Run {
    /// The next event as a step; `None` once every choice finished.
    async fn next(&mut self, usage: &mut Usage) -> Option<Result<Step, ApiError>> {
        if let Some(step) = self.ready.pop_front() {
            return Some(Ok(step));
        }
        let (i, ev) = self.events.next().await?;
        let choice = &mut self.choices[i];
        let asm = &mut choice.asm;
        Some(Ok(match ev {
            // Only a prompt's first choice scores it (with echo and logprobs); the others are
            // held until then and echo the same tokens.
            Event::PromptTokens(mut t) => {
                let p = i / self.plan.n.max(1);
                let offsets = prompt_offsets(&self.tokenizer, &t);
                t.iter_mut().for_each(|t| spell(&self.tokenizer, t));
                let piece = asm.prompt_tokens(&t, &offsets);
                for (k, rx) in std::mem::take(&mut self.held[p]) {
                    let echoed = self.choices[k].asm.prompt_tokens(&t, &offsets);
                    self.ready.push_back(Step::Piece(k, echoed));
                    self.events.insert(k, rx);
                }
                Step::Piece(i, piece)
            }
            Event::Token {
                mut token,
                delta,
                offset,
            } => {
                if self.plan.logprobs {
                    spell(&self.tokenizer, &mut token);
                }
                Step::Piece(i, asm.token(&token, &delta, offset))
            }
            Event::Finished(f) => {
                self.events.remove(&i);
                if choice.counts_prompt {
                    usage.prompt_tokens += f.prompt_tokens;
                    usage.prompt_tokens_details.cached_tokens += f.cached_prompt_tokens;
                }
                usage.completion_tokens += asm.completion_tokens;
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
                return Some(Ok(Step::Finished(i, finish_reason(f.reason, self.plan.score_only))));
            }
            Event::Failed(f) => return Some(Err(f.into())),
        }))
    }

    /// Every prompt's tokens and the tokens generated so far; cached tokens as far as the
    /// finished choices told.
    fn usage_so_far(&self, finished: &Usage) -> Usage {
        let completion_tokens = self.choices.iter().map(|c| c.asm.completion_tokens).sum();
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            total_tokens: self.prompt_tokens + completion_tokens,
            prompt_tokens_details: finished.prompt_tokens_details,
        }
    }

    fn completion(&self, choices: Vec<schema::Choice>, usage: Option<Option<Usage>>, created: u64) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    /// Every choice gathered into one response.
    async fn whole(mut self) -> Result<Completion, ApiError> {
        let created = now_secs();
        let mut pieces = vec![Piece::default(); self.choices.len()];
        let mut finish = vec![None; self.choices.len()];
        let mut usage = Usage::default();
        while let Some(step) = self.next(&mut usage).await {
            match step? {
                Step::Piece(i, p) => pieces[i].extend(p),
                Step::Finished(i, reason) => {
                    pieces[i].extend(self.choices[i].asm.finish());
                    finish[i] = Some(reason);
                }
            }
        }
        if finish.iter().any(Option::is_none) {
            tracing::warn!(request_id = %self.id, "{ENGINE_STOPPED}");
            return Err(ApiError::engine_stopped());
        }
        let choices = pieces
            .into_iter()
            .zip(finish)
            .enumerate()
            .map(|(index, (p, finish_reason))| schema::Choice {
                index,
                text: p.text,
                logprobs: p.logprobs,
                finish_reason,
            })
            .collect();
        Ok(self.completion(choices, Some(Some(usage)), created))
    }

    /// Server-sent events: a chunk per piece of text, one with each choice's finish reason,
    /// usage when asked for, then `[DONE]`. A client that goes away cancels every choice.
    fn stream(self) -> Response {
        let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(16);
        tokio::spawn(async move {
            tokio::select! {
                _ = self.pump(&tx) => {}
                _ = tx.closed() => {}
            }
        });
        let events = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
        Sse::new(events).keep_alive(KeepAlive::default()).into_response()
    }

    async fn pump(mut self, tx: &tokio::sync::mpsc::Sender<SseEvent>) {
        let created = now_secs();
        let mut usage = Usage::default();
        let mut finished = 0;
        while let Some(step) = self.next(&mut usage).await {
            let (index, piece, finish_reason) = match step {
                Ok(Step::Piece(_, p)) if p.is_empty() => continue,
                Ok(Step::Piece(i, p)) => (i, p, None),
                Ok(Step::Finished(i, reason)) => {
                    finished += 1;
                    (i, self.choices[i].asm.finish(), Some(reason))
                }
                Err(e) => {
                    let _ = tx.send(data(&e.body())).await;
                    let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
            };
            let choice = schema::Choice {
                index,
                text: piece.text,
                logprobs: piece.logprobs,
                finish_reason,
            };
            // With usage asked for, every chunk before the usage chunk carries `usage: null`, or
            // the usage so far with continuous usage stats.
            let chunk_usage = match self.plan.continuous_usage {
                true => Some(Some(self.usage_so_far(&usage))),
                false => self.plan.include_usage.then_some(None),
            };
            if tx
                .send(data(&self.completion(vec![choice], chunk_usage, created)))
                .await
                .is_err()
            {
                return;
            }
        }
        if finished < self.choices.len() {
            tracing::warn!(request_id = %self.id, "{ENGINE_STOPPED}");
            let _ = tx.send(data(&ApiError::engine_stopped().body())).await;
        } else if self.plan.include_usage {
            let _ = tx
                .send(data(&self.completion(Vec::new(), Some(Some(usage)), created)))
                .await;
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    }
}

fn data(v: &impl Serialize) -> SseEvent {
    SseEvent::default().data(serde_json::to_string(v).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_parameter() {
        let e = parse::<CompletionRequest>(br#"{"model": "m", "prompt": "x", "max_token": 3}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_token"));
        assert!(e.message.contains("unknown field `max_token`"), "{}", e.message);
        let e = parse::<CompletionRequest>(br#"{"prompt": "x"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        let e = parse::<CompletionRequest>(br#"{"model": "m", "prompt": "x", "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(
            e.message.starts_with("invalid request body: temperature: invalid type"),
            "{}",
            e.message
        );
        let e = parse::<CompletionRequest>(br#"{"model": "m", "prompt": {"text": "x"}}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert!(e.message.contains("an array of arrays of token ids"), "{}", e.message);
        let e = parse::<CompletionRequest>(br#"{"model": "m", "prompt": "x", "stream_options": {"include_usage": 1}}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream_options"));
        let e = parse::<CompletionRequest>(br#"{"model": "m", "prompt": "x", "seed": 1.5}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("seed"));
        // OpenAI's seed is a signed 64-bit integer.
        let negative = parse::<CompletionRequest>(br#"{"model": "m", "prompt": "x", "seed": -1}"#).unwrap();
        assert_eq!(negative.seed, Some(-1));
        for body in [&b"{"[..], b"[]", b"{\"model\": \"m\", \"prompt\": \"x\"} trailing", b""] {
            let e = parse::<CompletionRequest>(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
        parse::<CompletionRequest>(br#"{"model": "m", "prompt": "x", "temperature": null, "stop": ["a", "b"]}"#)
            .unwrap();
    }
}
