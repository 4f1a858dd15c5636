//! OpenAI's wire format, in one place: chat completion and embedding requests parsed and checked
//! into the contract's types, and completions, stream chunks, embeddings, model lists and errors
//! rendered as OpenAI sends them. Providers never see these shapes.

use crate::GatewayError;
use qlayer_runtime::{Completion, CompletionChunk, CompletionRequest, Message, Role, Usage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::request::{ChatRequest, Feature};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireChat {
    model: String,
    messages: Vec<WireMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u32>,
    user: Option<String>,
    safety_identifier: Option<String>,
    metadata: Option<std::collections::BTreeMap<String, String>>,
    store: Option<bool>,
    response_format: Option<Value>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    logprobs: Option<bool>,
    service_tier: Option<String>,
    prompt_cache_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
    include_obfuscation: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: Value,
    name: Option<String>,
    tool_calls: Option<Vec<Value>>,
    tool_call_id: Option<String>,
    refusal: Option<String>,
}

/// The most messages one request may carry.
pub const MAX_MESSAGES: usize = 10_000;
/// The most tools one request may define.
pub const MAX_TOOLS: usize = 512;

fn invalid(param: &str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid(message).param(param)
}

/// A body's JSON, read into `T`: a syntax error, a wrong type (naming the field's path) or an
/// unknown field (named as OpenAI names it) is a 400.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let text = inner.to_string();
            if inner.is_syntax() || inner.is_eof() {
                return Err(GatewayError::invalid(format!("the body is not valid JSON: {text}")).code("malformed_json"));
            }
            if let Some(rest) = text.strip_prefix("unknown field `") {
                let field = rest.split('`').next().unwrap_or_default();
                // The path may or may not end with the unknown field itself.
                let full = if path == "." || path.is_empty() {
                    field.to_string()
                } else if path == field || path.ends_with(&format!(".{field}")) {
                    path.clone()
                } else {
                    format!("{path}.{field}")
                };
                return Err(
                    invalid(&full, format!("Unrecognized request argument supplied: {full}")).code("unknown_parameter")
                );
            }
            let text = text.split(" at line ").next().unwrap_or(&text).to_string();
            if path == "." || path.is_empty() {
                Err(GatewayError::invalid(text))
            } else {
                Err(invalid(&path, format!("{path}: {text}")))
            }
        }
    }
}

fn refuse_unless(ok: bool, param: &str, message: &str) -> Result<(), GatewayError> {
    if ok { Ok(()) } else { Err(invalid(param, format!("{param}: {message}")).code("unsupported_parameter")) }
}

