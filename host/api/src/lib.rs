//! The service: REST, SSE, OpenAPI, gRPC, limits, the one error shape, and `serve`.
//! May depend on: `qlayer-runtime`, `qlayer-db`, `qlayer-scheduler`, `qlayer-gateway`, `qlayer-bundled`, `qlayer-marketplace`,
//! `qlayer-jobs`, `qlayer-manifest`, `qlayer-registry`.
//!
//! The service behind `qlayer serve`: REST (routes, authentication, limits, the one error shape,
//! request ids, metrics, server-sent events and the OpenAPI document generated from the
//! handlers), gRPC, and [`serve`], which starts both over the scheduler.

pub mod auth;
pub mod error;
pub mod gateway;
pub mod grpc;
pub mod jobs;
pub mod limits;
pub mod mcp;
pub mod pipelines;
pub mod resources;
pub mod serve;
pub mod ui;

use auth::{Caller, RateLimiter};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use error::{ApiError, ErrorBody};
use qlayer_jobs::JobRunner;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument as _;
use utoipa::OpenApi as _;

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// How long a request may take before it gets `503 timeout`.
    pub request_timeout: Duration,
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The state store.
    pub db: qlayer_db::Db,
    /// Runs jobs.
    pub runner: Arc<JobRunner>,
    /// Per-tenant request rate.
    pub limiter: Arc<RateLimiter>,
    /// Failed authentications per client address, and keys recently found unknown.
    pub auth_guard: Arc<auth::AuthGuard>,
    /// Request limits.
    pub limits: Limits,
    /// Renders the Prometheus metrics.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The OpenAI-compatible gateway.
    pub gateway: Option<Arc<qlayer_gateway::service::Gateway>>,
    /// `[mcp]`: which Host names and browser origins `/mcp` answers.
    pub mcp: mcp::McpSection,
    /// `[capsules]`: where tenants may publish runs' capsules, and the key that signs them.
    pub capsules: Arc<jobs::Capsules>,
}

impl AppState {
    /// Appends an audit record of `action` on `target` with its outcome (`ok`, or the error's
    /// code). A failure to record is logged; the response is not changed by it.
    pub async fn audit<T>(&self, caller: &Caller, action: &str, target: &str, outcome: &Result<T, ApiError>) {
        let outcome = match outcome {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("error: {}", e.code()),
        };
        let entry = qlayer_db::AuditEntry {
            actor: caller.actor().to_string(),
            tenant_id: caller.tenant_id().to_string(),
            action: action.to_string(),
            target: target.chars().take(256).collect(),
            outcome,
        };
        if let Err(e) = self.db.audit(entry).await {
            tracing::error!(error = %e, action, "writing the audit record failed");
        }
    }
}

/// The OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "QuantumLayer host API", description = "Tenants, API keys, installed plugins, jobs and factory runs of a `qlayer serve` host. Every /v1 route takes `Authorization: Bearer <api key>`; another tenant's object answers exactly like a missing one (404). Errors are `{\"error\": {\"code\", \"message\"}}`."),
    paths(
        health, ready, metrics_text,
        resources::create_tenant, resources::list_tenants, resources::get_tenant, resources::set_tenant_share,
        limits::set_tenant_limits, limits::set_key_limits,
        resources::create_key, resources::list_keys, resources::revoke_key,
        resources::list_plugins, resources::install_plugin, resources::get_plugin, resources::remove_plugin,
        jobs::submit_job, jobs::list_jobs, jobs::get_job, jobs::cancel_job, jobs::job_events, jobs::job_tasks,
        jobs::submit_run, jobs::get_run, jobs::run_capsule, jobs::publish_run, jobs::approve_run, jobs::reject_run,
        pipelines::put_pipeline, pipelines::get_pipeline, pipelines::list_pipelines, pipelines::delete_pipeline,
        gateway::chat_completions, gateway::messages, gateway::count_tokens, gateway::embeddings, gateway::list_models, gateway::get_model,
        gateway::put_model, gateway::delete_model, gateway::usage,
    ),
    components(schemas(qlayer_jobs::CallInput, qlayer_jobs::GraphInput, qlayer_jobs::GraphTask, qlayer_jobs::RunInput)),
    modifiers(&BearerAuth),
    tags(
        (name = "service", description = "Health, readiness and metrics"),
        (name = "tenants", description = "Tenants (operators: admin keys of the `system` tenant)"),
        (name = "keys", description = "API keys of the caller's tenant"),
        (name = "plugins", description = "Plugins installed for the caller's tenant from OCI registries"),
        (name = "jobs", description = "Work submitted by the caller's tenant"),
        (name = "runs", description = "Factory runs: requirement to validated project, through a pipeline (the bundled `default`, one stored for the tenant, or one given inline)"),
        (name = "gateway", description = "The OpenAI-compatible LLM gateway: the tenant's model table, completions and embeddings through its provider plugins (errors in OpenAI's shape), and usage"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("ql_<64 hex>").build(),
            ),
        );
    }
}

