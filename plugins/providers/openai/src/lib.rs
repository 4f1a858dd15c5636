//! The `openai` provider: any OpenAI-compatible server (OpenAI, Groq, Ollama, vLLM, llama.cpp).
//!
//! Config: `base_url` (default `https://api.openai.com/v1`), `model` (used when a request names
//! none), `embedding_model`, `timeout_ms` (default 60000). Secret: `api_key`, sent as a bearer
//! token when granted; local servers need none, so no dummy key is ever required.
//!
//! Upstream answers map onto the contract's errors: 400/404/413/422 `invalid-input`, 401/403
//! `unauthorized`, 429 `rate-limited` with Retry-After in milliseconds, 408/5xx and malformed
//! bodies `unavailable`, timeouts `timeout`. A stream that ends without `[DONE]` is an error.

use qlayer_sdk::http::{Request, Response};
use qlayer_sdk::provider::{ChunkSource, Provider};
use qlayer_sdk::*;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

struct OpenAi;

const MAX_BODY: usize = 16 << 20;
const MAX_LINE: usize = 1 << 20;

fn base_url() -> String {
    host::config("base_url").unwrap_or_else(|| "https://api.openai.com/v1".into()).trim_end_matches('/').to_string()
}

fn timeout() -> Duration {
    let ms = host::config("timeout_ms").and_then(|v| v.parse().ok()).unwrap_or(60_000u64);
    Duration::from_millis(ms)
}

fn model(requested: &str, key: &str) -> Result<String, PluginError> {
    if !requested.is_empty() {
        return Ok(requested.to_string());
    }
    host::config(key)
        .ok_or_else(|| PluginError::InvalidInput(format!("the request names no model and no `{key}` is configured")))
}

fn request(method_post: bool, path: &str) -> Request {
    let url = format!("{}{path}", base_url());
    let mut r = if method_post { Request::post(url) } else { Request::get(url) };
    r = r.timeout(timeout()).header("accept", "application/json");
    if let Some(key) = host::secret("api_key").filter(|k| !k.is_empty()) {
        r = r.header("authorization", format!("Bearer {key}"));
    }
    r
}

fn post_json(path: &str, body: &Value) -> Result<Response, PluginError> {
    let response =
        request(true, path).header("content-type", "application/json").body(body.to_string().into_bytes()).send()?;
    check_status(response)
}

/// Turns a non-2xx answer into the contract's error, quoting the upstream's own message.
fn check_status(response: Response) -> Result<Response, PluginError> {
    let status = response.status();
    if (200..300).contains(&status) {
        return Ok(response);
    }
    let retry_after = response.header("retry-after").and_then(parse_retry_after);
    let body = response.text(64 * 1024).unwrap_or_default();
    let detail = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(300).collect());
    let message = format!("upstream answered {status}: {detail}");
    Err(match status {
        429 => PluginError::RateLimited(retry_after),
        401 | 403 => PluginError::Unauthorized(message),
        408 | 500..=599 => PluginError::Unavailable(message),
        _ => PluginError::InvalidInput(message),
    })
}

/// Retry-After in seconds (possibly fractional) to milliseconds. HTTP dates are not used by LLM
/// APIs and are ignored.
fn parse_retry_after(v: &str) -> Option<u64> {
    v.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0).map(|s| (s * 1000.0) as u64)
}

fn malformed(what: &str, e: impl std::fmt::Display) -> PluginError {
    PluginError::Unavailable(format!("upstream sent a malformed {what}: {e}"))
}

