//! Amazon Bedrock's Converse and ConverseStream APIs as a test double
//! (`POST /model/{model}/converse` and `/converse-stream` on [`crate::TestServer`]).
//!
//! It verifies every request's AWS Signature Version 4 as Bedrock does, with its own
//! implementation: the `Authorization` header's credential (access key [`ACCESS_KEY`], today's
//! date, a region, service `bedrock`), its signed headers (which must include `host` and
//! `x-amz-date`), `x-amz-content-sha256` matching the body, an `x-amz-date` within 15 minutes, and
//! the signature recomputed with [`SECRET_KEY`] over the path double-encoded; a mismatch is 403
//! `InvalidSignatureException`. The body must be Converse's: known fields only, roles alternating
//! from `user`, well-formed blocks, a `toolResult` answering a `toolUse` of the turn before.
//!
//! Models `rate-limit` (429 `ThrottlingException`), `stream-throttled` (an exception message in
//! the stream) and `cut-stream` (no `messageStop`) fail as named. With `toolConfig` (and no
//! `toolResult` in the last turn) it calls the named tool (else the first) with
//! `{"text": <last user text>}`; after a result it answers `echo: tool said: <result>`; else
//! `echo: <last user text>`. Usage: 7 in and 3 out whole, 5 and 2 streamed.

use crate::{Body, boundary, full, json};
use hmac::{Hmac, Mac};
use hyper::{Response, StatusCode};
use serde_json::{Value, json as j};
use sha2::{Digest, Sha256};

/// The access key id the test double accepts.
pub const ACCESS_KEY: &str = "AKIDQLAYERTEST";
/// Its secret.
pub const SECRET_KEY: &str = "qlayer/test+secret/for-bedrock";

fn error(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    let mut r = json(status, j!({"message": message}));
    r.headers_mut().insert(
        "x-amzn-errortype",
        format!("{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/")
            .parse()
            .unwrap_or_else(|_| unreachable!()),
    );
    r
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn mac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// `YYYYMMDDTHHMMSSZ` as Unix seconds.
fn parse_amz_date(d: &str) -> Option<i64> {
    let n = |r: std::ops::Range<usize>| d.get(r)?.parse::<i64>().ok();
    let (y, m, day, h, min, s) = (n(0..4)?, n(4..6)?, n(6..8)?, n(9..11)?, n(11..13)?, n(13..15)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400 + h * 3600 + min * 60 + s)
}

/// Verifies the request's signature; the refusal otherwise.
fn verify(method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> Result<(), Response<Body>> {
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    let denied = |why: &str| Err(error(StatusCode::FORBIDDEN, "InvalidSignatureException", why));
    let Some(auth) = header("authorization").and_then(|a| a.strip_prefix("AWS4-HMAC-SHA256 ")) else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        ));
    };
    let field = |name: &str| auth.split(", ").find_map(|p| p.strip_prefix(&format!("{name}="))).map(str::to_string);
    let (Some(credential), Some(signed), Some(signature)) =
        (field("Credential"), field("SignedHeaders"), field("Signature"))
    else {
        return denied("Authorization header requires Credential, SignedHeaders and Signature");
    };
    let parts: Vec<&str> = credential.split('/').collect();
    let [key, date, region, service, terminal] = parts[..] else { return denied("malformed Credential") };
    if key != ACCESS_KEY {
        return Err(error(
            StatusCode::FORBIDDEN,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        ));
    }
    if service != "bedrock" || terminal != "aws4_request" {
        return denied("Credential should be scoped to service 'bedrock'");
    }
    let Some(amz_date) = header("x-amz-date") else { return denied("x-amz-date is required") };
    if !amz_date.starts_with(date) || parse_amz_date(amz_date).is_none_or(|t| (t - unix_now()).abs() > 900) {
        return denied("Signature expired or the date does not match the credential scope");
    }
    let hash = hex::encode(Sha256::digest(body));
    if header("x-amz-content-sha256").is_some_and(|h| h != hash) {
        return denied("The provided 'x-amz-content-sha256' header does not match what was computed.");
    }
    let names: Vec<&str> = signed.split(';').collect();
    if !names.contains(&"host") || !names.contains(&"x-amz-date") {
        return denied("host and x-amz-date must be signed");
    }
    let mut canonical_headers = String::new();
    for name in &names {
        let Some(value) = header(name) else { return denied(&format!("signed header {name} is missing")) };
        canonical_headers.push_str(&format!("{name}:{}\n", value.split_whitespace().collect::<Vec<_>>().join(" ")));
    }
    let (raw_path, query) = path.split_once('?').unwrap_or((path, ""));
    let uri: Vec<String> = raw_path.split('/').map(encode).collect();
    let canonical = format!("{method}\n{}\n{query}\n{canonical_headers}\n{signed}\n{hash}", uri.join("/"));
    let scope = format!("{date}/{region}/bedrock/aws4_request");
    let to_sign =
        format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", hex::encode(Sha256::digest(canonical.as_bytes())));
    let mut k = mac(format!("AWS4{SECRET_KEY}").as_bytes(), date);
    for part in [region, "bedrock", "aws4_request"] {
        k = mac(&k, part);
    }
    if hex::encode(mac(&k, &to_sign)) != signature {
        return denied("The request signature we calculated does not match the signature you provided.");
    }
    Ok(())
}

