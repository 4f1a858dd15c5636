//! Anthropic's Messages API as a test double (`POST /v1/messages` on [`crate::TestServer`]),
//! checking the wire format the real service expects: the `x-api-key` and `anthropic-version`
//! headers (401/400 without, in Anthropic's error shape), no unknown fields, roles alternating from
//! `user`, well-formed blocks, a `tool_result` answering a `tool_use` of the turn before, tools
//! with an `input_schema`, and `output_format` only with the structured-outputs beta header.
//!
//! Models `rate-limit` (429, Retry-After: 2), `overloaded` (529) and `cut-stream` (no
//! `message_stop`) fail as named. With tools (and no `tool_result` in the last turn) it calls the
//! named tool (else the first) with `{"text": <last user text>}`; after a result it answers
//! `echo: tool said: <result>`; with an `output_format` schema, an object of the schema's property
//! types; else `echo: <last user text>`. Usage: 7 in (plus 2 read from cache) and 3 out whole;
//! 5 and 2 streamed.

use crate::{Body, boundary, from_schema, json, sse};
use hyper::{Response, StatusCode};
use serde_json::{Value, json as j};

fn error(status: StatusCode, kind: &str, message: String) -> Response<Body> {
    json(status, j!({"type": "error", "error": {"type": kind, "message": message}}))
}

fn invalid(message: String) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// Checks the request as the API does; the tool to call, if any.
fn check(headers: &[(String, String)], body: &Value) -> Result<Option<String>, Response<Body>> {
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    if header("x-api-key").is_none() || header("authorization").is_some() {
        return Err(error(StatusCode::UNAUTHORIZED, "authentication_error", "x-api-key header is required".into()));
    }
    if header("anthropic-version").is_none() {
        return Err(invalid("anthropic-version: header is required".into()));
    }
    let Some(fields) = body.as_object() else { return Err(invalid("the body is not a JSON object".into())) };
    let allowed = [
        "model",
        "max_tokens",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "metadata",
        "stream",
        "output_format",
    ];
    if let Some(extra) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(format!("{extra}: Extra inputs are not permitted")));
    }
    if fields.contains_key("output_format")
        && !header("anthropic-beta").is_some_and(|b| b.contains("structured-outputs"))
    {
        return Err(invalid(
            "output_format: Extra inputs are not permitted (it needs the structured-outputs beta)".into(),
        ));
    }
    if !body["model"].is_string() || !body["max_tokens"].is_u64() {
        return Err(invalid("model and max_tokens: Field required".into()));
    }
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let mut last_role = "";
    let mut open: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or("");
        if !matches!(role, "user" | "assistant") || role == last_role || (i == 0 && role != "user") {
            return Err(invalid(format!(
                "messages.{i}: roles must alternate between user and assistant, starting with user"
            )));
        }
        last_role = role;
        let blocks = match &m["content"] {
            Value::String(_) => vec![],
            Value::Array(blocks) => blocks.clone(),
            _ => return Err(invalid(format!("messages.{i}.content: Input should be a valid list"))),
        };
        let mut calls = Vec::new();
        for (k, b) in blocks.iter().enumerate() {
            let ok = match b["type"].as_str() {
                Some("text") => b["text"].is_string(),
                Some("image") => matches!(b["source"]["type"].as_str(), Some("base64" | "url")),
                Some("tool_use") => {
                    calls.push(b["id"].as_str().unwrap_or("").to_string());
                    role == "assistant" && b["input"].is_object() && b["name"].is_string()
                }
                Some("tool_result") => role == "user" && open.iter().any(|id| b["tool_use_id"] == id.as_str()),
                _ => false,
            };
            if !ok {
                return Err(invalid(format!("messages.{i}.content.{k}: not a valid {role} block: {b}")));
            }
        }
        open = calls;
    }
    let tools = body["tools"].as_array().cloned().unwrap_or_default();
    for (i, t) in tools.iter().enumerate() {
        if !t["name"].is_string() || !t["input_schema"].is_object() {
            return Err(invalid(format!("tools.{i}: needs `name` and an `input_schema` object")));
        }
    }
    let choice = &body["tool_choice"];
    if tools.is_empty() || choice["type"] == "none" {
        return Ok(None);
    }
    let answered = messages
        .last()
        .and_then(|m| m["content"].as_array())
        .is_some_and(|b| b.iter().any(|b| b["type"] == "tool_result"));
    if answered {
        return Ok(None);
    }
    Ok(choice["name"].as_str().or(tools[0]["name"].as_str()).map(str::to_string))
}