/// The OpenAPI document as pretty JSON (what `/openapi.json` serves and `docs/openapi.json` holds).
pub fn openapi_json() -> String {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(build_openapi_json).clone()
}

fn build_openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut doc = match serde_json::to_value(&doc) {
        Ok(doc) => doc,
        Err(e) => return format!("{{\"error\": \"{e}\"}}\n"),
    };
    shared_behaviour(&mut doc);
    job_inputs_by_kind(&mut doc);
    gateway::document(&mut doc);
    pipelines::document(&mut doc);
    events_as_sent(&mut doc);
    serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")) + "\n"
}

/// A path parameter holds no control character ([`error::ApiPath`] refuses one with a 400).
const PATH_PARAMETER_PATTERN: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]+$";

/// Adds to every operation what the layers shared by all routes answer, so no handler has to
/// repeat it: the request deadline (503 `timeout`), and on authenticated routes a missing or
/// unknown key (401) and the rate limits (429 with `Retry-After`); for a JSON body, malformed
/// JSON or fields (400), a body over the limit (413) and a missing JSON content type (415); for a
/// path or query parameter, a bad value (400), and the pattern [`error::ApiPath`] enforces on
/// path parameters.
fn shared_behaviour(doc: &mut serde_json::Value) {
    use serde_json::json;
    let error = |description: &str| {
        json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        })
    };
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else { return };
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else { continue };
        for op in item.values_mut() {
            let Some(op) = op.as_object_mut() else { continue };
            let authenticated = op.get("security").is_some();
            let has_body = op.get("requestBody").is_some();
            let mut has_params = false;
            for param in op.get_mut("parameters").and_then(|p| p.as_array_mut()).into_iter().flatten() {
                has_params = true;
                if param["in"] == "path" {
                    param["schema"]["pattern"] = json!(PATH_PARAMETER_PATTERN);
                }
            }
            let Some(responses) = op.get_mut("responses").and_then(|r| r.as_object_mut()) else { continue };
            let mut add = |status: &str, response: serde_json::Value, replace: bool| {
                if replace || !responses.contains_key(status) {
                    responses.insert(status.to_string(), response);
                }
            };
            if has_body || has_params {
                add("400", error("a parameter or the body is invalid"), false);
            }
            if has_body {
                add("413", error("the body is larger than `[limits] max-body-bytes`"), false);
                add("415", error("the body is not sent as `Content-Type: application/json`"), false);
            }
            if authenticated {
                add("401", error("no API key, or an unknown or revoked one"), false);
                let mut limited =
                    error("over the tenant's request rate, or too many failed authentications from this address");
                limited["headers"] = json!({"Retry-After": {
                    "description": "seconds to wait before trying again",
                    "schema": {"type": "integer", "minimum": 0}
                }});
                // Replaces what a handler may say, so every 429 names its header.
                add("429", limited, true);
            }
            add("503", error("the request took longer than `[limits] request-timeout-ms`"), false);
        }
    }
}

