//! The test harness: fixtures (test guests with the manifests a test needs) and a local
//! **OpenAI-compatible test server** — a test double that the tests start on a loopback port, so
//! providers are exercised over real HTTP without any real LLM API.

// The test servers' checks return their refusal, a whole response, as the error: made once per
// request, its size does not matter.
#![allow(clippy::result_large_err)]

pub mod anthropic;
pub mod bedrock;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use qlayer_runtime::{Runtime, RuntimeConfig};
use sqlx::Connection as _;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The test guests and marketplace examples, built for wasm by `tests/build.rs`.
pub mod built {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// The raw component (no manifest) of a test guest package.
pub fn guest(package: &str) -> Vec<u8> {
    read_listed(built::TEST_GUESTS, package, "test guest")
}

/// Reads the file that `list` (built by tests/build.rs) names for `key`.
fn read_listed(list: &[(&str, &str)], key: &str, what: &str) -> Vec<u8> {
    let path = list
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, path)| PathBuf::from(path))
        .unwrap_or_else(|| panic!("no {what} {key}"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A test guest with a manifest embedded.
pub fn guest_with(package: &str, manifest_toml: &str) -> Vec<u8> {
    let manifest = qlayer_manifest::Manifest::from_toml(manifest_toml).unwrap_or_else(|e| panic!("{e}"));
    qlayer_manifest::embed(&guest(package), &manifest).unwrap_or_else(|e| panic!("{e}"))
}

/// The hostile tool guest with a given memory limit and timeout.
pub fn hostile(memory_mb: u32, timeout_ms: u64) -> Vec<u8> {
    guest_with(
        "qlayer-test-hostile",
        &format!(
            "name = \"hostile\"\nversion = \"0.1.0\"\nkind = \"tool\"\ndescription = \"misbehaves on request\"\n[limits]\nmemory-mb = {memory_mb}\ntimeout-ms = {timeout_ms}\n"
        ),
    )
}

/// The fetcher provider guest, asking for any host.
pub fn fetcher() -> Vec<u8> {
    guest_with(
        "qlayer-test-fetcher",
        "name = \"fetcher\"\nversion = \"0.1.0\"\nkind = \"provider\"\ndescription = \"fetches URLs\"\n[capabilities]\noutbound-hosts = [\"*\"]\n[limits]\ntimeout-ms = 10000\n",
    )
}

/// The network policy of the tests' runtimes: their upstreams (test servers, registries) are on
/// loopback, which the operator's default policy refuses; nothing else internal is allowed.
pub fn loopback_allowed() -> qlayer_runtime::NetworkPolicy {
    qlayer_runtime::NetworkPolicy::new(&["127.0.0.0/8", "[::1]"]).unwrap_or_else(|e| panic!("{e}"))
}

/// A runtime with a small pool whose plugins may reach loopback (see [`loopback_allowed`]).
pub fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig {
        // The workspace's shared compile cache (`.cargo/config.toml`), so the big bundled plugins
        // (the `tests` validator's Python interpreter) compile once per machine, not per test.
        cache_dir: std::env::var_os("QLAYER_CACHE_DIR").map(std::path::PathBuf::from),
        policy: qlayer_runtime::HostPolicy { max_instances: 64, ..Default::default() },
        network: loopback_allowed(),
    })
    .unwrap_or_else(|e| panic!("runtime: {e:#}"))
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Vec<u8>>> = const { std::cell::RefCell::new(None) };
}

/// Events of threads without a capture buffer, while [`capture_all_logs`] runs.
static ALL_THREADS: std::sync::Mutex<Option<Vec<u8>>> = std::sync::Mutex::new(None);

/// Writes tracing output into the current thread's capture buffer, if one is set, else into the
/// all-threads buffer, if that one is.
struct ThreadCapture;

