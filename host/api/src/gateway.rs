//! The OpenAI-compatible gateway's routes: chat completions (whole and streamed), embeddings,
//! the tenant's model table (OpenAI's model list, plus `PUT`/`DELETE` for admins), and usage.
//! Errors on these routes are in OpenAI's shape (see [`wire_errors`]), whichever layer made them.

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiQuery};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use qlayer_gateway::GatewayError;
use qlayer_gateway::anthropic;
use qlayer_gateway::openai::{self, ChunkWriter};
use qlayer_gateway::request::StreamWriter;
use qlayer_gateway::service::{Caller as GatewayCaller, Gateway, LiveStream, Providers, Routed};
use qlayer_gateway::table::ModelSpec;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When the request arrived (set by the outermost layer), for the overhead header and latency.
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub Instant);

/// A gateway error answered in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError(pub GatewayError);

impl From<GatewayError> for OpenAiError {
    fn from(e: GatewayError) -> Self {
        OpenAiError(e)
    }
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(GatewayError::new(e.status().as_u16(), e.code(), e.message()))
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let e = self.0;
        metrics::counter!("qlayer_http_errors_total", "code" => e.code.clone().unwrap_or_else(|| "invalid_request".into()))
            .increment(1);
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response =
            (status, [(header::CONTENT_TYPE, "application/json")], openai::error_body(&e)).into_response();
        if let Some(secs) = e.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        add_headers(&mut response, &e.headers);
        response
    }
}

/// Which wire format a path's errors take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Ours,
    OpenAi,
    Anthropic,
}

fn wire_of(path: &str) -> Wire {
    if path == "/v1/messages" || path == "/v1/messages/count_tokens" {
        Wire::Anthropic
    } else if path == "/v1/chat/completions"
        || path == "/v1/embeddings"
        || path == "/v1/models"
        || path.starts_with("/v1/models/")
    {
        Wire::OpenAi
    } else {
        Wire::Ours
    }
}

/// Rewrites the one error shape into OpenAI's (or Anthropic's, on `/v1/messages`) on the
/// gateway's routes, for errors made
/// by the shared layers (authentication, rate limits, body limits, the deadline, unknown
/// methods), so an SDK raises its own exception class with the message.
pub async fn wire_errors(mut req: Request, next: Next) -> Response {
    req.extensions_mut().insert(Arrived(Instant::now()));
    let wire = wire_of(req.uri().path());
    let mut response = next.run(req).await;
    if wire == Wire::Ours {
        return response;
    }
    let Some(info) = response.extensions_mut().remove::<crate::error::ErrorInfo>() else { return response };
    let e = GatewayError::new(response.status().as_u16(), info.code, info.message);
    let mut rewritten =
        if wire == Wire::Anthropic { AnthropicError(e).into_response() } else { OpenAiError(e).into_response() };
    for (name, value) in response.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rewritten
}

/// A request body as bytes; its rejections (over the limit) are rewritten into the route's
/// wire format by [`wire_errors`].
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(RawBody(bytes)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is larger than this server accepts ([limits] max-body-bytes)",
            )),
            Err(e) => Err(ApiError::invalid(e.body_text())),
        }
    }
}

/// The gateway's view of the caller.
fn who(caller: &Caller) -> GatewayCaller {
    GatewayCaller {
        tenant_id: caller.tenant_id().to_string(),
        tenant_name: caller.tenant_name().to_string(),
        key_id: caller.actor().to_string(),
    }
}

fn gateway(state: &AppState) -> Result<&Arc<Gateway>, OpenAiError> {
    state
        .gateway
        .as_ref()
        .ok_or_else(|| OpenAiError(GatewayError::new(503, "gateway_off", "the gateway is not running on this node")))
}

