//! Jobs (plugin calls, factory runs): submit with an optional idempotency key, get, list, cancel,
//! follow as server-sent events; runs and their tar.gz capsule.

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use qlayer_db::{CancelOutcome, Job, JobEvent, JobKind, JobStatus, Task};
use qlayer_jobs::{CallPlan, JobLimits, RunInput};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `POST /v1/jobs`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// `call` (input: `{"plugin": name, "input": any}`, or a DAG of calls: `{"tasks": [{"name",
    /// "plugin", "input"?, "after"?: [names]}]}`) or `run` (input: a run request).
    pub kind: JobKind,
    /// What the job works on.
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    /// -10 to 10 (default 0); higher runs first within the tenant.
    #[serde(default)]
    #[schema(minimum = -10, maximum = 10)]
    pub priority: Option<i32>,
    /// Submitting again with the same key returns the first job instead of a new one (1-255
    /// characters).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 255)]
    pub idempotency_key: Option<String>,
    /// Give the job up this many ms after submission; a running plugin call is stopped
    /// (1 to 86400000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86400000)]
    pub deadline_ms: Option<u64>,
    /// Attempts per task, counting retries of retryable errors (1-20, default 5).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 20)]
    pub max_attempts: Option<u32>,
}

/// `POST /v1/runs`: a factory run.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRun {
    /// What to build, in words (at most 16,384 characters, not all white space).
    #[schema(min_length = 1, max_length = 16384, pattern = r"\S")]
    pub requirement: String,
    /// `scripted` (the built-in offline test double; the default) or the name of an LLM provider
    /// plugin installed for the tenant.
    #[serde(default)]
    pub provider: Option<String>,
    /// For `scripted`: a script to answer from instead of its built-in rules.
    #[serde(default, deserialize_with = "qlayer_jobs::script_or_its_text")]
    pub script: Option<qlayer_jobs::Script>,
    /// Options for the agents, e.g. `{"language": "python"}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub options: Option<serde_json::Value>,
    /// Repair rounds after the first validation (0-5; default: the pipeline's, else 2).
    #[serde(default)]
    #[schema(maximum = 5)]
    pub max_repair_rounds: Option<u32>,
    /// The pipeline: a stored one's name (`default`, the bundled one, unless the tenant stored
    /// its own), or a definition. Default: `default`.
    #[serde(default, deserialize_with = "qlayer_jobs::pipeline_choice")]
    pub pipeline: Option<qlayer_jobs::PipelineChoice>,
    /// Tokens the whole run may spend, over every step (at least 1; default: no limit). A step
    /// that would start with the budget spent fails the run, naming the budget.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub token_budget: Option<u64>,
    /// -10 to 10 (default 0).
    #[serde(default)]
    #[schema(minimum = -10, maximum = 10)]
    pub priority: Option<i32>,
    /// Submitting again with the same key returns the first run (1-255 characters).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 255)]
    pub idempotency_key: Option<String>,
    /// Give the run up this many ms after submission (1 to 86400000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86400000)]
    pub deadline_ms: Option<u64>,
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobPage {
    /// This page.
    pub items: Vec<Job>,
    /// Pass as `after` for the next (older) page; absent on the last.
    pub next: Option<String>,
}

/// `?limit=&after=&kind=`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    /// 1-100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
    /// Only jobs of this kind.
    pub kind: Option<JobKind>,
    /// Only jobs in this status (`waiting`: paused at an approval gate).
    pub status: Option<JobStatus>,
}

fn check_priority(priority: Option<i32>) -> Result<i32, ApiError> {
    match priority.unwrap_or(0) {
        p @ -10..=10 => Ok(p),
        p => Err(ApiError::invalid(format!("priority {p} is out of range: -10 to 10"))),
    }
}

/// Checks a job's input before it is accepted: the shape for its kind, and that a called plugin
/// is installed for the tenant as a tool.
/// The caller's install `name`; `None` when there is none (a failing database is not "none").
async fn installed(
    state: &AppState,
    caller: &Caller,
    name: &str,
) -> Result<Option<qlayer_marketplace::Install>, ApiError> {
    match state.runner.marketplace().get(caller.tenant_name(), name).await {
        Ok(install) => Ok(Some(install)),
        Err(e) if e.downcast_ref::<qlayer_marketplace::InstallError>().is_some() => Ok(None),
        Err(e) => match e.downcast::<qlayer_db::DbError>() {
            Ok(db) => Err(db.into()),
            Err(e) => Err(ApiError::internal(format!("{e:#}"))),
        },
    }
}

