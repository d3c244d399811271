//! The `neox.v1.TextGeneration` service: validation, then the engine.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use neox_proto::neox::v1 as pb;
use pb::text_generation_server::TextGeneration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::off_runtime;
use super::submit::submit;
use super::validate::{deadline, encode_prompt, request_id, validate, Limits};
use crate::engine::{self, EngineHandle, Event, Failure, SubmitError, ENGINE_STOPPED};
use crate::model::NeoXTokenizer;

pub struct GenerationService {
    pub engine: EngineHandle,
    pub tokenizer: Arc<NeoXTokenizer>,
    pub limits: Limits,
    pub info: pb::ModelInfoResponse,
}

fn finish_pb(r: engine::FinishReason) -> pb::FinishReason {
    match r {
        engine::FinishReason::Length => pb::FinishReason::Length,
        engine::FinishReason::EosToken => pb::FinishReason::EosToken,
        engine::FinishReason::StopSequence => pb::FinishReason::StopSequence,
        engine::FinishReason::StopToken => pb::FinishReason::StopToken,
    }
}

/// A token as the API sends it, with the exact bytes beside its text.
fn token_pb(t: &engine::TokenInfo, tok: &NeoXTokenizer) -> pb::Token {
    let bytes = |id| tok.token_bytes(id).unwrap_or_default();
    pb::Token {
        id: t.id,
        text: t.text.clone(),
        logprob: t.logprob,
        top_tokens: t
            .top
            .iter()
            .map(|(id, text, lp)| pb::TopToken {
                id: *id,
                text: text.clone(),
                logprob: *lp,
                bytes: bytes(*id),
            })
            .collect(),
        bytes: bytes(t.id),
    }
}

fn failure_status(f: Failure) -> Status {
    let message = f.to_string();
    match f {
        Failure::DeadlineExceeded => Status::deadline_exceeded(message),
        Failure::Unavailable(_) => Status::unavailable(message),
        Failure::Internal(_) => Status::internal(message),
    }
}

impl GenerationService {
    /// Validates and queues a request; returns its events, deadline and id.
    async fn submit(&self, req: Request<pb::GenerateRequest>) -> Result<Submitted, Status> {
        let now = Instant::now();
        let dl = deadline(req.metadata(), now);
        let header = req.metadata().get("x-request-id").and_then(|v| v.to_str().ok());
        let id = request_id(&req.get_ref().request_id, header)
            .map_err(Status::from)
            .inspect_err(|e| tracing::info!(error = e.message(), "request rejected"))?;
        let (body, tokenizer, limits) = (req.into_inner(), self.tokenizer.clone(), self.limits.clone());
        let v = off_runtime(move || validate(&body, &tokenizer, &limits))
            .await
            .map_err(Status::internal)?
            .map_err(|e| turned_away(e.into(), &id, "rejected"))?;
        let rx = submit(&self.engine, v, id.clone(), dl, now, true)
            .map_err(|e| match e {
                SubmitError::QueueFull(_) => Status::resource_exhausted(e.to_string()),
                SubmitError::Unavailable(_) => Status::unavailable(e.to_string()),
                SubmitError::TooLarge { prompt: true, .. } => Status::invalid_argument(format!("prompt: {e}")),
                SubmitError::TooLarge { .. } => Status::invalid_argument(format!("parameters.max_new_tokens: {e}")),
            })
            .map_err(|e| turned_away(e, &id, "refused"))?;
        Ok((rx, dl, id))
    }
}

fn engine_stopped() -> Status {
    Status::unavailable(ENGINE_STOPPED)
}

type Submitted = (UnboundedReceiver<Event>, Option<Instant>, String);

type GenStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send + 'static>>;

fn usage(f: &engine::Finish) -> (pb::Usage, pb::Timings) {
    (
        pb::Usage {
            prompt_tokens: f.prompt_tokens as u32,
            generated_tokens: f.generated_tokens as u32,
            cached_prompt_tokens: f.cached_prompt_tokens as u32,
        },
        pb::Timings {
            queue_seconds: f.queue_secs,
            time_to_first_token_seconds: f.ttft_secs,
            total_seconds: f.total_secs,
        },
    )
}

/// A unary request's events gathered into its response, or the status it ends with.
async fn collect(
    mut rx: UnboundedReceiver<Event>,
    dl: Option<Instant>,
    tok: &NeoXTokenizer,
    mut out: pb::GenerateResponse,
) -> Result<pb::GenerateResponse, Status> {
    loop {
        let ev = match dl {
            Some(d) => match tokio::time::timeout_at(d.into(), rx.recv()).await {
                Ok(ev) => ev,
                Err(_) => return Err(failure_status(Failure::DeadlineExceeded)),
            },
            None => rx.recv().await,
        };
        let Some(ev) = ev else { break };
        match ev {
            Event::PromptTokens(t) => out.prompt_tokens = t.iter().map(|t| token_pb(t, tok)).collect(),
            Event::Token { token, delta, .. } => {
                out.text.push_str(&delta);
                out.token_ids.push(token.id);
                out.tokens.push(token_pb(&token, tok));
            }
            Event::Finished(f) => {
                let (u, t) = usage(&f);
                out.finish_reason = finish_pb(f.reason) as i32;
                out.usage = Some(u);
                out.timings = Some(t);
                return Ok(out);
            }
            Event::Failed(f) => return Err(failure_status(f)),
        }
    }
    tracing::warn!(request_id = %out.request_id, "{ENGINE_STOPPED}");
    Err(engine_stopped())
}