fn overhead(arrived: Instant, upstream: std::time::Duration) -> HeaderValue {
    let ms = arrived.elapsed().saturating_sub(upstream).as_secs_f64() * 1e3;
    HeaderValue::from_str(&format!("{ms:.3}")).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn arrived(req_arrived: Option<axum::Extension<Arrived>>) -> Instant {
    req_arrived.map(|a| a.0.0).unwrap_or_else(Instant::now)
}

/// Creates a chat completion (OpenAI-compatible): the request's `model` is a name of the
/// tenant's model table; `stream: true` answers with server-sent events ending in `[DONE]`.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "gateway",
    request_body(content = Object, description = "OpenAI's chat completion request: `model` (a name of the tenant's model table), `messages` (text and image parts, assistant tool calls, tool results), and optionally `tools`, `tool_choice`, `parallel_tool_calls`, `response_format` (text, json_object, json_schema), `stream`, `stream_options`, `max_tokens`/`max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `user`, `metadata`, `n` (1). An unknown field is refused by name; what a contract-0.1.0 provider cannot express is refused naming the feature and the plugin."),
    responses(
        (status = 200, description = "the completion (`chat.completion`), or with `stream: true` its chunks (`chat.completion.chunk`) as server-sent events, then `data: [DONE]`", content_type = "application/json", body = Object),
        (status = 400, description = "a field is invalid, unknown, or asks for what the model's providers cannot express (OpenAI's error shape names it in `param`)", body = OpenAiErrorBody),
        (status = 403, description = "a viewer key", body = OpenAiErrorBody),
        (status = 404, description = "the tenant has no model of that name (`model_not_found`)", body = OpenAiErrorBody),
        (status = 502, description = "the provider plugin or its upstream failed", body = OpenAiErrorBody),
        (status = 503, description = "every deployment is cooling down (with `Retry-After`), or the upstream is unavailable", body = OpenAiErrorBody),
        (status = 504, description = "the upstream did not answer in time", body = OpenAiErrorBody)),
    security(("api_key" = [])))]
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    at: Option<axum::Extension<Arrived>>,
    headers: axum::http::HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, OpenAiError> {
    let arrived = arrived(at);
    caller.require_write()?;
    let gateway = gateway(&state)?;
    let mut chat = openai::chat_request(&body)?;
    drop(body);
    chat.cache = cache_directives(&headers);
    let deadline = arrived + state.limits.request_timeout;
    let who = who(&caller);
    let entered = Instant::now();
    if !chat.stream {
        let routed = gateway.complete(&who, &chat, arrived, deadline).await?;
        let rendering = Instant::now();
        return Ok(whole(openai::completion(&chat.model, &routed.value), [arrived, entered, rendering], &routed));
    }
    let live = gateway.stream(&who, &chat, arrived, deadline).await?;
    Ok(event_stream(live, ChunkWriter::new(&chat.model, chat.include_usage), arrived, entered))
}

/// A whole answer's response, with the host's time, where it went (`Server-Timing`) and the
/// deployment that answered. `[arrived, entered, rendering]`: when the request arrived, when the
/// gateway had it (authenticated and parsed), and when its answer began to be rendered.
fn whole<T>(text: String, [arrived, entered, rendering]: [Instant; 3], routed: &Routed<T>) -> Response {
    let render = rendering.elapsed();
    let mut response = ([(header::CONTENT_TYPE, "application/json")], text).into_response();
    let headers = response.headers_mut();
    headers.insert("x-qlayer-overhead-ms", overhead(arrived, routed.upstream));
    if let Ok(v) = HeaderValue::from_str(&routed.timing.server_timing(entered.duration_since(arrived), render)) {
        headers.insert("server-timing", v);
    }
    if let Ok(v) = HeaderValue::from_str(&routed.deployment.key()) {
        headers.insert("x-qlayer-deployment", v);
    }
    headers.insert("x-qlayer-cache", HeaderValue::from_static(routed.cache.as_str()));
    add_headers(&mut response, &routed.rate_headers);
    response
}

/// A stream's response: each step sends what the next provider chunks produce; a clean end sends
/// the API's end marker, a cut one an error event and no end marker. A client that leaves drops
/// the body: the provider instance (and its upstream request) goes with it, and the stream is
/// metered as it stood.
fn event_stream<W: StreamWriter>(live: LiveStream, writer: W, arrived: Instant, entered: Instant) -> Response {
    let overhead = overhead(arrived, live.upstream());
    // Up to the first chunk; its rendering is part of the body.
    let timing =
        HeaderValue::from_str(&live.timing().server_timing(entered.duration_since(arrived), Duration::ZERO)).ok();
    let deployment = HeaderValue::from_str(&live.deployment().key()).ok();
    let rate_headers = live.rate_headers().to_vec();
    let cache = live.cache();
    let body = futures::stream::unfold(Some((live, writer)), |state| async move {
        let (mut live, mut writer) = state?;
        let mut out = String::new();
        loop {
            match live.next().await {
                Ok(Some(chunk)) => {
                    writer.chunk(&chunk, &mut out);
                    if !out.is_empty() {
                        return Some((Ok::<_, std::convert::Infallible>(Bytes::from(out)), Some((live, writer))));
                    }
                }
                Ok(None) => {
                    writer.end(&mut out);
                    return Some((Ok(Bytes::from(out)), None));
                }
                Err(e) => {
                    tracing::warn!("a stream was cut: {e}");
                    writer.error(&e, &mut out);
                    return Some((Ok(Bytes::from(out)), None));
                }
            }
        }
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-qlayer-overhead-ms", overhead);
    if let Some(t) = timing {
        headers.insert("server-timing", t);
    }
    if let Some(d) = deployment {
        headers.insert("x-qlayer-deployment", d);
    }
    headers.insert("x-qlayer-cache", HeaderValue::from_static(cache.as_str()));
    add_headers(&mut response, &rate_headers);
    response
}

/// Adds `headers` (OpenAI's `x-ratelimit-*`) to `response`.
fn add_headers(response: &mut Response, headers: &[(&'static str, String)]) {
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            response.headers_mut().insert(*name, value);
        }
    }
}

/// A gateway error answered in Anthropic's shape.
#[derive(Debug)]
pub struct AnthropicError(pub GatewayError);

impl From<OpenAiError> for AnthropicError {
    fn from(e: OpenAiError) -> Self {
        AnthropicError(e.0)
    }
}

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(OpenAiError::from(e).0)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let e = self.0;
        metrics::counter!("qlayer_http_errors_total", "code" => e.code.clone().unwrap_or_else(|| "invalid_request".into()))
            .increment(1);
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response =
            (status, [(header::CONTENT_TYPE, "application/json")], anthropic::error_body(&e)).into_response();
        if let Some(secs) = e.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        add_headers(&mut response, &e.headers);
        response
    }
}

