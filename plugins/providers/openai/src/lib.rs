//! The `openai` provider: any OpenAI-compatible server (OpenAI, Groq, Ollama, vLLM, llama.cpp),
//! and Azure OpenAI.
//!
//! Config: `preset` (`openai`, the default; `groq`; `azure`), `base_url` (default: the preset's,
//! `https://api.openai.com/v1` or `https://api.groq.com/openai/v1`; for Azure, the resource's
//! endpoint such as `https://NAME.openai.azure.com`, which is required), `model` (used when a
//! request names none; for Azure, a deployment name), `embedding_model`, `api_version` (Azure's
//! `api-version`, default `2024-10-21`), `timeout_ms` (default 60000). Secret: `api_key`, sent as
//! a bearer token (Azure: the `api-key` header) when granted; local servers need none, so no dummy
//! key is ever required.
//!
//! Azure addresses a deployment, not a model: a request for model `gpt4o-prod` goes to
//! `{base_url}/openai/deployments/gpt4o-prod/chat/completions?api-version=...`.
//!
//! Requests carry everything the contract says: tools and tool choice, tool calls and tool
//! results in the history, image parts, a JSON object or JSON schema response format, `top_p`,
//! `seed`, `user`. Answers carry tool calls, whole or streamed as argument pieces.
//!
//! Upstream answers map onto the contract's errors: 400/404/413/422 `invalid-input`, 401/403
//! `unauthorized`, 429 `rate-limited` with Retry-After in milliseconds, 408/5xx and malformed
//! bodies `unavailable`, timeouts `timeout`. A stream that ends without `[DONE]` is an error.

use qlayer_sdk::http::{Request, Response, malformed};
use qlayer_sdk::provider::{ChunkSource, Provider};
use qlayer_sdk::*;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

struct OpenAi;

const MAX_BODY: usize = 16 << 20;
const MAX_LINE: usize = 1 << 20;

/// Which flavour of the API the upstream speaks.
#[derive(Clone, Copy, PartialEq)]
enum Preset {
    OpenAi,
    Groq,
    Azure,
}

fn preset() -> Result<Preset, PluginError> {
    match host::config("preset").as_deref().unwrap_or("openai") {
        "openai" => Ok(Preset::OpenAi),
        "groq" => Ok(Preset::Groq),
        "azure" => Ok(Preset::Azure),
        other => Err(PluginError::InvalidInput(format!(
            "config `preset` is `{other}`; expected `openai`, `groq` or `azure`"
        ))),
    }
}

fn base_url(preset: Preset) -> Result<String, PluginError> {
    let url = match (host::config("base_url"), preset) {
        (Some(url), _) => url,
        (None, Preset::OpenAi) => "https://api.openai.com/v1".into(),
        (None, Preset::Groq) => "https://api.groq.com/openai/v1".into(),
        (None, Preset::Azure) => {
            return Err(PluginError::InvalidInput(
                "the `azure` preset needs config `base_url`, the resource's endpoint (https://NAME.openai.azure.com)"
                    .into(),
            ));
        }
    };
    Ok(url.trim_end_matches('/').to_string())
}

