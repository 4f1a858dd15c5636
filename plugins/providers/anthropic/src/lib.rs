//! The `anthropic` provider: Anthropic's Messages API (`POST /v1/messages`).
//!
//! Config: `base_url` (default `https://api.anthropic.com`), `model` (used when a request names
//! none), `max_tokens` (sent when a request sets none, as the API requires one; default 4096),
//! `anthropic_version` (the `anthropic-version` header, default `2023-06-01`), `timeout_ms`
//! (default 60000). Secret: `api_key`, sent as `x-api-key`.
//!
//! The contract's request becomes a Messages request: system messages join into `system`;
//! assistant tool calls become `tool_use` blocks and `tool` messages `tool_result` blocks of a
//! user turn (consecutive turns of one role are merged, as the API wants them alternating);
//! image parts become `image` blocks (a `data:` URL as base64, others as a URL source); tools,
//! tool choice (`auto`, `any`, `tool`, `none`, with `disable_parallel_tool_use`), `top_p`,
//! `top_k`, stop sequences and `user` (as `metadata.user_id`) as the API names them. A JSON schema
//! response format is sent as `output_format` (with the structured-outputs beta header); a JSON
//! object response format, which the API has no mode for, is asked for in the system prompt.
//! `seed` does not exist in the API and is refused by name.
//!
//! Answers: text blocks join into the text, `tool_use` blocks become tool calls (their `input` as
//! JSON text), `stop_reason` maps onto the finish reason, and the usage counts cached input
//! tokens as input. A stream is the API's event sequence: text deltas, `input_json_delta` pieces
//! of tool calls, the usage of `message_start` and `message_delta`; it ends at `message_stop`,
//! and a stream that stops before it, or an `error` event, is an error. Upstream errors map onto
//! the contract's: 400/404/413 `invalid-input`, 401/403 `unauthorized`, 429 `rate-limited` with
//! Retry-After, 500/529 (overloaded) and malformed bodies `unavailable`.

use qlayer_sdk::http::{Request, Response, malformed};
use qlayer_sdk::provider::{ChunkSource, Provider};
use qlayer_sdk::*;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

struct Anthropic;

const MAX_BODY: usize = 16 << 20;
const MAX_LINE: usize = 1 << 20;
/// The beta that enables `output_format` (structured outputs).
const STRUCTURED_OUTPUTS_BETA: &str = "structured-outputs-2025-11-13";

fn base_url() -> String {
    host::config("base_url").unwrap_or_else(|| "https://api.anthropic.com".into()).trim_end_matches('/').to_string()
}

fn timeout() -> Duration {
    Duration::from_millis(host::config("timeout_ms").and_then(|v| v.parse().ok()).unwrap_or(60_000u64))
}

fn request(post: bool, path: &str) -> Request {
    let url = format!("{}{path}", base_url());
    let r = if post { Request::post(url) } else { Request::get(url) };
    let version = host::config("anthropic_version").unwrap_or_else(|| "2023-06-01".into());
    let mut r = r.timeout(timeout()).header("accept", "application/json").header("anthropic-version", version);
    if let Some(key) = host::secret("api_key").filter(|k| !k.is_empty()) {
        r = r.header("x-api-key", key);
    }
    r
}

/// An image part as an `image` block: a `data:` URL's bytes as base64, any other URL as a URL.
fn image_block(image: &ImageUrl) -> Result<Value, PluginError> {
    if let Some(rest) = image.url.strip_prefix("data:") {
        let (media, data) = rest.split_once(";base64,").ok_or_else(|| {
            PluginError::InvalidInput("an image data URL must be base64 (data:<type>;base64,...)".into())
        })?;
        return Ok(json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}));
    }
    Ok(json!({"type": "image", "source": {"type": "url", "url": image.url}}))
}

/// The request's messages as the API's `system` and alternating `messages`.
fn conversation(req: &CompletionRequest) -> Result<(String, Vec<Value>), PluginError> {
    let turns = qlayer_sdk::provider::Turns {
        part: |p: &ContentPart| match p {
            ContentPart::Text(t) => Ok(json!({"type": "text", "text": t})),
            ContentPart::ImageUrl(i) => image_block(i),
        },
        call: |c: &ToolCall, input| json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input}),
        result: |id: &str, content| json!({"type": "tool_result", "tool_use_id": id, "content": content}),
    };
    turns.of(req, "Anthropic's API")
}

