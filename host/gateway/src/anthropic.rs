//! Anthropic's Messages wire format, in one place: requests parsed and checked into the
//! contract's types, and messages, the streaming event sequence (`message_start` …
//! `message_stop`) and errors rendered as Anthropic sends them. Providers never see these shapes.

use crate::GatewayError;
use crate::request::{ChatRequest, Feature};
use qlayer_runtime::{Completion, CompletionChunk, CompletionRequest, Message, Role, Usage};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMessages {
    model: String,
    max_tokens: u32,
    messages: Vec<WireMessage>,
    system: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    stream: Option<bool>,
    metadata: Option<Metadata>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    service_tier: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    user_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMessage {
    role: String,
    content: Value,
}

fn invalid(param: &str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid(message).param(param)
}

/// Parses and checks a Messages request into the gateway's request.
pub fn messages_request(body: &[u8]) -> Result<ChatRequest, GatewayError> {
    let w: WireMessages = crate::openai::parse(body)?;
    if w.model.is_empty() {
        return Err(invalid("model", "model: give the model name to use"));
    }
    if w.max_tokens == 0 {
        return Err(invalid("max_tokens", "max_tokens: must be at least 1"));
    }
    if let Some(t) = w.temperature
        && !(0.0..=1.0).contains(&t)
    {
        return Err(invalid("temperature", format!("temperature: {t} is out of range 0 to 1")));
    }
    if let Some(p) = w.top_p
        && !(0.0..=1.0).contains(&p)
    {
        return Err(invalid("top_p", format!("top_p: {p} is out of range 0 to 1")));
    }
    if w.service_tier.as_deref().is_some_and(|t| t != "auto" && t != "standard_only") {
        return Err(invalid("service_tier", "service_tier: expected `auto` or `standard_only`"));
    }
    let _ = w.metadata.map(|m| m.user_id);
    let mut needs = Vec::new();
    if let Some(tools) = &w.tools {
        if tools.len() > crate::openai::MAX_TOOLS {
            return Err(invalid(
                "tools",
                format!("tools: the most a request may define is {}", crate::openai::MAX_TOOLS),
            ));
        }
        for (i, tool) in tools.iter().enumerate() {
            if tool.get("name").and_then(Value::as_str).is_none() {
                return Err(invalid(&format!("tools.{i}.name"), format!("tools.{i}.name: a tool needs a name")));
            }
        }
        if !tools.is_empty() {
            needs.push(Feature::Tools);
        }
    }
    if w.tool_choice.is_some() {
        needs.push(Feature::ToolChoice);
    }
    if w.top_p.is_some() {
        needs.push(Feature::TopP);
    }
    if w.top_k.is_some() {
        needs.push(Feature::TopK);
    }
    let mut messages = Vec::with_capacity(w.messages.len() + 1);
    if let Some(system) = &w.system {
        let text = blocks(system, "system", &mut needs)?;
        if !text.is_empty() {
            messages.push(Message { role: Role::System, content: text });
        }
    }
    if w.messages.is_empty() {
        return Err(invalid("messages", "messages: at least one message is needed"));
    }
    if w.messages.len() > crate::openai::MAX_MESSAGES {
        return Err(invalid("messages", format!("messages: the most is {}", crate::openai::MAX_MESSAGES)));
    }
    for (i, m) in w.messages.iter().enumerate() {
        let at = format!("messages.{i}");
        let role = match m.role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(invalid(
                    &format!("{at}.role"),
                    format!(
                        "{at}.role: `{}` is not `user` or `assistant` (a system prompt goes in `system`)",
                        other.escape_debug()
                    ),
                ));
            }
        };
        let text = blocks(&m.content, &format!("{at}.content"), &mut needs)?;
        messages.push(Message { role, content: text });
    }
    Ok(ChatRequest {
        endpoint: "messages",
        model: w.model,
        request: CompletionRequest {
            model: String::new(),
            messages,
            max_tokens: Some(w.max_tokens),
            temperature: w.temperature,
            stop: w.stop_sequences.unwrap_or_default(),
            json_output: false,
        },
        stream: w.stream.unwrap_or(false),
        include_usage: true,
        needs,
    })
}

/// A content value: a string, or blocks (text joined; tool and image blocks need a provider
/// that can express them).
fn blocks(value: &Value, at: &str, needs: &mut Vec<Feature>) -> Result<String, GatewayError> {
    let mut need = |f: Feature| {
        if !needs.contains(&f) {
            needs.push(f);
        }
    };
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(items) => {
            let mut text = String::new();
            for (j, block) in items.iter().enumerate() {
                let here = format!("{at}.{j}");
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => match block.get("text").and_then(Value::as_str) {
                        Some(t) => text.push_str(t),
                        None => return Err(invalid(&here, format!("{here}: a text block needs `text`"))),
                    },
                    Some("image") | Some("document") => need(Feature::ImageInput),
                    Some("tool_use") | Some("tool_result") => need(Feature::ToolMessages),
                    Some(other) => {
                        return Err(invalid(
                            &here,
                            format!(
                                "{here}: blocks of type `{}` are not available through this gateway",
                                other.escape_debug()
                            ),
                        ));
                    }
                    None => return Err(invalid(&here, format!("{here}: a block needs a `type`"))),
                }
            }
            Ok(text)
        }
        _ => Err(invalid(at, format!("{at}: expected a string or a list of content blocks"))),
    }
}