impl std::io::Write for ThreadCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mine = CAPTURE.with(|c| match c.borrow_mut().as_mut() {
            Some(out) => {
                out.extend_from_slice(buf);
                true
            }
            None => false,
        });
        if !mine && let Some(out) = ALL_THREADS.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            out.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` and returns every tracing event (all levels) emitted on this thread meanwhile. `f`
/// should run its async work on a [`current_thread`] runtime so the events stay on this thread.
///
/// One global subscriber serves the whole test binary: a scoped `with_default` subscriber is
/// unreliable when other test threads hit the same callsites (tracing caches callsite interest
/// globally), and would miss events.
pub fn capture_logs(f: impl FnOnce()) -> String {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(|| ThreadCapture)
            .with_ansi(false)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
    CAPTURE.with(|c| *c.borrow_mut() = Some(Vec::new()));
    f();
    let bytes = CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Like [`capture_logs`], with the events of other threads too (an Extism call runs on a
/// blocking thread): they may include other tests' events, so look for what names this test's
/// own tenant or plugin.
pub fn capture_all_logs(f: impl FnOnce()) -> String {
    *ALL_THREADS.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
    let mine = capture_logs(f);
    let others = ALL_THREADS.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
    mine + &String::from_utf8_lossy(&others)
}

/// A current-thread tokio runtime, for tests that capture logs.
pub fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"))
}

/// One request the test server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Path and query.
    pub path: String,
    /// The Authorization header, if any.
    pub authorization: Option<String>,
    /// The `api-key` header (Azure OpenAI's), if any.
    pub api_key: Option<String>,
    /// Every header, names lowercase, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

type Body = BoxBody<Bytes, Infallible>;

/// A local HTTP server on a free loopback port, serving the OpenAI-compatible API as a test
/// double, plus `/plain` (200) and `/redirect?to=URL` (302) for grant tests.
///
/// The chat behaviour is chosen by the request's `model`: `ok` (default), `rate-limit` (429 with
/// Retry-After: 2), `error-500`, `malformed` (200 with a broken body), `slow` (answers after 3 s),
/// `cut-stream` (a stream that stops before `[DONE]`), `unauthorized` (401).
///
/// Tools, as OpenAI takes them: each tool, `tool_choice` and `response_format` is checked
/// against OpenAI's wire format (a 400 naming what is wrong, as OpenAI answers). With tools and a
/// last message that is not a tool result, the answer calls the named tool (else the first) with
/// `{"text": <last user text>}`, streamed in three argument pieces; after a tool result it
/// answers `tool said: <result>`. A `json_schema` response format gets an object with a value of
/// each property's type (strings `echo: <last>`).
///
/// Anthropic's Messages API too (`/v1/messages`): see [`anthropic`]. Amazon Bedrock's Converse
/// and ConverseStream (`/model/{id}/converse`, `/converse-stream`), signatures verified: see
/// [`bedrock`].
///
/// Azure OpenAI's paths too: `/openai/deployments/{deployment}/chat/completions` and
/// `/embeddings` need `?api-version=` and an `api-key` header (401 without, as Azure answers);
/// the deployment is the model.
pub struct TestServer {
    /// `127.0.0.1:<port>`.
    pub addr: SocketAddr,
    /// Every request seen, in order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Seen {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl TestServer {
    /// Starts the server on a free port.
    pub async fn start() -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let log = seen.clone();
        let accepted_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted_count.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = &mut rx => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let log = log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, log.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestServer { addr, seen, accepted: accepted_count, _shutdown: tx }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests seen so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", content_type.parse().unwrap_or_else(|_| unreachable!()));
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    full(status, "application/json", v.to_string())
}

async fn handle(req: Request<hyper::body::Incoming>, log: Arc<Mutex<Vec<Seen>>>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
    let api_key = req.headers().get("api-key").and_then(|v| v.to_str().ok()).map(str::to_string);
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let raw = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body = String::from_utf8_lossy(&raw).into_owned();
    if let Ok(mut l) = log.lock() {
        l.push(Seen {
            path: path.clone(),
            authorization: authorization.clone(),
            api_key: api_key.clone(),
            headers: headers.clone(),
            body: body.clone(),
        });
    }
    let request: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    let mut model = request["model"].as_str().unwrap_or("ok").to_string();
    let mut route = path.split('?').next().unwrap_or("").to_string();
    if let Some(rest) = route.strip_prefix("/openai/deployments/") {
        // Azure: the deployment names the model; the operation follows it.
        let Some((deployment, operation)) = rest.split_once('/') else {
            return Ok(json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": {"code": "404", "message": "Resource not found"}}),
            ));
        };
        if !path.contains("api-version=") {
            return Ok(json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": {"code": "404", "message": "Resource not found (no api-version)"}}),
            ));
        }
        if api_key.is_none() || authorization.is_some() {
            return Ok(json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint."}}),
            ));
        }
        model = deployment.to_string();
        route = format!("/v1/{operation}");
    }
    let route = route.as_str();
    Ok(match route {
        "/plain" => full(StatusCode::OK, "text/plain", "granted host answered"),
        "/redirect" => {
            let to = path.split_once("to=").map(|(_, t)| t.to_string()).unwrap_or_default();
            let mut r = full(StatusCode::FOUND, "text/plain", "");
            r.headers_mut().insert("location", to.parse().unwrap_or_else(|_| unreachable!()));
            r
        }
        "/v1/models" => json(
            StatusCode::OK,
            serde_json::json!({"object": "list", "data": [
            {"id": "ok", "object": "model", "owned_by": "test-server"},
            {"id": "slow", "object": "model", "owned_by": "test-server"}]}),
        ),
        "/v1/embeddings" => {
            let inputs: Vec<String> = match &request["input"] {
                serde_json::Value::Array(items) => items.iter().map(|i| i.as_str().unwrap_or("").to_string()).collect(),
                other => vec![other.as_str().unwrap_or("").to_string()],
            };
            // Model `bag-of-words`: a test double of a real embedding, close for texts that
            // share words. `dims-N`: N dimensions, for models that answer the wrong size.
            // Any other: `[index, 0.5, -0.5]`.
            let vector = |i: usize, text: &str| match model.as_str() {
                "bag-of-words" => bag_of_words(text),
                m if m.starts_with("dims-") => vec![1.0; m[5..].parse().unwrap_or(1)],
                _ => vec![i as f32, 0.5, -0.5],
            };
            let data: Vec<_> = inputs
                .iter()
                .enumerate()
                .rev()
                .map(|(i, text)| serde_json::json!({"index": i, "embedding": vector(i, text)}))
                .collect();
            json(
                StatusCode::OK,
                serde_json::json!({"data": data, "model": model, "usage": {"prompt_tokens": 3, "total_tokens": 3}}),
            )
        }
        "/v1/chat/completions" => chat(&model, request["stream"].as_bool().unwrap_or(false), &request).await,
        "/v1/messages" => anthropic::messages(&headers, &body).await,
        r if r.starts_with("/model/") => bedrock::converse(&path, &headers, raw.as_ref()).await,
        _ => json(StatusCode::NOT_FOUND, serde_json::json!({"error": {"message": format!("no route {route}")}})),
    })
}

/// Word counts hashed into 64 dimensions (lowercase, letters and digits): texts with the same
/// words embed the same, texts sharing most words embed close.
fn bag_of_words(text: &str) -> Vec<f32> {
    let mut v = vec![0.0f32; 64];
    for word in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        let h = word
            .to_lowercase()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        v[(h % 64) as usize] += 1.0;
    }
    v
}

/// A message's text: its string content, or its text parts joined.
fn text_of(message: &serde_json::Value) -> String {
    match &message["content"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

fn bad_request(message: String, param: &str) -> Response<Body> {
    json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}}),
    )
}

/// Checks `tools`, `tool_choice` and `response_format` as OpenAI does; the tool to call, if any.
fn check_tools(request: &serde_json::Value) -> Result<Option<String>, Response<Body>> {
    let tools = request["tools"].as_array().cloned().unwrap_or_default();
    for (i, t) in tools.iter().enumerate() {
        if t["type"] != "function" || !t["function"]["name"].is_string() {
            return Err(bad_request(format!("tools[{i}]: expected {{type: function, function: {{name}}}}"), "tools"));
        }
        if !t["function"].get("parameters").is_none_or(serde_json::Value::is_object) {
            return Err(bad_request(format!("tools[{i}].function.parameters: expected an object"), "tools"));
        }
    }
    let format = &request["response_format"];
    if format["type"] == "json_schema"
        && (!format["json_schema"]["name"].is_string() || !format["json_schema"]["schema"].is_object())
    {
        return Err(bad_request(
            "response_format.json_schema: needs `name` and a `schema` object".into(),
            "response_format",
        ));
    }
    let choice = &request["tool_choice"];
    let named = choice["function"]["name"].as_str().map(str::to_string);
    if !choice.is_null() && !choice.is_string() && named.is_none() {
        return Err(bad_request(
            "tool_choice: expected a string or {type: function, function: {name}}".into(),
            "tool_choice",
        ));
    }
    if choice == "none" || tools.is_empty() {
        return Ok(None);
    }
    let last_is_result = request["messages"].as_array().and_then(|m| m.last()).is_some_and(|m| m["role"] == "tool");
    if last_is_result {
        return Ok(None);
    }
    Ok(named.or_else(|| tools[0]["function"]["name"].as_str().map(str::to_string)))
}

/// An object with a value of each property's type, for a `json_schema` response format.
fn from_schema(schema: &serde_json::Value, text: &str) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    if let Some(props) = schema["properties"].as_object() {
        for (name, p) in props {
            let v = match p["type"].as_str() {
                Some("integer") => serde_json::json!(1),
                Some("number") => serde_json::json!(1.5),
                Some("boolean") => serde_json::json!(true),
                Some("array") => serde_json::json!([]),
                Some("object") => from_schema(p, text),
                _ => serde_json::json!(text),
            };
            out.insert(name.clone(), v);
        }
    }
    serde_json::Value::Object(out)
}

/// The last char boundary of `s` at or before `at`.
fn boundary(s: &str, at: usize) -> usize {
    (0..=at.min(s.len())).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0)
}

fn sse(events: Vec<String>) -> Response<Body> {
    let frames = futures::stream::iter(events.into_iter().map(|e| Ok::<_, Infallible>(Frame::data(Bytes::from(e)))));
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    r.headers_mut().insert("content-type", "text/event-stream".parse().unwrap_or_else(|_| unreachable!()));
    r
}

async fn chat(model: &str, stream: bool, request: &serde_json::Value) -> Response<Body> {
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    let last_message = messages.last().cloned().unwrap_or(serde_json::Value::Null);
    let last_user = messages.iter().rev().find(|m| m["role"] == "user").map(text_of).unwrap_or_default();
    let call = match check_tools(request) {
        Ok(call) => call,
        Err(refused) => return refused,
    };
    let last_owned = if last_message["role"] == "tool" {
        format!("tool said: {}", text_of(&last_message))
    } else {
        text_of(&last_message)
    };
    let last = last_owned.as_str();
    if let Some(tool) = call {
        let arguments = serde_json::json!({"text": last_user}).to_string();
        let id = "call_test_1";
        if !stream {
            return json(
                StatusCode::OK,
                serde_json::json!({
                    "id": "test", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                        {"id": id, "type": "function", "function": {"name": tool, "arguments": arguments}}]},
                        "finish_reason": "tool_calls"}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
                }),
            );
        }
        let (a, b) = (boundary(&arguments, arguments.len() / 3), boundary(&arguments, 2 * arguments.len() / 3));
        let pieces = [&arguments[..a], &arguments[a..b], &arguments[b..]];
        let mut events = vec![format!(
            "data: {}

",
            serde_json::json!({"choices": [{"delta": {"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": id, "type": "function", "function": {"name": tool, "arguments": ""}}]}}]})
        )];
        for p in pieces {
            events.push(format!(
                "data: {}

",
                serde_json::json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": p}}]}}]})
            ));
        }
        events.push(format!(
            "data: {}

",
            serde_json::json!({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
        ));
        events.push(format!(
            "data: {}

",
            serde_json::json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
        ));
        events.push(
            "data: [DONE]

"
            .to_string(),
        );
        return sse(events);
    }
    let schema_reply = (request["response_format"]["type"] == "json_schema").then(|| {
        from_schema(&request["response_format"]["json_schema"]["schema"], &format!("echo: {last}")).to_string()
    });
    if let Some(reply_text) = schema_reply.as_ref().filter(|_| !stream) {
        return json(StatusCode::OK, reply(model, reply_text));
    }
    match model {
        "rate-limit" => {
            let mut r = json(StatusCode::TOO_MANY_REQUESTS, serde_json::json!({"error": {"message": "slow down"}}));
            r.headers_mut().insert("retry-after", "2".parse().unwrap_or_else(|_| unreachable!()));
            r
        }
        "error-500" => {
            json(StatusCode::INTERNAL_SERVER_ERROR, serde_json::json!({"error": {"message": "upstream exploded"}}))
        }
        "unauthorized" => json(StatusCode::UNAUTHORIZED, serde_json::json!({"error": {"message": "bad key"}})),
        "malformed" => full(StatusCode::OK, "application/json", "{\"choices\": [ {\"mess"),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            json(StatusCode::OK, reply(model, "late"))
        }
        _ if stream => {
            let words = match &schema_reply {
                Some(reply) => {
                    let half = boundary(reply, reply.len() / 2);
                    vec![reply[..half].to_string(), reply[half..].to_string()]
                }
                None => vec!["echo: ".to_string(), last.to_string()],
            };
            let cut = model == "cut-stream";
            let mut events: Vec<String> =
                vec![format!("data: {}\n\n", serde_json::json!({"choices": [{"delta": {"role": "assistant"}}]}))];
            for w in words {
                events.push(format!(
                    "data: {}\n\n",
                    serde_json::json!({"choices": [{"delta": {"content": w}, "finish_reason": null}]})
                ));
            }
            if !cut {
                events.push(format!(
                    "data: {}\n\n",
                    serde_json::json!({"choices": [{"delta": {}, "finish_reason": "stop"}]})
                ));
                events.push(format!(
                    "data: {}\n\n",
                    serde_json::json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
                ));
                events.push("data: [DONE]\n\n".to_string());
            }
            sse(events)
        }
        _ => json(StatusCode::OK, reply(model, &format!("echo: {last}"))),
    }
}

fn reply(model: &str, text: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "test", "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    })
}

/// The hostile Extism guest with a manifest: `loop`, `grow`, `fetch:<url>`, `fail`, echo.
pub fn extism_hostile(memory_mb: u32, timeout_ms: u64) -> Vec<u8> {
    guest_with(
        "qlayer-test-extism-hostile",
        &format!(
            "name = \"extism-hostile\"\nversion = \"0.1.0\"\nkind = \"tool\"\nformat = \"extism\"\ndescription = \"misbehaves on request\"\n[capabilities]\noutbound-hosts = [\"*\"]\n[limits]\nmemory-mb = {memory_mb}\ntimeout-ms = {timeout_ms}\n"
        ),
    )
}

/// A marketplace example plugin (manifest embedded), by name.
pub fn marketplace_plugin(name: &str) -> Vec<u8> {
    read_listed(built::MARKETPLACE, name, "marketplace plugin")
}

static APT: Mutex<()> = Mutex::new(());

/// Makes sure a Debian package's program exists, installing the package with apt-get when it is
/// missing (the test machines are Debian; tests run as root there). Panics with what to do.
pub fn ensure_program(program: &str, package: &str) -> PathBuf {
    let found = || ["/usr/bin", "/usr/sbin"].iter().map(|dir| Path::new(dir).join(program)).find(|p| p.exists());
    let _guard = APT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = found() {
        return path;
    }
    let status = std::process::Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    match found() {
        Some(path) if matches!(status, Ok(s) if s.success()) => path,
        _ => panic!(
            "{program} is needed by this test: install the Debian package `{package}` (apt-get install {package})"
        ),
    }
}

static PIP: Mutex<()> = Mutex::new(());

/// A program from PyPI, installed with pip into a virtual environment of its own under the
/// build's target directory (kept between runs; made again when missing), as `packages` pin it.
/// Panics with what to do when Python or PyPI is not at hand.
pub fn python_tool(program: &str, packages: &[&str]) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let venv = target.join("test-tools").join(packages.join("+").replace(['=', '<', '>', '[', ']', ','], "_"));
    let path = venv.join("bin").join(program);
    let _guard = PIP.lock().unwrap_or_else(|e| e.into_inner());
    if path.exists() {
        return path;
    }
    let run = |what: &str, command: &mut std::process::Command| {
        let status = command.status();
        if !matches!(status, Ok(s) if s.success()) {
            panic!(
                "{program} is needed by this test and {what} failed ({status:?}): it needs python3 with venv and \
                 PyPI (pip install {})",
                packages.join(" ")
            );
        }
    };
    let _ = std::fs::remove_dir_all(&venv);
    let python = newest_python();
    run("creating its virtual environment", std::process::Command::new(&python).arg("-m").arg("venv").arg(&venv));
    run(
        "pip install",
        std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(packages),
    );
    assert!(path.exists(), "pip installed {} but there is no {}", packages.join(" "), path.display());
    path
}

static NPM: Mutex<()> = Mutex::new(());

/// A program from npm (`package` pinned as `name@version`), installed with `npm install` into a
/// directory of its own under the build's target directory (kept between runs; made again when
/// missing). `postinstall` is the package's own install script, run with node when npm did not
/// run it (npm may refuse install scripts by default). Panics with what to do when node or npm
/// is not at hand.
pub fn npm_tool(program: &str, package: &str, postinstall: Option<&str>) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-tools").join(format!("npm-{}", package.replace(['@', '/'], "_")));
    let path = dir.join("node_modules/.bin").join(program);
    let _guard = NPM.lock().unwrap_or_else(|e| e.into_inner());
    let works = || std::process::Command::new(&path).arg("--version").output().is_ok_and(|o| o.status.success());
    if works() {
        return path;
    }
    let fail = |what: &str, status: &dyn std::fmt::Debug| -> ! {
        panic!(
            "{program} is needed by this test and {what} failed ({status:?}): it needs node and npm (npm install {package})"
        )
    };
    if !path.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail("creating its directory", &e));
        let status = std::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
            .arg(&dir)
            .arg(package)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            fail("npm install", &status);
        }
    }
    if let Some(script) = postinstall
        && !works()
    {
        let name = package.rsplit_once('@').map_or(package, |(name, _)| name);
        let status =
            std::process::Command::new("node").arg(script).current_dir(dir.join("node_modules").join(name)).status();
        if !matches!(status, Ok(s) if s.success()) {
            fail("its install script", &status);
        }
    }
    if !works() {
        fail("running it", &"no answer to --version");
    }
    path
}

/// An npm package (`name@version`) installed into a directory of its own under the build's
/// target directory, for a test that runs its files itself; returns its folder
/// (`.../node_modules/<name>`). Panics with what to do when npm is not at hand.
pub fn npm_package(package: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("test-tools").join(format!("npm-{}", package.replace(['@', '/'], "_")));
    let name = package.rsplit_once('@').map_or(package, |(name, _)| name);
    let installed = dir.join("node_modules").join(name);
    let _guard = NPM.lock().unwrap_or_else(|e| e.into_inner());
    if installed.join("package.json").is_file() {
        return installed;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let status = std::process::Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
        .arg(&dir)
        .arg(package)
        .status();
    assert!(
        matches!(status, Ok(s) if s.success()) && installed.join("package.json").is_file(),
        "{package} is needed by this test and `npm install {package}` failed ({status:?}): it needs node and npm"
    );
    installed
}

/// The newest Python 3.12 or later on PATH or installed with pyenv, else `python3`. CPython
/// 3.11.7 crashes inside Hypothesis (`SystemError: AST constructor recursion depth mismatch`)
/// while schemathesis generates some bodies; 3.12 does not.
fn newest_python() -> PathBuf {
    let version = |python: &std::path::Path| -> Option<(u32, u32)> {
        let out = std::process::Command::new(python)
            .args(["-c", "import sys; print(sys.version_info[0], sys.version_info[1])"])
            .env_remove("PYENV_VERSION")
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut parts = text.split_whitespace().map(|p| p.parse::<u32>().ok());
        Some((parts.next()??, parts.next()??))
    };
    let mut candidates: Vec<PathBuf> = ["python3.14", "python3.13", "python3.12"].iter().map(PathBuf::from).collect();
    if let Ok(out) = std::process::Command::new("pyenv").arg("root").output() {
        let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if let Ok(entries) = std::fs::read_dir(root.join("versions")) {
            candidates.extend(entries.flatten().map(|e| e.path().join("bin/python3")));
        }
    }
    candidates
        .into_iter()
        .filter_map(|python| version(&python).filter(|v| *v >= (3, 12)).map(|v| (v, python)))
        .max_by_key(|(v, _)| *v)
        .map(|(_, python)| python)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// A free loopback port (bound and released; good enough for a test server started right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A real CNCF distribution registry (Debian's `docker-registry`) on a free loopback port with
/// its storage in a temp dir. Plain HTTP: clients must list it as insecure. Stopped on drop.
pub struct TestRegistry {
    child: Option<std::process::Child>,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// The registry's storage root.
    pub storage: tempfile::TempDir,
    _config: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts a registry and waits until it answers `/v2/`.
    pub fn start() -> TestRegistry {
        Self::start_inner(None)
    }

    /// Starts a registry that requires HTTP basic auth (htpasswd, bcrypt) for `user`:`password`.
    pub fn start_with_basic_auth(user: &str, password: &str) -> TestRegistry {
        Self::start_inner(Some((user, password)))
    }

    fn start_inner(auth: Option<(&str, &str)>) -> TestRegistry {
        let binary = ensure_program("docker-registry", "docker-registry");
        let storage = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let config_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            storage.path().display()
        );
        let mut config = config;
        if let Some((user, password)) = auth {
            let htpasswd = ensure_program("htpasswd", "apache2-utils");
            let out = std::process::Command::new(htpasswd)
                .args(["-Bbn", user, password])
                .output()
                .unwrap_or_else(|e| panic!("htpasswd: {e}"));
            let file = config_dir.path().join("htpasswd");
            std::fs::write(&file, out.stdout).unwrap_or_else(|e| panic!("{e}"));
            config.push_str(&format!("auth:\n  htpasswd:\n    realm: qlayer-test\n    path: {}\n", file.display()));
        }
        let config_path = config_dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("{e}"));
        let child = std::process::Command::new(binary)
            .arg("serve")
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting docker-registry: {e}"));
        let registry = TestRegistry { child: Some(child), addr, storage, _config: config_dir };
        for _ in 0..200 {
            if let Ok(mut stream) = std::net::TcpStream::connect(&registry.addr) {
                use std::io::{Read, Write};
                let _ = stream.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut response = String::new();
                let _ = stream.read_to_string(&mut response);
                let status = response.split(' ').nth(1).unwrap_or("");
                if status == "200" || (auth.is_some() && status == "401") {
                    return registry;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not start on {}", registry.addr)
    }

    /// Where the registry keeps the blob `sha256:<hex>` on disk.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage.path().join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }

    /// Stops the registry (the data stays until drop).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A NATS server with JetStream (Debian's `nats-server`, installed with apt-get when missing) on
/// a free loopback port, its store in a temp dir. Stopped on drop.
pub struct TestNats {
    child: Option<std::process::Child>,
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    _store: tempfile::TempDir,
}

impl TestNats {
    /// Starts the server and waits until it accepts connections.
    pub fn start() -> TestNats {
        let binary = PathBuf::from("/usr/sbin/nats-server");
        if !binary.exists() {
            let _guard = APT.lock().unwrap_or_else(|e| e.into_inner());
            let _ = std::process::Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "nats-server"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
            assert!(binary.exists(), "nats-server is needed by this test: apt-get install nats-server");
        }
        let store = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let port = free_port();
        let child = std::process::Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting nats-server: {e}"));
        let nats = TestNats { child: Some(child), url: format!("nats://127.0.0.1:{port}"), _store: store };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return nats;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("nats-server did not start on port {port}")
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Qdrant server: `../shared/bin/qdrant` from the project root (built from Qdrant's public
/// source; see `shared/bin/README.md`) on free loopback ports with its storage in a temp dir,
/// stopped on drop; or the one `QLAYER_TEST_QDRANT` names (its gRPC URL).
pub struct TestQdrant {
    child: Option<std::process::Child>,
    /// Its gRPC URL, which `qdrant-client` talks to.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestQdrant {
    /// Starts one and waits until it is ready; `None` (and a line saying so) where neither the
    /// binary nor `QLAYER_TEST_QDRANT` is there.
    pub fn start() -> Option<TestQdrant> {
        if let Ok(url) = std::env::var("QLAYER_TEST_QDRANT") {
            return Some(TestQdrant { child: None, url, _dir: None });
        }
        let binary = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bin/qdrant");
        if !binary.exists() {
            eprintln!("skipped: no Qdrant at {} and no QLAYER_TEST_QDRANT", binary.display());
            return None;
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (http, grpc) = (free_port(), free_port());
        let child = std::process::Command::new(&binary)
            .current_dir(dir.path())
            .env("QDRANT__SERVICE__HOST", "127.0.0.1")
            .env("QDRANT__SERVICE__HTTP_PORT", http.to_string())
            .env("QDRANT__SERVICE__GRPC_PORT", grpc.to_string())
            .env("QDRANT__STORAGE__STORAGE_PATH", dir.path().join("storage"))
            .env("QDRANT__STORAGE__SNAPSHOTS_PATH", dir.path().join("snapshots"))
            .env("QDRANT__TELEMETRY_DISABLED", "true")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let qdrant = TestQdrant { child: Some(child), url: format!("http://127.0.0.1:{grpc}"), _dir: Some(dir) };
        for _ in 0..400 {
            if ready(http) && std::net::TcpStream::connect(("127.0.0.1", grpc)).is_ok() {
                return Some(qdrant);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("qdrant did not become ready on port {http}")
    }

    /// Stops it (a Qdrant that went down).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether `GET /readyz` on `port` answers 200.
fn ready(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

impl Drop for TestQdrant {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The operator key the service tests start `qlayer serve` with.
pub const ADMIN: &str = "ql_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A fresh PostgreSQL database on the machine's server, dropped (forcibly) on drop.
pub struct PgDb {
    admin: String,
    name: String,
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::AnyConnection::connect(&admin).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await;
                }
            });
        })
        .join();
    }
}

/// Creates a fresh database on the machine's PostgreSQL (`QLAYER_TEST_POSTGRES`, default
/// `postgres://postgres@127.0.0.1:5432/postgres`): its URL and the guard that drops it.
pub async fn fresh_postgres() -> (String, PgDb) {
    sqlx::any::install_default_drivers();
    let admin =
        std::env::var("QLAYER_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_else(|e| panic!("{e}"))
        .subsec_nanos();
    let name = format!("qlayer_api_{}_{nanos}", std::process::id());
    let mut conn = sqlx::AnyConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed by this test: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.unwrap_or_else(|e| panic!("{e}"));
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap_or_else(|| panic!("{admin} has no database part")).0);
    (url, PgDb { admin, name })
}

/// A developer agent's reply (the scripted provider's `reply`) of two files: a Cargo.toml and
/// `src/main.rs` with `main_rs`, for scripts that make the syntax validator pass or fail.
pub fn files_json(main_rs: &str) -> String {
    serde_json::json!({"files": [
        {"path": "Cargo.toml", "content": "[package]\nname = \"x\"\nversion = \"0.1.0\"\n"},
        {"path": "src/main.rs", "content": main_rs},
        {"path": "README.md", "content": "# x\n"},
    ]})
    .to_string()
}
