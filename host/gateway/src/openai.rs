//! OpenAI's wire format, in one place: chat completion and embedding requests parsed and checked
//! into the contract's types, and completions, stream chunks, embeddings, model lists and errors
//! rendered as OpenAI sends them. Providers never see these shapes.

use crate::GatewayError;
use qlayer_runtime::{
    Completion, CompletionChunk, CompletionRequest, ContentPart, FinishReason, ImageUrl, JsonSchema, Message,
    ResponseFormat, Role, ToolCall, ToolChoice, ToolDefinition, Usage,
};
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
    response_format: Option<WireFormat>,
    tools: Option<Vec<WireTool>>,
    tool_choice: Option<WireToolChoice>,
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
struct WireTool {
    r#type: String,
    function: WireFunction,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireFunction {
    name: String,
    description: Option<String>,
    parameters: Option<serde_json::Map<String, Value>>,
    strict: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WireToolChoice {
    Mode(String),
    Named(NamedTool),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedTool {
    r#type: String,
    function: NamedFunction,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedFunction {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireFormat {
    r#type: String,
    json_schema: Option<WireSchema>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSchema {
    name: String,
    description: Option<String>,
    schema: Option<serde_json::Map<String, Value>>,
    strict: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireToolCall {
    id: String,
    r#type: String,
    function: WireCalled,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireCalled {
    name: String,
    arguments: String,
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
    tool_calls: Option<Vec<WireToolCall>>,
    tool_call_id: Option<String>,
    refusal: Option<String>,
    /// Response-only fields that SDKs send back when a client appends the answer's message to
    /// the history (`messages.append(choice.message)`): annotations are ignored, as OpenAI does;
    /// audio and the deprecated function call are refused by name.
    annotations: Option<Value>,
    audio: Option<Value>,
    function_call: Option<Value>,
}

/// Whether `name` is a tool name OpenAI accepts: 1 to 64 letters, digits, `_` and `-`.
pub fn valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks the tool definitions shared by both APIs: how many, valid and distinct names.
pub fn check_tools(tools: &[ToolDefinition], at: impl Fn(usize) -> String) -> Result<(), GatewayError> {
    if tools.len() > MAX_TOOLS {
        return Err(invalid(
            "tools",
            format!("tools: {} tools, the most a request may define is {MAX_TOOLS}", tools.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, t) in tools.iter().enumerate() {
        let here = at(i);
        if !valid_tool_name(&t.name) {
            return Err(invalid(
                &here,
                format!(
                    "{here}: `{}` is not a valid tool name (1 to 64 of a-z, A-Z, 0-9, _ and -)",
                    t.name.escape_debug()
                ),
            ));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(invalid(&here, format!("{here}: tool `{}` is defined twice", t.name)));
        }
    }
    Ok(())
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
    let _ = (&w.store, &w.prompt_cache_key);
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
    let mut tools = Vec::new();
    for (i, t) in w.tools.unwrap_or_default().into_iter().enumerate() {
        if t.r#type != "function" {
            return Err(invalid(
                &format!("tools[{i}].type"),
                format!(
                    "tools[{i}].type: `{}` tools are not available through this gateway (`function` is)",
                    t.r#type.escape_debug()
                ),
            ));
        }
        tools.push(ToolDefinition {
            name: t.function.name,
            description: t.function.description,
            parameters_json: match t.function.parameters {
                Some(p) => Value::Object(p).to_string(),
                None => r#"{"type":"object","properties":{}}"#.to_string(),
            },
            strict: t.function.strict.unwrap_or(false),
        });
    }
    check_tools(&tools, |i| format!("tools[{i}].function.name"))?;
    if (w.tool_choice.is_some() || w.parallel_tool_calls.is_some()) && tools.is_empty() {
        let param = if w.tool_choice.is_some() { "tool_choice" } else { "parallel_tool_calls" };
        return Err(invalid(param, format!("{param}: is only allowed when tools are given")));
    }
    let tool_choice = match w.tool_choice {
        None => None,
        Some(WireToolChoice::Mode(mode)) => Some(match mode.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(invalid(
                    "tool_choice",
                    format!(
                        "tool_choice: `{}` is not `auto`, `none`, `required` or a named function",
                        other.escape_debug()
                    ),
                ));
            }
        }),
        Some(WireToolChoice::Named(named)) => {
            if named.r#type != "function" {
                return Err(invalid("tool_choice.type", "tool_choice.type: expected `function`"));
            }
            if !tools.iter().any(|t| t.name == named.function.name) {
                return Err(invalid(
                    "tool_choice.function.name",
                    format!(
                        "tool_choice.function.name: no tool named `{}` is defined in `tools`",
                        named.function.name.escape_debug()
                    ),
                ));
            }
            Some(ToolChoice::Named(named.function.name))
        }
    };
    let response_format = match w.response_format {
        None => ResponseFormat::Text,
        Some(f) => match (f.r#type.as_str(), f.json_schema) {
            ("text", None) => ResponseFormat::Text,
            ("json_object", None) => ResponseFormat::JsonObject,
            ("json_schema", Some(schema)) => {
                if !valid_tool_name(&schema.name) {
                    return Err(invalid(
                        "response_format.json_schema.name",
                        "response_format.json_schema.name: 1 to 64 of a-z, A-Z, 0-9, _ and -",
                    ));
                }
                ResponseFormat::JsonSchema(JsonSchema {
                    name: schema.name,
                    description: schema.description,
                    schema_json: Value::Object(schema.schema.unwrap_or_default()).to_string(),
                    strict: schema.strict.unwrap_or(false),
                })
            }
            ("json_schema", None) => {
                return Err(invalid(
                    "response_format.json_schema",
                    "response_format.json_schema: is required for type `json_schema`",
                ));
            }
            ("text" | "json_object", Some(_)) => {
                return Err(invalid(
                    "response_format.json_schema",
                    "response_format.json_schema: only goes with type `json_schema`",
                ));
            }
            _ => {
                return Err(invalid(
                    "response_format.type",
                    "response_format.type: expected `text`, `json_object` or `json_schema`",
                ));
            }
        },
    };
    let messages = messages(w.messages)?;
    if let Some(options) = &w.stream_options {
        refuse_unless(w.stream == Some(true), "stream_options", "only allowed when `stream` is true")?;
        let _ = options.include_obfuscation;
    }
    Ok(ChatRequest {
        cache: Default::default(),
        unused: Vec::new(),
        endpoint: "chat",
        model: w.model,
        request: CompletionRequest {
            tools,
            tool_choice,
            parallel_tool_calls: w.parallel_tool_calls,
            response_format,
            max_tokens,
            temperature: w.temperature,
            top_p: w.top_p,
            seed: w.seed,
            stop,
            user: w.user.or(w.safety_identifier),
            ..CompletionRequest::new("", messages)
        },
        stream: w.stream.unwrap_or(false),
        include_usage: w.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
    })
}

fn messages(wire: Vec<WireMessage>) -> Result<Vec<Message>, GatewayError> {
    if wire.is_empty() {
        return Err(invalid("messages", "messages: at least one message is needed"));
    }
    if wire.len() > MAX_MESSAGES {
        return Err(invalid("messages", format!("messages: {} messages, the most is {MAX_MESSAGES}", wire.len())));
    }
    let mut out = Vec::with_capacity(wire.len());
    // The ids of the last assistant message's tool calls not answered yet.
    let mut open_calls: Vec<String> = Vec::new();
    for (i, m) in wire.into_iter().enumerate() {
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
        let _ = (&m.refusal, &m.annotations);
        for (field, value) in [("audio", &m.audio), ("function_call", &m.function_call)] {
            if value.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(invalid(
                    &format!("{at}.{field}"),
                    format!("{at}.{field}: is not available through this gateway (use tool_calls for calls)"),
                ));
            }
        }
        let content = content(&m.content, &at)?;
        if m.tool_calls.is_some() && role != Role::Assistant {
            return Err(invalid(
                &format!("{at}.tool_calls"),
                format!("{at}.tool_calls: only assistant messages make tool calls"),
            ));
        }
        if m.tool_call_id.is_some() && role != Role::Tool {
            return Err(invalid(
                &format!("{at}.tool_call_id"),
                format!("{at}.tool_call_id: only `tool` messages answer tool calls"),
            ));
        }
        let mut tool_calls = Vec::new();
        match role {
            Role::Tool => {
                let Some(id) = m.tool_call_id.clone().filter(|id| !id.is_empty()) else {
                    return Err(invalid(
                        &format!("{at}.tool_call_id"),
                        format!("{at}.tool_call_id: a `tool` message names the call it answers"),
                    ));
                };
                let Some(pos) = open_calls.iter().position(|c| *c == id) else {
                    return Err(invalid(
                        &format!("{at}.tool_call_id"),
                        format!(
                            "{at}.tool_call_id: `{}` answers no tool call of the assistant message before it",
                            id.escape_debug()
                        ),
                    ));
                };
                open_calls.remove(pos);
                if content.is_none() {
                    return Err(invalid(
                        &format!("{at}.content"),
                        format!("{at}.content: a tool message needs content"),
                    ));
                }
            }
            Role::Assistant => {
                open_calls.clear();
                for (j, call) in m.tool_calls.unwrap_or_default().into_iter().enumerate() {
                    let here = format!("{at}.tool_calls[{j}]");
                    if call.r#type != "function" {
                        return Err(invalid(&format!("{here}.type"), format!("{here}.type: expected `function`")));
                    }
                    if call.id.is_empty() || open_calls.contains(&call.id) {
                        return Err(invalid(&format!("{here}.id"), format!("{here}.id: each call needs its own id")));
                    }
                    open_calls.push(call.id.clone());
                    tool_calls.push(ToolCall {
                        id: call.id,
                        name: call.function.name,
                        arguments: call.function.arguments,
                    });
                }
                if content.is_none() && tool_calls.is_empty() {
                    return Err(invalid(
                        &format!("{at}.content"),
                        format!("{at}.content: an assistant message without tool calls needs content"),
                    ));
                }
            }
            _ => {
                open_calls.clear();
                if content.is_none() {
                    return Err(invalid(
                        &format!("{at}.content"),
                        format!("{at}.content: a {} message needs content", m.role),
                    ));
                }
            }
        }
        out.push(Message {
            role,
            content: content.unwrap_or_default(),
            tool_calls,
            tool_call_id: m.tool_call_id,
            name: m.name,
        });
    }
    Ok(out)
}

/// A message's content: a string, or text and image parts in order. `None` for null or absent.
fn content(value: &Value, at: &str) -> Result<Option<Vec<ContentPart>>, GatewayError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(vec![ContentPart::Text(s.clone())])),
        Value::Array(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let here = format!("{at}.content[{j}]");
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => match part.get("text").and_then(Value::as_str) {
                        Some(t) => out.push(ContentPart::Text(t.to_string())),
                        None => return Err(invalid(&here, format!("{here}: a text part needs `text`"))),
                    },
                    Some("image_url") => {
                        let Some(url) = part.pointer("/image_url/url").and_then(Value::as_str) else {
                            return Err(invalid(&here, format!("{here}: an image_url part needs `image_url.url`")));
                        };
                        let detail = part.pointer("/image_url/detail").and_then(Value::as_str);
                        if detail.is_some_and(|d| !matches!(d, "auto" | "low" | "high")) {
                            return Err(invalid(&here, format!("{here}: image_url.detail is `auto`, `low` or `high`")));
                        }
                        out.push(ContentPart::ImageUrl(ImageUrl {
                            url: url.to_string(),
                            detail: detail.map(str::to_string),
                        }));
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
            Ok(Some(out))
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
fn finish_reason(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::Other(other) => match other.as_str() {
            "max_tokens" => "length",
            "tool_use" => "tool_calls",
            _ => "stop",
        },
    }
}

fn tool_calls(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .map(|c| serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
        .collect()
}

fn message_body(c: &Completion) -> Value {
    let content =
        if c.text.is_empty() && !c.tool_calls.is_empty() { Value::Null } else { Value::from(c.text.as_str()) };
    let mut m = serde_json::json!({"role": "assistant", "content": content, "refusal": null, "annotations": []});
    if !c.tool_calls.is_empty() {
        m["tool_calls"] = tool_calls(&c.tool_calls);
    }
    m
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
            "message": message_body(c),
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
        if self.finish.is_none() {
            for t in &c.tool_calls {
                // A call's first piece carries its id, type and name; later ones only arguments.
                let mut piece = serde_json::json!({"index": t.index, "function": {"arguments": t.arguments}});
                if let Some(id) = &t.id {
                    piece["id"] = Value::from(id.as_str());
                    piece["type"] = Value::from("function");
                }
                if let Some(name) = &t.name {
                    piece["function"]["name"] = Value::from(name.as_str());
                }
                out.push_str(&self.event(serde_json::json!({"tool_calls": [piece]}), None));
            }
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
            self.chunk(
                &CompletionChunk { delta: String::new(), tool_calls: vec![], finish_reason: None, usage: None },
                out,
            );
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
        assert!(!r.stream && r.needs().is_empty());
        assert_eq!(r.request.messages[0].role, Role::System);
        assert_eq!(r.request.messages[1].text(), "hi there");
        assert_eq!(r.request.messages[1].content.len(), 2, "parts are kept apart");
        assert_eq!(
            (r.request.max_tokens, r.request.stop.clone(), r.request.response_format.clone()),
            (Some(5), vec!["END".to_string()], ResponseFormat::JsonObject)
        );
        assert_eq!(r.request.user.as_deref(), Some("u1"));
    }

    #[test]
    fn tools_tool_calls_and_schemas_reach_the_contract_whole() {
        let r = chat_request(
            br#"{"model": "m", "tools": [{"type": "function", "function": {"name": "get_weather",
                  "description": "now", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": true}}],
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": false,
                "top_p": 0.5, "seed": 7,
                "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": true}},
                "messages": [{"role": "user", "content": [{"type": "text", "text": "weather?"},
                                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]},
                  {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}"#,
        )
        .unwrap();
        let q = &r.request;
        assert_eq!(q.tools[0].name, "get_weather");
        assert!(q.tools[0].strict);
        assert_eq!(
            serde_json::from_str::<Value>(&q.tools[0].parameters_json).unwrap()["properties"]["city"]["type"],
            "string"
        );
        assert_eq!(q.tool_choice, Some(ToolChoice::Named("get_weather".into())));
        assert_eq!((q.parallel_tool_calls, q.top_p, q.seed), (Some(false), Some(0.5), Some(7)));
        assert!(matches!(&q.response_format, ResponseFormat::JsonSchema(s) if s.name == "w" && s.strict));
        assert!(matches!(&q.messages[0].content[1], ContentPart::ImageUrl(i) if i.detail.as_deref() == Some("low")));
        assert_eq!(q.messages[1].tool_calls[0].arguments, r#"{"city": "Oslo"}"#);
        assert_eq!((q.messages[2].role, q.messages[2].tool_call_id.as_deref()), (Role::Tool, Some("c1")));
        assert_eq!(
            r.needs(),
            [
                Feature::Tools,
                Feature::ToolChoice,
                Feature::ToolMessages,
                Feature::ImageInput,
                Feature::JsonSchema,
                Feature::TopP,
                Feature::Seed
            ]
        );
    }

    #[test]
    fn a_completion_with_tool_calls_is_rendered_as_openai_does() {
        let c = Completion {
            model: "x".into(),
            text: String::new(),
            tool_calls: vec![ToolCall { id: "c1".into(), name: "f".into(), arguments: "{}".into() }],
            finish_reason: FinishReason::ToolCalls,
            usage: Usage { prompt_tokens: 1, completion_tokens: 2 },
        };
        let body: Value = serde_json::from_str(&completion("m", &c)).unwrap();
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], Value::Null);
        assert_eq!(
            choice["message"]["tool_calls"],
            serde_json::json!([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}])
        );
    }

    #[test]
    fn what_the_contract_cannot_express_is_named_and_bad_input_is_refused_by_field() {
        let needs = |body: &str| chat_request(body.as_bytes()).unwrap().needs();
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
                "messages[0].tool_call_id",
                "answers no tool call",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "r", "tool_call_id": "c2"}]}"#,
                "messages[2].tool_call_id",
                "`c2` answers no tool call",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}"#,
                "tool_choice.function.name",
                "no tool named `g`",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]}"#,
                "tools[1].function.name",
                "defined twice",
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "no spaces"}}]}"#,
                "tools[0].function.name",
                "not a valid tool name",
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
        let chunk = |d: &str, f: Option<FinishReason>, u: Option<(u32, u32)>| CompletionChunk {
            delta: d.into(),
            tool_calls: vec![],
            finish_reason: f,
            usage: u.map(|(p, c)| Usage { prompt_tokens: p, completion_tokens: c }),
        };
        w.chunk(&chunk("Hel", None, None), &mut out);
        w.chunk(&chunk("lo", Some(FinishReason::Stop), None), &mut out);
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
    fn streamed_tool_calls_are_deltas_with_the_id_and_name_first() {
        let mut w = ChunkWriter::new("m", false);
        let mut out = String::new();
        let piece = |id: Option<&str>, name: Option<&str>, args: &str| qlayer_runtime::ToolCallDelta {
            index: 0,
            id: id.map(str::to_string),
            name: name.map(str::to_string),
            arguments: args.into(),
        };
        for (p, f) in [
            (piece(Some("c1"), Some("f"), ""), None),
            (piece(None, None, "{\"a\":"), None),
            (piece(None, None, " 1}"), Some(FinishReason::ToolCalls)),
        ] {
            w.chunk(
                &CompletionChunk { delta: String::new(), tool_calls: vec![p], finish_reason: f, usage: None },
                &mut out,
            );
        }
        w.end(&mut out);
        let events: Vec<Value> = out
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let deltas: Vec<&Value> = events.iter().map(|e| &e["choices"][0]["delta"]).collect();
        assert_eq!(
            deltas[1]["tool_calls"][0],
            serde_json::json!({"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}})
        );
        assert_eq!(deltas[2]["tool_calls"][0], serde_json::json!({"index": 0, "function": {"arguments": "{\"a\":"}}));
        assert_eq!(deltas[3]["tool_calls"][0]["function"]["arguments"], " 1}");
        assert_eq!(events[4]["choices"][0]["finish_reason"], "tool_calls");
        assert!(out.ends_with("data: [DONE]\n\n"));
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