/// The request id as the `x-request-id` response header (ids are printable ASCII).
fn tag(meta: &mut tonic::metadata::MetadataMap, id: &str) {
    if let Ok(v) = id.parse() {
        meta.insert("x-request-id", v);
    }
}

fn tagged<T>(mut r: Response<T>, id: &str) -> Response<T> {
    tag(r.metadata_mut(), id);
    r
}

/// The request id on an error status too, so a failed call can be found in the logs.
fn status_with_id(mut st: Status, id: &str) -> Status {
    tag(st.metadata_mut(), id);
    st
}

/// A request turned away before the engine took it (`how`: rejected or refused): logged with
/// its id, which its status carries too.
fn turned_away(st: Status, id: &str, how: &str) -> Status {
    tracing::info!(request_id = %id, error = st.message(), "request {how}");
    status_with_id(st, id)
}

#[tonic::async_trait]
impl TextGeneration for GenerationService {
    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let (rx, dl, request_id) = self.submit(req).await?;
        let id = request_id.clone();
        let out = pb::GenerateResponse {
            request_id,
            ..Default::default()
        };
        match collect(rx, dl, &self.tokenizer, out).await {
            Ok(out) => Ok(tagged(Response::new(out), &id)),
            Err(e) => Err(status_with_id(e, &id)),
        }
    }

    type GenerateStreamStream = GenStream;

    async fn generate_stream(&self, req: Request<pb::GenerateRequest>) -> Result<Response<GenStream>, Status> {
        let (mut rx, _, request_id) = self.submit(req).await?;
        let id = request_id.clone();
        let tok = self.tokenizer.clone();
        let stream = async_stream_from(move |yield_tx| async move {
            let mut prompt_tokens = Vec::new();
            loop {
                // Notice a client that went away at once, not at its next token.
                let ev = tokio::select! {
                    ev = rx.recv() => ev,
                    _ = yield_tx.closed() => return,
                };
                let Some(ev) = ev else {
                    // The engine went away without a last word: never a clean end of stream.
                    tracing::warn!(request_id = %request_id, "the engine stopped before the request finished");
                    let _ = yield_tx.send(Err(engine_stopped())).await;
                    return;
                };
                let msg = match ev {
                    Event::PromptTokens(t) => {
                        prompt_tokens = t.iter().map(|t| token_pb(t, &tok)).collect();
                        continue;
                    }
                    Event::Token { token, delta, .. } => Ok(pb::GenerateStreamResponse {
                        token: Some(token_pb(&token, &tok)),
                        text_delta: delta,
                        prompt_tokens: std::mem::take(&mut prompt_tokens),
                        ..Default::default()
                    }),
                    Event::Finished(f) => {
                        let (u, t) = usage(&f);
                        let last = pb::GenerateStreamResponse {
                            finish_reason: Some(finish_pb(f.reason) as i32),
                            usage: Some(u),
                            timings: Some(t),
                            request_id,
                            ..Default::default()
                        };
                        let _ = yield_tx.send(Ok(last)).await;
                        return;
                    }
                    Event::Failed(f) => Err(failure_status(f)),
                };
                let end = msg.is_err();
                if yield_tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(tagged(Response::new(stream), &id))
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let (text, tokenizer, limits) = (req.into_inner().text, self.tokenizer.clone(), self.limits.clone());
        let answer = off_runtime(move || {
            // The prompt's checks, under this request's field name.
            let ids = encode_prompt(&text, &tokenizer, &limits)
                .map_err(|e| Status::invalid_argument(format!("text: {}", e.message)))?;
            let tokens = ids
                .iter()
                .map(|&id| tokenizer.decode(&[id]).unwrap_or_default())
                .collect();
            let token_bytes = ids
                .iter()
                .map(|&id| tokenizer.token_bytes(id).unwrap_or_default())
                .collect();
            Ok(pb::TokenizeResponse {
                ids,
                tokens,
                token_bytes,
            })
        });
        answer.await.map_err(Status::internal)?.map(Response::new)
    }

    async fn model_info(&self, _req: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }
}

/// A stream fed by a task: the task ends (and the engine sees the request cancelled) as soon
/// as the client drops the stream.
fn async_stream_from<F, Fut>(f: F) -> GenStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::GenerateStreamResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