fn model(requested: &str) -> Result<String, PluginError> {
    if !requested.is_empty() {
        return Ok(requested.to_string());
    }
    host::config("model")
        .ok_or_else(|| PluginError::InvalidInput("the request names no model and no `model` is configured".into()))
}

/// The Messages request body, and whether it needs the structured-outputs beta.
fn messages_body(req: &CompletionRequest, stream: bool) -> Result<(Value, bool), PluginError> {
    if req.seed.is_some() {
        return Err(PluginError::InvalidInput("Anthropic's API has no `seed`; leave it out for this provider".into()));
    }
    let (mut system, messages) = conversation(req)?;
    let default_max = host::config("max_tokens").and_then(|v| v.parse().ok()).unwrap_or(4096u32);
    let mut body = json!({
        "model": model(&req.model)?,
        "max_tokens": req.max_tokens.unwrap_or(default_max),
        "messages": messages,
    });
    let mut beta = false;
    match &req.response_format {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject => {
            if !system.is_empty() {
                system.push_str("\n\n");
            }
            system.push_str("Reply with one JSON object and nothing else.");
        }
        ResponseFormat::JsonSchema(s) => {
            let schema = json::value(&s.schema_json, &format!("the response schema `{}`", s.name))?;
            body["output_format"] = json!({"type": "json_schema", "schema": schema});
            beta = true;
        }
    }
    if !system.is_empty() {
        body["system"] = json!(system);
    }
    if !req.tools.is_empty() {
        let mut tools = Vec::with_capacity(req.tools.len());
        for t in &req.tools {
            let mut tool = json!({
                "name": t.name,
                "input_schema": json::value(&t.parameters_json, &format!("the parameters of tool `{}`", t.name))?,
            });
            if let Some(d) = &t.description {
                tool["description"] = json!(d);
            }
            tools.push(tool);
        }
        body["tools"] = Value::Array(tools);
    }
    let mut choice = match &req.tool_choice {
        None if req.parallel_tool_calls == Some(false) && !req.tools.is_empty() => Some(json!({"type": "auto"})),
        None => None,
        Some(ToolChoice::Auto) => Some(json!({"type": "auto"})),
        Some(ToolChoice::Required) => Some(json!({"type": "any"})),
        Some(ToolChoice::None) => Some(json!({"type": "none"})),
        Some(ToolChoice::Named(name)) => Some(json!({"type": "tool", "name": name})),
    };
    if let (Some(c), Some(false)) = (choice.as_mut(), req.parallel_tool_calls)
        && c["type"] != "none"
    {
        c["disable_parallel_tool_use"] = json!(true);
    }
    if let Some(c) = choice {
        body["tool_choice"] = c;
    }
    if let Some(t) = req.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(p) = req.top_p {
        body["top_p"] = json!(p);
    }
    if let Some(k) = req.top_k {
        body["top_k"] = json!(k);
    }
    if !req.stop.is_empty() {
        body["stop_sequences"] = json!(req.stop);
    }
    if let Some(user) = &req.user {
        body["metadata"] = json!({"user_id": user});
    }
    if stream {
        body["stream"] = json!(true);
    }
    Ok((body, beta))
}

fn post_messages(req: &CompletionRequest, stream: bool) -> Result<(Response, String), PluginError> {
    let (body, beta) = messages_body(req, stream)?;
    let mut r = request(true, "/v1/messages").header("content-type", "application/json");
    if beta {
        r = r.header("anthropic-beta", STRUCTURED_OUTPUTS_BETA);
    }
    let response = r.body(body.to_string().into_bytes()).send()?.error_for_status()?;
    Ok((response, body["model"].as_str().unwrap_or_default().to_string()))
}

fn stop_reason(reason: &str) -> FinishReason {
    match reason {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "max_tokens" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_string()),
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
struct ApiUsage {
    #[serde(default)]
    input_tokens: u32,
    #[serde(default)]
    output_tokens: u32,
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
}

impl ApiUsage {
    fn input(&self) -> u32 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
            .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
    }
}

