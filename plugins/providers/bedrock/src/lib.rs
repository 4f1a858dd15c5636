//! The `bedrock` provider: Amazon Bedrock's Converse and ConverseStream APIs, each request signed
//! with AWS Signature Version 4 inside the sandbox (the host never sees the secret key in use).
//!
//! Config: `region` (required: the signing region, and the endpoint
//! `https://bedrock-runtime.<region>.amazonaws.com` unless `base_url` says otherwise), `model`
//! (a model or inference profile id, used when a request names none), `max_tokens` (sent when a
//! request sets none), `timeout_ms` (default 60000). Secrets: `access_key_id`,
//! `secret_access_key`, and `session_token` for temporary credentials.
//!
//! The contract's request becomes a Converse request: system messages join into `system`; turns
//! of one role are merged (Converse wants them alternating); assistant tool calls become `toolUse`
//! blocks and `tool` messages `toolResult` blocks of a user turn; image parts with a `data:` URL
//! become `image` blocks (Converse takes no image URLs); tools go in `toolConfig` (`auto`, `any`,
//! or a named `tool`); `max-tokens`, `temperature`, `top-p` and stop sequences in
//! `inferenceConfig`; `top-k` in `additionalModelRequestFields`; `user` in `requestMetadata`.
//! JSON mode is asked for in the system prompt. What Converse cannot say is refused by name: a
//! JSON schema response format, tool choice `none`, `parallel-tool-calls: false`, `seed`.
//!
//! A stream is the event stream's messages (CRCs checked): text and tool-input deltas, the stop
//! reason, then the usage; it ends cleanly only after `messageStop`. Errors: throttling is
//! `rate-limited`; validation and not-found `invalid-input`; access denied, an unknown key or a bad
//! signature `unauthorized`; the rest `unavailable`.

mod eventstream;
mod sigv4;

use qlayer_sdk::http::{Request, Response, malformed};
use qlayer_sdk::provider::{ChunkSource, Provider};
use qlayer_sdk::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

struct Bedrock;

const MAX_BODY: usize = 16 << 20;

fn region() -> Result<String, PluginError> {
    host::config("region").filter(|r| !r.is_empty()).ok_or_else(|| {
        PluginError::InvalidInput("config `region` is not set (the AWS region of the Bedrock endpoint)".into())
    })
}

fn credentials() -> Result<sigv4::Credentials, PluginError> {
    let get = |key: &str| host::secret(key).filter(|v| !v.is_empty());
    match (get("access_key_id"), get("secret_access_key")) {
        (Some(access_key_id), Some(secret_access_key)) => {
            Ok(sigv4::Credentials { access_key_id, secret_access_key, session_token: get("session_token") })
        }
        _ => Err(PluginError::Unauthorized(
            "the secrets `access_key_id` and `secret_access_key` are not granted to this plugin".into(),
        )),
    }
}

/// The endpoint's scheme and authority, e.g. `https://bedrock-runtime.us-east-1.amazonaws.com`.
fn endpoint(region: &str) -> Result<(String, String), PluginError> {
    let base = host::config("base_url").unwrap_or_else(|| format!("https://bedrock-runtime.{region}.amazonaws.com"));
    let base = base.trim_end_matches('/');
    let (scheme, rest) = base
        .split_once("://")
        .ok_or_else(|| PluginError::InvalidInput(format!("config `base_url` ({base}) is not an http(s) URL")))?;
    if rest.contains('/') || rest.is_empty() {
        return Err(PluginError::InvalidInput(format!("config `base_url` ({base}) must be a scheme and host only")));
    }
    Ok((format!("{scheme}://{rest}"), rest.to_string()))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Sends `body` to `/model/{model}/{operation}`, signed.
fn post(model: &str, operation: &str, body: &Value) -> Result<Response, PluginError> {
    let region = region()?;
    let credentials = credentials()?;
    let (base, authority) = endpoint(&region)?;
    let path = format!("/model/{}/{operation}", sigv4::uri_encode(model));
    let payload = body.to_string().into_bytes();
    let amz_date = sigv4::amz_date(now_unix());
    let mut headers = vec![
        ("content-type".to_string(), "application/json".to_string()),
        ("host".to_string(), authority),
        ("x-amz-content-sha256".to_string(), sigv4::sha256_hex(&payload)),
        ("x-amz-date".to_string(), amz_date.clone()),
    ];
    if let Some(token) = &credentials.session_token {
        headers.push(("x-amz-security-token".to_string(), token.clone()));
    }
    let signing = sigv4::Signing {
        method: "POST",
        path: &path,
        query: "",
        headers: &headers,
        payload: &payload,
        amz_date: &amz_date,
        region: &region,
        service: "bedrock",
    };
    let authorization = sigv4::authorization(&signing, &credentials);
    let timeout = Duration::from_millis(host::config("timeout_ms").and_then(|v| v.parse().ok()).unwrap_or(60_000u64));
    let mut request = Request::post(format!("{base}{path}")).timeout(timeout).header("authorization", authorization);
    for (name, value) in headers.into_iter().filter(|(n, _)| n != "host") {
        // The host header is the URL's authority, which is what was signed.
        request = request.header(name, value);
    }
    check(request.header("accept", "application/json").body(payload).send()?)
}

/// A non-2xx answer as the contract's error, by AWS's error type.
fn check(response: Response) -> Result<Response, PluginError> {
    let status = response.status();
    if (200..300).contains(&status) {
        return Ok(response);
    }
    let kind = response.header("x-amzn-errortype").map(|t| t.split(':').next().unwrap_or(t).to_string());
    let body = response.text(64 * 1024).unwrap_or_default();
    let detail = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().or(v["Message"].as_str()).map(str::to_string))
        .unwrap_or_else(|| body.chars().take(300).collect());
    let kind = kind.unwrap_or_default();
    let message = format!("upstream answered {status} {kind}: {detail}");
    Err(match (status, kind.as_str()) {
        (429, _) | (_, "ThrottlingException") => PluginError::RateLimited(None),
        (401 | 403, _) => PluginError::Unauthorized(message),
        (400 | 404 | 413 | 422, _) => PluginError::InvalidInput(message),
        _ => PluginError::Unavailable(message),
    })
}