/// Parses and checks a chat completion request.
pub fn chat_request(body: &[u8]) -> Result<ChatRequest, GatewayError> {
    let w: WireChat = parse(body)?;
    if w.model.is_empty() {
        return Err(invalid("model", "model: give the model name to use (see GET /v1/models)"));
    }
    refuse_unless(
        w.n.unwrap_or(1) == 1,
        "n",
        "this gateway returns one choice per request; send n = 1 or leave it out",
    )?;
    refuse_unless(
        !w.logprobs.unwrap_or(false),
        "logprobs",
        "log probabilities are not available through this gateway",
    )?;
    refuse_unless(
        w.logit_bias.as_ref().is_none_or(|b| b.is_empty()),
        "logit_bias",
        "logit bias is not available through this gateway",
    )?;
    refuse_unless(
        w.frequency_penalty.unwrap_or(0.0) == 0.0,
        "frequency_penalty",
        "penalties are not available through this gateway",
    )?;
    refuse_unless(
        w.presence_penalty.unwrap_or(0.0) == 0.0,
        "presence_penalty",
        "penalties are not available through this gateway",
    )?;
    refuse_unless(
        w.service_tier.as_deref().is_none_or(|t| t == "auto" || t == "default"),
        "service_tier",
        "only `auto` and `default` are available through this gateway",
    )?;
    let _ = (&w.user, &w.safety_identifier, &w.store, &w.prompt_cache_key);
    if let Some(metadata) = &w.metadata
        && (metadata.len() > 16 || metadata.iter().any(|(k, v)| k.chars().count() > 64 || v.chars().count() > 512))
    {
        return Err(invalid("metadata", "metadata: at most 16 pairs, keys up to 64 and values up to 512 characters"));
    }
    if let Some(t) = w.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(invalid("temperature", format!("temperature: {t} is out of range 0 to 2")));
    }
    if let Some(p) = w.top_p
        && !(0.0..=1.0).contains(&p)
    {
        return Err(invalid("top_p", format!("top_p: {p} is out of range 0 to 1")));
    }
    let stop = match w.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    refuse_unless(stop.len() <= 4, "stop", "at most 4 stop sequences")?;
    if w.max_tokens.is_some() && w.max_completion_tokens.is_some() && w.max_tokens != w.max_completion_tokens {
        return Err(invalid("max_tokens", "max_tokens and max_completion_tokens disagree; send one of them"));
    }
    let max_tokens = w.max_completion_tokens.or(w.max_tokens);
    if max_tokens == Some(0) {
        return Err(invalid("max_tokens", "max_tokens: must be at least 1"));
    }
    let mut needs = Vec::new();
    if let Some(tools) = &w.tools {
        if tools.len() > MAX_TOOLS {
            return Err(invalid(
                "tools",
                format!("tools: {} tools, the most a request may define is {MAX_TOOLS}", tools.len()),
            ));
        }
        for (i, tool) in tools.iter().enumerate() {
            if tool.get("type").and_then(Value::as_str) != Some("function")
                || tool.pointer("/function/name").and_then(Value::as_str).is_none()
            {
                return Err(invalid(
                    &format!("tools[{i}]"),
                    format!("tools[{i}]: a tool is `{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}`"),
                ));
            }
        }
        if !tools.is_empty() {
            needs.push(Feature::Tools);
        }
    }
    if w.tool_choice.is_some() || w.parallel_tool_calls.is_some() {
        if w.tools.as_ref().is_none_or(Vec::is_empty) {
            return Err(invalid("tool_choice", "tool_choice: is only allowed when tools are given"));
        }
        needs.push(Feature::ToolChoice);
    }
    if w.top_p.is_some() {
        needs.push(Feature::TopP);
    }
    if w.seed.is_some() {
        needs.push(Feature::Seed);
    }
    let mut json_output = false;
    if let Some(format) = &w.response_format {
        match format.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => json_output = true,
            Some("json_schema") => {
                if format.pointer("/json_schema/name").and_then(Value::as_str).is_none() {
                    return Err(invalid("response_format.json_schema", "response_format.json_schema: needs a `name`"));
                }
                needs.push(Feature::JsonSchema);
            }
            _ => {
                return Err(invalid(
                    "response_format.type",
                    "response_format.type: expected `text`, `json_object` or `json_schema`",
                ));
            }
        }
    }
    let messages = messages(&w.messages, &mut needs)?;
    if let Some(options) = &w.stream_options {
        refuse_unless(w.stream == Some(true), "stream_options", "only allowed when `stream` is true")?;
        let _ = options.include_obfuscation;
    }
    Ok(ChatRequest {
        endpoint: "chat",
        model: w.model,
        request: CompletionRequest {
            model: String::new(),
            messages,
            max_tokens,
            temperature: w.temperature,
            stop,
            json_output,
        },
        stream: w.stream.unwrap_or(false),
        include_usage: w.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        needs,
    })
}

fn messages(wire: &[WireMessage], needs: &mut Vec<Feature>) -> Result<Vec<Message>, GatewayError> {
    if wire.is_empty() {
        return Err(invalid("messages", "messages: at least one message is needed"));
    }
    if wire.len() > MAX_MESSAGES {
        return Err(invalid("messages", format!("messages: {} messages, the most is {MAX_MESSAGES}", wire.len())));
    }
    let mut out = Vec::with_capacity(wire.len());
    let mut open_tool_calls = false;
    for (i, m) in wire.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => {
                return Err(invalid(
                    &format!("{at}.role"),
                    format!(
                        "{at}.role: `{}` is not one of system, developer, user, assistant, tool",
                        other.escape_debug()
                    ),
                ));
            }
        };
        let _ = (&m.name, &m.refusal);
        let text = content(&m.content, &at, needs)?;
        match role {
            Role::Tool => {
                if !open_tool_calls {
                    return Err(invalid(
                        &format!("{at}.role"),
                        format!("{at}: a `tool` message must answer a tool call of an assistant message before it"),
                    ));
                }
                if m.tool_call_id.as_deref().is_none_or(str::is_empty) {
                    return Err(invalid(
                        &format!("{at}.tool_call_id"),
                        format!("{at}.tool_call_id: a `tool` message names the call it answers"),
                    ));
                }
                if !needs.contains(&Feature::ToolMessages) {
                    needs.push(Feature::ToolMessages);
                }
            }
            Role::Assistant => {
                open_tool_calls = m.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
                if open_tool_calls && !needs.contains(&Feature::ToolMessages) {
                    needs.push(Feature::ToolMessages);
                }
                if text.is_none() && !open_tool_calls {
                    return Err(invalid(
                        &format!("{at}.content"),
                        format!("{at}.content: an assistant message without tool calls needs content"),
                    ));
                }
            }
            _ => {
                open_tool_calls = false;
                if text.is_none() {
                    return Err(invalid(
                        &format!("{at}.content"),
                        format!("{at}.content: a {} message needs content", m.role),
                    ));
                }
            }
        }
        if m.tool_calls.is_some() && role != Role::Assistant {
            return Err(invalid(
                &format!("{at}.tool_calls"),
                format!("{at}.tool_calls: only assistant messages make tool calls"),
            ));
        }
        out.push(Message { role, content: text.unwrap_or_default() });
    }
    Ok(out)
}