#[derive(Deserialize)]
struct MessageReply {
    model: Option<String>,
    content: Vec<Value>,
    stop_reason: Option<String>,
    #[serde(default)]
    usage: ApiUsage,
}

impl Provider for Anthropic {
    type Stream = Events;

    fn models() -> Result<Vec<ModelInfo>, PluginError> {
        let text = request(false, "/v1/models").send()?.error_for_status()?.text(MAX_BODY)?;
        #[derive(Deserialize)]
        struct List {
            data: Vec<Item>,
        }
        #[derive(Deserialize)]
        struct Item {
            id: String,
        }
        let list: List = serde_json::from_str(&text).map_err(|e| malformed("model list", e))?;
        Ok(list.data.into_iter().map(|m| ModelInfo { id: m.id, owned_by: "anthropic".into() }).collect())
    }

    fn complete(req: CompletionRequest) -> Result<Completion, PluginError> {
        let (response, model) = post_messages(&req, false)?;
        let text = response.text(MAX_BODY)?;
        let reply: MessageReply = serde_json::from_str(&text).map_err(|e| malformed("message", e))?;
        let mut out = String::new();
        let mut tool_calls = Vec::new();
        for block in reply.content {
            match block["type"].as_str() {
                Some("text") => out.push_str(block["text"].as_str().unwrap_or_default()),
                Some("tool_use") => tool_calls.push(ToolCall {
                    id: block["id"].as_str().unwrap_or_default().to_string(),
                    name: block["name"].as_str().unwrap_or_default().to_string(),
                    arguments: block["input"].to_string(),
                }),
                _ => {} // thinking and server-tool blocks carry nothing the contract has
            }
        }
        Ok(Completion {
            model: reply.model.unwrap_or(model),
            text: out,
            tool_calls,
            finish_reason: stop_reason(reply.stop_reason.as_deref().unwrap_or("end_turn")),
            usage: Usage { prompt_tokens: reply.usage.input(), completion_tokens: reply.usage.output_tokens },
        })
    }

    fn stream(req: CompletionRequest) -> Result<Events, PluginError> {
        let (response, _) = post_messages(&req, true)?;
        Ok(Events { response: Some(response), tools: HashMap::new(), input_tokens: 0 })
    }

    fn embed(_: EmbeddingRequest) -> Result<Embeddings, PluginError> {
        Err(PluginError::InvalidInput("Anthropic's API has no embeddings; route embeddings to another provider".into()))
    }
}

/// The server-sent events of a streamed message.
struct Events {
    response: Option<Response>,
    /// Content block index → the tool call's index among the message's tool calls.
    tools: HashMap<u64, u32>,
    input_tokens: u32,
}

impl Events {
    fn chunk(&self) -> CompletionChunk {
        CompletionChunk { delta: String::new(), tool_calls: vec![], finish_reason: None, usage: None }
    }

    /// The chunk for one event's data, `None` for events that carry nothing for the contract.
    fn event(&mut self, data: &Value) -> Result<Option<CompletionChunk>, PluginError> {
        let mut chunk = self.chunk();
        match data["type"].as_str() {
            Some("message_start") => {
                let usage: ApiUsage = serde_json::from_value(data["message"]["usage"].clone()).unwrap_or_default();
                self.input_tokens = usage.input();
                return Ok(None);
            }
            Some("content_block_start") => {
                let block = &data["content_block"];
                if block["type"] != "tool_use" {
                    return Ok(None);
                }
                let index = self.tools.len() as u32;
                self.tools.insert(data["index"].as_u64().unwrap_or(0), index);
                chunk.tool_calls.push(ToolCallDelta {
                    index,
                    id: block["id"].as_str().map(str::to_string),
                    name: block["name"].as_str().map(str::to_string),
                    arguments: String::new(),
                });
            }
            Some("content_block_delta") => {
                let delta = &data["delta"];
                match delta["type"].as_str() {
                    Some("text_delta") => chunk.delta = delta["text"].as_str().unwrap_or_default().to_string(),
                    Some("input_json_delta") => {
                        let block = data["index"].as_u64().unwrap_or(0);
                        let index = *self.tools.get(&block).ok_or_else(|| {
                            malformed("stream event", format!("input for block {block}, which is no tool_use"))
                        })?;
                        chunk.tool_calls.push(ToolCallDelta {
                            index,
                            id: None,
                            name: None,
                            arguments: delta["partial_json"].as_str().unwrap_or_default().to_string(),
                        });
                    }
                    _ => return Ok(None),
                }
            }
            Some("message_delta") => {
                chunk.finish_reason = data["delta"]["stop_reason"].as_str().map(stop_reason);
                let usage: ApiUsage = serde_json::from_value(data["usage"].clone()).unwrap_or_default();
                let input = if usage.input() > 0 { usage.input() } else { self.input_tokens };
                chunk.usage = Some(Usage { prompt_tokens: input, completion_tokens: usage.output_tokens });
            }
            Some("error") => {
                let kind = data["error"]["type"].as_str().unwrap_or("error");
                let message = data["error"]["message"].as_str().unwrap_or_default();
                return Err(match kind {
                    "rate_limit_error" => PluginError::RateLimited(None),
                    _ => PluginError::Unavailable(format!("upstream stream failed: {kind}: {message}")),
                });
            }
            _ => return Ok(None), // ping, content_block_stop, and what later versions add
        }
        Ok(Some(chunk))
    }
}