/// Creates a message (Anthropic-compatible, for the `anthropic` SDKs and Claude Code): the
/// request's `model` is a name of the tenant's model table; `stream: true` answers with
/// Anthropic's event sequence. The key may come as `x-api-key`.
#[utoipa::path(post, path = "/v1/messages", tag = "gateway",
    request_body(content = Object, description = "Anthropic's Messages request: `model` (a name of the tenant's model table), `max_tokens`, `messages` (text, image, tool_use and tool_result blocks), and optionally `system`, `tools`, `tool_choice`, `stop_sequences`, `temperature`, `top_p`, `top_k`, `stream`, `metadata`, `output_config.format` (a JSON schema for the answer), `thinking`, `output_config.effort` and `context_management` (clear_thinking edits). `thinking` and `effort` are checked and then unused (the response names them in `x-qlayer-unused`): no provider contract carries reasoning yet, so answers have no thinking blocks, and earlier turns' thinking blocks are dropped, as Anthropic drops them. `system` messages among `messages` need `anthropic-beta: mid-conversation-system-2026-04-07`. An unknown field is refused by name."),
    responses(
        (status = 200, description = "the message, or with `stream: true` its events (`message_start` … `message_stop`)", body = Object),
        (status = 400, body = AnthropicErrorBody), (status = 403, body = AnthropicErrorBody), (status = 404, body = AnthropicErrorBody),
        (status = 502, body = AnthropicErrorBody), (status = 503, body = AnthropicErrorBody), (status = 504, body = AnthropicErrorBody)),
    security(("api_key" = [])))]
pub async fn messages(
    State(state): State<AppState>,
    caller: Caller,
    at: Option<axum::Extension<Arrived>>,
    headers: axum::http::HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, AnthropicError> {
    let arrived = arrived(at);
    caller.require_write()?;
    let gateway = gateway(&state)?;
    let mut chat = anthropic::messages_request(&body, betas(&headers)).map_err(AnthropicError)?;
    drop(body);
    chat.cache = cache_directives(&headers);
    let deadline = arrived + state.limits.request_timeout;
    let who = who(&caller);
    let entered = Instant::now();
    let mut response = if !chat.stream {
        let routed = gateway.complete(&who, &chat, arrived, deadline).await.map_err(AnthropicError)?;
        let rendering = Instant::now();
        whole(anthropic::message(&chat.model, &routed.value), [arrived, entered, rendering], &routed)
    } else {
        let prompt: usize = chat.prompt_bytes();
        let live = gateway.stream(&who, &chat, arrived, deadline).await.map_err(AnthropicError)?;
        event_stream(live, anthropic::EventWriter::new(&chat.model, prompt.div_ceil(4) as u32), arrived, entered)
    };
    if !chat.unused.is_empty()
        && let Ok(v) = HeaderValue::from_str(&chat.unused.join(", "))
    {
        response.headers_mut().insert("x-qlayer-unused", v);
    }
    Ok(response)
}

/// What a request's `Cache-Control` asks of the gateway's cache (`no-cache`, `no-store`).
fn cache_directives(headers: &axum::http::HeaderMap) -> qlayer_gateway::cache::Directives {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(qlayer_gateway::cache::Directives::parse)
        .fold(Default::default(), |a, b| qlayer_gateway::cache::Directives {
            no_cache: a.no_cache || b.no_cache,
            no_store: a.no_store || b.no_store,
        })
}

/// The `anthropic-beta` features a request names.
fn betas(headers: &axum::http::HeaderMap) -> anthropic::Betas {
    anthropic::Betas::from_header(headers.get_all("anthropic-beta").iter().filter_map(|v| v.to_str().ok()))
}

/// Counts a Messages request's input tokens (Anthropic's `count_tokens`, which Claude Code calls):
/// an estimate, as Anthropic's own is, of about four bytes of text a token; nothing is sent
/// upstream or metered. The model must be one of the tenant's.
#[utoipa::path(post, path = "/v1/messages/count_tokens", tag = "gateway",
    request_body(content = Object, description = "A Messages request's `model`, `messages`, and optionally `system`, `tools`, `tool_choice`, `thinking`, `context_management`, `output_config`; any other field is refused by name."),
    responses(
        (status = 200, description = "`{\"input_tokens\": N}`", body = Object),
        (status = 400, body = AnthropicErrorBody), (status = 403, body = AnthropicErrorBody), (status = 404, body = AnthropicErrorBody)),
    security(("api_key" = [])))]