/// A message's content: a string, or parts (text joined; an image part needs a provider that
/// takes images). `None` for null or absent.
fn content(value: &Value, at: &str, needs: &mut Vec<Feature>) -> Result<Option<String>, GatewayError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let here = format!("{at}.content[{j}]");
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => match part.get("text").and_then(Value::as_str) {
                        Some(t) => text.push_str(t),
                        None => return Err(invalid(&here, format!("{here}: a text part needs `text`"))),
                    },
                    Some("image_url") => {
                        if part.pointer("/image_url/url").and_then(Value::as_str).is_none() {
                            return Err(invalid(&here, format!("{here}: an image_url part needs `image_url.url`")));
                        }
                        if !needs.contains(&Feature::ImageInput) {
                            needs.push(Feature::ImageInput);
                        }
                    }
                    Some(other) => {
                        return Err(invalid(
                            &here,
                            format!(
                                "{here}: parts of type `{}` are not available through this gateway (text and image_url are)",
                                other.escape_debug()
                            ),
                        ));
                    }
                    None => return Err(invalid(&here, format!("{here}: a content part needs a `type`"))),
                }
            }
            Ok(Some(text))
        }
        _ => Err(invalid(&format!("{at}.content"), format!("{at}.content: expected a string or a list of parts"))),
    }
}

/// A parsed embeddings request.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    /// The model name asked for.
    pub model: String,
    /// The texts.
    pub inputs: Vec<String>,
    /// `encoding_format: base64` (what the official SDKs ask for by default).
    pub base64: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEmbed {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    user: Option<String>,
}

/// The most inputs one embeddings request may carry (OpenAI's own limit).
pub const MAX_INPUTS: usize = 2048;

/// Parses and checks an embeddings request.
pub fn embed_request(body: &[u8]) -> Result<EmbedRequest, GatewayError> {
    let w: WireEmbed = parse(body)?;
    let _ = w.user;
    if w.model.is_empty() {
        return Err(invalid("model", "model: give the model name to use"));
    }
    let base64 = match w.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(invalid(
                "encoding_format",
                format!("encoding_format: `{}` is not `float` or `base64`", other.escape_debug()),
            ));
        }
    };
    let inputs = match w.input {
        Value::String(s) => vec![s],
        Value::Array(items) if items.iter().all(Value::is_string) => {
            items.into_iter().filter_map(|v| if let Value::String(s) = v { Some(s) } else { None }).collect()
        }
        Value::Array(_) => {
            return Err(invalid("input", "input: token arrays are not available through this gateway; send text"));
        }
        _ => return Err(invalid("input", "input: expected a string or a list of strings")),
    };
    if inputs.is_empty() || inputs.len() > MAX_INPUTS {
        return Err(invalid("input", format!("input: 1 to {MAX_INPUTS} inputs, this request has {}", inputs.len())));
    }
    if inputs.iter().any(String::is_empty) {
        return Err(invalid("input", "input: an input is empty"));
    }
    Ok(EmbedRequest { model: w.model, inputs, base64 })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A new id with `prefix` (`chatcmpl-`...): 24 random letters and digits.
pub fn new_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 24);
    id.push_str(prefix);
    for _ in 0..24 {
        id.push(fastrand::alphanumeric());
    }
    id
}

#[derive(Serialize)]
struct WireUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl From<Usage> for WireUsage {
    fn from(u: Usage) -> Self {
        WireUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
        }
    }
}

/// OpenAI's finish reasons; anything else a provider says becomes `stop`.
fn finish_reason(reason: &str) -> &'static str {
    match reason {
        "length" | "max_tokens" => "length",
        "content_filter" => "content_filter",
        "tool_calls" | "tool-calls" => "tool_calls",
        _ => "stop",
    }
}

