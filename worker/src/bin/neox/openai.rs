//! A small client of the OpenAI-compatible HTTP API, for `neox bench --api openai`: streamed
//! completions read as server-sent events, so the HTTP path is measured as OpenAI's SDKs use it.

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use super::SamplingArgs;

/// The largest event the client holds while waiting for its end: a stream that never sends
/// one is broken, not a reason to grow without bound.
const MAX_EVENT_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct OpenAiClient {
    http: Client<HttpConnector, Full<Bytes>>,
    base: String,
    /// The served model's name, from `GET /v1/models`.
    pub model: String,
}

impl OpenAiClient {
    /// Connects to `addr` (`http://host:port`) and asks which model it serves.
    pub async fn connect(addr: &str) -> Result<Self> {
        let base = addr.trim_end_matches('/').to_owned();
        let http = Client::builder(TokioExecutor::new()).build_http();
        let mut c = OpenAiClient {
            http,
            base,
            model: String::new(),
        };
        let (status, body) = c.send(Method::GET, "/v1/models", None).await?;
        let list: Value = serde_json::from_slice(&body).context("GET /v1/models: not JSON")?;
        if status != StatusCode::OK {
            bail!("GET /v1/models: HTTP {status}: {list}");
        }
        c.model = list["data"][0]["id"]
            .as_str()
            .context("GET /v1/models names no model")?
            .to_owned();
        Ok(c)
    }

    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<(StatusCode, Bytes)> {
        let res = self.request(method, path, body).await?;
        let status = res.status();
        let body = res
            .into_body()
            .collect()
            .await
            .context("reading the response")?
            .to_bytes();
        Ok((status, body))
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let uri = format!("{}{path}", self.base);
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(&uri)
            .header("content-type", "application/json")
            .body(Full::new(bytes))
            .with_context(|| format!("invalid address {uri}"))?;
        self.http
            .request(req)
            .await
            .with_context(|| format!("cannot connect to {uri}"))
    }

    /// The completions request `neox bench` sends: the sampling flags under OpenAI's names
    /// (greedy unless `--temperature`, as the gRPC API), streamed with usage.
    pub fn completion(&self, prompt: &str, s: &SamplingArgs) -> Value {
        let mut body = json!({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature.unwrap_or(0.0),
            "stream": true,
            "stream_options": {"include_usage": true},
            "ignore_eos": s.ignore_eos,
        });
        let optional = [
            ("top_k", (s.top_k > 0).then(|| json!(s.top_k))),
            ("top_p", s.top_p.map(|v| json!(v))),
            ("typical_p", s.typical_p.map(|v| json!(v))),
            ("repetition_penalty", s.repetition_penalty.map(|v| json!(v))),
            ("seed", s.seed.map(|v| json!(v))),
            ("stop", (!s.stop.is_empty()).then(|| json!(s.stop))),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                body[k] = v;
            }
        }
        body
    }

    /// Streams one completion, calling `on_event` with each event's JSON as it arrives. An
    /// error status, an error event or a stream that ends before `[DONE]` is an error.
    pub async fn stream(&self, body: &Value, mut on_event: impl FnMut(&Value)) -> Result<()> {
        let res = self.request(Method::POST, "/v1/completions", Some(body)).await?;
        let status = res.status();
        let mut body = res.into_body();
        if status != StatusCode::OK {
            let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            bail!("HTTP {}: {}", status.as_u16(), String::from_utf8_lossy(&text));
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("reading the event stream")?;
            let Some(data) = frame.data_ref() else { continue };
            pending.extend_from_slice(data);
            while let Some(end) = find(&pending, b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                for line in String::from_utf8_lossy(&event).lines() {
                    let Some(data) = line.strip_prefix("data:").map(str::trim_start) else {
                        continue;
                    };
                    if data == "[DONE]" {
                        return Ok(());
                    }
                    let v: Value =
                        serde_json::from_str(data).with_context(|| format!("an event is not JSON: {data}"))?;
                    if let Some(e) = v.get("error") {
                        bail!("{}", e["message"].as_str().unwrap_or("error event"));
                    }
                    on_event(&v);
                }
            }
            if pending.len() > MAX_EVENT_BYTES {
                bail!("an event longer than {MAX_EVENT_BYTES} bytes");
            }
        }
        bail!("the stream ended before [DONE]")
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