pub async fn count_tokens(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, AnthropicError> {
    let gateway = gateway(&state)?;
    let chat = anthropic::count_tokens_request(&body, betas(&headers)).map_err(AnthropicError)?;
    let tokens = gateway.count_tokens(&who(&caller), &chat).await.map_err(AnthropicError)?;
    Ok(axum::Json(serde_json::json!({"input_tokens": tokens})).into_response())
}

/// Anthropic's error shape.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct AnthropicErrorBody {
    /// `error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What went wrong.
    pub error: AnthropicErrorDetail,
}

/// What went wrong, as Anthropic says it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct AnthropicErrorDetail {
    /// `invalid_request_error`, `authentication_error`, `permission_error`, `not_found_error`,
    /// `request_too_large`, `rate_limit_error`, `overloaded_error`, `timeout_error` or `api_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For people: names what is wrong.
    pub message: String,
}

/// Creates embeddings (OpenAI-compatible), as floats or base64.
#[utoipa::path(post, path = "/v1/embeddings", tag = "gateway",
    request_body(content = Object, description = "OpenAI's embeddings request: `model` (a name of the tenant's model table), `input` (a string or up to 2048 strings), `encoding_format` (`float` or `base64`), `user`."),
    responses(
        (status = 200, description = "one embedding per input, in input order", body = Object),
        (status = 400, body = OpenAiErrorBody), (status = 403, body = OpenAiErrorBody), (status = 404, body = OpenAiErrorBody),
        (status = 502, body = OpenAiErrorBody), (status = 503, body = OpenAiErrorBody), (status = 504, body = OpenAiErrorBody)),
    security(("api_key" = [])))]
pub async fn embeddings(
    State(state): State<AppState>,
    caller: Caller,
    at: Option<axum::Extension<Arrived>>,
    RawBody(body): RawBody,
) -> Result<Response, OpenAiError> {
    let arrived = arrived(at);
    caller.require_write()?;
    let gateway = gateway(&state)?;
    let request = openai::embed_request(&body)?;
    drop(body);
    let entered = Instant::now();
    let routed = gateway.embed(&who(&caller), &request, arrived, arrived + state.limits.request_timeout).await?;
    let rendering = Instant::now();
    let text = openai::embeddings(&request.model, &routed.value.vectors, routed.value.usage, request.base64);
    Ok(whole(text, [arrived, entered, rendering], &routed))
}

/// OpenAI's error shape.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct OpenAiErrorBody {
    /// What went wrong.
    pub error: OpenAiErrorDetail,
}

/// What went wrong, as OpenAI says it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct OpenAiErrorDetail {
    /// For people: names what is wrong.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `permission_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// A stable code, such as `model_not_found`.
    pub code: Option<String>,
}

/// A model of the tenant's table, as OpenAI lists models, with its entry.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ModelObject {
    /// The model name.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds of the entry's last change.
    pub created: i64,
    /// The tenant's name.
    pub owned_by: String,
    /// The entry: strategy and deployments (left out of the list).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub spec: Option<ModelSpec>,
}

/// The tenant's model names.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The models, by name.
    pub data: Vec<ModelObject>,
}

/// Lists the tenant's model names (OpenAI-compatible).
#[utoipa::path(get, path = "/v1/models", tag = "gateway",
    responses((status = 200, body = ModelList)),
    security(("api_key" = [])))]