/// A whole completion as OpenAI sends it; `model` is the name the client asked for.
pub fn completion(model: &str, c: &Completion) -> String {
    let body = serde_json::json!({
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": c.text, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": finish_reason(&c.finish_reason),
        }],
        "usage": WireUsage::from(c.usage),
        "service_tier": "default",
        "system_fingerprint": null,
    });
    body.to_string()
}

/// Renders a stream's chunks as OpenAI's server-sent events: a first chunk with the role, one
/// per content delta, one with the finish reason, the usage chunk when asked for, then
/// `[DONE]`, which only a clean end writes.
#[derive(Debug)]
pub struct ChunkWriter {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    role_sent: bool,
    finish: Option<&'static str>,
    usage: Option<Usage>,
}

impl crate::request::StreamWriter for ChunkWriter {
    fn chunk(&mut self, c: &CompletionChunk, out: &mut String) {
        ChunkWriter::chunk(self, c, out)
    }
    fn end(&mut self, out: &mut String) {
        ChunkWriter::end(self, out)
    }
    fn error(&self, e: &GatewayError, out: &mut String) {
        ChunkWriter::error(self, e, out)
    }
}

impl ChunkWriter {
    /// A writer for a stream of `model` (the name the client asked for).
    pub fn new(model: &str, include_usage: bool) -> Self {
        ChunkWriter {
            id: new_id("chatcmpl-"),
            created: unix_now(),
            model: model.to_string(),
            include_usage,
            role_sent: false,
            finish: None,
            usage: None,
        }
    }

    fn event(&self, delta: Value, finish: Option<&str>) -> String {
        let mut chunk = serde_json::json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        format!("data: {chunk}\n\n")
    }

    /// The events for one chunk from the provider (none for an empty one).
    pub fn chunk(&mut self, c: &CompletionChunk, out: &mut String) {
        if !self.role_sent {
            self.role_sent = true;
            out.push_str(&self.event(serde_json::json!({"role": "assistant", "content": "", "refusal": null}), None));
        }
        if !c.delta.is_empty() && self.finish.is_none() {
            out.push_str(&self.event(serde_json::json!({"content": c.delta}), None));
        }
        if let Some(reason) = &c.finish_reason
            && self.finish.is_none()
        {
            let reason = finish_reason(reason);
            self.finish = Some(reason);
            out.push_str(&self.event(serde_json::json!({}), Some(reason)));
        }
        if let Some(usage) = c.usage {
            self.usage = Some(usage);
        }
    }

    /// The events of a clean end: the finish reason if none came, the usage chunk when asked
    /// for, and `[DONE]`.
    pub fn end(&mut self, out: &mut String) {
        if !self.role_sent {
            self.chunk(&CompletionChunk { delta: String::new(), finish_reason: None, usage: None }, out);
        }
        if self.finish.is_none() {
            self.finish = Some("stop");
            out.push_str(&self.event(serde_json::json!({}), Some("stop")));
        }
        if self.include_usage {
            let usage = self.usage.unwrap_or(Usage { prompt_tokens: 0, completion_tokens: 0 });
            let chunk = serde_json::json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "service_tier": "default",
                "system_fingerprint": null,
                "choices": [],
                "usage": WireUsage::from(usage),
            });
            out.push_str(&format!("data: {chunk}\n\n"));
        }
        out.push_str("data: [DONE]\n\n");
    }

    /// The event of a stream cut short: an error, and no `[DONE]`.
    pub fn error(&self, e: &GatewayError, out: &mut String) {
        out.push_str(&format!("data: {}\n\n", error_body(e)));
    }
}

/// Embeddings as OpenAI sends them, floats or base64 (little-endian f32).
pub fn embeddings(model: &str, vectors: &[Vec<f32>], usage: Usage, base64: bool) -> String {
    use base64::Engine as _;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                serde_json::json!(v)
            };
            serde_json::json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    serde_json::json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
    })
    .to_string()
}

/// OpenAI's error type for a status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 404 | 409 | 413 | 415 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        _ => "server_error",
    }
}