/// The URL of an operation: `/chat/completions`, `/embeddings` or `/models`, for `deployment`
/// (the model) on Azure.
fn url(operation: &str, deployment: &str) -> Result<String, PluginError> {
    let preset = preset()?;
    let base = base_url(preset)?;
    if preset != Preset::Azure {
        return Ok(format!("{base}{operation}"));
    }
    let version = host::config("api_version").unwrap_or_else(|| "2024-10-21".into());
    let version = qlayer_sdk::http::percent_encode(&version);
    Ok(match operation {
        "/models" => format!("{base}/openai/models?api-version={version}"),
        _ => format!(
            "{base}/openai/deployments/{}{operation}?api-version={version}",
            qlayer_sdk::http::percent_encode(deployment)
        ),
    })
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

fn request(method_post: bool, operation: &str, deployment: &str) -> Result<Request, PluginError> {
    let url = url(operation, deployment)?;
    let mut r = if method_post { Request::post(url) } else { Request::get(url) };
    r = r.timeout(timeout()).header("accept", "application/json");
    if let Some(key) = host::secret("api_key").filter(|k| !k.is_empty()) {
        r = match preset()? {
            Preset::Azure => r.header("api-key", key),
            _ => r.header("authorization", format!("Bearer {key}")),
        };
    }
    Ok(r)
}

fn post_json(operation: &str, body: &Value) -> Result<Response, PluginError> {
    let deployment = body["model"].as_str().unwrap_or_default();
    let response = request(true, operation, deployment)?
        .header("content-type", "application/json")
        .body(body.to_string().into_bytes())
        .send()?;
    response.error_for_status()
}

fn role(r: Role) -> &'static str {
    match r {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

fn message(m: &Message) -> Value {
    // Text alone is sent as a string, which every compatible server takes; parts otherwise.
    let content = if m.content.iter().all(|p| matches!(p, ContentPart::Text(_))) {
        if m.content.is_empty() && !m.tool_calls.is_empty() { Value::Null } else { json!(m.text()) }
    } else {
        Value::Array(
            m.content
                .iter()
                .map(|p| match p {
                    ContentPart::Text(t) => json!({"type": "text", "text": t}),
                    ContentPart::ImageUrl(i) => match &i.detail {
                        Some(d) => json!({"type": "image_url", "image_url": {"url": i.url, "detail": d}}),
                        None => json!({"type": "image_url", "image_url": {"url": i.url}}),
                    },
                })
                .collect(),
        )
    };
    let mut out = json!({"role": role(m.role), "content": content});
    if !m.tool_calls.is_empty() {
        out["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
    }
    if let Some(id) = &m.tool_call_id {
        out["tool_call_id"] = json!(id);
    }
    if let Some(name) = &m.name {
        out["name"] = json!(name);
    }
    out
}

fn chat_body(req: &CompletionRequest, stream: bool) -> Result<Value, PluginError> {
    if req.messages.is_empty() {
        return Err(PluginError::InvalidInput("`messages` is empty".into()));
    }
    let mut body = json!({
        "model": model(&req.model, "model")?,
        "messages": req.messages.iter().map(message).collect::<Vec<_>>(),
    });
    if !req.tools.is_empty() {
        let mut tools = Vec::with_capacity(req.tools.len());
        for t in &req.tools {
            let mut function = json!({
                "name": t.name,
                "parameters": json::value(&t.parameters_json, &format!("the parameters of tool `{}`", t.name))?,
            });
            if let Some(d) = &t.description {
                function["description"] = json!(d);
            }
            if t.strict {
                function["strict"] = json!(true);
            }
            tools.push(json!({"type": "function", "function": function}));
        }
        body["tools"] = Value::Array(tools);
    }
    if let Some(choice) = &req.tool_choice {
        body["tool_choice"] = match choice {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::None => json!("none"),
            ToolChoice::Required => json!("required"),
            ToolChoice::Named(name) => json!({"type": "function", "function": {"name": name}}),
        };
    }
    if let Some(p) = req.parallel_tool_calls {
        body["parallel_tool_calls"] = json!(p);
    }
    match &req.response_format {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject => body["response_format"] = json!({"type": "json_object"}),
        ResponseFormat::JsonSchema(s) => {
            let mut schema = json!({
                "name": s.name,
                "schema": json::value(&s.schema_json, &format!("the response schema `{}`", s.name))?,
                "strict": s.strict,
            });
            if let Some(d) = &s.description {
                schema["description"] = json!(d);
            }
            body["response_format"] = json!({"type": "json_schema", "json_schema": schema});
        }
    }
    if let Some(t) = req.max_tokens {
        body["max_tokens"] = json!(t);
    }
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(p) = req.top_p {
        body["top_p"] = json!(p);
    }
    if let Some(k) = req.top_k {
        // Not in OpenAI's API; servers that take it (vLLM, llama.cpp) do, the others say so.
        body["top_k"] = json!(k);
    }
    if let Some(seed) = req.seed {
        body["seed"] = json!(seed);
    }
    if !req.stop.is_empty() {
        body["stop"] = json!(req.stop);
    }
    if let Some(user) = &req.user {
        body["user"] = json!(user);
    }
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    Ok(body)
}

fn finish_reason(reason: String) -> FinishReason {
    match reason.as_str() {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        _ => FinishReason::Other(reason),
    }
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
    #[serde(default)]
    tool_calls: Vec<ApiToolCall>,
}

#[derive(Deserialize)]
struct ApiToolCall {
    id: String,
    function: ApiFunction,
}

#[derive(Deserialize)]
struct ApiFunction {
    name: String,
    #[serde(default)]
    arguments: String,
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
    #[serde(default)]
    tool_calls: Vec<ApiToolCallDelta>,
}

#[derive(Deserialize)]
struct ApiToolCallDelta {
    index: u32,
    id: Option<String>,
    #[serde(default)]
    function: ApiFunctionDelta,
}

#[derive(Deserialize, Default)]
struct ApiFunctionDelta {
    name: Option<String>,
    arguments: Option<String>,
}

impl Provider for OpenAi {
    type Stream = SseStream;

    fn models() -> Result<Vec<ModelInfo>, PluginError> {
        let response = request(false, "/models", "")?.send()?.error_for_status()?;
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
            tool_calls: choice
                .message
                .tool_calls
                .into_iter()
                .map(|c| ToolCall { id: c.id, name: c.function.name, arguments: c.function.arguments })
                .collect(),
            finish_reason: finish_reason(choice.finish_reason.unwrap_or_else(|| "stop".into())),
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
            let (delta, tool_calls, reason) = match event.choices.into_iter().next() {
                Some(c) => (c.delta.content.unwrap_or_default(), c.delta.tool_calls, c.finish_reason),
                None => (String::new(), Vec::new(), None),
            };
            let chunk = CompletionChunk {
                delta,
                tool_calls: tool_calls
                    .into_iter()
                    .map(|t| ToolCallDelta {
                        index: t.index,
                        id: t.id,
                        name: t.function.name,
                        arguments: t.function.arguments.unwrap_or_default(),
                    })
                    .collect(),
                finish_reason: reason.map(finish_reason),
                usage: event.usage.map(Usage::from),
            };
            if chunk.delta.is_empty()
                && chunk.tool_calls.is_empty()
                && chunk.finish_reason.is_none()
                && chunk.usage.is_none()
            {
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
    fn messages_go_out_in_openai_shape() {
        let text = message(&Message::new(Role::User, "hi"));
        assert_eq!(text, json!({"role": "user", "content": "hi"}));
        let mut call = Message::new(Role::Assistant, "");
        call.content.clear();
        call.tool_calls.push(ToolCall { id: "c1".into(), name: "f".into(), arguments: "{}".into() });
        assert_eq!(
            message(&call),
            json!({"role": "assistant", "content": null,
                   "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
        );
        let mut image = Message::new(Role::User, "what is this?");
        image.content.push(ContentPart::ImageUrl(ImageUrl { url: "data:image/png;base64,AA==".into(), detail: None }));
        assert_eq!(
            message(&image)["content"][1],
            json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}})
        );
        let mut result = Message::new(Role::Tool, "42");
        result.tool_call_id = Some("c1".into());
        assert_eq!(message(&result), json!({"role": "tool", "content": "42", "tool_call_id": "c1"}));
    }
}