pub async fn list_models(State(state): State<AppState>, caller: Caller) -> Result<axum::Json<ModelList>, OpenAiError> {
    let rows = state.db.models(caller.tenant_id()).await.map_err(ApiError::from)?;
    let mut data: Vec<ModelObject> = rows
        .into_iter()
        .map(|r| ModelObject {
            id: r.name,
            object: "model",
            created: r.updated_at / 1000,
            owned_by: caller.tenant_name().to_string(),
            spec: None,
        })
        .collect();
    // The server's defaults, then the models of its upstream, where the tenant has no entry
    // of that name.
    if let Some(gateway) = &state.gateway {
        let upstream = gateway.passthrough_models(&who(&caller)).await;
        for name in gateway.defaults().keys().cloned().chain(upstream) {
            if !data.iter().any(|m| m.id == name) {
                data.push(ModelObject { id: name, object: "model", created: 0, owned_by: "system".into(), spec: None });
            }
        }
        data.sort_by(|a, b| a.id.cmp(&b.id));
    }
    Ok(axum::Json(ModelList { object: "list", data }))
}

async fn model_object(state: &AppState, caller: &Caller, name: &str) -> Result<ModelObject, OpenAiError> {
    let rows = state.db.models(caller.tenant_id()).await.map_err(ApiError::from)?;
    let Some(row) = rows.into_iter().find(|r| r.name == name) else {
        let default = state.gateway.as_ref().and_then(|g| g.defaults().get(name).cloned());
        let spec = default.ok_or_else(|| GatewayError::model_not_found(name))?;
        return Ok(ModelObject {
            id: name.to_string(),
            object: "model",
            created: 0,
            owned_by: "system".into(),
            spec: Some((*spec).clone()),
        });
    };
    let spec: ModelSpec = serde_json::from_str(&row.spec).map_err(GatewayError::internal)?;
    Ok(ModelObject {
        id: row.name,
        object: "model",
        created: row.updated_at / 1000,
        owned_by: caller.tenant_name().to_string(),
        spec: Some(spec),
    })
}

/// One model of the tenant's table, with its strategy and deployments.
#[utoipa::path(get, path = "/v1/models/{name}", tag = "gateway", params(("name" = String, Path, description = "model name")),
    responses((status = 200, body = ModelObject), (status = 404, body = OpenAiErrorBody)),
    security(("api_key" = [])))]
pub async fn get_model(
    State(state): State<AppState>,
    caller: Caller,
    crate::error::ApiPath(name): crate::error::ApiPath,
) -> Result<axum::Json<ModelObject>, OpenAiError> {
    model_object(&state, &caller, &name).await.map(axum::Json)
}

/// Sets a model of the tenant's table (admins): each deployment names an installed provider
/// plugin. Takes effect at once on this node and within a second on the others.
#[utoipa::path(put, path = "/v1/models/{name}", tag = "gateway", params(("name" = String, Path, description = "model name")),
    request_body = ModelSpec,
    responses((status = 200, body = ModelObject), (status = 400, body = OpenAiErrorBody), (status = 403, body = OpenAiErrorBody)),
    security(("api_key" = [])))]
pub async fn put_model(
    State(state): State<AppState>,
    caller: Caller,
    crate::error::ApiPath(name): crate::error::ApiPath,
    RawBody(body): RawBody,
) -> Result<axum::Json<ModelObject>, OpenAiError> {
    caller.require_admin()?;
    let gateway = gateway(&state)?;
    let outcome = async {
        let spec: ModelSpec = openai::parse(&body)?;
        gateway.put_model(&who(&caller), &name, &spec).await
    }
    .await;
    let audited: Result<(), ApiError> = match &outcome {
        Ok(_) => Ok(()),
        Err(e) => Err(ApiError::invalid(e.message.clone())),
    };
    state.audit(&caller, "model.put", &name, &audited).await;
    outcome?;
    model_object(&state, &caller, &name).await.map(axum::Json)
}

/// Removes a model of the tenant's table (admins).
#[utoipa::path(delete, path = "/v1/models/{name}", tag = "gateway", params(("name" = String, Path, description = "model name")),
    responses((status = 200, description = "`{\"id\", \"object\": \"model\", \"deleted\": true}`", body = Object), (status = 403, body = OpenAiErrorBody), (status = 404, body = OpenAiErrorBody)),
    security(("api_key" = [])))]
pub async fn delete_model(
    State(state): State<AppState>,
    caller: Caller,
    crate::error::ApiPath(name): crate::error::ApiPath,
) -> Result<axum::Json<Value>, OpenAiError> {
    caller.require_admin()?;
    let gateway = gateway(&state)?;
    let outcome = gateway.delete_model(&who(&caller), &name).await;
    let audited: Result<(), ApiError> = outcome.clone().map_err(|e| ApiError::not_found(e.message));
    state.audit(&caller, "model.delete", &name, &audited).await;
    outcome?;
    Ok(axum::Json(json!({"id": name, "object": "model", "deleted": true})))
}