/// An image part as an `image` block: Converse takes the bytes inline.
fn image_block(image: &ImageUrl) -> Result<Value, PluginError> {
    let (media, data) = image.url.strip_prefix("data:").and_then(|r| r.split_once(";base64,")).ok_or_else(|| {
        PluginError::InvalidInput("Bedrock takes images inline: send them as data:<type>;base64,... URLs".into())
    })?;
    let format = match media {
        "image/png" => "png",
        "image/jpeg" | "image/jpg" => "jpeg",
        "image/gif" => "gif",
        "image/webp" => "webp",
        other => return Err(PluginError::InvalidInput(format!("Bedrock does not take images of type `{other}`"))),
    };
    Ok(json!({"image": {"format": format, "source": {"bytes": data}}}))
}

/// The request's messages as Converse's `system` and alternating `messages`.
fn conversation(req: &CompletionRequest) -> Result<(String, Vec<Value>), PluginError> {
    let turns = qlayer_sdk::provider::Turns {
        part: |p: &ContentPart| match p {
            ContentPart::Text(t) => Ok(json!({"text": t})),
            ContentPart::ImageUrl(i) => image_block(i),
        },
        call: |c: &ToolCall, input| json!({"toolUse": {"toolUseId": c.id, "name": c.name, "input": input}}),
        result: |id: &str, mut content: Vec<Value>| {
            if content.is_empty() {
                content.push(json!({"text": ""}));
            }
            json!({"toolResult": {"toolUseId": id, "content": content}})
        },
    };
    turns.of(req, "Bedrock's Converse API")
}

fn model(requested: &str) -> Result<String, PluginError> {
    if !requested.is_empty() {
        return Ok(requested.to_string());
    }
    host::config("model")
        .ok_or_else(|| PluginError::InvalidInput("the request names no model and no `model` is configured".into()))
}

