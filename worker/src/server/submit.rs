//! Handing a validated request to the engine, for every API the server speaks.

use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::validate::Validated;
use crate::engine::{self, EngineHandle, Event, SubmitError};

/// Queues `v` as request `id`; its events arrive on the receiver. Dropping the receiver
/// cancels the request (the engine frees its KV at its next step). `counted`: whether it
/// counts in the per-request metrics (a further choice of the same prompt does not).
pub(super) fn submit(
    engine: &EngineHandle,
    v: Validated,
    id: String,
    deadline: Option<Instant>,
    received: Instant,
    counted: bool,
) -> Result<UnboundedReceiver<Event>, SubmitError> {
    let (tx, rx) = unbounded_channel();
    engine.submit(engine::Request {
        id,
        prompt_ids: v.prompt_ids,
        sampling: v.sampling,
        stop: v.stop,
        logprobs: v.logprobs,
        prompt_logprobs: v.prompt_logprobs,
        deadline,
        received,
        events: tx,
        counted,
    })?;
    Ok(rx)
}