/// `GET /v1/usage` parameters.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// From this time (unix ms, inclusive).
    pub from: Option<i64>,
    /// Up to this time (unix ms, exclusive).
    pub to: Option<i64>,
    /// Only this API key (its id).
    pub key: Option<String>,
    /// Only this model name.
    pub model: Option<String>,
    /// `total` (the default: one row), `day`, `model`, `key` or `deployment`.
    #[param(pattern = "^(total|day|model|key|deployment)$")]
    pub group_by: Option<String>,
}

/// One group of usage.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct UsageRow {
    /// The group's value: a day's first unix ms, a model name, a key id, a deployment; empty for the total.
    pub group: String,
    /// Requests.
    pub requests: i64,
    /// Requests that failed.
    pub errors: i64,
    /// Requests answered from a cache.
    pub cache_hits: i64,
    /// Input tokens.
    pub prompt_tokens: i64,
    /// Output tokens.
    pub completion_tokens: i64,
    /// Input plus output tokens.
    pub total_tokens: i64,
    /// Cost in billionths of the price table's currency unit.
    pub cost_nanos: i64,
    /// Cost in the price table's currency unit.
    pub cost: f64,
}

/// Usage of the gateway by the caller's tenant.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    /// How rows are grouped (`total` when not).
    pub group_by: String,
    /// The groups.
    pub data: Vec<UsageRow>,
    /// The tenant's gateway limits and budgets, and those of the key asked for (`key`, else the
    /// caller's own), each with what was used of it in its current window.
    pub limits: Vec<crate::limits::LimitStanding>,
}

/// The tenant's gateway usage: requests, tokens and cost, filtered by time, key and model, and
/// grouped by day, model, key or deployment.
#[utoipa::path(get, path = "/v1/usage", tag = "gateway", params(UsageQuery),
    responses((status = 200, body = UsageReport), (status = 400, body = crate::error::ErrorBody)),
    security(("api_key" = [])))]
pub async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<axum::Json<UsageReport>, ApiError> {
    usage_op(&state, &caller, &q).await.map(axum::Json)
}

/// Usage (REST and gRPC).
pub async fn usage_op(state: &AppState, caller: &Caller, q: &UsageQuery) -> Result<UsageReport, ApiError> {
    use qlayer_db::UsageGroup;
    let (group, name) = match q.group_by.as_deref() {
        None | Some("total") => (UsageGroup::All, "total"),
        Some("day") => (UsageGroup::Day, "day"),
        Some("model") => (UsageGroup::Model, "model"),
        Some("key") => (UsageGroup::Key, "key"),
        Some("deployment") => (UsageGroup::Deployment, "deployment"),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "group_by `{}` is not one of total, day, model, key, deployment",
                other.escape_debug()
            )));
        }
    };
    let filter = qlayer_db::UsageFilter { from: q.from, to: q.to, key_id: q.key.clone(), model: q.model.clone() };
    let sums = state.db.usage(caller.tenant_id(), &filter, group).await?;
    let data = sums
        .into_iter()
        .map(|s| UsageRow {
            group: s.key,
            requests: s.requests,
            errors: s.errors,
            cache_hits: s.cache_hits,
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            total_tokens: s.prompt_tokens + s.completion_tokens,
            cost_nanos: s.cost_nanos,
            cost: s.cost_nanos as f64 / 1e9,
        })
        .collect();
    let key = q.key.as_deref().unwrap_or(caller.actor());
    let limits = crate::limits::standings(state, caller.tenant_id(), Some(key)).await?;
    Ok(UsageReport { group_by: name.to_string(), data, limits })
}

/// Provider plugins installed for a tenant in the marketplace, for the gateway.
pub struct MarketProviders {
    /// Has the marketplace and the runtime.
    pub runner: Arc<qlayer_jobs::JobRunner>,
    /// `[gateway] upstream`'s provider, plugin `upstream` for every tenant.
    pub upstream: Option<qlayer_runtime::Installed>,
}

