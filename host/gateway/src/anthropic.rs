//! Anthropic's Messages wire format, in one place: requests parsed and checked into the
//! contract's types, and messages, the streaming event sequence (`message_start` …
//! `message_stop`) and errors rendered as Anthropic sends them. Providers never see these shapes.

use crate::GatewayError;
use crate::request::ChatRequest;
use qlayer_runtime::{
    Completion, CompletionChunk, CompletionRequest, ContentPart, FinishReason, ImageUrl, JsonSchema, Message,
    ResponseFormat, Role, ToolCall, ToolChoice, ToolDefinition, Usage,
};
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
    tools: Option<Vec<WireTool>>,
    tool_choice: Option<WireToolChoice>,
    service_tier: Option<String>,
    thinking: Option<WireThinking>,
    context_management: Option<WireContextManagement>,
    output_config: Option<WireOutputConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireThinking {
    r#type: String,
    budget_tokens: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireContextManagement {
    edits: Vec<WireEdit>,
}

#[derive(Deserialize)]
struct WireEdit {
    r#type: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireOutputConfig {
    effort: Option<String>,
    format: Option<WireOutputFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireOutputFormat {
    r#type: String,
    schema: Option<serde_json::Map<String, Value>>,
}

/// The `anthropic-beta` feature that allows `system` messages among `messages`.
pub const MID_CONVERSATION_SYSTEM: &str = "mid-conversation-system-2026-04-07";

/// What the request's `anthropic-beta` header turns on that the parser honours.
#[derive(Debug, Clone, Copy, Default)]
pub struct Betas {
    /// `system` messages among `messages` ([`MID_CONVERSATION_SYSTEM`]).
    pub mid_conversation_system: bool,
}

impl Betas {
    /// The features named in `anthropic-beta` header values (comma-separated lists).
    pub fn from_header<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut betas = Betas::default();
        for name in values.into_iter().flat_map(|v| v.split(',')).map(str::trim) {
            if name == MID_CONVERSATION_SYSTEM {
                betas.mid_conversation_system = true;
            }
        }
        betas
    }
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireTool {
    r#type: Option<String>,
    name: String,
    description: Option<String>,
    input_schema: serde_json::Map<String, Value>,
    cache_control: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireToolChoice {
    r#type: String,
    name: Option<String>,
    disable_parallel_tool_use: Option<bool>,
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

/// Parses and checks a Messages request into the gateway's request; `betas` are the
/// `anthropic-beta` features it came with.
pub fn messages_request(body: &[u8], betas: Betas) -> Result<ChatRequest, GatewayError> {
    let w: WireMessages = crate::openai::parse(body)?;
    let mut unused = Vec::new();
    if let Some(t) = &w.thinking {
        match (t.r#type.as_str(), t.budget_tokens) {
            ("enabled", Some(budget)) if budget >= 1024 => unused.push("thinking"),
            ("enabled", _) => {
                return Err(invalid(
                    "thinking.budget_tokens",
                    "thinking.budget_tokens: type `enabled` needs a budget of at least 1024 tokens",
                ));
            }
            ("adaptive", None) => unused.push("thinking"),
            ("disabled", None) => {}
            ("adaptive" | "disabled", Some(_)) => {
                return Err(invalid(
                    "thinking.budget_tokens",
                    "thinking.budget_tokens: only type `enabled` takes a budget",
                ));
            }
            _ => {
                return Err(invalid("thinking.type", "thinking.type: expected `enabled`, `adaptive` or `disabled`"));
            }
        }
    }
    if let Some(cm) = &w.context_management {
        for (i, edit) in cm.edits.iter().enumerate() {
            // Answers here never carry thinking blocks, and earlier turns' are dropped (see
            // `blocks`): clearing them is already done. Clearing tool results is not offered.
            if !edit.r#type.starts_with("clear_thinking_") {
                return Err(invalid(
                    &format!("context_management.edits.{i}.type"),
                    format!(
                        "context_management.edits.{i}.type: `{}` is not available through this gateway (clear_thinking edits are)",
                        edit.r#type.escape_debug()
                    ),
                ));
            }
        }
    }
    let mut response_format = ResponseFormat::Text;
    if let Some(config) = w.output_config {
        match config.effort.as_deref() {
            None => {}
            Some("low" | "medium" | "high" | "max") => unused.push("output_config.effort"),
            Some(_) => {
                return Err(invalid(
                    "output_config.effort",
                    "output_config.effort: expected `low`, `medium`, `high` or `max`",
                ));
            }
        }
        if let Some(format) = config.format {
            match (format.r#type.as_str(), format.schema) {
                ("json_schema", Some(schema)) => {
                    response_format = ResponseFormat::JsonSchema(JsonSchema {
                        name: "output".into(),
                        description: None,
                        schema_json: Value::Object(schema).to_string(),
                        strict: true,
                    });
                }
                ("json_schema", None) => {
                    return Err(invalid(
                        "output_config.format.schema",
                        "output_config.format.schema: is required for type `json_schema`",
                    ));
                }
                _ => {
                    return Err(invalid(
                        "output_config.format.type",
                        "output_config.format.type: expected `json_schema`",
                    ));
                }
            }
        }
    }
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
    let user = w.metadata.and_then(|m| m.user_id);
    let mut tools = Vec::new();
    for (i, t) in w.tools.unwrap_or_default().into_iter().enumerate() {
        if t.r#type.as_deref().is_some_and(|ty| ty != "custom") {
            return Err(invalid(
                &format!("tools.{i}.type"),
                format!("tools.{i}.type: server tools are not available through this gateway (custom tools are)"),
            ));
        }
        let _ = t.cache_control;
        tools.push(ToolDefinition {
            name: t.name,
            description: t.description,
            parameters_json: Value::Object(t.input_schema).to_string(),
            strict: false,
        });
    }
    crate::openai::check_tools(&tools, |i| format!("tools.{i}.name"))?;
    let (tool_choice, parallel_tool_calls) = match w.tool_choice {
        None => (None, None),
        Some(c) => {
            if tools.is_empty() && c.r#type != "none" {
                return Err(invalid("tool_choice", "tool_choice: is only allowed when tools are given"));
            }
            let choice = match (c.r#type.as_str(), c.name) {
                ("auto", None) => ToolChoice::Auto,
                ("any", None) => ToolChoice::Required,
                ("none", None) => ToolChoice::None,
                ("tool", Some(name)) => {
                    if !tools.iter().any(|t| t.name == name) {
                        return Err(invalid(
                            "tool_choice.name",
                            format!("tool_choice.name: no tool named `{}` is defined in `tools`", name.escape_debug()),
                        ));
                    }
                    ToolChoice::Named(name)
                }
                ("tool", None) => {
                    return Err(invalid("tool_choice.name", "tool_choice.name: type `tool` names the tool"));
                }
                _ => {
                    return Err(invalid(
                        "tool_choice.type",
                        "tool_choice.type: expected `auto`, `any`, `tool` (with a name) or `none`",
                    ));
                }
            };
            (Some(choice), c.disable_parallel_tool_use.map(|d| !d))
        }
    };
    let mut messages = Vec::with_capacity(w.messages.len() + 1);
    if let Some(system) = &w.system {
        let parts = system_text(system)?;
        if !parts.is_empty() {
            messages.push(Message::new(Role::System, parts));
        }
    }
    if w.messages.is_empty() {
        return Err(invalid("messages", "messages: at least one message is needed"));
    }
    if w.messages.len() > crate::openai::MAX_MESSAGES {
        return Err(invalid("messages", format!("messages: the most is {}", crate::openai::MAX_MESSAGES)));
    }
    // The ids of the last assistant turn's tool uses not answered yet.
    let mut open_calls: Vec<String> = Vec::new();
    for (i, m) in w.messages.iter().enumerate() {
        let at = format!("messages.{i}");
        let role = match m.role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "system" if betas.mid_conversation_system => {
                let text = system_text(&m.content).map_err(|_| {
                    invalid(&format!("{at}.content"), format!("{at}.content: a system message is text"))
                })?;
                messages.push(Message::new(Role::System, text));
                continue;
            }
            "system" => {
                return Err(invalid(
                    &format!("{at}.role"),
                    format!(
                        "{at}.role: `system` messages need the `anthropic-beta: {MID_CONVERSATION_SYSTEM}` header (a system prompt goes in `system`)"
                    ),
                ));
            }
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
        let turn = blocks(&m.content, &format!("{at}.content"), role)?;
        if role == Role::Assistant {
            open_calls = turn.tool_calls.iter().map(|c| c.id.clone()).collect();
        } else {
            for (result, here) in &turn.results {
                let id = result.tool_call_id.as_deref().unwrap_or_default();
                let Some(pos) = open_calls.iter().position(|c| c == id) else {
                    let param = format!("{here}.tool_use_id");
                    return Err(invalid(
                        &param,
                        format!(
                            "{param}: `{}` answers no tool_use block of the assistant turn before it",
                            id.escape_debug()
                        ),
                    ));
                };
                open_calls.remove(pos);
            }
            open_calls.clear();
        }
        // Tool results become `tool` messages, ahead of the turn's other content.
        messages.extend(turn.results.into_iter().map(|(m, _)| m));
        if !turn.parts.is_empty() || !turn.tool_calls.is_empty() {
            messages.push(Message {
                role,
                content: turn.parts,
                tool_calls: turn.tool_calls,
                tool_call_id: None,
                name: None,
            });
        }
    }
    Ok(ChatRequest {
        cache: Default::default(),
        endpoint: "messages",
        model: w.model,
        request: CompletionRequest {
            tools,
            tool_choice,
            parallel_tool_calls,
            max_tokens: Some(w.max_tokens),
            response_format,
            temperature: w.temperature,
            top_p: w.top_p,
            top_k: w.top_k,
            stop: w.stop_sequences.unwrap_or_default(),
            user,
            ..CompletionRequest::new("", messages)
        },
        stream: w.stream.unwrap_or(false),
        include_usage: true,
        unused,
    })
}

/// Parses and checks a `count_tokens` request: a Messages request's `model`, `messages`,
/// `system`, `tools` and `tool_choice`, checked as for a message; any other field is refused by
/// name, as Anthropic does.
pub fn count_tokens_request(body: &[u8], betas: Betas) -> Result<ChatRequest, GatewayError> {
    let mut value: Value = crate::openai::parse(body)?;
    let Value::Object(fields) = &mut value else {
        return Err(GatewayError::invalid("the body must be a JSON object"));
    };
    let allowed =
        ["model", "messages", "system", "tools", "tool_choice", "thinking", "context_management", "output_config"];
    if let Some(extra) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(extra, format!("{extra}: Extra inputs are not permitted")).code("unknown_parameter"));
    }
    // The same checks as a message's; max_tokens is not part of a count.
    fields.insert("max_tokens".into(), json!(1));
    let mut chat = messages_request(value.to_string().as_bytes(), betas)?;
    chat.request.max_tokens = None;
    Ok(chat)
}