fn role(r: Role) -> &'static str {
    match r {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

fn chat_body(req: &CompletionRequest, stream: bool) -> Result<Value, PluginError> {
    if req.messages.is_empty() {
        return Err(PluginError::InvalidInput("`messages` is empty".into()));
    }
    let mut body = json!({
        "model": model(&req.model, "model")?,
        "messages": req.messages.iter().map(|m| json!({"role": role(m.role), "content": m.content})).collect::<Vec<_>>(),
    });
    if let Some(t) = req.max_tokens {
        body["max_tokens"] = json!(t);
    }
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    if !req.stop.is_empty() {
        body["stop"] = json!(req.stop);
    }
    if req.json_output {
        body["response_format"] = json!({"type": "json_object"});
    }
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    Ok(body)
}

#[derive(Deserialize)]
struct ApiUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

impl From<ApiUsage> for Usage {
    fn from(u: ApiUsage) -> Usage {
        Usage { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens }
    }
}

#[derive(Deserialize)]
struct ChatResponse {
    model: Option<String>,
    choices: Vec<ChatChoice>,
    usage: Option<ApiUsage>,
}

#[derive(Deserialize)]
struct ChatChoice {
    message: ChatMessage,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    content: Option<String>,
}

#[derive(Deserialize)]
struct StreamEvent {
    #[serde(default)]
    choices: Vec<StreamChoice>,
    usage: Option<ApiUsage>,
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: StreamDelta,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct StreamDelta {
    content: Option<String>,
}

impl Provider for OpenAi {
    type Stream = SseStream;

    fn models() -> Result<Vec<ModelInfo>, PluginError> {
        let response = check_status(request(false, "/models").send()?)?;
        let text = response.text(MAX_BODY)?;
        #[derive(Deserialize)]
        struct List {
            data: Vec<Item>,
        }
        #[derive(Deserialize)]
        struct Item {
            id: String,
            #[serde(default)]
            owned_by: String,
        }
        let list: List = serde_json::from_str(&text).map_err(|e| malformed("model list", e))?;
        Ok(list.data.into_iter().map(|m| ModelInfo { id: m.id, owned_by: m.owned_by }).collect())
    }

    fn complete(req: CompletionRequest) -> Result<Completion, PluginError> {
        let body = chat_body(&req, false)?;
        let text = post_json("/chat/completions", &body)?.text(MAX_BODY)?;
        let parsed: ChatResponse = serde_json::from_str(&text).map_err(|e| malformed("chat completion", e))?;
        let choice = parsed.choices.into_iter().next().ok_or_else(|| malformed("chat completion", "no choices"))?;
        Ok(Completion {
            model: parsed.model.unwrap_or_else(|| body["model"].as_str().unwrap_or_default().to_string()),
            text: choice.message.content.unwrap_or_default(),
            finish_reason: choice.finish_reason.unwrap_or_else(|| "stop".into()),
            usage: parsed.usage.map(Usage::from).unwrap_or(Usage { prompt_tokens: 0, completion_tokens: 0 }),
        })
    }

    fn stream(req: CompletionRequest) -> Result<SseStream, PluginError> {
        let body = chat_body(&req, true)?;
        let response = post_json("/chat/completions", &body)?;
        Ok(SseStream { response: Some(response) })
    }

    fn embed(req: EmbeddingRequest) -> Result<Embeddings, PluginError> {
        if req.inputs.is_empty() {
            return Err(PluginError::InvalidInput("`inputs` is empty".into()));
        }
        let model = model(&req.model, "embedding_model")?;
        let text = post_json("/embeddings", &json!({"model": model, "input": req.inputs}))?.text(MAX_BODY)?;
        #[derive(Deserialize)]
        struct Reply {
            data: Vec<Item>,
            model: Option<String>,
            usage: Option<ApiUsage>,
        }
        #[derive(Deserialize)]
        struct Item {
            index: usize,
            embedding: Vec<f32>,
        }
        let mut reply: Reply = serde_json::from_str(&text).map_err(|e| malformed("embedding reply", e))?;
        if reply.data.len() != req.inputs.len() {
            return Err(malformed(
                "embedding reply",
                format!("{} vectors for {} inputs", reply.data.len(), req.inputs.len()),
            ));
        }
        reply.data.sort_by_key(|d| d.index);
        Ok(Embeddings {
            model: reply.model.unwrap_or(model),
            vectors: reply.data.into_iter().map(|d| d.embedding).collect(),
            usage: reply.usage.map(Usage::from).unwrap_or(Usage { prompt_tokens: 0, completion_tokens: 0 }),
        })
    }
}

/// Server-sent events from a streamed chat completion.
struct SseStream {
    response: Option<Response>,
}

impl ChunkSource for SseStream {
    fn next_chunk(&mut self) -> Result<Option<CompletionChunk>, PluginError> {
        loop {
            let Some(response) = self.response.as_mut() else { return Ok(None) };
            let Some(line) = response.next_line(MAX_LINE)? else {
                self.response = None;
                return Err(PluginError::Unavailable("upstream closed the stream before [DONE]".into()));
            };
            let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
            if data == "[DONE]" {
                self.response = None;
                return Ok(None);
            }
            let event: StreamEvent = serde_json::from_str(data).map_err(|e| malformed("stream event", e))?;
            let choice = event.choices.into_iter().next();
            let chunk = CompletionChunk {
                delta: choice.as_ref().and_then(|c| c.delta.content.clone()).unwrap_or_default(),
                finish_reason: choice.and_then(|c| c.finish_reason),
                usage: event.usage.map(Usage::from),
            };
            if chunk.delta.is_empty() && chunk.finish_reason.is_none() && chunk.usage.is_none() {
                continue; // role-only or keep-alive event
            }
            return Ok(Some(chunk));
        }
    }
}

qlayer_sdk::export_provider!(OpenAi);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_in_seconds() {
        assert_eq!(parse_retry_after("2"), Some(2000));
        assert_eq!(parse_retry_after("0.5"), Some(500));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