/// `POST /v1/jobs` takes a `call` input or a `run` input, as `kind` says: one schema per kind, so
/// a client (and a fuzzer) knows which input goes with which kind.
fn job_inputs_by_kind(doc: &mut serde_json::Value) {
    use serde_json::json;
    let Some(schemas) = doc.pointer_mut("/components/schemas") else { return };
    let Some(base) = schemas.get("SubmitJob").cloned() else { return };
    let variant = |kind: &str, input: serde_json::Value| {
        let mut v = base.clone();
        v["properties"]["kind"] = json!({"type": "string", "enum": [kind]});
        v["properties"]["input"] = input;
        v.as_object_mut().map(|o| o.remove("description"));
        v
    };
    let input = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});
    schemas["SubmitJob"] = json!({
        "description": base["description"],
        "oneOf": [
            variant("call", input("CallInput")),
            variant("call", input("GraphInput")),
            variant("run", input("RunInput"))
        ]
    });
}

/// Server-sent events are documented as they are sent: each event has an `id` (its `seq`), an
/// `event` (its kind) and `data`, the JSON text of the declared schema.
fn events_as_sent(doc: &mut serde_json::Value) {
    use serde_json::json;
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else { return };
    for op in paths.values_mut().filter_map(|i| i.as_object_mut()).flat_map(|i| i.values_mut()) {
        for response in op.get_mut("responses").and_then(|r| r.as_object_mut()).into_iter().flat_map(|r| r.values_mut())
        {
            if let Some(stream) = response.pointer_mut("/content/text~1event-stream") {
                let data = stream["schema"].take();
                stream["schema"] = json!({
                    "type": "object",
                    "required": ["id", "event", "data"],
                    "properties": {
                        "id": {"type": "string", "description": "the event's `seq`, for `Last-Event-ID`"},
                        "event": {"type": "string", "description": "the event's `kind`"},
                        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
                    }
                });
            }
        }
    }
}

/// The REST router.
pub fn router(state: AppState) -> axum::Router {
    let v1 = axum::Router::new()
        .route("/v1/tenants", post(resources::create_tenant).get(resources::list_tenants))
        .route("/v1/tenants/{id}", get(resources::get_tenant))
        .route("/v1/tenants/{id}/share", axum::routing::put(resources::set_tenant_share))
        .route("/v1/tenants/{id}/limits", axum::routing::put(limits::set_tenant_limits))
        .route("/v1/keys/{id}/limits", axum::routing::put(limits::set_key_limits))
        .route("/v1/keys", post(resources::create_key).get(resources::list_keys))
        .route("/v1/keys/{id}", axum::routing::delete(resources::revoke_key))
        .route("/v1/plugins", get(resources::list_plugins).post(resources::install_plugin))
        .route("/v1/plugins/{name}", get(resources::get_plugin).delete(resources::remove_plugin))
        .route("/v1/jobs", post(jobs::submit_job).get(jobs::list_jobs))
        .route("/v1/jobs/{id}", get(jobs::get_job))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel_job))
        .route("/v1/jobs/{id}/tasks", get(jobs::job_tasks))
        .route("/v1/jobs/{id}/events", get(jobs::job_events))
        .route("/v1/runs", post(jobs::submit_run))
        .route("/v1/runs/{id}", get(jobs::get_run))
        .route("/v1/runs/{id}/capsule", get(jobs::run_capsule))
        .route("/v1/runs/{id}/publish", post(jobs::publish_run))
        .route("/v1/runs/{id}/approve", post(jobs::approve_run))
        .route("/v1/runs/{id}/reject", post(jobs::reject_run))
        .route("/v1/pipelines", get(pipelines::list_pipelines))
        .route(
            "/v1/pipelines/{name}",
            get(pipelines::get_pipeline).put(pipelines::put_pipeline).delete(pipelines::delete_pipeline),
        )
        .route("/v1/chat/completions", post(gateway::chat_completions))
        .route("/v1/messages", post(gateway::messages))
        .route("/v1/messages/count_tokens", post(gateway::count_tokens))
        .route("/v1/embeddings", post(gateway::embeddings))
        .route("/v1/models", get(gateway::list_models))
        // A catch-all: model names may hold `/` (`meta/llama-3.1-8b`).
        .route("/v1/models/{*name}", get(gateway::get_model).put(gateway::put_model).delete(gateway::delete_model))
        .route("/v1/usage", get(gateway::usage))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::authenticate));
    axum::Router::new()
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_text))
        .route(
            "/openapi.json",
            get(|| async { ([(axum::http::header::CONTENT_TYPE, "application/json")], openapi_json()) }),
        )
        .merge(v1)
        .merge(mcp::router(&state))
        .merge(ui::router(&state))
        .fallback(|req: Request| async move {
            ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
        })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::middleware::from_fn(gateway::wire_errors))
        .with_state(state)
}