async fn check_input(
    state: &AppState,
    caller: &Caller,
    kind: JobKind,
    input: &serde_json::Value,
) -> Result<(), ApiError> {
    match kind {
        JobKind::Call => {
            let plan = CallPlan::parse(input).map_err(ApiError::invalid)?;
            let field = if matches!(plan, CallPlan::One(_)) { "input.plugin" } else { "input.tasks" };
            for plugin in plan.plugins() {
                let install = installed(state, caller, plugin).await?.ok_or_else(|| {
                    ApiError::not_found(format!("{field}: plugin `{plugin}` is not installed for this tenant"))
                })?;
                if install.kind != qlayer_runtime::Kind::Tool {
                    return Err(ApiError::invalid(format!(
                        "{field}: plugin `{plugin}` is a {} plugin; jobs of kind `call` invoke tool plugins",
                        install.kind
                    )));
                }
            }
        }
        JobKind::Run => {
            let run: RunInput =
                serde_json::from_value(input.clone()).map_err(|e| ApiError::invalid(format!("input: {e}")))?;
            run.check().map_err(ApiError::invalid)?;
            // The pipeline: a stored one that is missing is a 404; a bad one names its step.
            state.runner.prepare_run(caller.tenant_id(), input).await.map_err(crate::pipelines::run_refused)?;
            if let Some(name) = run.provider.as_deref().filter(|p| *p != "scripted") {
                let install = installed(state, caller, name).await?.ok_or_else(|| {
                    ApiError::not_found(format!("provider: plugin `{name}` is not installed for this tenant"))
                })?;
                if install.kind != qlayer_runtime::Kind::Provider {
                    return Err(ApiError::invalid(format!(
                        "provider: plugin `{name}` is a {} plugin, not a provider",
                        install.kind
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Submits a job (REST and gRPC): `true` when it is new, `false` for an idempotent replay.
pub async fn submit_op(
    state: &AppState,
    caller: &Caller,
    kind: JobKind,
    input: serde_json::Value,
    priority: Option<i32>,
    idempotency_key: Option<String>,
    limits: JobLimits,
) -> Result<(Job, bool), ApiError> {
    caller.require_write()?;
    let outcome = async {
        let priority = check_priority(priority)?;
        limits.check().map_err(ApiError::invalid)?;
        check_input(state, caller, kind, &input).await?;
        let submitted =
            state.runner.submit(caller.tenant_id(), kind, &input, priority, idempotency_key.as_deref(), limits).await?;
        Ok::<_, ApiError>(submitted)
    }
    .await;
    let target = outcome.as_ref().map(|(j, _)| j.id.clone()).unwrap_or_else(|_| kind.as_str().to_string());
    let action = if kind == JobKind::Run { "run.submit" } else { "job.submit" };
    state.audit(caller, action, &target, &outcome).await;
    outcome
}

async fn submit(
    state: &AppState,
    caller: &Caller,
    kind: JobKind,
    input: serde_json::Value,
    priority: Option<i32>,
    idempotency_key: Option<String>,
    limits: JobLimits,
) -> Result<Response, ApiError> {
    let (job, created) = submit_op(state, caller, kind, input, priority, idempotency_key, limits).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    let mut response = (status, axum::Json(&job)).into_response();
    let location = format!("/v1/{}/{}", if kind == JobKind::Run { "runs" } else { "jobs" }, job.id);
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

/// Submits a job. It is stored before the answer: 201 with the new job, or 200 with the job an
/// earlier request with the same idempotency key created.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = SubmitJob,
    responses((status = 201, body = Job), (status = 200, body = Job, description = "idempotent replay"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "a plugin the input names is not installed for the tenant, or a run names a pipeline the tenant has not stored"),
        (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn submit_job(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<SubmitJob>,
) -> Result<Response, ApiError> {
    let limits = JobLimits { deadline_ms: body.deadline_ms, max_attempts: body.max_attempts };
    submit(&state, &caller, body.kind, body.input, body.priority, body.idempotency_key, limits).await
}

/// Lists the caller's tenant's jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(JobQuery),
    responses((status = 200, body = JobPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<JobQuery>,
) -> Result<axum::Json<JobPage>, ApiError> {
    list_jobs_op(&state, &caller, query).await.map(axum::Json)
}

/// Lists jobs (REST and gRPC).
pub async fn list_jobs_op(state: &AppState, caller: &Caller, query: JobQuery) -> Result<JobPage, ApiError> {
    let limit = super::error::page_size(query.limit)?;
    let items = state.db.jobs(caller.tenant_id(), query.kind, query.status, query.after.as_deref(), limit).await?;
    let next = (items.len() == limit as usize).then(|| items.last().map(|j| j.id.clone())).flatten();
    Ok(JobPage { items, next })
}

/// A job of the caller's tenant, of `kind` when given (REST and gRPC).
pub async fn find(state: &AppState, caller: &Caller, id: &str, kind: Option<JobKind>) -> Result<Job, ApiError> {
    let noun = if kind == Some(JobKind::Run) { "run" } else { "job" };
    match state.db.job(caller.tenant_id(), id).await? {
        Some(job) if kind.is_none_or(|k| k == job.kind) => Ok(job),
        _ => Err(ApiError::not_found(format!("{noun} `{id}` not found"))),
    }
}

/// One job of the caller's tenant.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = Job), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> Result<axum::Json<Job>, ApiError> {
    find(&state, &caller, &id, None).await.map(axum::Json)
}

/// A job's tasks.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TaskList {
    /// In the job's order.
    pub items: Vec<Task>,
}

/// The tasks of a job of the caller's tenant: each one's status, attempts, dependencies, and its
/// output or last error.
#[utoipa::path(get, path = "/v1/jobs/{id}/tasks", tag = "jobs", params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = TaskList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn job_tasks(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> Result<axum::Json<TaskList>, ApiError> {
    job_tasks_op(&state, &caller, &id).await.map(axum::Json)
}

/// A job's tasks (REST and gRPC); another tenant's job is missing.
pub async fn job_tasks_op(state: &AppState, caller: &Caller, id: &str) -> Result<TaskList, ApiError> {
    find(state, caller, id, None).await?;
    Ok(TaskList { items: state.db.job_tasks(caller.tenant_id(), id).await? })
}

/// Cancels a queued or running job: a running plugin call is stopped.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = Job), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "already finished")),
    security(("api_key" = [])))]
pub async fn cancel_job(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> Result<axum::Json<Job>, ApiError> {
    cancel_op(&state, &caller, &id).await.map(axum::Json)
}

/// Cancels a job (REST and gRPC).
pub async fn cancel_op(state: &AppState, caller: &Caller, id: &str) -> Result<Job, ApiError> {
    caller.require_write()?;
    let outcome = match state.db.cancel_job(caller.tenant_id(), id, "cancelled by the caller").await {
        Ok(CancelOutcome::Cancelled(job)) => {
            state.runner.cancel(&job.id).await;
            Ok(job)
        }
        Ok(CancelOutcome::AlreadyFinished(job)) => {
            Err(ApiError::conflict(format!("job `{id}` already finished ({})", job.status.as_str())))
        }
        Ok(CancelOutcome::NotFound) => Err(ApiError::not_found(format!("job `{id}` not found"))),
        Err(e) => Err(e.into()),
    };
    state.audit(caller, "job.cancel", id, &outcome).await;
    outcome
}

/// The job's events as server-sent events (`id` is the event's sequence number; send
/// `Last-Event-ID` to resume). The stream ends after the job's last event.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", params(("id" = String, Path, description = "job id")),
    responses((status = 200, content_type = "text/event-stream", body = JobEvent, description = "one `data:` line per event"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn job_events(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiPath(id): ApiPath,
) -> Result<Response, ApiError> {
    find(&state, &caller, &id, None).await?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    let stream = event_stream(state, caller.tenant_id().to_string(), id, after);
    let stream = futures::StreamExt::map(stream, |e: JobEvent| {
        Ok::<_, std::convert::Infallible>(
            Event::default()
                .id(e.seq.to_string())
                .event(e.kind.clone())
                .json_data(&e)
                .unwrap_or_else(|_| Event::default().comment("unserialisable event")),
        )
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// A job's events after `after`, live, ending after its terminal event. Wakes on the runner's
/// announcements, and checks the store every second anyway (another node may run the job).
pub fn event_stream(
    state: AppState,
    tenant_id: String,
    job_id: String,
    after: i64,
) -> impl futures::Stream<Item = JobEvent> + Send + 'static {
    let announcements = state.runner.subscribe();
    let init = (state, tenant_id, job_id, after, announcements, std::collections::VecDeque::<JobEvent>::new(), false);
    futures::stream::unfold(init, |(state, tenant, job, mut after, mut rx, mut buffered, mut done)| async move {
        loop {
            if let Some(event) = buffered.pop_front() {
                after = event.seq;
                if matches!(event.kind.as_str(), "succeeded" | "failed" | "cancelled") {
                    done = true;
                    buffered.clear();
                }
                return Some((event, (state, tenant, job, after, rx, buffered, done)));
            }
            if done {
                return None;
            }
            match state.db.job_events(&tenant, &job, after).await {
                Ok(events) if !events.is_empty() => {
                    buffered.extend(events);
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(job = %job, error = %e, "reading job events failed");
                    return None;
                }
            }
            let wait = async {
                loop {
                    match rx.recv().await {
                        Ok(id) if id == job => return,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
        }
    })
}

/// Starts a factory run through a pipeline (by default: requirement → product manager →
/// developer → validators with bounded repair); the generated project becomes the run's capsule.
/// The pipeline is checked before anything runs; an error names the step at fault.
#[utoipa::path(post, path = "/v1/runs", tag = "runs", request_body = SubmitRun,
    responses((status = 201, body = Job), (status = 200, body = Job, description = "idempotent replay"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "the provider is not installed for the tenant, or the pipeline named is not stored for it"), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn submit_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<SubmitRun>,
) -> Result<Response, ApiError> {
    let run = RunInput {
        requirement: body.requirement,
        provider: body.provider,
        script: body.script,
        options: body.options,
        max_repair_rounds: body.max_repair_rounds,
        token_budget: body.token_budget,
        pipeline: body.pipeline,
    };
    let input = serde_json::to_value(&run).map_err(ApiError::internal)?;
    let limits = JobLimits { deadline_ms: body.deadline_ms, max_attempts: None };
    submit(&state, &caller, JobKind::Run, input, body.priority, body.idempotency_key, limits).await
}

/// One run: a job of kind `run`; once succeeded, `output` is the run report.
#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs", params(("id" = String, Path, description = "run id")),
    responses((status = 200, body = Job), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> Result<axum::Json<Job>, ApiError> {
    find(&state, &caller, &id, Some(JobKind::Run)).await.map(axum::Json)
}

/// A person's decision at a run's approval gate.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GateBody {
    /// A note for the record (the run's events and audit log). At most 16,384 characters.
    #[schema(max_length = 16384)]
    pub comment: Option<String>,
}

/// A rejection at a run's approval gate.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectBody {
    /// Why: it goes back to the gated step as feedback in the next repair round. At most 16,384
    /// characters, not all white space.
    #[schema(min_length = 1, max_length = 16384, pattern = r"\S")]
    pub comment: String,
}

/// Decides at the gate a run waits at (REST and gRPC): the run goes on (approved), or the steps
/// after the gate skip this round and the gated step gets the comment in the next (rejected).
pub async fn gate_op(
    state: &AppState,
    caller: &Caller,
    id: &str,
    approved: bool,
    comment: Option<String>,
) -> Result<Job, ApiError> {
    caller.require_write()?;
    let action = if approved { "run.approve" } else { "run.reject" };
    let outcome = async {
        let decision = qlayer_jobs::GateDecision { approved, comment, by: Some(caller.actor().to_string()) };
        decision.check().map_err(ApiError::invalid)?;
        find(state, caller, id, Some(JobKind::Run)).await?;
        let decision = serde_json::to_value(&decision).map_err(ApiError::internal)?;
        let kind = if approved { "approved" } else { "rejected" };
        match state.runner.scheduler().decide_gate(caller.tenant_id(), id, &decision, kind).await? {
            qlayer_db::GateOutcome::Decided(_) => find(state, caller, id, Some(JobKind::Run)).await,
            qlayer_db::GateOutcome::NotWaiting(job) => {
                Err(ApiError::conflict(format!("run `{id}` is not waiting at a gate (it is {})", job.status.as_str())))
            }
            qlayer_db::GateOutcome::NotFound => Err(ApiError::not_found(format!("run `{id}` not found"))),
        }
    }
    .await;
    state.audit(caller, action, id, &outcome).await;
    outcome
}

/// Approves the gate a run waits at: the steps after it run.
#[utoipa::path(post, path = "/v1/runs/{id}/approve", tag = "runs", params(("id" = String, Path, description = "run id")),
    request_body = GateBody,
    responses((status = 200, body = Job), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the run is not waiting at a gate")),
    security(("api_key" = [])))]
pub async fn approve_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    body: axum::body::Bytes,
) -> Result<axum::Json<Job>, ApiError> {
    let body = gate_body(&body)?;
    gate_op(&state, &caller, &id, true, body.comment).await.map(axum::Json)
}

/// A gate decision's body: JSON, or nothing (no comment).
fn gate_body(bytes: &[u8]) -> Result<GateBody, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(GateBody::default());
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("the body is not a gate decision: {e}")))
}

/// Rejects the gate a run waits at, with a comment: the steps after it skip this round, and the
/// gated step gets the comment as feedback in the next repair round (within the repair bound;
/// with no round left the run ends `failed-validation`).
#[utoipa::path(post, path = "/v1/runs/{id}/reject", tag = "runs", params(("id" = String, Path, description = "run id")),
    request_body = RejectBody,
    responses((status = 200, body = Job), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the run is not waiting at a gate")),
    security(("api_key" = [])))]
pub async fn reject_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    body: axum::body::Bytes,
) -> Result<axum::Json<Job>, ApiError> {
    let body: RejectBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the body is not a rejection (`{{\"comment\": \"why\"}}`): {e}")))?;
    gate_op(&state, &caller, &id, false, Some(body.comment)).await.map(axum::Json)
}

/// A run's capsule (REST and gRPC).
pub async fn capsule_op(state: &AppState, caller: &Caller, id: &str) -> Result<qlayer_db::Artifact, ApiError> {
    let job = find(state, caller, id, Some(JobKind::Run)).await?;
    match state.db.artifact(caller.tenant_id(), id).await? {
        Some(artifact) => Ok(artifact),
        None => Err(ApiError::conflict(format!("run `{id}` has no capsule: it is {}", job.status.as_str()))),
    }
}

/// `[capsules]` as the service holds it: where each tenant may publish, and the signing key.
#[derive(Default)]
pub struct Capsules {
    /// Repository prefixes (`{tenant}` stands for the tenant's name).
    pub publish_to: Vec<String>,
    /// The key every published capsule is signed with.
    pub key: Option<std::sync::Arc<qlayer_registry::PrivateKey>>,
}

impl std::fmt::Debug for Capsules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capsules").field("publish_to", &self.publish_to).field("signs", &self.key.is_some()).finish()
    }
}

impl Capsules {
    /// Whether `tenant` may push to `reference` (`registry/repository:tag`): under one of its
    /// prefixes, at a path boundary. The error says where it may.
    fn check(&self, tenant: &str, reference: &str) -> Result<(), ApiError> {
        if self.publish_to.is_empty() {
            return Err(ApiError::forbidden(
                "publishing capsules is off on this service: the operator has not set [capsules] publish-to",
            ));
        }
        let parsed = qlayer_registry::parse_reference(reference).map_err(|e| ApiError::invalid(e.to_string()))?;
        if parsed.tag().is_none() || parsed.digest().is_some() {
            return Err(ApiError::invalid(format!(
                "`{reference}`: give a tag and no digest, e.g. registry.example.com/capsules/{tenant}/todo:1"
            )));
        }
        let repository = format!("{}/{}", parsed.registry(), parsed.repository());
        let allowed: Vec<String> = self.publish_to.iter().map(|p| p.replace("{tenant}", tenant)).collect();
        if allowed
            .iter()
            .any(|prefix| repository.strip_prefix(prefix.as_str()).is_some_and(|rest| rest.starts_with('/')))
        {
            return Ok(());
        }
        Err(ApiError::forbidden(format!(
            "`{reference}` is not where this tenant may publish: use a repository under {}",
            allowed.iter().map(|p| format!("{p}/")).collect::<Vec<_>>().join(" or ")
        )))
    }
}

/// Where to publish a run's capsule.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    /// An OCI reference with a tag, under a repository the operator lets the tenant publish to
    /// (`[capsules] publish-to`), e.g. `registry.example.com/capsules/acme/todo:1`.
    #[schema(min_length = 1, max_length = 1024)]
    pub reference: String,
}

/// A published capsule.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Published {
    /// The reference pushed to.
    pub reference: String,
    /// `sha256:<hex>` of the OCI manifest (what a signature signs; pull by `<repository>@<digest>`).
    pub digest: String,
    /// Whether the service signed it (`[capsules] signing-key`).
    pub signed: bool,
}

/// Publishes a run's capsule (REST and gRPC): checked (every file against its report), pushed
/// as an OCI artifact (the files as a tar.gz layer, the report as the config), signed with the
/// service's key when it has one.
pub async fn publish_op(state: &AppState, caller: &Caller, id: &str, reference: &str) -> Result<Published, ApiError> {
    caller.require_write()?;
    let outcome = async {
        // Another tenant's run answers 404 whatever the reference.
        find(state, caller, id, Some(JobKind::Run)).await?;
        state.capsules.check(caller.tenant_name(), reference)?;
        let artifact = capsule_op(state, caller, id).await?;
        let (report, annotations) =
            qlayer_jobs::capsule_publication(id, &artifact.bytes).map_err(|e| ApiError::internal(format!("{e:#}")))?;
        let market = state.runner.marketplace();
        market
            .check_registry(state.runner.runtime(), reference)
            .await
            .map_err(|e| crate::resources::install_error(e, reference))?;
        let key = state.capsules.key.as_deref();
        let digest = market
            .push_capsule(reference, &report, &artifact.bytes, annotations, key)
            .await
            .map_err(|e| crate::resources::install_error(e, reference))?;
        Ok(Published { reference: reference.to_string(), digest, signed: key.is_some() })
    }
    .await;
    state.audit(caller, "run.publish", id, &outcome).await;
    outcome
}

/// Pushes a run's capsule to an OCI registry: the files as a tar.gz layer
/// (`application/vnd.quantumlayer.capsule.layer.v1.tar+gzip`), the run report (every plugin with
/// its digest, the validators' findings) as the config
/// (`application/vnd.quantumlayer.capsule.config.v1+json`), signed with the service's key when
/// the operator set one. `qlayer capsule pull` verifies and unpacks it.
#[utoipa::path(post, path = "/v1/runs/{id}/publish", tag = "runs", params(("id" = String, Path, description = "run id")),
    request_body = PublishBody,
    responses((status = 200, body = Published), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "a viewer key, publishing is off, or the reference is outside the tenant's repositories"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the run has no capsule"),
        (status = 422, body = ErrorBody), (status = 502, body = ErrorBody, description = "the registry refused or could not be reached")),
    security(("api_key" = [])))]
pub async fn publish_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
    ApiJson(body): ApiJson<PublishBody>,
) -> Result<axum::Json<Published>, ApiError> {
    publish_op(&state, &caller, &id, &body.reference).await.map(axum::Json)
}