/// The system prompt: a string or text blocks, joined.
fn system_text(value: &Value) -> Result<String, GatewayError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(items) => {
            let mut text = String::new();
            for (j, block) in items.iter().enumerate() {
                match (block.get("type").and_then(Value::as_str), block.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(invalid(
                            &format!("system.{j}"),
                            format!("system.{j}: the system prompt is text blocks"),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(invalid("system", "system: expected a string or a list of text blocks")),
    }
}

/// One turn's content, split the way the contract carries it.
struct Turn {
    /// Text and images, in order.
    parts: Vec<ContentPart>,
    /// An assistant turn's `tool_use` blocks.
    tool_calls: Vec<ToolCall>,
    /// A user turn's `tool_result` blocks, as `tool` messages, with where each was.
    results: Vec<(Message, String)>,
}

/// A content value: a string, or blocks (text, image, tool_use in an assistant turn,
/// tool_result in a user turn).
fn blocks(value: &Value, at: &str, role: Role) -> Result<Turn, GatewayError> {
    let mut turn = Turn { parts: Vec::new(), tool_calls: Vec::new(), results: Vec::new() };
    let items = match value {
        Value::String(s) => {
            turn.parts.push(ContentPart::Text(s.clone()));
            return Ok(turn);
        }
        Value::Array(items) => items,
        _ => return Err(invalid(at, format!("{at}: expected a string or a list of content blocks"))),
    };
    for (j, block) in items.iter().enumerate() {
        let here = format!("{at}.{j}");
        let str_field = |name: &str| block.get(name).and_then(Value::as_str);
        match str_field("type") {
            Some("text") => match str_field("text") {
                Some(t) => turn.parts.push(ContentPart::Text(t.to_string())),
                None => return Err(invalid(&here, format!("{here}: a text block needs `text`"))),
            },
            Some("image") => turn.parts.push(ContentPart::ImageUrl(image(block, &here)?)),
            Some("tool_use") if role == Role::Assistant => {
                let (Some(id), Some(name)) = (str_field("id"), str_field("name")) else {
                    return Err(invalid(&here, format!("{here}: a tool_use block needs `id` and `name`")));
                };
                let input = block.get("input").filter(|i| i.is_object()).ok_or_else(|| {
                    invalid(&format!("{here}.input"), format!("{here}.input: a tool_use block's input is an object"))
                })?;
                turn.tool_calls.push(ToolCall {
                    id: id.to_string(),
                    name: name.to_string(),
                    arguments: input.to_string(),
                });
            }
            Some("tool_result") if role == Role::User => {
                let Some(id) = str_field("tool_use_id") else {
                    return Err(invalid(&here, format!("{here}: a tool_result block needs `tool_use_id`")));
                };
                let mut result = match block.get("content") {
                    None | Some(Value::Null) => Message::new(Role::Tool, ""),
                    Some(content) => {
                        let inner = blocks(content, &format!("{here}.content"), Role::Tool)?;
                        Message {
                            role: Role::Tool,
                            content: inner.parts,
                            tool_calls: vec![],
                            tool_call_id: None,
                            name: None,
                        }
                    }
                };
                if block.get("is_error").and_then(Value::as_bool) == Some(true) {
                    result.content.insert(0, ContentPart::Text("Error: ".into()));
                }
                result.tool_call_id = Some(id.to_string());
                turn.results.push((result, here));
            }
            // Earlier turns' thinking is dropped, as Anthropic drops it from the context.
            Some("thinking" | "redacted_thinking") if role == Role::Assistant => {}
            Some(kind @ ("tool_use" | "tool_result")) => {
                let wanted = if kind == "tool_use" { "assistant" } else { "user" };
                return Err(invalid(&here, format!("{here}: {kind} blocks belong in {wanted} turns")));
            }
            Some(other) => {
                return Err(invalid(
                    &here,
                    format!("{here}: blocks of type `{}` are not available through this gateway", other.escape_debug()),
                ));
            }
            None => return Err(invalid(&here, format!("{here}: a block needs a `type`"))),
        }
    }
    Ok(turn)
}

/// An image block's source as a URL: a `data:` URL for base64 data.
fn image(block: &Value, at: &str) -> Result<ImageUrl, GatewayError> {
    let source = block.get("source");
    let get = |name: &str| source.and_then(|s| s.get(name)).and_then(Value::as_str);
    match get("type") {
        Some("base64") => match (get("media_type"), get("data")) {
            (Some(media), Some(data)) => Ok(ImageUrl { url: format!("data:{media};base64,{data}"), detail: None }),
            _ => Err(invalid(
                &format!("{at}.source"),
                format!("{at}.source: a base64 image needs `media_type` and `data`"),
            )),
        },
        Some("url") => match get("url") {
            Some(url) => Ok(ImageUrl { url: url.to_string(), detail: None }),
            None => Err(invalid(&format!("{at}.source"), format!("{at}.source: a url image needs `url`"))),
        },
        _ => Err(invalid(&format!("{at}.source"), format!("{at}.source: expected a `base64` or `url` source"))),
    }
}

/// A tool call's arguments as the object Anthropic's `input` is: the model's JSON, or, when it
/// wrote something that is not an object, that text under `arguments`.
fn tool_input(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ if arguments.trim().is_empty() => json!({}),
        _ => json!({"arguments": arguments}),
    }
}

fn stop_reason(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "end_turn",
        FinishReason::Length => "max_tokens",
        FinishReason::ToolCalls => "tool_use",
        FinishReason::ContentFilter => "refusal",
        FinishReason::Other(other) => match other.as_str() {
            "stop_sequence" => "stop_sequence",
            "max_tokens" => "max_tokens",
            "tool_use" => "tool_use",
            _ => "end_turn",
        },
    }
}

fn content_blocks(c: &Completion) -> Value {
    let mut blocks = Vec::new();
    if !c.text.is_empty() || c.tool_calls.is_empty() {
        blocks.push(json!({"type": "text", "text": c.text}));
    }
    for t in &c.tool_calls {
        blocks.push(json!({"type": "tool_use", "id": t.id, "name": t.name, "input": tool_input(&t.arguments)}));
    }
    Value::Array(blocks)
}

/// A whole message as Anthropic sends it; `model` is the name the client asked for.
pub fn message(model: &str, c: &Completion) -> String {
    json!({
        "id": crate::openai::new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content_blocks(c),
        "stop_reason": stop_reason(&c.finish_reason),
        "stop_sequence": null,
        "usage": {"input_tokens": c.usage.prompt_tokens, "output_tokens": c.usage.completion_tokens},
    })
    .to_string()
}

/// Renders a stream as Anthropic's event sequence: `message_start`, the content blocks in order
/// (a text block with `text_delta`s, a `tool_use` block per tool call with `input_json_delta`s;
/// each `content_block_start` … `content_block_stop`), `message_delta` with the stop reason and
/// usage, and `message_stop`, which only a clean end writes.
#[derive(Debug)]
pub struct EventWriter {
    id: String,
    model: String,
    prompt_estimate: u32,
    started: bool,
    /// The open block: its index in the message, and the provider's tool call index if it is a
    /// tool_use block.
    open: Option<(u32, Option<u32>)>,
    blocks: u32,
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
            open: None,
            blocks: 0,
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
    }

    /// Closes the open block, if any.
    fn close(&mut self, out: &mut String) {
        if let Some((index, _)) = self.open.take() {
            event(out, "content_block_stop", json!({"type": "content_block_stop", "index": index}));
        }
    }

    /// Opens a new block, closing the one before.
    fn open(&mut self, out: &mut String, tool: Option<u32>, block: Value) -> u32 {
        self.close(out);
        let index = self.blocks;
        self.blocks += 1;
        self.open = Some((index, tool));
        event(
            out,
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        index
    }

    /// The events for one chunk from the provider.
    pub fn chunk(&mut self, c: &CompletionChunk, out: &mut String) {
        self.start(out);
        if self.stop.is_some() {
            if let Some(u) = c.usage {
                self.usage = Some(u);
            }
            return;
        }
        if !c.delta.is_empty() {
            let index = match self.open {
                Some((index, None)) => index,
                _ => self.open(out, None, json!({"type": "text", "text": ""})),
            };
            event(
                out,
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "text_delta", "text": c.delta}}),
            );
        }
        for t in &c.tool_calls {
            let index = match self.open {
                Some((index, Some(tool))) if tool == t.index && t.id.is_none() => index,
                _ => {
                    let block = json!({"type": "tool_use", "id": t.id.clone().unwrap_or_default(),
                        "name": t.name.clone().unwrap_or_default(), "input": {}});
                    self.open(out, Some(t.index), block)
                }
            };
            if !t.arguments.is_empty() {
                event(
                    out,
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": t.arguments}}),
                );
            }
        }
        if let Some(reason) = &c.finish_reason {
            self.stop = Some(stop_reason(reason));
        }
        if let Some(u) = c.usage {
            self.usage = Some(u);
        }
    }

    /// The events of a clean end.
    pub fn end(&mut self, out: &mut String) {
        self.start(out);
        if self.blocks == 0 {
            self.open(out, None, json!({"type": "text", "text": ""}));
        }
        self.close(out);
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
            Betas::default(),
        )
        .unwrap();
        assert_eq!(r.request.messages.len(), 2);
        assert_eq!((r.request.messages[0].role, r.request.messages[1].text().as_str()), (Role::System, "hi"));
        assert_eq!((r.request.max_tokens, r.request.stop.clone()), (Some(10), vec!["END".to_string()]));
        let r = messages_request(
            br#"{"model": "m", "max_tokens": 10, "top_k": 5,
                "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
                "messages": [{"role": "user", "content": "go"},
                  {"role": "assistant", "content": [{"type": "text", "text": "calling"},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"},
                    {"type": "text", "text": "and?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}"#,
            Betas::default(),
        )
        .unwrap();
        let q = &r.request;
        assert_eq!(
            (q.tools[0].name.as_str(), q.tool_choice.clone(), q.parallel_tool_calls),
            ("f", Some(ToolChoice::Required), Some(false))
        );
        assert_eq!(q.top_k, Some(5));
        assert_eq!(q.messages[1].tool_calls[0].arguments, r#"{"a":1}"#);
        assert_eq!(
            (q.messages[2].role, q.messages[2].tool_call_id.as_deref(), q.messages[2].text()),
            (Role::Tool, Some("t1"), "x".into())
        );
        assert_eq!(q.messages[3].text(), "and?");
        assert!(matches!(&q.messages[3].content[1], ContentPart::ImageUrl(i) if i.url == "data:image/png;base64,AA=="));
        use qlayer_runtime::Unexpressible as F;
        assert_eq!(r.needs(), [F::Tools, F::ToolChoice, F::ToolMessages, F::ImageInput, F::TopK]);
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
            (
                r#"{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}]}"#,
                Some("messages.0.content.0.tool_use_id"),
            ),
            (
                r#"{"model": "m", "max_tokens": 1, "tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool", "name": "g"}, "messages": [{"role": "user", "content": "x"}]}"#,
                Some("tool_choice.name"),
            ),
        ] {
            let e = messages_request(body.as_bytes(), Betas::default()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, param), "{body}: {e:?}");
        }
    }

    #[test]
    fn a_stream_is_the_event_sequence_anthropic_sends() {
        let mut w = EventWriter::new("m", 4);
        let mut out = String::new();
        w.chunk(
            &CompletionChunk {
                delta: "Hi".into(),
                tool_calls: vec![],
                finish_reason: Some(FinishReason::Stop),
                usage: None,
            },
            &mut out,
        );
        w.chunk(
            &CompletionChunk {
                delta: String::new(),
                tool_calls: vec![],
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

    #[test]
    fn streamed_tool_calls_are_tool_use_blocks_with_input_json_deltas() {
        let mut w = EventWriter::new("m", 4);
        let mut out = String::new();
        let chunk = |delta: &str, calls: Vec<qlayer_runtime::ToolCallDelta>, f: Option<FinishReason>| CompletionChunk {
            delta: delta.into(),
            tool_calls: calls,
            finish_reason: f,
            usage: None,
        };
        let piece = |index: u32, id: Option<&str>, args: &str| qlayer_runtime::ToolCallDelta {
            index,
            id: id.map(str::to_string),
            name: id.map(|_| "f".to_string()),
            arguments: args.into(),
        };
        w.chunk(&chunk("Let me look.", vec![], None), &mut out);
        w.chunk(&chunk("", vec![piece(0, Some("t1"), "")], None), &mut out);
        w.chunk(&chunk("", vec![piece(0, None, "{\"a\":")], None), &mut out);
        w.chunk(&chunk("", vec![piece(0, None, " 1}")], None), &mut out);
        w.chunk(&chunk("", vec![piece(1, Some("t2"), "{}")], Some(FinishReason::ToolCalls)), &mut out);
        w.end(&mut out);
        let events: Vec<(String, Value)> = out
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once("\ndata: ").unwrap();
                (name.trim_start_matches("event: ").to_string(), serde_json::from_str(data).unwrap())
            })
            .collect();
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events[4].1["content_block"], json!({"type": "tool_use", "id": "t1", "name": "f", "input": {}}));
        assert_eq!((events[4].1["index"].clone(), events[8].1["index"].clone()), (json!(1), json!(2)));
        assert_eq!(events[5].1["delta"], json!({"type": "input_json_delta", "partial_json": "{\"a\":"}));
        assert_eq!(events[11].1["delta"]["stop_reason"], "tool_use");
    }

    #[test]
    fn a_message_with_tool_calls_has_tool_use_blocks() {
        let c = Completion {
            model: "x".into(),
            text: String::new(),
            tool_calls: vec![ToolCall { id: "t1".into(), name: "f".into(), arguments: "{\"a\": 1}".into() }],
            finish_reason: FinishReason::ToolCalls,
            usage: Usage { prompt_tokens: 1, completion_tokens: 2 },
        };
        let body: Value = serde_json::from_str(&message("m", &c)).unwrap();
        assert_eq!(body["content"], json!([{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]));
        assert_eq!(body["stop_reason"], "tool_use");
    }

    /// What Claude Code sends (2.1.197, captured): adaptive thinking, a clear-thinking context
    /// edit, an effort, a `system` message among `messages` under its beta, and an earlier
    /// turn's thinking block. Accepted; the hints no provider can act on are named as unused.
    #[test]
    fn claude_codes_requests_are_accepted_and_their_unusable_hints_named() {
        let body = br#"{"model": "m", "max_tokens": 32000, "stream": true,
            "system": [{"type": "text", "text": "You are", "cache_control": {"type": "ephemeral"}}],
            "thinking": {"type": "adaptive"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "output_config": {"effort": "high"},
            "metadata": {"user_id": "{\"session_id\": \"s\"}"},
            "messages": [{"role": "user", "content": "hi"},
              {"role": "system", "content": "Available agent types"},
              {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "x"},
                {"type": "text", "text": "hello"}]},
              {"role": "user", "content": "again"}]}"#;
        let betas = Betas::from_header(["claude-code-20250219, mid-conversation-system-2026-04-07,effort-2025-11-24"]);
        let r = messages_request(body, betas).unwrap();
        assert_eq!(r.unused, ["thinking", "output_config.effort"]);
        let roles: Vec<Role> = r.request.messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::System, Role::User, Role::System, Role::Assistant, Role::User]);
        assert_eq!(r.request.messages[3].text(), "hello", "the earlier turn's thinking is dropped");
        let e = messages_request(body, Betas::default()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages.1.role"), "{e:?}");
        assert!(e.message.contains(MID_CONVERSATION_SYSTEM), "{e:?}");
        // A JSON schema for the answer is structured output.
        let r = messages_request(
            br#"{"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
                "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}"#,
            Betas::default(),
        )
        .unwrap();
        assert!(
            matches!(&r.request.response_format, ResponseFormat::JsonSchema(s) if s.schema_json == r#"{"type":"object"}"#)
        );
        assert!(r.unused.is_empty());
        for (extra, param) in [
            (r#""thinking": {"type": "enabled", "budget_tokens": 10}"#, "thinking.budget_tokens"),
            (r#""thinking": {"type": "sometimes"}"#, "thinking.type"),
            (
                r#""context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}"#,
                "context_management.edits.0.type",
            ),
            (r#""output_config": {"effort": "extreme"}"#, "output_config.effort"),
            (r#""output_config": {"format": {"type": "json_schema"}}"#, "output_config.format.schema"),
        ] {
            let body = format!(
                r#"{{"model": "m", "max_tokens": 10, "messages": [{{"role": "user", "content": "x"}}], {extra}}}"#
            );
            let e = messages_request(body.as_bytes(), Betas::default()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}: {e:?}");
        }
        let ok = br#"{"model": "m", "max_tokens": 2048, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled", "budget_tokens": 1024}}"#;
        assert_eq!(messages_request(ok, Betas::default()).unwrap().unused, ["thinking"]);
    }

    #[test]
    fn a_count_tokens_request_is_a_message_without_max_tokens_and_refuses_the_rest() {
        let r = count_tokens_request(
            br#"{"model": "m", "system": "be brief", "messages": [{"role": "user", "content": "hello there"}],
                "tools": [{"name": "f", "input_schema": {"type": "object"}}]}"#,
            Betas::default(),
        )
        .unwrap();
        assert_eq!((r.model.as_str(), r.request.max_tokens, r.request.tools.len()), ("m", None, 1));
        for (body, param) in [
            (r#"{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}"#, "max_tokens"),
            (r#"{"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]}"#, "stream"),
            (r#"{"model": "m", "messages": [{"role": "system", "content": "x"}]}"#, "messages.0.role"),
        ] {
            let e = count_tokens_request(body.as_bytes(), Betas::default()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}: {e:?}");
        }
    }
}