/// The Converse request body.
fn converse_body(req: &CompletionRequest) -> Result<Value, PluginError> {
    let refuse = |what: &str| Err(PluginError::InvalidInput(format!("Bedrock's Converse API has no {what}")));
    if req.seed.is_some() {
        return refuse("`seed`; leave it out for this provider");
    }
    if req.parallel_tool_calls == Some(false) {
        return refuse("switch for parallel tool calls; leave `parallel_tool_calls` out");
    }
    if req.tool_choice == Some(ToolChoice::None) {
        return refuse("tool choice `none`; send no tools instead");
    }
    let (mut system, messages) = conversation(req)?;
    match &req.response_format {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject => {
            if !system.is_empty() {
                system.push_str("\n\n");
            }
            system.push_str("Reply with one JSON object and nothing else.");
        }
        ResponseFormat::JsonSchema(_) => {
            return refuse("response format with a JSON schema; describe the shape in the prompt");
        }
    }
    let mut body = json!({"messages": messages});
    if !system.is_empty() {
        body["system"] = json!([{"text": system}]);
    }
    let mut inference = serde_json::Map::new();
    let max_tokens = req.max_tokens.or_else(|| host::config("max_tokens").and_then(|v| v.parse().ok()));
    if let Some(t) = max_tokens {
        inference.insert("maxTokens".into(), json!(t));
    }
    if let Some(t) = req.temperature {
        inference.insert("temperature".into(), json!(t));
    }
    if let Some(p) = req.top_p {
        inference.insert("topP".into(), json!(p));
    }
    if !req.stop.is_empty() {
        inference.insert("stopSequences".into(), json!(req.stop));
    }
    if !inference.is_empty() {
        body["inferenceConfig"] = Value::Object(inference);
    }
    if !req.tools.is_empty() {
        let mut tools = Vec::with_capacity(req.tools.len());
        for t in &req.tools {
            let schema = json::value(&t.parameters_json, &format!("the parameters of tool `{}`", t.name))?;
            let mut spec = json!({"name": t.name, "inputSchema": {"json": schema}});
            if let Some(d) = &t.description {
                spec["description"] = json!(d);
            }
            tools.push(json!({"toolSpec": spec}));
        }
        let mut config = json!({"tools": tools});
        match &req.tool_choice {
            None | Some(ToolChoice::Auto) | Some(ToolChoice::None) => {}
            Some(ToolChoice::Required) => config["toolChoice"] = json!({"any": {}}),
            Some(ToolChoice::Named(name)) => config["toolChoice"] = json!({"tool": {"name": name}}),
        }
        body["toolConfig"] = config;
    }
    if let Some(k) = req.top_k {
        body["additionalModelRequestFields"] = json!({"top_k": k});
    }
    if let Some(user) = &req.user {
        body["requestMetadata"] = json!({"user": user});
    }
    Ok(body)
}

fn stop_reason(reason: &str) -> FinishReason {
    match reason {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "max_tokens" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "guardrail_intervened" | "content_filtered" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.to_string()),
    }
}

fn usage(v: &Value) -> Usage {
    let n = |k: &str| v[k].as_u64().unwrap_or(0) as u32;
    Usage {
        prompt_tokens: n("inputTokens")
            .saturating_add(n("cacheReadInputTokens"))
            .saturating_add(n("cacheWriteInputTokens")),
        completion_tokens: n("outputTokens"),
    }
}

impl Provider for Bedrock {
    type Stream = Events;

    fn models() -> Result<Vec<ModelInfo>, PluginError> {
        // Listing foundation models is the control plane's (bedrock.<region>), not the runtime
        // endpoint's; what this install serves is its configured model.
        Ok(host::config("model").into_iter().map(|id| ModelInfo { id, owned_by: "aws-bedrock".into() }).collect())
    }

    fn complete(req: CompletionRequest) -> Result<Completion, PluginError> {
        let model = model(&req.model)?;
        let text = post(&model, "converse", &converse_body(&req)?)?.text(MAX_BODY)?;
        let reply: Value = serde_json::from_str(&text).map_err(|e| malformed("Converse reply", e))?;
        let content = reply["output"]["message"]["content"]
            .as_array()
            .ok_or_else(|| malformed("Converse reply", "no output.message.content"))?;
        let mut out = String::new();
        let mut tool_calls = Vec::new();
        for block in content {
            if let Some(t) = block["text"].as_str() {
                out.push_str(t);
            } else if block["toolUse"].is_object() {
                let t = &block["toolUse"];
                tool_calls.push(ToolCall {
                    id: t["toolUseId"].as_str().unwrap_or_default().to_string(),
                    name: t["name"].as_str().unwrap_or_default().to_string(),
                    arguments: t["input"].to_string(),
                });
            }
        }
        Ok(Completion {
            model,
            text: out,
            tool_calls,
            finish_reason: stop_reason(reply["stopReason"].as_str().unwrap_or("end_turn")),
            usage: usage(&reply["usage"]),
        })
    }

    fn stream(req: CompletionRequest) -> Result<Events, PluginError> {
        let model = model(&req.model)?;
        let response = post(&model, "converse-stream", &converse_body(&req)?)?;
        Ok(Events { response: Some(response), tools: HashMap::new(), stopped: false })
    }

    fn embed(_: EmbeddingRequest) -> Result<Embeddings, PluginError> {
        Err(PluginError::InvalidInput(
            "this provider serves Converse only; route embeddings to another provider".into(),
        ))
    }
}

/// The event stream of ConverseStream.
struct Events {
    response: Option<Response>,
    /// Content block index → the tool call's index among the message's tool calls.
    tools: HashMap<u64, u32>,
    /// `messageStop` came: the body may end now.
    stopped: bool,
}

