//! The dashboard's pages: runs (start, watch live, gates, documents, files, findings, capsule),
//! jobs and their tasks, plugins (installs, registry search, install, upgrade, remove), usage,
//! and the operators' pages. Each goes through the REST API's operations.

use super::{Posted, Section, Visitor, csrf_field, day, error_page, layout, not_found, page, see_other, when};
use crate::AppState;
use crate::error::ApiError;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use qlayer_db::{Job, JobKind, JobStatus, Task};
use serde_json::Value;
use std::collections::HashMap;

/// Runs per page.
const PAGE: u32 = 50;
/// The most of one file a page shows.
const SHOWN_BYTES: usize = 64 * 1024;

fn status_badge(status: &str) -> Markup {
    html! { span class={"badge " (status)} { (status) } }
}

/// A short id for tables.
fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

fn parsed(text: Option<&qlayer_db::JsonText>) -> Value {
    text.and_then(|t| serde_json::from_str(t.get()).ok()).unwrap_or(Value::Null)
}

fn requirement(job: &Job) -> String {
    let r = job.input["requirement"].as_str().unwrap_or("");
    if r.chars().count() > 120 { format!("{}…", r.chars().take(120).collect::<String>()) } else { r.to_string() }
}

/// The query of a list page.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct ListQuery {
    after: Option<String>,
    kind: Option<String>,
    status: Option<String>,
}

/// What a person typed into the start form, kept when it is refused.
#[derive(Default)]
struct RunForm {
    requirement: String,
    pipeline: String,
    provider: String,
}

pub(crate) async fn runs(State(state): State<AppState>, visitor: Visitor, Query(q): Query<ListQuery>) -> Response {
    runs_page(&state, &visitor, q.after.as_deref(), RunForm::default(), None).await
}

async fn runs_page(
    state: &AppState,
    visitor: &Visitor,
    after: Option<&str>,
    typed: RunForm,
    refused: Option<(StatusCode, String)>,
) -> Response {
    let tenant = visitor.caller.tenant_id();
    let items = match state.db.jobs(tenant, Some(JobKind::Run), None, after, PAGE).await {
        Ok(items) => items,
        Err(e) => return error_page(visitor, &e.into()),
    };
    let next = (items.len() == PAGE as usize).then(|| items.last().map(|j| j.id.clone())).flatten();
    let pipelines: Vec<String> =
        state.db.pipelines(tenant).await.map(|p| p.into_iter().map(|p| p.name).collect()).unwrap_or_default();
    let providers: Vec<String> = state
        .runner
        .marketplace()
        .list(visitor.caller.tenant_name())
        .await
        .map(|l| l.into_iter().filter(|i| i.kind == qlayer_runtime::Kind::Provider).map(|i| i.name).collect())
        .unwrap_or_default();
    let status = refused.as_ref().map(|(s, _)| *s).unwrap_or(StatusCode::OK);
    let body = html! {
        @if visitor.can_write() {
            section aria-labelledby="start-title" {
                h2 #start-title { "Start a run" }
                @if let Some((_, message)) = &refused {
                    p.error #form-error role="alert" { (message) }
                }
                form method="post" action="/ui/runs" #start-run {
                    (csrf_field(visitor))
                    label for="requirement" { "What to build" }
                    textarea #requirement name="requirement" rows="3" required maxlength="16384"
                        placeholder="a todo list CLI in Rust" { (typed.requirement) }
                    div.row {
                        div {
                            label for="pipeline" { "Pipeline" }
                            select #pipeline name="pipeline" {
                                @for name in std::iter::once("default".to_string()).chain(pipelines.iter().filter(|p| *p != "default").cloned()) {
                                    option value=(name) selected[typed.pipeline == name] { (name) }
                                }
                            }
                        }
                        div {
                            label for="provider" { "Provider" }
                            select #provider name="provider" {
                                option value="scripted" { "scripted (offline test double)" }
                                @for name in &providers {
                                    option value=(name) selected[typed.provider == *name] { (name) }
                                }
                            }
                        }
                    }
                    button type="submit" { "Start the run" }
                }
            }
        }
        section aria-labelledby="runs-title" {
            h2 #runs-title { "Runs" }
            @if items.is_empty() {
                p { "No runs yet." }
            } @else {
                table #runs {
                    caption.visually-hidden { "The tenant's runs, newest first" }
                    thead { tr { th scope="col" { "Run" } th scope="col" { "Status" } th scope="col" { "Requirement" } th scope="col" { "Started" } th scope="col" { "Finished" } } }
                    tbody {
                        @for job in &items {
                            tr {
                                td { a href={"/ui/runs/" (job.id)} { code { (job.id) } } }
                                td { (status_badge(job.status.as_str())) }
                                td { (requirement(job)) }
                                td { (when(job.created_at)) }
                                td { @if let Some(at) = job.finished_at { (when(at)) } }
                            }
                        }
                    }
                }
                @if let Some(next) = &next {
                    p { a rel="next" href={"/ui/runs?after=" (next)} { "Older runs →" } }
                }
            }
        }
    };
    (status, axum::response::Html(layout(visitor, Section::Runs, "Runs", body).into_string())).into_response()
}

pub(crate) async fn start_run(State(state): State<AppState>, visitor: Visitor, Posted(fields): Posted) -> Response {
    let typed = RunForm {
        requirement: fields.get("requirement").cloned().unwrap_or_default(),
        pipeline: fields.get("pipeline").cloned().unwrap_or_else(|| "default".into()),
        provider: fields.get("provider").cloned().unwrap_or_else(|| "scripted".into()),
    };
    let mut input = serde_json::json!({"requirement": typed.requirement, "pipeline": typed.pipeline});
    if typed.provider != "scripted" {
        input["provider"] = Value::String(typed.provider.clone());
    }
    let submitted = crate::jobs::submit_op(
        &state,
        &visitor.caller,
        JobKind::Run,
        input,
        None,
        None,
        qlayer_jobs::JobLimits { deadline_ms: None, max_attempts: None },
    )
    .await;
    match submitted {
        Ok((job, _)) => see_other(&format!("/ui/runs/{}", job.id)),
        Err(e) if e.status() == StatusCode::FORBIDDEN => error_page(&visitor, &e),
        Err(e) => runs_page(&state, &visitor, None, typed, Some((e.status(), e.message().to_string()))).await,
    }
}