fn event(name: &str, data: Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// Answers one `POST /v1/messages`.
pub(crate) async fn messages(headers: &[(String, String)], body: &str) -> Response<Body> {
    let Ok(request) = serde_json::from_str::<Value>(body) else { return invalid("the body is not valid JSON".into()) };
    let tool = match check(headers, &request) {
        Ok(tool) => tool,
        Err(refused) => return refused,
    };
    let model = request["model"].as_str().unwrap_or("ok").to_string();
    match model.as_str() {
        "rate-limit" => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "slow down".into());
            r.headers_mut().insert("retry-after", "2".parse().unwrap_or_else(|_| unreachable!()));
            return r;
        }
        "overloaded" => {
            let status = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return error(status, "overloaded_error", "Overloaded".into());
        }
        _ => {}
    }
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    let last_user_text = messages
        .iter()
        .rev()
        .filter(|m| m["role"] == "user")
        .map(|m| text_of(&m["content"]))
        .find(|t| !t.is_empty())
        .unwrap_or_default();
    let result = last["content"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["type"] == "tool_result"))
        .map(|b| text_of(&b["content"]));
    let text = match (&result, &request["output_format"]["schema"]) {
        (Some(r), _) => format!("echo: tool said: {r}"),
        (None, schema) if schema.is_object() => from_schema(schema, &format!("echo: {last_user_text}")).to_string(),
        _ => format!("echo: {last_user_text}"),
    };
    let input = j!({"text": last_user_text});
    if !request["stream"].as_bool().unwrap_or(false) {
        let (content, stop) = match &tool {
            Some(name) => (j!([{"type": "tool_use", "id": "toolu_test_1", "name": name, "input": input}]), "tool_use"),
            None => (j!([{"type": "text", "text": text}]), "end_turn"),
        };
        return json(
            StatusCode::OK,
            j!({"id": "msg_test", "type": "message", "role": "assistant", "model": model, "content": content,
                "stop_reason": stop, "stop_sequence": null,
                "usage": {"input_tokens": 7, "output_tokens": 3, "cache_read_input_tokens": 2}}),
        );
    }
    let mut events = vec![
        event(
            "message_start",
            j!({"type": "message_start", "message": {"id": "msg_test", "type": "message", "role": "assistant",
                "model": model, "content": [], "stop_reason": null, "usage": {"input_tokens": 5, "output_tokens": 1}}}),
        ),
        event("ping", j!({"type": "ping"})),
    ];
    let stop = match &tool {
        Some(name) => {
            events.push(event(
                "content_block_start",
                j!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "tool_use", "id": "toolu_test_1", "name": name, "input": {}}}),
            ));
            let args = input.to_string();
            let (a, b) = (boundary(&args, args.len() / 3), boundary(&args, 2 * args.len() / 3));
            for piece in [&args[..a], &args[a..b], &args[b..]] {
                events.push(event(
                    "content_block_delta",
                    j!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": piece}}),
                ));
            }
            "tool_use"
        }
        None => {
            events.push(event(
                "content_block_start",
                j!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ));
            let half = boundary(&text, text.len() / 2);
            for piece in [&text[..half], &text[half..]] {
                events.push(event(
                    "content_block_delta",
                    j!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
                ));
            }
            "end_turn"
        }
    };
    if model != "cut-stream" {
        events.push(event("content_block_stop", j!({"type": "content_block_stop", "index": 0})));
        events.push(event(
            "message_delta",
            j!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": 2}}),
        ));
        events.push(event("message_stop", j!({"type": "message_stop"})));
    }
    sse(events)
}