impl ChunkSource for Events {
    fn next_chunk(&mut self) -> Result<Option<CompletionChunk>, PluginError> {
        loop {
            let Some(response) = self.response.as_mut() else { return Ok(None) };
            let Some(line) = response.next_line(MAX_LINE)? else {
                self.response = None;
                return Err(PluginError::Unavailable("upstream closed the stream before message_stop".into()));
            };
            let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
            let data: Value = serde_json::from_str(data).map_err(|e| malformed("stream event", e))?;
            if data["type"] == "message_stop" {
                self.response = None;
                return Ok(None);
            }
            match self.event(&data) {
                Ok(Some(chunk)) => return Ok(Some(chunk)),
                Ok(None) => continue,
                Err(e) => {
                    self.response = None;
                    return Err(e);
                }
            }
        }
    }
}

qlayer_sdk::export_provider!(Anthropic);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn with(messages: Vec<Message>) -> CompletionRequest {
        CompletionRequest { model: "m".into(), ..CompletionRequest::new(messages) }
    }

    #[test]
    fn tool_results_join_a_user_turn_and_system_messages_go_to_system() {
        let mut call = Message::new(Role::Assistant, "let me see");
        call.tool_calls.push(ToolCall { id: "t1".into(), name: "f".into(), arguments: r#"{"a":1}"#.into() });
        let mut result = Message::new(Role::Tool, "42");
        result.tool_call_id = Some("t1".into());
        let (system, turns) = conversation(&with(vec![
            Message::new(Role::System, "be brief"),
            Message::new(Role::User, "go"),
            call,
            result,
            Message::new(Role::User, "and?"),
        ]))
        .unwrap();
        assert_eq!(system, "be brief");
        assert_eq!(turns.len(), 3);
        assert_eq!(turns[1]["content"][1], json!({"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}));
        assert_eq!(
            turns[2]["content"],
            json!([{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "42"}]},
                   {"type": "text", "text": "and?"}])
        );
    }

    #[test]
    fn images_become_base64_or_url_sources() {
        let data = image_block(&ImageUrl { url: "data:image/png;base64,AA==".into(), detail: None }).unwrap();
        assert_eq!(data["source"], json!({"type": "base64", "media_type": "image/png", "data": "AA=="}));
        let url = image_block(&ImageUrl { url: "https://x/y.png".into(), detail: None }).unwrap();
        assert_eq!(url["source"], json!({"type": "url", "url": "https://x/y.png"}));
        assert!(image_block(&ImageUrl { url: "data:image/png,raw".into(), detail: None }).is_err());
    }

    #[test]
    fn stop_reasons_map_onto_the_contract() {
        assert_eq!(stop_reason("tool_use"), FinishReason::ToolCalls);
        assert_eq!(stop_reason("max_tokens"), FinishReason::Length);
        assert_eq!(stop_reason("pause_turn"), FinishReason::Other("pause_turn".into()));
    }
}