/// One step's figures from its task's output.
struct StepFigures {
    tokens: Option<u64>,
    cost: Option<f64>,
    summary: String,
}

fn figures(task: &Task) -> StepFigures {
    let out = parsed(task.output.as_ref());
    let step = &out["step"];
    let tokens = step["tokens"].as_object().map(|t| {
        t.get("prompt").and_then(Value::as_u64).unwrap_or(0) + t.get("completion").and_then(Value::as_u64).unwrap_or(0)
    });
    StepFigures {
        tokens,
        cost: step["cost"].as_f64(),
        summary: step["summary"].as_str().map(str::to_string).or_else(|| task.error.clone()).unwrap_or_default(),
    }
}

fn total_tokens(tasks: &[Task]) -> u64 {
    tasks.iter().filter_map(|t| figures(t).tokens).sum()
}

fn total_cost(tasks: &[Task]) -> Option<f64> {
    let costs: Vec<f64> = tasks.iter().filter_map(|t| figures(t).cost).collect();
    (!costs.is_empty()).then(|| costs.iter().sum())
}

fn money(cost: Option<f64>) -> String {
    cost.map(|c| format!("{c:.6}")).unwrap_or_else(|| "—".into())
}

/// The steps as a table that the page's script keeps current.
fn steps_table(tasks: &[Task], live: Option<(&str, i64)>) -> Markup {
    html! {
        table #steps data-events=[live.map(|(id, after)| format!("/ui/runs/{id}/events?after={after}"))] {
            caption.visually-hidden { "Steps and their status" }
            thead { tr {
                th scope="col" { "Step" } th scope="col" { "Kind" } th scope="col" { "Status" }
                th scope="col" { "Attempts" } th scope="col" { "After" } th scope="col" { "Tokens" } th scope="col" { "Cost" } th scope="col" { "Summary or error" }
            } }
            tbody {
                @for t in tasks {
                    @let f = figures(t);
                    tr data-task=(t.name) {
                        th scope="row" data-field="name" { (t.name) }
                        td data-field="kind" { (t.kind) }
                        td data-field="status" { (status_badge(t.status.as_str())) }
                        td data-field="attempts" { (t.attempts) "/" (t.max_attempts) }
                        td data-field="after" { (t.depends_on.join(", ")) }
                        td data-field="tokens" { @if let Some(n) = f.tokens { (n) } }
                        td data-field="cost" { @if f.cost.is_some() { (money(f.cost)) } }
                        td data-field="summary" { (f.summary) }
                    }
                }
            }
        }
    }
}