fn invalid(message: String) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, "ValidationException", &message)
}

fn text_of(content: &Value) -> String {
    content.as_array().map(|b| b.iter().filter_map(|b| b["text"].as_str()).collect()).unwrap_or_default()
}

/// Checks the Converse body; the tool to call, if any.
fn check(body: &Value) -> Result<Option<String>, Response<Body>> {
    let Some(fields) = body.as_object() else { return Err(invalid("the body is not a JSON object".into())) };
    let allowed =
        ["messages", "system", "inferenceConfig", "toolConfig", "additionalModelRequestFields", "requestMetadata"];
    if let Some(extra) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(format!("Malformed input request: extraneous key [{extra}] is not permitted")));
    }
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let mut last_role = "";
    let mut open: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or("");
        if !matches!(role, "user" | "assistant") || role == last_role || (i == 0 && role != "user") {
            return Err(invalid(format!(
                "messages.{i}: conversation roles must alternate user/assistant, starting with user"
            )));
        }
        last_role = role;
        let mut calls = Vec::new();
        for (k, b) in m["content"].as_array().cloned().unwrap_or_default().iter().enumerate() {
            let ok = if b["text"].is_string() {
                true
            } else if b["image"].is_object() {
                b["image"]["source"]["bytes"].is_string() && b["image"]["format"].is_string()
            } else if b["toolUse"].is_object() {
                calls.push(b["toolUse"]["toolUseId"].as_str().unwrap_or("").to_string());
                role == "assistant" && b["toolUse"]["input"].is_object()
            } else if b["toolResult"].is_object() {
                role == "user" && open.iter().any(|id| b["toolResult"]["toolUseId"] == id.as_str())
            } else {
                false
            };
            if !ok {
                return Err(invalid(format!("messages.{i}.content.{k}: not a valid {role} block: {b}")));
            }
        }
        open = calls;
    }
    let tools = body["toolConfig"]["tools"].as_array().cloned().unwrap_or_default();
    for (i, t) in tools.iter().enumerate() {
        if !t["toolSpec"]["name"].is_string() || !t["toolSpec"]["inputSchema"]["json"].is_object() {
            return Err(invalid(format!("toolConfig.tools.{i}: needs toolSpec.name and toolSpec.inputSchema.json")));
        }
    }
    let answered = messages
        .last()
        .and_then(|m| m["content"].as_array())
        .is_some_and(|b| b.iter().any(|b| b["toolResult"].is_object()));
    if tools.is_empty() || answered {
        return Ok(None);
    }
    let named = body["toolConfig"]["toolChoice"]["tool"]["name"].as_str();
    Ok(named.or(tools[0]["toolSpec"]["name"].as_str()).map(str::to_string))
}