/// `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(e: &GatewayError) -> String {
    serde_json::json!({
        "error": {
            "message": e.message,
            "type": error_type(e.status),
            "param": e.param,
            "code": e.code,
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn refused(body: &str) -> GatewayError {
        chat_request(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn a_plain_request_becomes_the_contracts() {
        let r = chat_request(
            br#"{"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
                "max_completion_tokens": 5, "stop": "END", "temperature": 0.5, "user": "u1",
                "metadata": {"k": "v"}, "response_format": {"type": "json_object"}, "n": 1}"#,
        )
        .unwrap();
        assert_eq!(r.model, "m");
        assert!(!r.stream && r.needs.is_empty());
        assert_eq!(r.request.messages[0].role, Role::System);
        assert_eq!(r.request.messages[1].content, "hi there");
        assert_eq!(
            (r.request.max_tokens, r.request.stop.clone(), r.request.json_output),
            (Some(5), vec!["END".to_string()], true)
        );
    }

    #[test]
    fn what_the_contract_cannot_express_is_named_and_bad_input_is_refused_by_field() {
        let needs = |body: &str| chat_request(body.as_bytes()).unwrap().needs;
        assert_eq!(
            needs(
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}"#
            ),
            [Feature::Tools, Feature::ToolChoice]
        );
        assert_eq!(
            needs(
                r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}"#
            ),
            [Feature::ImageInput]
        );
        assert_eq!(
            needs(r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0.5, "seed": 3}"#),
            [Feature::TopP, Feature::Seed]
        );
        for (body, param, says) in [
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "temprature": 1}"#,
                "temprature",
                "Unrecognized request argument supplied: temprature",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x", "nmae": "a"}]}"#,
                "messages[0].nmae",
                "Unrecognized request argument supplied: messages[0].nmae",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}"#,
                "n",
                "one choice per request",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
                "temperature",
                "invalid type",
            ),
            (r#"{"model": "m", "messages": []}"#, "messages", "at least one message"),
            (
                r#"{"model": "m", "messages": [{"role": "tool", "content": "x", "tool_call_id": "c1"}]}"#,
                "messages[0].role",
                "must answer a tool call",
            ),
            (r#"{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}"#, "messages[0].role", "not one of"),
            (r#"{"model": "m", "messages": [{"role": "user"}]}"#, "messages[0].content", "needs content"),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}"#,
                "stream_options",
                "only allowed when `stream` is true",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}"#,
                "tool_choice",
                "only allowed when tools",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}"#,
                "response_format.type",
                "expected `text`",
            ),
        ] {
            let e = refused(body);
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}: {e:?}");
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
        let e = refused(r#"{"model": "m", "messages": [{"role": "user", "content": "x"}"#);
        assert_eq!((e.status, e.code.as_deref()), (400, Some("malformed_json")));
        let e = chat_request(b"{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\"}]}")
            .unwrap_err();
        assert_eq!(e.status, 400, "invalid UTF-8: {e:?}");
    }

    #[test]
    fn a_stream_is_role_then_deltas_then_finish_then_usage_then_done() {
        let mut w = ChunkWriter::new("m", true);
        let mut out = String::new();
        let chunk = |d: &str, f: Option<&str>, u: Option<(u32, u32)>| CompletionChunk {
            delta: d.into(),
            finish_reason: f.map(str::to_string),
            usage: u.map(|(p, c)| Usage { prompt_tokens: p, completion_tokens: c }),
        };
        w.chunk(&chunk("Hel", None, None), &mut out);
        w.chunk(&chunk("lo", Some("stop"), None), &mut out);
        w.chunk(&chunk("", None, Some((3, 2))), &mut out);
        w.end(&mut out);
        let events: Vec<&str> = out.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 6, "{out}");
        let json = |e: &str| serde_json::from_str::<Value>(e.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(json(events[0])["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(json(events[1])["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(json(events[2])["choices"][0]["delta"]["content"], "lo");
        assert_eq!(json(events[3])["choices"][0]["finish_reason"], "stop");
        assert_eq!(json(events[4])["usage"]["total_tokens"], 5);
        assert_eq!(json(events[4])["choices"], serde_json::json!([]));
        assert_eq!(events[5], "data: [DONE]");
        let ids: std::collections::HashSet<String> =
            events[..5].iter().map(|e| json(e)["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(ids.len(), 1, "one id for the stream");
    }

    #[test]
    fn embeddings_as_floats_or_base64() {
        let r = embed_request(br#"{"model": "e", "input": ["a", "b"], "encoding_format": "base64"}"#).unwrap();
        assert!(r.base64);
        let body: Value = serde_json::from_str(&embeddings(
            "e",
            &[vec![1.0, -2.0]],
            Usage { prompt_tokens: 2, completion_tokens: 0 },
            true,
        ))
        .unwrap();
        use base64::Engine as _;
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(body["data"][0]["embedding"].as_str().unwrap()).unwrap();
        assert_eq!(bytes, [1.0f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat());
        let e = embed_request(br#"{"model": "e", "input": [[1, 2]]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input"));
    }
}