/// A job's tasks as a layered graph: each task one column to the right of its latest dependency.
fn dag(tasks: &[Task]) -> Markup {
    let index: HashMap<&str, usize> = tasks.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
    let mut layer = vec![0usize; tasks.len()];
    // Tasks are stored after their dependencies; a few passes settle any other order.
    for _ in 0..tasks.len().min(64) {
        let mut changed = false;
        for (i, t) in tasks.iter().enumerate() {
            let l = t.depends_on.iter().filter_map(|d| index.get(d.as_str())).map(|&d| layer[d] + 1).max().unwrap_or(0);
            if l != layer[i] {
                layer[i] = l;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut row = vec![0usize; tasks.len()];
    let mut per_layer: HashMap<usize, usize> = HashMap::new();
    for (i, l) in layer.iter().enumerate() {
        let n = per_layer.entry(*l).or_default();
        row[i] = *n;
        *n += 1;
    }
    let (w, h, gx, gy) = (150usize, 30usize, 40usize, 14usize);
    let width = (layer.iter().max().copied().unwrap_or(0) + 1) * (w + gx);
    let height = per_layer.values().max().copied().unwrap_or(1) * (h + gy) + gy;
    let pos = |i: usize| (layer[i] * (w + gx) + 4, row[i] * (h + gy) + gy);
    html! {
        svg.dag role="img" aria-labelledby="dag-title" width=(width) height=(height) viewBox={"0 0 " (width) " " (height)} {
            title #dag-title { "The tasks and what each waits for" }
            @for (i, t) in tasks.iter().enumerate() {
                @for d in &t.depends_on {
                    @if let Some(&j) = index.get(d.as_str()) {
                        @let (x1, y1) = pos(j);
                        @let (x2, y2) = pos(i);
                        line.edge x1=(x1 + w) y1=(y1 + h / 2) x2=(x2) y2=(y2 + h / 2) {}
                    }
                }
            }
            @for (i, t) in tasks.iter().enumerate() {
                @let (x, y) = pos(i);
                g class={"node " (t.status.as_str())} data-task=(t.name) {
                    rect x=(x) y=(y) width=(w) height=(h) rx="4" {}
                    text x=(x + 8) y=(y + 19) { (t.name.chars().take(20).collect::<String>()) }
                }
            }
        }
    }
}

/// The latest text of each artifact the run's steps wrote, by path.
fn artifacts(tasks: &[Task]) -> Vec<(String, String)> {
    let mut by_path: Vec<(String, String)> = Vec::new();
    for t in tasks {
        let out = parsed(t.output.as_ref());
        for a in out["artifacts"].as_array().into_iter().flatten() {
            let (Some(path), Some(text)) = (a["path"].as_str(), a["text"].as_str()) else { continue };
            match by_path.iter_mut().find(|(p, _)| p == path) {
                Some(slot) => slot.1 = text.to_string(),
                None => by_path.push((path.to_string(), text.to_string())),
            }
        }
    }
    by_path
}

fn shown(text: &str) -> (String, bool) {
    if text.len() <= SHOWN_BYTES {
        return (text.to_string(), false);
    }
    let mut end = SHOWN_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].to_string(), true)
}

fn file_list(files: &[(String, String)]) -> Markup {
    html! {
        @for (path, text) in files {
            @let (text, cut) = shown(text);
            details.file {
                summary { code { (path) } " · " (text.len()) " bytes" }
                pre { code { (text) } }
                @if cut { p.muted { "Only the first 64 KiB are shown; the capsule has it whole." } }
            }
        }
    }
}

pub(crate) async fn run(State(state): State<AppState>, visitor: Visitor, Path(id): Path<String>) -> Response {
    let caller = &visitor.caller;
    let job = match crate::jobs::find(&state, caller, &id, Some(JobKind::Run)).await {
        Ok(job) => job,
        Err(e) => return error_page(&visitor, &e),
    };
    let (tasks, events) = match tokio::try_join!(
        state.db.job_tasks(caller.tenant_id(), &id),
        state.db.job_events(caller.tenant_id(), &id, 0)
    ) {
        Ok(found) => found,
        Err(e) => return error_page(&visitor, &e.into()),
    };
    let last_seq = events.last().map(|e| e.seq).unwrap_or(0);
    let gate = (job.status == JobStatus::Waiting)
        .then(|| {
            events.iter().rev().find(|e| e.kind == "waiting").and_then(|e| e.data["gate"].as_str()).map(str::to_string)
        })
        .flatten();
    let report = parsed(job.output.as_ref());
    let written = artifacts(&tasks);
    let (docs, mut files): (Vec<_>, Vec<_>) = written.into_iter().partition(|(p, _)| p.starts_with("docs/"));
    if let Some(final_files) = report["files"].as_array() {
        let keep: Vec<&str> = final_files.iter().filter_map(|f| f["path"].as_str()).collect();
        files.retain(|(p, _)| keep.contains(&p.as_str()));
    }
    let findings: Vec<Value> = match report["diagnostics"].as_array() {
        Some(d) => d.clone(),
        None => tasks
            .iter()
            .rev()
            .find(|t| t.kind == "validate" && t.output.is_some())
            .and_then(|t| parsed(t.output.as_ref())["diagnostics"].as_array().cloned())
            .unwrap_or_default(),
    };
    let live = (!job.status.is_terminal()).then_some((id.as_str(), last_seq));
    let tokens = report["tokens"].as_object().map_or_else(
        || total_tokens(&tasks),
        |t| {
            t.get("prompt").and_then(Value::as_u64).unwrap_or(0)
                + t.get("completion").and_then(Value::as_u64).unwrap_or(0)
        },
    );
    let cost = report["cost"].as_f64().or_else(|| total_cost(&tasks));
    let body = html! {
        dl.facts {
            dt { "Status" } dd #run-status data-status=(job.status.as_str()) { (status_badge(job.status.as_str())) }
            @if let Some(verdict) = report["status"].as_str() {
                dt { "Verdict" } dd #run-verdict { (verdict) " — " (report["stop_reason"].as_str().unwrap_or("")) }
            }
            dt { "Requirement" } dd { (job.input["requirement"].as_str().unwrap_or("")) }
            dt { "Pipeline" } dd { (job.input["pipeline"].as_str().or(job.input["pipeline"]["name"].as_str()).or(report["pipeline"].as_str()).unwrap_or("inline")) }
            dt { "Tokens" } dd #run-tokens { (tokens) }
            dt { "Cost" } dd #run-cost { (money(cost)) }
            dt { "Started" } dd { (when(job.created_at)) }
            @if let Some(at) = job.finished_at { dt { "Finished" } dd { (when(at)) } }
            @if let Some(error) = &job.error { dt { "Error" } dd.error { (error) } }
        }
        @if let Some(gate) = &gate {
            section.gate #gate aria-labelledby="gate-title" {
                h2 #gate-title { "Waiting at gate " code { (gate) } }
                p { "The steps before the gate are done. Read what they wrote below, then decide." }
                @if visitor.can_write() {
                    div.row {
                        form method="post" action={"/ui/runs/" (id) "/approve"} {
                            (csrf_field(&visitor))
                            label for="approve-comment" { "Comment (optional)" }
                            input #approve-comment type="text" name="comment" maxlength="16384";
                            button type="submit" #approve { "Approve" }
                        }
                        form method="post" action={"/ui/runs/" (id) "/reject"} {
                            (csrf_field(&visitor))
                            label for="reject-comment" { "Why (goes back to the step)" }
                            input #reject-comment type="text" name="comment" required maxlength="16384";
                            button type="submit" #reject { "Reject" }
                        }
                    }
                } @else {
                    p.muted { "Your key has the viewer role: someone with a member or admin key decides." }
                }
            }
        }
        @if job.status == JobStatus::Succeeded {
            p { a.button #capsule href={"/ui/runs/" (id) "/capsule"} download={(id) ".tar.gz"} { "Download the capsule (tar.gz)" } }
        }
        section aria-labelledby="steps-title" {
            h2 #steps-title { "Steps" }
            (steps_table(&tasks, live))
            @if live.is_some() {
                p.muted.js-only #live-note aria-live="polite" { "This page follows the run as it goes." }
                noscript { p.muted { "Reload the page to see the run's progress." } }
            }
            (dag(&tasks))
        }
        @if !findings.is_empty() {
            section aria-labelledby="findings-title" {
                h2 #findings-title { "Findings" }
                table #findings {
                    thead { tr { th scope="col" { "Severity" } th scope="col" { "Where" } th scope="col" { "Rule" } th scope="col" { "Message" } th scope="col" { "By" } } }
                    tbody {
                        @for d in &findings {
                            tr {
                                td { (status_badge(d["severity"].as_str().unwrap_or("info"))) }
                                td { code { (d["path"].as_str().unwrap_or("")) @if let Some(l) = d["line"].as_u64() { ":" (l) } @if let Some(c) = d["column"].as_u64() { ":" (c) } } }
                                td { (d["rule"].as_str().unwrap_or("")) }
                                td { (d["message"].as_str().unwrap_or("")) }
                                td { (d["validator"].as_str().unwrap_or("")) }
                            }
                        }
                    }
                }
            }
        }
        @if !docs.is_empty() {
            section #documents aria-labelledby="docs-title" {
                h2 #docs-title { "PRD and design" }
                (file_list(&docs))
            }
        }
        @if !files.is_empty() {
            section #files aria-labelledby="files-title" {
                h2 #files-title { "Files" }
                (file_list(&files))
            }
        }
    };
    page(layout(&visitor, Section::Runs, &format!("Run {id}"), body))
}