/// Per request: an id (the caller's `x-request-id` when it is sane, else a new one) on the span
/// and the response, the deadline, a log line, and the request metrics.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_string)
        .unwrap_or_else(new_request_id);
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let span = tracing::info_span!("request", request_id = %id, method = %method, route = %route,
        tenant = tracing::field::Empty, key = tracing::field::Empty);
    let started = Instant::now();
    let timeout = state.limits.request_timeout;
    let mut response = async move {
        match tokio::time::timeout(timeout, next.run(req)).await {
            Ok(response) => response,
            Err(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!("the request took longer than {} ms and was stopped", timeout.as_millis()),
            )
            .into_response(),
        }
    }
    .instrument(span.clone())
    .await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    span.in_scope(|| tracing::info!(status, latency_us = elapsed.as_micros() as u64, "request"));
    metrics::counter!("qlayer_http_requests_total", "method" => method.to_string(), "route" => route.clone(), "status" => status.to_string()).increment(1);
    metrics::histogram!("qlayer_http_request_duration_seconds", "route" => route).record(elapsed.as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

fn new_request_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static BOOT: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let boot = BOOT.get_or_init(|| {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        format!("{:08x}", (nanos as u64 ^ u64::from(std::process::id()).rotate_left(32)) as u32)
    });
    format!("req_{boot}{:010x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "service", responses((status = 200, description = "the process is up")))]
pub async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: the database answers.
#[utoipa::path(get, path = "/readyz", tag = "service",
    responses((status = 200, description = "ready"), (status = 503, description = "the database is unreachable")))]
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.db.ping().await {
        axum::Json(serde_json::json!({ "status": "ready", "database": "ok" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "status": "not ready", "database": "unreachable" })),
        )
            .into_response()
    }
}

/// Prometheus metrics (operators: an admin key of the `system` tenant, since plugin names are
/// labels).
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, content_type = "text/plain", body = String), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn metrics_text(State(state): State<AppState>, req: axum::extract::Request) -> Result<Response, ApiError> {
    let caller = Caller(auth::resolve(&state, req.headers(), auth::client_of(&req)).await?);
    if !caller.is_operator() {
        return Err(ApiError::forbidden("metrics are for operators: an admin key of the `system` tenant"));
    }
    if let Ok((queued, running)) = state.db.job_counts().await {
        metrics::gauge!("qlayer_jobs_queued").set(queued as f64);
        metrics::gauge!("qlayer_jobs_running").set(running as f64);
    }
    let warm = state.runner.runtime().warm_stats();
    metrics::gauge!("qlayer_provider_instances_idle").set(warm.idle as f64);
    metrics::counter!("qlayer_provider_instance_reuse_total", "outcome" => "hit").absolute(warm.hits);
    metrics::counter!("qlayer_provider_instance_reuse_total", "outcome" => "miss").absolute(warm.misses);
    metrics::counter!("qlayer_provider_instances_dropped_total").absolute(warm.dropped);
    let text = state.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// Installs the process-wide Prometheus recorder once; later calls get the same handle.
pub fn metrics_handle() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use std::sync::OnceLock;
    static HANDLE: OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            // Histogram samples are held until drained: drain them regularly, or they grow.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("qlayer-metrics".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .ok()?;
            Some(handle)
        })
        .clone()
}