impl Providers for MarketProviders {
    fn load<'a>(
        &'a self,
        tenant: &'a str,
        plugin: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<qlayer_runtime::Installed, String>> {
        Box::pin(async move {
            if plugin == crate::serve::UPSTREAM
                && let Some(upstream) = &self.upstream
            {
                return Ok(upstream.clone());
            }
            let market = self.runner.marketplace();
            let installed = match market.load(self.runner.runtime(), tenant, plugin).await {
                Ok(installed) => installed,
                Err(e) if matches!(e.downcast_ref(), Some(qlayer_marketplace::InstallError::NotInstalled { .. })) => {
                    return Err(format!("no plugin `{plugin}` is installed for this tenant"));
                }
                Err(e) => return Err(format!("plugin `{plugin}` cannot be loaded: {e:#}")),
            };
            let kind = installed.plugin().manifest().kind;
            if kind != qlayer_runtime::Kind::Provider {
                return Err(format!("plugin `{plugin}` is a {kind} plugin, not a provider"));
            }
            Ok(installed)
        })
    }
}

/// The request bodies of the OpenAI-compatible routes, as JSON Schemas written beside their
/// parser (`qlayer_gateway::openai`): the fields it takes, with the ranges it checks, and no
/// others. Rules between fields (message order, `stream_options` only with `stream`) are the
/// parser's; a stream's 200 is documented as `text/event-stream`.
pub fn document(doc: &mut Value) {
    let text = json!({"type": "string"});
    let boolean = json!({"type": ["boolean", "null"]});
    let part = json!({
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["text", "image_url"]},
            "text": text,
            "image_url": {"type": "object", "required": ["url"], "properties": {
                "url": text, "detail": {"type": "string", "enum": ["auto", "low", "high"]}}}
        }
    });
    let tool_name = json!({"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"});
    let tool_call = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["id", "type", "function"],
        "properties": {
            "id": {"type": "string", "minLength": 1},
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "additionalProperties": false, "required": ["name", "arguments"],
                "properties": {"name": text, "arguments": {"type": "string", "description": "JSON text"}}}
        }
    });
    let message = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["role"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": part}, {"type": "null"}]},
            "name": {"type": ["string", "null"]},
            "tool_calls": {"type": ["array", "null"], "items": tool_call,
                "description": "an assistant message's calls; each `tool` message after it answers one by `tool_call_id`"},
            "tool_call_id": {"type": ["string", "null"]},
            "refusal": {"type": ["string", "null"]},
            "annotations": {"description": "sent back by SDKs with an answer's message; ignored"},
            "audio": {"type": "null"},
            "function_call": {"type": "null"}
        }
    });
    let tool = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["type", "function"],
        "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "additionalProperties": false, "required": ["name"], "properties": {
                "name": tool_name,
                "description": {"type": ["string", "null"]},
                "parameters": {"type": ["object", "null"], "description": "the arguments' JSON Schema"},
                "strict": boolean
            }}
        }
    });
    let chat = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1, "description": "a model name of the tenant's table"},
            "messages": {"type": "array", "minItems": 1, "maxItems": openai::MAX_MESSAGES, "items": message},
            "stream": boolean,
            "stream_options": {"type": ["object", "null"], "additionalProperties": false,
                "properties": {"include_usage": boolean, "include_obfuscation": boolean}},
            "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": u32::MAX},
            "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": u32::MAX},
            "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
            "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "seed": {"type": ["integer", "null"], "format": "int64"},
            "stop": {"oneOf": [{"type": "string"}, {"type": "array", "maxItems": 4, "items": text}, {"type": "null"}]},
            "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},
            "user": {"type": ["string", "null"]},
            "safety_identifier": {"type": ["string", "null"]},
            "prompt_cache_key": {"type": ["string", "null"]},
            "metadata": {"type": ["object", "null"], "maxProperties": 16, "propertyNames": {"maxLength": 64},
                "additionalProperties": {"type": "string", "maxLength": 512}},
            "store": boolean,
            "response_format": {"type": ["object", "null"], "additionalProperties": false, "required": ["type"], "properties": {
                "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
                "json_schema": {"type": "object", "additionalProperties": false, "required": ["name"], "properties": {
                    "name": tool_name,
                    "description": {"type": ["string", "null"]},
                    "schema": {"type": ["object", "null"]},
                    "strict": boolean
                }}
            }},
            "tools": {"type": ["array", "null"], "maxItems": openai::MAX_TOOLS, "items": tool,
                "description": "tool names are distinct"},
            "tool_choice": {"description": "only with tools; a named function must be one of them", "oneOf": [
                {"type": "string", "enum": ["auto", "none", "required"]},
                {"type": "object", "additionalProperties": false, "required": ["type", "function"], "properties": {
                    "type": {"type": "string", "enum": ["function"]},
                    "function": {"type": "object", "additionalProperties": false, "required": ["name"], "properties": {"name": text}}
                }},
                {"type": "null"}
            ]},
            "parallel_tool_calls": boolean,
            "frequency_penalty": {"type": ["number", "null"], "minimum": 0, "maximum": 0},
            "presence_penalty": {"type": ["number", "null"], "minimum": 0, "maximum": 0},
            "logit_bias": {"type": ["object", "null"], "maxProperties": 0},
            "logprobs": {"type": ["boolean", "null"], "enum": [false, null]},
            "service_tier": {"type": ["string", "null"], "enum": ["auto", "default", null]}
        }
    });
    let embed = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["model", "input"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "input": {"oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "maxItems": openai::MAX_INPUTS, "items": {"type": "string", "minLength": 1}}
            ]},
            "encoding_format": {"type": ["string", "null"], "enum": ["float", "base64", null]},
            "user": {"type": ["string", "null"]}
        }
    });
    let block = json!({
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"type": "string", "enum": ["text", "image", "tool_use", "tool_result"]},
            "text": text,
            "source": {"type": "object", "description": "an image's: `base64` (media_type, data) or `url`"},
            "id": text,
            "name": text,
            "input": {"type": "object", "description": "a tool_use block's arguments"},
            "tool_use_id": {"type": "string", "description": "a tool_result's: the tool_use of the assistant turn before"},
            "content": {"description": "a tool_result's: a string or text and image blocks"},
            "is_error": {"type": "boolean"}
        }
    });
    let blocks = json!({"oneOf": [{"type": "string"}, {"type": "array", "items": block}]});
    let messages = json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["model", "max_tokens", "messages"],
        "properties": {
            "model": {"type": "string", "minLength": 1, "description": "a model name of the tenant's table"},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": u32::MAX},
            "messages": {"type": "array", "minItems": 1, "maxItems": openai::MAX_MESSAGES, "items": {
                "type": "object",
                "additionalProperties": false,
                "required": ["role", "content"],
                "properties": {"role": {"type": "string", "enum": ["user", "assistant"]}, "content": blocks}
            }},
            "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": block}, {"type": "null"}]},
            "stop_sequences": {"type": ["array", "null"], "items": text},
            "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "top_k": {"type": ["integer", "null"], "minimum": 0, "maximum": u32::MAX},
            "stream": boolean,
            "metadata": {"type": ["object", "null"], "additionalProperties": false,
                "properties": {"user_id": {"type": ["string", "null"]}}},
            "tools": {"type": ["array", "null"], "maxItems": openai::MAX_TOOLS,
                "items": {"type": "object", "additionalProperties": false, "required": ["name", "input_schema"], "properties": {
                    "type": {"type": ["string", "null"], "enum": ["custom", null]},
                    "name": tool_name,
                    "description": {"type": ["string", "null"]},
                    "input_schema": {"type": "object"},
                    "cache_control": {}
                }}},
            "tool_choice": {"type": ["object", "null"], "additionalProperties": false, "required": ["type"], "properties": {
                "type": {"type": "string", "enum": ["auto", "any", "tool", "none"]},
                "name": {"type": ["string", "null"], "description": "with type `tool`: one of `tools`"},
                "disable_parallel_tool_use": boolean
            }},
            "service_tier": {"type": ["string", "null"], "enum": ["auto", "standard_only", null]}
        }
    });
    for (path, schema) in [("/v1/chat/completions", chat), ("/v1/embeddings", embed), ("/v1/messages", messages)] {
        if let Some(content) =
            doc.pointer_mut(&format!("/paths/{}/post/requestBody/content/application~1json", path.replace('/', "~1")))
        {
            content["schema"] = schema;
        }
    }
    // The shared layers' errors (401, 413, 429, 503...) are rewritten into each route's shape.
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let body = match wire_of(path.replace("{name}", "x").as_str()) {
                Wire::Ours => continue,
                Wire::OpenAi => "#/components/schemas/OpenAiErrorBody",
                Wire::Anthropic => "#/components/schemas/AnthropicErrorBody",
            };
            let ops = item.as_object_mut().into_iter().flat_map(|i| i.values_mut());
            for response in ops
                .filter_map(|op| op.get_mut("responses"))
                .filter_map(Value::as_object_mut)
                .flat_map(|r| r.values_mut())
            {
                if let Some(schema) = response.pointer_mut("/content/application~1json/schema")
                    && schema.get("$ref").and_then(Value::as_str) == Some("#/components/schemas/ErrorBody")
                {
                    *schema = json!({"$ref": body});
                }
            }
        }
    }
    for path in ["~1v1~1chat~1completions", "~1v1~1messages"] {
        if let Some(ok) = doc.pointer_mut(&format!("/paths/{path}/post/responses/200/content")) {
            ok["text/event-stream"] = json!({"schema": {"type": "string"}});
        }
    }
}