/// `?after=`: the last event the page already shows.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct EventsQuery {
    after: Option<i64>,
}

/// The run's events for the page's script: each with the figures of the step it is about and
/// the run's totals so far.
pub(crate) async fn run_events(
    State(state): State<AppState>,
    visitor: Visitor,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Response {
    if let Err(e) = crate::jobs::find(&state, &visitor.caller, &id, Some(JobKind::Run)).await {
        return (e.status(), e.message().to_string()).into_response();
    }
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .or(q.after)
        .unwrap_or(0);
    let tenant = visitor.caller.tenant_id().to_string();
    let events = crate::jobs::event_stream(state.clone(), tenant.clone(), id.clone(), after);
    let stream = futures::StreamExt::then(events, move |e| {
        let (state, tenant, id) = (state.clone(), tenant.clone(), id.clone());
        async move {
            let mut data = serde_json::json!({"seq": e.seq, "at": e.at, "kind": e.kind});
            if let Some(fields) = e.data.as_object() {
                for (k, v) in fields {
                    data[k.as_str()] = v.clone();
                }
            }
            if matches!(e.kind.as_str(), "progress" | "started" | "retrying")
                && let Ok(tasks) = state.db.job_tasks(&tenant, &id).await
            {
                if let Some(task) = e.data["task"].as_str().and_then(|n| tasks.iter().find(|t| t.name == n)) {
                    let f = figures(task);
                    data["status"] = Value::String(task.status.as_str().to_string());
                    data["attempts"] = Value::String(format!("{}/{}", task.attempts, task.max_attempts));
                    data["kind_of_task"] = Value::String(task.kind.clone());
                    data["after"] = Value::String(task.depends_on.join(", "));
                    if let Some(n) = f.tokens {
                        data["tokens"] = n.into();
                    }
                    if f.cost.is_some() {
                        data["cost"] = Value::String(money(f.cost));
                    }
                    data["summary"] = Value::String(f.summary);
                }
                data["run_tokens"] = total_tokens(&tasks).into();
                data["run_cost"] = Value::String(money(total_cost(&tasks)));
            }
            Ok::<_, std::convert::Infallible>(
                Event::default().id(e.seq.to_string()).event(e.kind.clone()).data(data.to_string()),
            )
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

pub(crate) async fn capsule(State(state): State<AppState>, visitor: Visitor, Path(id): Path<String>) -> Response {
    match crate::jobs::capsule_op(&state, &visitor.caller, &id).await {
        Ok(artifact) => {
            let disposition = format!("attachment; filename=\"{id}.tar.gz\"");
            let (Ok(kind), Ok(disposition)) =
                (HeaderValue::from_str(&artifact.media_type), HeaderValue::from_str(&disposition))
            else {
                return error_page(&visitor, &ApiError::internal("the capsule's headers"));
            };
            ([(header::CONTENT_TYPE, kind), (header::CONTENT_DISPOSITION, disposition)], artifact.bytes).into_response()
        }
        Err(e) => error_page(&visitor, &e),
    }
}

/// A decision at the gate the run waits at. A rejection's comment is required (`gate_op` says
/// so); an approval's is optional.
async fn decide(
    state: AppState,
    visitor: Visitor,
    id: String,
    fields: HashMap<String, String>,
    approved: bool,
) -> Response {
    let comment = fields.get("comment").map(|c| c.trim().to_string());
    let comment = if approved { comment.filter(|c| !c.is_empty()) } else { Some(comment.unwrap_or_default()) };
    match crate::jobs::gate_op(&state, &visitor.caller, &id, approved, comment).await {
        Ok(_) => see_other(&format!("/ui/runs/{id}")),
        Err(e) => error_page(&visitor, &e),
    }
}

pub(crate) async fn approve(
    State(state): State<AppState>,
    visitor: Visitor,
    Path(id): Path<String>,
    Posted(fields): Posted,
) -> Response {
    decide(state, visitor, id, fields, true).await
}

pub(crate) async fn reject(
    State(state): State<AppState>,
    visitor: Visitor,
    Path(id): Path<String>,
    Posted(fields): Posted,
) -> Response {
    decide(state, visitor, id, fields, false).await
}

pub(crate) async fn jobs(State(state): State<AppState>, visitor: Visitor, Query(q): Query<ListQuery>) -> Response {
    let kind = match q.kind.as_deref().filter(|k| !k.is_empty()) {
        None => None,
        Some("call") => Some(JobKind::Call),
        Some("run") => Some(JobKind::Run),
        Some(other) => {
            return error_page(
                &visitor,
                &ApiError::invalid(format!("kind `{}` is not call or run", other.escape_debug())),
            );
        }
    };
    let status = q.status.clone().filter(|s| !s.is_empty());
    let wanted = match status.as_deref().map(JobStatus::named) {
        None => None,
        Some(Some(wanted)) => Some(wanted),
        Some(None) => {
            return error_page(
                &visitor,
                &ApiError::invalid(format!(
                    "status `{}` is not queued, running, waiting, succeeded, failed or cancelled",
                    status.as_deref().unwrap_or_default().escape_debug()
                )),
            );
        }
    };
    let items = match state.db.jobs(visitor.caller.tenant_id(), kind, wanted, q.after.as_deref(), PAGE).await {
        Ok(items) => items,
        Err(e) => return error_page(&visitor, &e.into()),
    };
    let next = (items.len() == PAGE as usize).then(|| items.last().map(|j| j.id.clone())).flatten();
    let query = |after: &str| {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(k) = kind {
            q.append_pair("kind", k.as_str());
        }
        if let Some(s) = &status {
            q.append_pair("status", s);
        }
        q.append_pair("after", after);
        q.finish()
    };
    let body = html! {
        form.filters method="get" action="/ui/jobs" {
            label for="kind" { "Kind" }
            select #kind name="kind" {
                option value="" { "any" }
                @for k in ["call", "run"] { option value=(k) selected[kind.map(JobKind::as_str) == Some(k)] { (k) } }
            }
            label for="status" { "Status" }
            select #status name="status" {
                option value="" { "any" }
                @for s in ["queued", "running", "waiting", "succeeded", "failed", "cancelled"] {
                    option value=(s) selected[status.as_deref() == Some(s)] { (s) }
                }
            }
            button type="submit" { "Filter" }
        }
        table #jobs {
            caption.visually-hidden { "Jobs, newest first" }
            thead { tr { th scope="col" { "Job" } th scope="col" { "Kind" } th scope="col" { "Status" } th scope="col" { "Tasks" } th scope="col" { "Created" } th scope="col" { "Error" } } }
            tbody {
                @for job in &items {
                    tr {
                        td { a href={"/ui/jobs/" (job.id)} { code { (job.id) } } }
                        td { (job.kind.as_str()) }
                        td { (status_badge(job.status.as_str())) }
                        td { (job.task_count) }
                        td { (when(job.created_at)) }
                        td { (job.error.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
        @if items.is_empty() { p { "No jobs match." } }
        @if let Some(next) = &next { p { a rel="next" href={"/ui/jobs?" (query(next))} { "Older jobs →" } } }
    };
    page(layout(&visitor, Section::Jobs, "Jobs", body))
}

fn json_block(v: &Value) -> Markup {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    let (text, cut) = shown(&text);
    html! { pre { code { (text) } } @if cut { p.muted { "Cut at 64 KiB." } } }
}

pub(crate) async fn job(State(state): State<AppState>, visitor: Visitor, Path(id): Path<String>) -> Response {
    let job = match crate::jobs::find(&state, &visitor.caller, &id, None).await {
        Ok(job) => job,
        Err(e) => return error_page(&visitor, &e),
    };
    let tasks = match state.db.job_tasks(visitor.caller.tenant_id(), &id).await {
        Ok(t) => t,
        Err(e) => return error_page(&visitor, &e.into()),
    };
    let body = html! {
        dl.facts {
            dt { "Kind" } dd { (job.kind.as_str()) @if job.kind == JobKind::Run { " · " a href={"/ui/runs/" (id)} { "the run's page" } } }
            dt { "Status" } dd { (status_badge(job.status.as_str())) }
            dt { "Priority" } dd { (job.priority) }
            dt { "Created" } dd { (when(job.created_at)) }
            @if let Some(at) = job.finished_at { dt { "Finished" } dd { (when(at)) } }
            @if let Some(e) = &job.error { dt { "Error" } dd.error { (e) } }
        }
        h2 { "Tasks" }
        table #tasks {
            thead { tr { th scope="col" { "Task" } th scope="col" { "Kind" } th scope="col" { "Plugin" } th scope="col" { "Status" } th scope="col" { "Attempts" } th scope="col" { "After" } th scope="col" { "Error" } } }
            tbody {
                @for t in &tasks {
                    tr data-task=(t.name) {
                        th scope="row" { (t.name) }
                        td { (t.kind) }
                        td { (t.plugin) }
                        td { (status_badge(t.status.as_str())) }
                        td { (t.attempts) "/" (t.max_attempts) }
                        td { (t.depends_on.join(", ")) }
                        td { (t.error.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
        (dag(&tasks))
        h2 { "Input" }
        (json_block(&job.input))
        @if job.kind == JobKind::Call && job.output.is_some() {
            h2 { "Output" }
            (json_block(&parsed(job.output.as_ref())))
        }
    };
    page(layout(&visitor, Section::Jobs, &format!("Job {id}"), body))
}

/// What a person typed into the install form.
#[derive(Default)]
struct InstallForm {
    reference: String,
    hosts: String,
    config: String,
}

/// `?registry=&q=` of the search form.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct PluginQuery {
    registry: Option<String>,
    q: Option<String>,
    installed: Option<String>,
    upgraded: Option<String>,
    newest: Option<String>,
}

pub(crate) async fn plugins(State(state): State<AppState>, visitor: Visitor, Query(q): Query<PluginQuery>) -> Response {
    plugins_page(&state, &visitor, &q, InstallForm::default(), None).await
}

async fn plugins_page(
    state: &AppState,
    visitor: &Visitor,
    q: &PluginQuery,
    typed: InstallForm,
    refused: Option<(StatusCode, String)>,
) -> Response {
    let installs = match crate::resources::list_plugins_op(state, &visitor.caller).await {
        Ok(list) => list.items,
        Err(e) => return error_page(visitor, &e),
    };
    let registry = q.registry.as_deref().map(str::trim).filter(|r| !r.is_empty());
    let found = match registry {
        Some(registry) => Some(search(state, registry, q.q.as_deref()).await),
        None => None,
    };
    let status = refused.as_ref().map(|(s, _)| *s).unwrap_or(StatusCode::OK);
    let body = html! {
        @if let Some(name) = &q.installed { p.notice #installed-note role="status" { "Installed " code { (name) } "." } }
        @if let Some(name) = &q.upgraded { p.notice #upgraded-note role="status" { "Upgraded " code { (name) } "." } }
        @if let Some(name) = &q.newest { p.notice #newest-note role="status" { code { (name) } " is already the newest version." } }
        section aria-labelledby="installed-title" {
            h2 #installed-title { "Installed for this tenant" }
            @if installs.is_empty() { p { "Nothing installed yet." } }
            @else {
                table #plugins {
                    thead { tr {
                        th scope="col" { "Plugin" } th scope="col" { "Kind" } th scope="col" { "Version" } th scope="col" { "From" }
                        th scope="col" { "Digest" } th scope="col" { "Signature" } th scope="col" { "Grants" }
                        @if visitor.can_write() { th scope="col" { span.visually-hidden { "Actions" } } }
                    } }
                    tbody {
                        @for p in &installs {
                            tr data-plugin=(p.name) {
                                th scope="row" { (p.name) }
                                td { (p.kind) " (" (p.format) ")" }
                                td { (p.version) }
                                td { code { (p.repository) @if let Some(t) = &p.tag { ":" (t) } } }
                                td { code title=(p.digest) { (short(&p.digest)) "…" } }
                                td { (p.signature) }
                                td {
                                    @if p.grants.hosts.is_empty() && p.grants.config.is_empty() && p.grants.secrets.is_empty() { "none" }
                                    @for h in &p.grants.hosts { span.tag { "host " (h) } }
                                    @for k in p.grants.config.keys() { span.tag { "config " (k) } }
                                    @for k in p.grants.secrets.keys() { span.tag { "secret " (k) } }
                                }
                                @if visitor.can_write() {
                                    td.actions {
                                        form method="post" action={"/ui/plugins/" (p.name) "/upgrade"} {
                                            (csrf_field(visitor))
                                            button type="submit" aria-label={"Upgrade " (p.name)} { "Upgrade" }
                                        }
                                        form method="post" action={"/ui/plugins/" (p.name) "/remove"} {
                                            (csrf_field(visitor))
                                            button.danger type="submit" aria-label={"Remove " (p.name)} { "Remove" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="search-title" {
            h2 #search-title { "Search a registry" }
            form.filters method="get" action="/ui/plugins" {
                label for="registry" { "Registry" }
                input #registry type="text" name="registry" value=(registry.unwrap_or("")) placeholder="registry.example.com";
                label for="q" { "Text" }
                input #q type="text" name="q" value=(q.q.as_deref().unwrap_or(""));
                button type="submit" { "Search" }
            }
            @match &found {
                Some(Ok(entries)) if entries.is_empty() => { p { "No plugins found there." } }
                Some(Ok(entries)) => {
                    table #catalog {
                        thead { tr { th scope="col" { "Repository" } th scope="col" { "Newest" } th scope="col" { "What it is" } th scope="col" { "It asks for" } } }
                        tbody {
                            @for e in entries {
                                tr {
                                    th scope="row" { code { (e.repository) } }
                                    td { (e.latest_tag.as_deref().unwrap_or("")) }
                                    td { @if let Some(m) = &e.latest { (m.kind.to_string()) ": " (m.description) } }
                                    td {
                                        @if let Some(m) = &e.latest {
                                            @if m.capabilities.outbound_hosts.is_empty() && m.capabilities.config.is_empty() && m.capabilities.secrets.is_empty() { "nothing" }
                                            @for h in &m.capabilities.outbound_hosts { span.tag { "host " (h) } }
                                            @for k in &m.capabilities.config { span.tag { "config " (k) } }
                                            @for k in &m.capabilities.secrets { span.tag { "secret " (k) } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                Some(Err(message)) => { p.error role="alert" { (message) } }
                None => {}
            }
        }
        @if visitor.can_write() {
            section aria-labelledby="install-title" {
                h2 #install-title { "Install" }
                @if let Some((_, message)) = &refused { p.error #form-error role="alert" { (message) } }
                form method="post" action="/ui/plugins" #install {
                    (csrf_field(visitor))
                    label for="reference" { "Reference" }
                    input #reference type="text" name="reference" required value=(typed.reference) placeholder="registry.example.com/plugins/openai:1.2.0";
                    label for="hosts" { "Grant hosts (space or comma separated; only what it asks for)" }
                    input #hosts type="text" name="hosts" value=(typed.hosts) placeholder="api.openai.com";
                    label for="config" { "Grant config (one key=value a line)" }
                    textarea #config name="config" rows="2" { (typed.config) }
                    button type="submit" { "Install" }
                }
            }
        }
    };
    (status, axum::response::Html(layout(visitor, Section::Plugins, "Plugins", body).into_string())).into_response()
}

/// A registry's plugins, when the operator's network policy lets the host reach it.
async fn search(
    state: &AppState,
    registry: &str,
    text: Option<&str>,
) -> Result<Vec<qlayer_registry::CatalogEntry>, String> {
    let market = state.runner.marketplace();
    market
        .check_registry(state.runner.runtime(), &format!("{registry}/probe:latest"))
        .await
        .map_err(|e| crate::resources::install_error(e, registry).message().to_string())?;
    market
        .search(registry, text.filter(|t| !t.trim().is_empty()))
        .await
        .map_err(|e| crate::resources::install_error(e, registry).message().to_string())
}

pub(crate) async fn install(State(state): State<AppState>, visitor: Visitor, Posted(fields): Posted) -> Response {
    let typed = InstallForm {
        reference: fields.get("reference").map(|r| r.trim().to_string()).unwrap_or_default(),
        hosts: fields.get("hosts").cloned().unwrap_or_default(),
        config: fields.get("config").cloned().unwrap_or_default(),
    };
    let mut config = std::collections::BTreeMap::new();
    for line in typed.config.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match line.split_once('=') {
            Some((k, v)) => {
                config.insert(k.trim().to_string(), v.trim().to_string());
            }
            None => {
                let message = format!("config line `{line}` is not key=value");
                return plugins_page(
                    &state,
                    &visitor,
                    &PluginQuery::default(),
                    typed,
                    Some((StatusCode::BAD_REQUEST, message)),
                )
                .await;
            }
        }
    }
    let hosts =
        typed.hosts.split([' ', ',', '\n']).map(str::trim).filter(|h| !h.is_empty()).map(str::to_string).collect();
    let asked = crate::resources::InstallPlugin {
        reference: typed.reference.clone(),
        grants: crate::resources::Grants { hosts, config, secrets: Default::default() },
    };
    match crate::resources::install_plugin_op(&state, &visitor.caller, asked).await {
        Ok(done) => {
            let name = url::form_urlencoded::byte_serialize(done.plugin.name.as_bytes()).collect::<String>();
            see_other(&format!("/ui/plugins?installed={name}"))
        }
        Err(e) if e.status() == StatusCode::FORBIDDEN && !visitor.can_write() => error_page(&visitor, &e),
        Err(e) => {
            plugins_page(&state, &visitor, &PluginQuery::default(), typed, Some((e.status(), e.message().to_string())))
                .await
        }
    }
}

pub(crate) async fn remove(
    State(state): State<AppState>,
    visitor: Visitor,
    Path(name): Path<String>,
    _: Posted,
) -> Response {
    match crate::resources::remove_plugin_op(&state, &visitor.caller, &name).await {
        Ok(()) => see_other("/ui/plugins"),
        Err(e) => error_page(&visitor, &e),
    }
}

pub(crate) async fn upgrade(
    State(state): State<AppState>,
    visitor: Visitor,
    Path(name): Path<String>,
    _: Posted,
) -> Response {
    if let Err(e) = visitor.caller.require_write() {
        return error_page(&visitor, &e);
    }
    let market = state.runner.marketplace();
    let outcome = market
        .upgrade(state.runner.runtime(), visitor.caller.tenant_name(), &name, &qlayer_marketplace::GrantSpec::default())
        .await
        .map_err(|e| crate::resources::install_error(e, &name));
    state.audit(&visitor.caller, "plugin.upgrade", &name, &outcome).await;
    let name = url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>();
    match outcome {
        Ok(Some(_)) => see_other(&format!("/ui/plugins?upgraded={name}")),
        Ok(None) => see_other(&format!("/ui/plugins?newest={name}")),
        Err(e) => error_page(&visitor, &e),
    }
}

/// A bar chart of `values` (label, value), with the values in a table for screen readers.
fn bars(id: &str, title: &str, unit: &str, values: &[(String, f64)]) -> Markup {
    let max = values.iter().map(|(_, v)| *v).fold(0.0f64, f64::max);
    let (bar, gap, height) = (28usize, 8usize, 160f64);
    let width = values.len().max(1) * (bar + gap) + gap;
    html! {
        figure.chart {
            figcaption { (title) }
            svg id=(id) role="img" aria-labelledby={(id) "-title"} width=(width) height=(height as usize + 40) viewBox={"0 0 " (width) " " (height as usize + 40)} {
                title id={(id) "-title"} { (title) }
                @for (i, (label, v)) in values.iter().enumerate() {
                    @let h = if max > 0.0 { (v / max * height).max(1.0) } else { 0.0 };
                    @let x = gap + i * (bar + gap);
                    rect.bar x=(x) y=(format!("{:.1}", height - h + 4.0)) width=(bar) height=(format!("{h:.1}")) data-value=(v) {
                        title { (label) ": " (v) " " (unit) }
                    }
                    text.axis x=(x) y=(height as usize + 20) { (label.get(5..).unwrap_or(label)) }
                }
            }
        }
    }
}

/// A horizontal bar chart of `values` (name, value), largest first, for names of any length.
fn hbars(id: &str, title: &str, unit: &str, values: &[(String, f64)]) -> Markup {
    let mut values: Vec<&(String, f64)> = values.iter().collect();
    values.sort_by(|a, b| b.1.total_cmp(&a.1));
    values.truncate(20);
    let max = values.iter().map(|(_, v)| *v).fold(0.0f64, f64::max);
    let (label_w, bar_w, row) = (220usize, 360f64, 24usize);
    let width = label_w + bar_w as usize + 110;
    let height = values.len().max(1) * row + 8;
    html! {
        figure.chart {
            figcaption { (title) }
            svg id=(id) role="img" aria-labelledby={(id) "-title"} width=(width) height=(height) viewBox={"0 0 " (width) " " (height)} {
                title id={(id) "-title"} { (title) }
                @for (i, (name, v)) in values.iter().enumerate() {
                    @let w = if max > 0.0 { (v / max * bar_w).max(1.0) } else { 0.0 };
                    @let y = 4 + i * row;
                    text.axis.name x="0" y=(y + 15) { (name.chars().take(32).collect::<String>()) }
                    rect.bar x=(label_w) y=(y + 3) width=(format!("{w:.1}")) height=(row - 8) data-value=(v) {
                        title { (name) ": " (v) " " (unit) }
                    }
                    text.axis x=(format!("{:.1}", label_w as f64 + w + 6.0)) y=(y + 15) { (v) }
                }
            }
        }
    }
}

pub(crate) async fn usage(State(state): State<AppState>, visitor: Visitor) -> Response {
    let now = chrono_free_now_ms();
    let from = (now / 86_400_000 - 29) * 86_400_000;
    let q = |group: &str| crate::gateway::UsageQuery {
        from: Some(from),
        to: None,
        key: None,
        model: None,
        group_by: Some(group.to_string()),
    };
    let (by_day_q, by_model_q, by_key_q) = (q("day"), q("model"), q("key"));
    let (days, models, keys) = match tokio::try_join!(
        crate::gateway::usage_op(&state, &visitor.caller, &by_day_q),
        crate::gateway::usage_op(&state, &visitor.caller, &by_model_q),
        crate::gateway::usage_op(&state, &visitor.caller, &by_key_q),
    ) {
        Ok(found) => found,
        Err(e) => return error_page(&visitor, &e),
    };
    let table = match state.db.models(visitor.caller.tenant_id()).await {
        Ok(t) => t,
        Err(e) => return error_page(&visitor, &e.into()),
    };
    let by_day: HashMap<String, &crate::gateway::UsageRow> =
        days.data.iter().map(|r| (day(r.group.parse::<i64>().unwrap_or(0)), r)).collect();
    let series = |f: &dyn Fn(&crate::gateway::UsageRow) -> f64| -> Vec<(String, f64)> {
        (0..30)
            .map(|i| {
                let d = day(from + i * 86_400_000);
                let v = by_day.get(&d).map(|r| f(r)).unwrap_or(0.0);
                (d, v)
            })
            .collect()
    };
    let rows = |rows: &[crate::gateway::UsageRow]| {
        html! {
            @for r in rows {
                tr {
                    th scope="row" { code { (r.group) } }
                    td { (r.requests) } td { (r.errors) } td { (r.cache_hits) }
                    td { (r.prompt_tokens) } td { (r.completion_tokens) } td { (format!("{:.6}", r.cost)) }
                }
            }
        }
    };
    let head = |first: &str| {
        html! { thead { tr { th scope="col" { (first) } th scope="col" { "Requests" } th scope="col" { "Refused or failed" } th scope="col" { "Cache hits" } th scope="col" { "Input tokens" } th scope="col" { "Output tokens" } th scope="col" { "Cost" } } } }
    };
    let body = html! {
        p { "The gateway's last 30 days (UTC) for this tenant." }
        div.charts {
            (bars("chart-tokens", "Tokens per day", "tokens", &series(&|r| r.total_tokens as f64)))
            (bars("chart-requests", "Requests per day", "requests", &series(&|r| r.requests as f64)))
            (bars("chart-cost", "Cost per day", "", &series(&|r| r.cost)))
        }
        h2 { "Per model" }
        (hbars("chart-models", "Tokens per model", "tokens", &models.data.iter().map(|r| (r.group.clone(), r.total_tokens as f64)).collect::<Vec<_>>()))
        table #usage-models { (head("Model")) tbody { (rows(&models.data)) } }
        h2 { "Per key" }
        (hbars("chart-keys", "Tokens per key", "tokens", &keys.data.iter().map(|r| (r.group.clone(), r.total_tokens as f64)).collect::<Vec<_>>()))
        table #usage-keys { (head("Key")) tbody { (rows(&keys.data)) } }
        h2 { "Limits" }
        @if days.limits.is_empty() { p { "No gateway limits or budgets are set for this tenant." } }
        @else { (json_block(&serde_json::to_value(&days.limits).unwrap_or(Value::Null))) }
        h2 { "Model table" }
        @if table.is_empty() { p { "No models declared for this tenant (PUT /v1/models/{name})." } }
        @else {
            table #model-table {
                thead { tr { th scope="col" { "Model" } th scope="col" { "Deployments" } th scope="col" { "Updated" } } }
                tbody {
                    @for m in &table {
                        @let spec: Value = serde_json::from_str(&m.spec).unwrap_or(Value::Null);
                        tr {
                            th scope="row" { code { (m.name) } }
                            td {
                                @for d in spec["deployments"].as_array().into_iter().flatten() {
                                    span.tag { (d["plugin"].as_str().unwrap_or("?")) " → " (d["model"].as_str().unwrap_or("?")) }
                                }
                            }
                            td { (when(m.updated_at)) }
                        }
                    }
                }
            }
        }
    };
    page(layout(&visitor, Section::Usage, "Usage", body))
}

fn chrono_free_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub(crate) async fn operators(State(state): State<AppState>, visitor: Visitor, Query(q): Query<ListQuery>) -> Response {
    if !visitor.caller.is_operator() {
        return not_found(&visitor, "There is no such page.");
    }
    let page_query = crate::error::PageQuery { limit: Some(100), after: q.after.clone() };
    let (tenants, check) = match tokio::try_join!(
        async { crate::resources::list_tenants_op(&state, &visitor.caller, page_query).await },
        async { state.db.verify_audit().await.map_err(ApiError::from) },
    ) {
        Ok(found) => found,
        Err(e) => return error_page(&visitor, &e),
    };
    let (intact, count, problem) = match &check {
        qlayer_db::AuditCheck::Intact { records, .. } => (true, *records, String::new()),
        qlayer_db::AuditCheck::Broken { seq, problem } => (false, *seq, problem.clone()),
    };
    let records = state.db.audit_records(None, (count - 50).max(0), 50).await.unwrap_or_default();
    let body = html! {
        h2 { "Tenants" }
        table #tenants {
            thead { tr { th scope="col" { "Tenant" } th scope="col" { "Id" } th scope="col" { "Weight" } th scope="col" { "Running at most" } th scope="col" { "Created" } } }
            tbody {
                @for t in &tenants.items {
                    tr {
                        th scope="row" { a href={"/ui/operators/tenants/" (t.id)} { (t.name) } }
                        td { code { (t.id) } }
                        td { (t.weight) }
                        td { (t.max_running) }
                        td { (when(t.created_at)) }
                    }
                }
            }
        }
        @if let Some(next) = &tenants.next { p { a rel="next" href={"/ui/operators?after=" (next)} { "More tenants →" } } }
        h2 { "Audit log" }
        @if intact {
            p.notice #audit-check { "The hash chain verifies: " (count) " records, none changed or missing." }
        } @else {
            p.error #audit-check role="alert" { "The hash chain is broken at record " (count) ": " (problem) }
        }
        table #audit {
            caption { "The latest records" }
            thead { tr { th scope="col" { "#" } th scope="col" { "When" } th scope="col" { "Actor" } th scope="col" { "Tenant" } th scope="col" { "Action" } th scope="col" { "Target" } th scope="col" { "Outcome" } } }
            tbody {
                @for r in records.iter().rev() {
                    tr { td { (r.seq) } td { (when(r.at)) } td { code { (r.actor) } } td { code { (r.tenant_id) } } td { (r.action) } td { (r.target) } td { (r.outcome) } }
                }
            }
        }
    };
    page(layout(&visitor, Section::Operators, "Operators", body))
}

pub(crate) async fn operator_tenant(
    State(state): State<AppState>,
    visitor: Visitor,
    Path(id): Path<String>,
) -> Response {
    if !visitor.caller.is_operator() {
        return not_found(&visitor, "There is no such page.");
    }
    let tenant = match crate::resources::get_tenant_op(&state, &visitor.caller, &id).await {
        Ok(t) => t,
        Err(e) => return error_page(&visitor, &e),
    };
    let keys = match state.db.keys(&id).await {
        Ok(k) => k,
        Err(e) => return error_page(&visitor, &e.into()),
    };
    let body = html! {
        dl.facts { dt { "Id" } dd { code { (tenant.id) } } dt { "Weight" } dd { (tenant.weight) } dt { "Running at most" } dd { (tenant.max_running) } }
        h2 { "Keys" }
        table #keys {
            thead { tr { th scope="col" { "Key" } th scope="col" { "Name" } th scope="col" { "Role" } th scope="col" { "Prefix" } th scope="col" { "Created" } th scope="col" { "Revoked" } } }
            tbody {
                @for k in &keys {
                    tr {
                        th scope="row" { code { (k.id) } }
                        td { (k.name) } td { (k.role.to_string()) } td { code { (k.prefix) "…" } }
                        td { (when(k.created_at)) } td { @if let Some(at) = k.revoked_at { (when(at)) } }
                    }
                }
            }
        }
    };
    page(layout(&visitor, Section::Operators, &format!("Tenant {}", tenant.name), body))
}