fn stop_reason(reason: &str) -> &'static str {
    match reason {
        "length" | "max_tokens" => "max_tokens",
        "tool_calls" | "tool-calls" | "tool_use" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// A whole message as Anthropic sends it; `model` is the name the client asked for.
pub fn message(model: &str, c: &Completion) -> String {
    json!({
        "id": crate::openai::new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": c.text}],
        "stop_reason": stop_reason(&c.finish_reason),
        "stop_sequence": null,
        "usage": {"input_tokens": c.usage.prompt_tokens, "output_tokens": c.usage.completion_tokens},
    })
    .to_string()
}

/// Renders a stream as Anthropic's event sequence: `message_start`, one text block
/// (`content_block_start`, its deltas, `content_block_stop`), `message_delta` with the stop
/// reason and usage, and `message_stop`, which only a clean end writes.
#[derive(Debug)]
pub struct EventWriter {
    id: String,
    model: String,
    prompt_estimate: u32,
    started: bool,
    stop: Option<&'static str>,
    usage: Option<Usage>,
}

fn event(out: &mut String, name: &str, data: Value) {
    out.push_str("event: ");
    out.push_str(name);
    out.push_str("\ndata: ");
    out.push_str(&data.to_string());
    out.push_str("\n\n");
}

impl crate::request::StreamWriter for EventWriter {
    fn chunk(&mut self, c: &CompletionChunk, out: &mut String) {
        EventWriter::chunk(self, c, out)
    }
    fn end(&mut self, out: &mut String) {
        EventWriter::end(self, out)
    }
    fn error(&self, e: &GatewayError, out: &mut String) {
        EventWriter::error(self, e, out)
    }
}

impl EventWriter {
    /// A writer for a stream of `model`; `prompt_estimate` is the input token count given in
    /// `message_start` (the real count follows in `message_delta`).
    pub fn new(model: &str, prompt_estimate: u32) -> Self {
        EventWriter {
            id: crate::openai::new_id("msg_"),
            model: model.to_string(),
            prompt_estimate,
            started: false,
            stop: None,
            usage: None,
        }
    }

    fn start(&mut self, out: &mut String) {
        if self.started {
            return;
        }
        self.started = true;
        event(
            out,
            "message_start",
            json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.prompt_estimate, "output_tokens": 0}
            }}),
        );
        event(
            out,
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        );
    }

    /// The events for one chunk from the provider.
    pub fn chunk(&mut self, c: &CompletionChunk, out: &mut String) {
        self.start(out);
        if !c.delta.is_empty() && self.stop.is_none() {
            event(
                out,
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": c.delta}}),
            );
        }
        if let Some(reason) = &c.finish_reason
            && self.stop.is_none()
        {
            self.stop = Some(stop_reason(reason));
        }
        if let Some(u) = c.usage {
            self.usage = Some(u);
        }
    }

    /// The events of a clean end.
    pub fn end(&mut self, out: &mut String) {
        self.start(out);
        event(out, "content_block_stop", json!({"type": "content_block_stop", "index": 0}));
        let usage = self.usage.unwrap_or(Usage { prompt_tokens: self.prompt_estimate, completion_tokens: 0 });
        event(
            out,
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": self.stop.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}}),
        );
        event(out, "message_stop", json!({"type": "message_stop"}));
    }

    /// The event of a stream cut short: an `error` event, and no `message_stop`.
    pub fn error(&self, e: &GatewayError, out: &mut String) {
        event(out, "error", error_value(e));
    }
}

/// Anthropic's error type for a status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 409 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

fn error_value(e: &GatewayError) -> Value {
    json!({"type": "error", "error": {"type": error_type(e.status), "message": e.message}})
}

/// `{"type": "error", "error": {"type", "message"}}`.
pub fn error_body(e: &GatewayError) -> String {
    error_value(e).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_messages_request_becomes_the_contracts_and_bad_ones_are_named() {
        let r = messages_request(
            br#"{"model": "m", "max_tokens": 10, "system": [{"type": "text", "text": "be brief"}],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "stop_sequences": ["END"], "metadata": {"user_id": "u"}}"#,
        )
        .unwrap();
        assert_eq!(r.request.messages.len(), 2);
        assert_eq!((r.request.messages[0].role, r.request.messages[1].content.as_str()), (Role::System, "hi"));
        assert_eq!((r.request.max_tokens, r.request.stop.clone()), (Some(10), vec!["END".to_string()]));
        let needs = messages_request(
            br#"{"model": "m", "max_tokens": 10, "tools": [{"name": "f", "input_schema": {}}],
                "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]}"#,
        )
        .unwrap()
        .needs;
        assert_eq!(needs, [Feature::Tools, Feature::ToolMessages]);
        for (body, param) in [
            (r#"{"model": "m", "messages": [{"role": "user", "content": "x"}]}"#, None),
            (
                r#"{"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]}"#,
                Some("messages.0.role"),
            ),
            (
                r#"{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "thinking": {}}"#,
                Some("thinking"),
            ),
            (r#"{"model": "m", "max_tokens": 1, "messages": []}"#, Some("messages")),
        ] {
            let e = messages_request(body.as_bytes()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, param), "{body}: {e:?}");
        }
    }

    #[test]
    fn a_stream_is_the_event_sequence_anthropic_sends() {
        let mut w = EventWriter::new("m", 4);
        let mut out = String::new();
        w.chunk(&CompletionChunk { delta: "Hi".into(), finish_reason: Some("stop".into()), usage: None }, &mut out);
        w.chunk(
            &CompletionChunk {
                delta: String::new(),
                finish_reason: None,
                usage: Some(Usage { prompt_tokens: 5, completion_tokens: 1 }),
            },
            &mut out,
        );
        w.end(&mut out);
        let names: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert!(out.contains(r#""stop_reason":"end_turn""#) && out.contains(r#""output_tokens":1"#), "{out}");
    }
}