impl Events {
    fn message(&mut self) -> Result<Option<eventstream::Message>, PluginError> {
        let Some(response) = self.response.as_mut() else { return Ok(None) };
        let Some(prelude) = response.read_exact(12)? else {
            self.response = None;
            if self.stopped {
                return Ok(None);
            }
            return Err(PluginError::Unavailable("upstream closed the stream before messageStop".into()));
        };
        let total = eventstream::total_length(&prelude)?;
        let rest = response
            .read_exact(total - 12)?
            .ok_or_else(|| PluginError::Unavailable("upstream closed the stream inside a message".into()))?;
        let mut frame = prelude;
        frame.extend_from_slice(&rest);
        eventstream::decode(&frame).map(Some)
    }

    /// The chunk of one event, `None` for events that carry nothing for the contract.
    fn event(&mut self, m: &eventstream::Message) -> Result<Option<CompletionChunk>, PluginError> {
        let data: Value = serde_json::from_slice(&m.payload).map_err(|e| malformed("stream event", e))?;
        if m.header(":message-type") == Some("exception") {
            let kind = m.header(":exception-type").unwrap_or("exception");
            let message = data["message"].as_str().or(data["Message"].as_str()).unwrap_or_default();
            return Err(match kind {
                "throttlingException" => PluginError::RateLimited(None),
                "validationException" => PluginError::InvalidInput(format!("upstream: {kind}: {message}")),
                _ => PluginError::Unavailable(format!("upstream stream failed: {kind}: {message}")),
            });
        }
        let mut chunk = CompletionChunk { delta: String::new(), tool_calls: vec![], finish_reason: None, usage: None };
        match m.header(":event-type") {
            Some("contentBlockStart") if data["start"]["toolUse"].is_object() => {
                let index = self.tools.len() as u32;
                self.tools.insert(data["contentBlockIndex"].as_u64().unwrap_or(0), index);
                let t = &data["start"]["toolUse"];
                chunk.tool_calls.push(ToolCallDelta {
                    index,
                    id: t["toolUseId"].as_str().map(str::to_string),
                    name: t["name"].as_str().map(str::to_string),
                    arguments: String::new(),
                });
            }
            Some("contentBlockDelta") => {
                let delta = &data["delta"];
                if let Some(text) = delta["text"].as_str() {
                    chunk.delta = text.to_string();
                } else if let Some(input) = delta["toolUse"]["input"].as_str() {
                    let block = data["contentBlockIndex"].as_u64().unwrap_or(0);
                    let index = *self.tools.get(&block).ok_or_else(|| {
                        malformed("stream event", format!("tool input for block {block}, which is no toolUse"))
                    })?;
                    chunk.tool_calls.push(ToolCallDelta { index, id: None, name: None, arguments: input.to_string() });
                } else {
                    return Ok(None);
                }
            }
            Some("messageStop") => {
                self.stopped = true;
                chunk.finish_reason = Some(stop_reason(data["stopReason"].as_str().unwrap_or("end_turn")));
            }
            Some("metadata") => chunk.usage = Some(usage(&data["usage"])),
            _ => return Ok(None), // messageStart, contentBlockStop, and what later versions add
        }
        Ok(Some(chunk))
    }
}

impl ChunkSource for Events {
    fn next_chunk(&mut self) -> Result<Option<CompletionChunk>, PluginError> {
        loop {
            let message = match self.message() {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.response = None;
                    return Err(e);
                }
            };
            match self.event(&message) {
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

qlayer_sdk::export_provider!(Bedrock);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn turns_alternate_with_tool_results_in_user_turns() {
        let mut call = Message::new(Role::Assistant, "");
        call.content.clear();
        call.tool_calls.push(ToolCall { id: "t1".into(), name: "f".into(), arguments: r#"{"a":1}"#.into() });
        let mut result = Message::new(Role::Tool, "42");
        result.tool_call_id = Some("t1".into());
        let request = CompletionRequest::new(vec![
            Message::new(Role::System, "be brief"),
            Message::new(Role::User, "go"),
            call,
            result,
            Message::new(Role::User, "and?"),
        ]);
        let (system, turns) = conversation(&request).unwrap();
        assert_eq!(system, "be brief");
        assert_eq!(turns[1]["content"][0], json!({"toolUse": {"toolUseId": "t1", "name": "f", "input": {"a": 1}}}));
        assert_eq!(
            turns[2]["content"],
            json!([{"toolResult": {"toolUseId": "t1", "content": [{"text": "42"}]}}, {"text": "and?"}])
        );
    }

    #[test]
    fn images_are_inline_bytes_and_urls_are_refused() {
        let block = image_block(&ImageUrl { url: "data:image/jpeg;base64,AA==".into(), detail: None }).unwrap();
        assert_eq!(block, json!({"image": {"format": "jpeg", "source": {"bytes": "AA=="}}}));
        assert!(image_block(&ImageUrl { url: "https://x/y.png".into(), detail: None }).is_err());
    }
}