/// The generated project as a tar.gz (files under `<run id>/`, with `qlayer-run.json`).
#[utoipa::path(get, path = "/v1/runs/{id}/capsule", tag = "runs", params(("id" = String, Path, description = "run id")),
    responses((status = 200, content_type = "application/gzip", body = Vec<u8>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the run has not succeeded")),
    security(("api_key" = [])))]
pub async fn run_capsule(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath,
) -> Result<Response, ApiError> {
    let artifact = capsule_op(&state, &caller, &id).await?;
    let disposition = format!("attachment; filename=\"{id}.tar.gz\"");
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_str(&artifact.media_type).map_err(ApiError::internal)?),
            (header::CONTENT_DISPOSITION, HeaderValue::from_str(&disposition).map_err(ApiError::internal)?),
        ],
        artifact.bytes,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_tenant_publishes_only_under_its_own_prefixes_and_nowhere_when_publishing_is_off() {
        let off = Capsules::default();
        let e = off.check("acme", "r.example.com/capsules/acme/todo:1").unwrap_err();
        assert!(e.message().contains("[capsules] publish-to"), "{e:?}");
        let on = Capsules { publish_to: vec!["r.example.com/capsules/{tenant}".into()], key: None };
        assert!(on.check("acme", "r.example.com/capsules/acme/todo:1").is_ok());
        assert!(on.check("acme", "r.example.com/capsules/acme/a/b:2").is_ok());
        for refused in [
            "r.example.com/capsules/acme:1",
            "r.example.com/capsules/acme-x/todo:1",
            "r.example.com/capsules/globex/todo:1",
            "evil.example.com/capsules/acme/todo:1",
        ] {
            let e = on.check("acme", refused).unwrap_err();
            assert!(e.message().contains("r.example.com/capsules/acme/"), "{refused}: {e:?}");
        }
        assert!(on.check("acme", "not a reference!").is_err());
        assert!(on.check("acme", &format!("r.example.com/capsules/acme/todo@sha256:{}", "a".repeat(64))).is_err());
    }
}