/// One event stream message with string headers.
fn frame(headers: &[(&str, &str)], payload: &Value) -> Vec<u8> {
    let payload = payload.to_string();
    let mut h = Vec::new();
    for (name, value) in headers {
        h.push(name.len() as u8);
        h.extend_from_slice(name.as_bytes());
        h.push(7);
        h.extend_from_slice(&(value.len() as u16).to_be_bytes());
        h.extend_from_slice(value.as_bytes());
    }
    let total = (12 + h.len() + payload.len() + 4) as u32;
    let mut out = total.to_be_bytes().to_vec();
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload.as_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn event(kind: &str, payload: Value) -> Vec<u8> {
    frame(&[(":event-type", kind), (":content-type", "application/json"), (":message-type", "event")], &payload)
}

/// Answers one Converse or ConverseStream request.
pub(crate) async fn converse(path: &str, headers: &[(String, String)], body: &[u8]) -> Response<Body> {
    if let Err(refused) = verify("POST", path, headers, body) {
        return refused;
    }
    let route = path.split('?').next().unwrap_or("");
    let Some(rest) = route.strip_prefix("/model/") else { return invalid("unknown operation".into()) };
    let Some((model, operation)) = rest.rsplit_once('/') else { return invalid("unknown operation".into()) };
    let model = model.replace("%3A", ":");
    let Ok(request) = serde_json::from_slice::<Value>(body) else { return invalid("Malformed input request".into()) };
    let tool = match check(&request) {
        Ok(tool) => tool,
        Err(refused) => return refused,
    };
    if model == "rate-limit" {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            "Too many requests, please wait before trying again.",
        );
    }
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    let last_user = messages
        .iter()
        .rev()
        .filter(|m| m["role"] == "user")
        .map(|m| text_of(&m["content"]))
        .find(|t| !t.is_empty())
        .unwrap_or_default();
    let result = messages
        .last()
        .and_then(|m| m["content"].as_array())
        .and_then(|b| b.iter().find(|b| b["toolResult"].is_object()).map(|b| text_of(&b["toolResult"]["content"])));
    let text = match result {
        Some(r) => format!("echo: tool said: {r}"),
        None => format!("echo: {last_user}"),
    };
    let input = j!({"text": last_user});
    if operation == "converse" {
        let (content, stop) = match &tool {
            Some(name) => {
                (j!([{"toolUse": {"toolUseId": "tooluse_test_1", "name": name, "input": input}}]), "tool_use")
            }
            None => (j!([{"text": text}]), "end_turn"),
        };
        return json(
            StatusCode::OK,
            j!({"output": {"message": {"role": "assistant", "content": content}}, "stopReason": stop,
                "usage": {"inputTokens": 7, "outputTokens": 3, "totalTokens": 10}, "metrics": {"latencyMs": 1}}),
        );
    }
    if operation != "converse-stream" {
        return invalid(format!("unknown operation {operation}"));
    }
    let mut out = event("messageStart", j!({"role": "assistant"}));
    let stop = match &tool {
        Some(name) => {
            out.extend(event(
                "contentBlockStart",
                j!({"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": "tooluse_test_1", "name": name}}}),
            ));
            let args = input.to_string();
            let (a, b) = (boundary(&args, args.len() / 3), boundary(&args, 2 * args.len() / 3));
            for piece in [&args[..a], &args[a..b], &args[b..]] {
                out.extend(event(
                    "contentBlockDelta",
                    j!({"contentBlockIndex": 0, "delta": {"toolUse": {"input": piece}}}),
                ));
            }
            "tool_use"
        }
        None => {
            let half = boundary(&text, text.len() / 2);
            for piece in [&text[..half], &text[half..]] {
                out.extend(event("contentBlockDelta", j!({"contentBlockIndex": 0, "delta": {"text": piece}})));
            }
            "end_turn"
        }
    };
    if model == "stream-throttled" {
        out.extend(frame(
            &[
                (":exception-type", "throttlingException"),
                (":content-type", "application/json"),
                (":message-type", "exception"),
            ],
            &j!({"message": "Too many tokens, please wait before trying again."}),
        ));
    } else if model != "cut-stream" {
        out.extend(event("contentBlockStop", j!({"contentBlockIndex": 0})));
        out.extend(event("messageStop", j!({"stopReason": stop})));
        out.extend(event(
            "metadata",
            j!({"usage": {"inputTokens": 5, "outputTokens": 2, "totalTokens": 7}, "metrics": {"latencyMs": 1}}),
        ));
    }
    full(StatusCode::OK, "application/vnd.amazon.eventstream", out)
}
