//! The host's jobs: what a tenant asks for (a plugin call, a DAG of calls, a factory run),
//! planned into tasks for the core scheduler ([`crate::scheduler`]), and how each task runs: a
//! call loads the tenant's installed tool and invokes it under the job's deadline; a run drives
//! the factory pipeline, storing its progress as events and its tar.gz capsule with the job.

use crate::embedded::{self, ProviderChoice};
use crate::factory::{self, Progress, RunRequest};
use crate::marketplace::Marketplace;
use crate::runtime::{CallError, CallErrorKind, Kind, PluginError, Runtime};
use crate::scheduler::{Execute, Scheduler, SchedulerConfig, SubmitError, TaskContext, TaskError};
use futures::future::BoxFuture;
use qlayer_db::{Db, Job, JobKind, NewJob, NewTask, Task};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// The input of a `call` job.
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallInput {
    /// The installed tool plugin.
    pub plugin: String,
    /// What to pass it: a JSON string is passed as its text; anything else as JSON text.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
}

/// The input of a `run` job: a factory run.
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunInput {
    /// What to build, in words (at most 16 KiB).
    pub requirement: String,
    /// `scripted` (the built-in offline test double; the default) or the name of an LLM provider
    /// plugin installed for the tenant.
    #[serde(default)]
    pub provider: Option<String>,
    /// For `scripted`: a script to answer from instead of its built-in rules.
    #[serde(default)]
    pub script: Option<String>,
    /// Options for the agents, e.g. `{"language": "python"}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub options: Option<serde_json::Value>,
    /// Repair rounds after the first validation (0-5, default 2).
    #[serde(default)]
    pub max_repair_rounds: Option<u32>,
}

/// The most repair rounds a run may ask for.
pub const MAX_REPAIR_ROUNDS: u32 = 5;

impl RunInput {
    /// Checks what can be checked before the job is accepted.
    pub fn check(&self) -> Result<(), String> {
        if self.requirement.trim().is_empty() {
            return Err("requirement is empty: say what to build".into());
        }
        if self.requirement.len() > factory::MAX_REQUIREMENT_BYTES {
            return Err(format!(
                "requirement is {} bytes; the limit is {}",
                self.requirement.len(),
                factory::MAX_REQUIREMENT_BYTES
            ));
        }
        if self.max_repair_rounds.is_some_and(|n| n > MAX_REPAIR_ROUNDS) {
            return Err(format!("max_repair_rounds must be 0-{MAX_REPAIR_ROUNDS}"));
        }
        if self.options.as_ref().is_some_and(|o| !o.is_object()) {
            return Err("options must be a JSON object".into());
        }
        if self.script.is_some() && self.provider.as_deref().is_some_and(|p| p != "scripted") {
            return Err("script is only for the `scripted` provider".into());
        }
        Ok(())
    }
}

/// One task of a `call` job given as a graph.
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GraphTask {
    /// Unique in the job: 1-64 letters, digits, `-` or `_`.
    pub name: String,
    /// The installed tool plugin it invokes.
    pub plugin: String,
    /// What to pass it. Without it, a task with dependencies gets their outputs, by name.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub input: Option<serde_json::Value>,
    /// Names of the tasks that must succeed first; tasks without a path between them run in
    /// parallel.
    #[serde(default)]
    pub after: Vec<String>,
}

/// The input of a `call` job that is a DAG of tool calls.
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GraphInput {
    /// 1-64 tasks.
    pub tasks: Vec<GraphTask>,
}

/// The most tasks a job may have.
pub const MAX_TASKS: usize = 64;

/// What a `call` job asks for.
#[derive(Debug, Clone)]
pub enum CallPlan {
    /// One tool call.
    One(CallInput),
    /// A DAG of tool calls.
    Graph(GraphInput),
}

impl CallPlan {
    /// Reads a `call` job's input: `{"plugin", "input"}` or `{"tasks": [...]}`. The message
    /// names the field at fault.
    pub fn parse(input: &serde_json::Value) -> Result<CallPlan, String> {
        if input.get("tasks").is_some() {
            let graph: GraphInput = serde_json::from_value(input.clone()).map_err(|e| format!("input: {e}"))?;
            check_graph(&graph)?;
            Ok(CallPlan::Graph(graph))
        } else {
            serde_json::from_value(input.clone()).map(CallPlan::One).map_err(|e| format!("input: {e}"))
        }
    }

    /// The plugins it calls.
    pub fn plugins(&self) -> Vec<&str> {
        match self {
            CallPlan::One(call) => vec![call.plugin.as_str()],
            CallPlan::Graph(graph) => graph.tasks.iter().map(|t| t.plugin.as_str()).collect(),
        }
    }
}

fn check_graph(graph: &GraphInput) -> Result<(), String> {
    if graph.tasks.is_empty() || graph.tasks.len() > MAX_TASKS {
        return Err(format!("input.tasks: a job has 1 to {MAX_TASKS} tasks, not {}", graph.tasks.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, task) in graph.tasks.iter().enumerate() {
        let valid = (1..=64).contains(&task.name.len())
            && task.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(format!("input.tasks[{i}].name `{}`: use 1-64 letters, digits, `-` or `_`", task.name));
        }
        if !seen.insert(task.name.as_str()) {
            return Err(format!("input.tasks[{i}].name `{}` is used twice", task.name));
        }
    }
    for (i, task) in graph.tasks.iter().enumerate() {
        for dep in &task.after {
            if !seen.contains(dep.as_str()) {
                return Err(format!("input.tasks[{i}].after: no task is named `{dep}`"));
            }
            if dep == &task.name {
                return Err(format!("input.tasks[{i}].after: task `{dep}` cannot wait for itself"));
            }
        }
    }
    // Kahn's algorithm: whatever cannot be ordered sits on a cycle.
    let mut waiting: std::collections::HashMap<&str, usize> =
        graph.tasks.iter().map(|t| (t.name.as_str(), t.after.len())).collect();
    let mut ready: Vec<&str> = waiting.iter().filter(|(_, n)| **n == 0).map(|(k, _)| *k).collect();
    let mut ordered = 0;
    while let Some(done) = ready.pop() {
        ordered += 1;
        for task in graph.tasks.iter().filter(|t| t.after.iter().any(|d| d == done)) {
            if let Some(n) = waiting.get_mut(task.name.as_str()) {
                *n -= 1;
                if *n == 0 {
                    ready.push(task.name.as_str());
                }
            }
        }
    }
    if ordered < graph.tasks.len() {
        let mut stuck: Vec<&str> = waiting.iter().filter(|(_, n)| **n > 0).map(|(k, _)| *k).collect();
        stuck.sort();
        return Err(format!("input.tasks: the dependencies form a cycle through {}", stuck.join(", ")));
    }
    Ok(())
}

/// How a job may run: its deadline and its tasks' attempts.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobLimits {
    /// Give the job up this long after submission (ms).
    pub deadline_ms: Option<u64>,
    /// Attempts per task (counting retries).
    pub max_attempts: Option<u32>,
}

/// The longest deadline a job may ask for: a day.
pub const MAX_DEADLINE_MS: u64 = 24 * 3600 * 1000;
/// The most attempts a task may ask for.
pub const MAX_ATTEMPTS: u32 = 20;

impl JobLimits {
    /// Checks the ranges; the message names the field.
    pub fn check(&self) -> Result<(), String> {
        if self.deadline_ms.is_some_and(|d| d == 0 || d > MAX_DEADLINE_MS) {
            return Err(format!("deadline_ms must be 1 to {MAX_DEADLINE_MS} (a day)"));
        }
        if self.max_attempts.is_some_and(|a| a == 0 || a > MAX_ATTEMPTS) {
            return Err(format!("max_attempts must be 1 to {MAX_ATTEMPTS}"));
        }
        Ok(())
    }
}

/// Plans a job's tasks from its kind and input (already checked).
pub fn plan(kind: JobKind, input: &serde_json::Value, max_attempts: i32) -> Result<Vec<NewTask>, String> {
    Ok(match kind {
        JobKind::Call => match CallPlan::parse(input)? {
            CallPlan::One(call) => vec![NewTask {
                name: "call".into(),
                kind: "call".into(),
                plugin: call.plugin,
                input: call.input,
                depends_on: vec![],
                max_attempts,
            }],
            CallPlan::Graph(graph) => graph
                .tasks
                .into_iter()
                .map(|t| NewTask {
                    input: t.input.unwrap_or(serde_json::Value::Null),
                    name: t.name,
                    kind: "call".into(),
                    plugin: t.plugin,
                    depends_on: t.after,
                    max_attempts,
                })
                .collect(),
        },
        JobKind::Run => {
            let run: RunInput = serde_json::from_value(input.clone()).map_err(|e| format!("input: {e}"))?;
            vec![NewTask {
                name: "run".into(),
                kind: "run".into(),
                plugin: run.provider.clone().unwrap_or_else(|| "scripted".into()),
                input: input.clone(),
                depends_on: vec![],
                max_attempts,
            }]
        }
    })
}

/// The service's jobs: plans them into tasks for the scheduler and runs those tasks.
pub struct JobRunner {
    scheduler: Arc<Scheduler>,
    executor: Arc<PluginExecutor>,
    default_attempts: i32,
}

impl std::fmt::Debug for JobRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRunner").field("scheduler", &self.scheduler).finish()
    }
}

impl JobRunner {
    /// Jobs over `db`, run by a scheduler configured by `config`.
    pub fn new(
        db: Db,
        runtime: Arc<Runtime>,
        marketplace: Arc<Marketplace>,
        data_dir: PathBuf,
        config: SchedulerConfig,
    ) -> Arc<Self> {
        let default_attempts = config.max_attempts;
        let executor = Arc::new(PluginExecutor { db: db.clone(), runtime, marketplace, data_dir });
        let scheduler = Scheduler::new(db, config, executor.clone());
        Arc::new(JobRunner { scheduler, executor, default_attempts })
    }

    /// The scheduler.
    pub fn scheduler(&self) -> &Arc<Scheduler> {
        &self.scheduler
    }

    /// The marketplace jobs load plugins from.
    pub fn marketplace(&self) -> &Arc<Marketplace> {
        &self.executor.marketplace
    }

    /// The runtime jobs run on.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.executor.runtime
    }

    /// Announcements of new events: the id of the job that has one.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.scheduler.subscribe()
    }

    /// Gives tasks to jobs stored before there were tasks, then starts the scheduler, which
    /// picks up whatever a previous process left unfinished. Returns the tasks queued.
    pub async fn start(&self) -> anyhow::Result<usize> {
        for job in self.scheduler.db().jobs_without_tasks().await? {
            match plan(job.kind, &job.input, self.default_attempts) {
                Ok(tasks) => self.scheduler.db().add_tasks(&job, &tasks).await?,
                Err(e) => tracing::error!(job = %job.id, error = %e, "an unfinished job's input no longer plans"),
            }
        }
        self.scheduler.start().await
    }

    /// Stores a job (planned into tasks) and queues it.
    pub async fn submit(
        &self,
        tenant_id: &str,
        kind: JobKind,
        input: &serde_json::Value,
        priority: i32,
        idempotency_key: Option<&str>,
        limits: JobLimits,
    ) -> Result<(Job, bool), SubmitError> {
        let attempts = limits.max_attempts.map(|a| a as i32).unwrap_or(self.default_attempts);
        let tasks = plan(kind, input, attempts).map_err(|e| SubmitError::Db(qlayer_db::DbError::Invalid(e)))?;
        let deadline_at = limits.deadline_ms.map(|ms| now_ms() + ms as i64);
        self.scheduler.submit(NewJob { tenant_id, kind, input, priority, idempotency_key, deadline_at, tasks }).await
    }

    /// Stops a cancelled job's work in progress (its status is already `cancelled`).
    pub async fn cancel(&self, job_id: &str) {
        self.scheduler.cancel(job_id).await;
    }

    /// Stops the scheduler: running tasks get `grace`, then are handed back for the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.scheduler.shutdown(grace).await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Runs the host's tasks: tool calls and factory runs, with the tenant's installed plugins.
pub struct PluginExecutor {
    db: Db,
    runtime: Arc<Runtime>,
    marketplace: Arc<Marketplace>,
    data_dir: PathBuf,
}

/// How a failed plugin call counts for the scheduler.
pub fn task_error(e: &CallError) -> TaskError {
    let retry_after = match &e.kind {
        CallErrorKind::Plugin(PluginError::RateLimited(Some(ms))) => Some(Duration::from_millis(*ms)),
        _ => None,
    };
    let against_plugin =
        !matches!(e.kind, CallErrorKind::Plugin(PluginError::InvalidInput(_) | PluginError::Unauthorized(_)));
    TaskError { message: e.to_string(), retryable: e.is_retryable(), retry_after, against_plugin }
}

impl Execute for PluginExecutor {
    fn execute<'a>(&'a self, task: &'a Task, ctx: TaskContext) -> BoxFuture<'a, Result<serde_json::Value, TaskError>> {
        Box::pin(async move {
            match task.kind.as_str() {
                "call" => self.call(task, &ctx).await,
                "run" => self.run(task, &ctx).await.map_err(TaskError::fatal),
                other => Err(TaskError::fatal(format!("unknown task kind `{other}`"))),
            }
        })
    }
}

impl PluginExecutor {
    async fn tenant_name(&self, tenant_id: &str) -> Result<String, String> {
        match self.db.tenant(tenant_id).await {
            Ok(Some(t)) => Ok(t.name),
            Ok(None) => Err("the tenant no longer exists".into()),
            Err(e) => Err(format!("{e}")),
        }
    }

    async fn call(&self, task: &Task, ctx: &TaskContext) -> Result<serde_json::Value, TaskError> {
        let tenant = self.tenant_name(&task.tenant_id).await.map_err(TaskError::fatal)?;
        let started = Instant::now();
        let outcome = async {
            let installed = self
                .marketplace
                .load(&self.runtime, &tenant, &task.plugin)
                .map_err(|e| TaskError::fatal(format!("{e:#}")))?;
            // The call's own deadline never outlives the job's.
            let installed = match ctx.deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                    let timeout = installed.timeout().min(left);
                    installed.with_timeout(timeout)
                }
                None => installed,
            };
            let mut tool = installed.any_tool(&task.tenant_id).await.map_err(|e| task_error(&e))?;
            let text = match &task.input {
                serde_json::Value::String(s) => s.clone(),
                other => serde_json::to_string(other).map_err(|e| TaskError::fatal(e.to_string()))?,
            };
            tool.invoke(&text).await.map_err(|e| task_error(&e))
        }
        .await;
        let label = if outcome.is_ok() { "ok" } else { "error" };
        metrics::counter!("qlayer_plugin_calls_total", "plugin" => task.plugin.clone(), "outcome" => label)
            .increment(1);
        metrics::histogram!("qlayer_plugin_call_duration_seconds", "plugin" => task.plugin.clone())
            .record(started.elapsed().as_secs_f64());
        let text = outcome?;
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    async fn run(&self, task: &Task, ctx: &TaskContext) -> Result<serde_json::Value, String> {
        let input: RunInput = serde_json::from_value(task.input.clone()).map_err(|e| format!("input: {e}"))?;
        input.check()?;
        let tenant = self.tenant_name(&task.tenant_id).await?;
        let choice = match input.provider.as_deref() {
            None | Some("scripted") => ProviderChoice::Scripted { script: input.script.clone() },
            Some(name) => {
                let install = self.marketplace.get(&tenant, name).map_err(|e| format!("{e:#}"))?;
                if install.kind != Kind::Provider {
                    return Err(format!("installed plugin `{name}` is a {} plugin, not a provider", install.kind));
                }
                ProviderChoice::Installed {
                    name: name.to_string(),
                    tenant: tenant.clone(),
                    data_dir: self.data_dir.clone(),
                }
            }
        };
        // Installing compiles (or loads from the cache): off the async workers.
        let runtime = self.runtime.clone();
        let pipeline = tokio::task::spawn_blocking(move || embedded::pipeline(&runtime, &choice, None))
            .await
            .map_err(|e| format!("{e}"))?
            .map_err(|e| format!("{e:#}"))?;
        let out = self.data_dir.join("runs").join(&task.job_id);
        let _ = std::fs::remove_dir_all(&out);
        factory::prepare(&input.requirement, &out, true).map_err(|e| format!("{e:#}"))?;
        let request = RunRequest {
            requirement: input.requirement.clone(),
            options_json: input.options.as_ref().map(|o| o.to_string()).unwrap_or_else(|| "{}".into()),
            max_repair_rounds: input.max_repair_rounds.unwrap_or(2),
            tenant: task.tenant_id.clone(),
        };
        let progress = |p: Progress| {
            let data = match p {
                Progress::Started { step } => serde_json::json!({ "step": step, "state": "started" }),
                Progress::Finished(report) => serde_json::json!({
                    "step": report.step, "state": report.outcome, "plugin": report.plugin,
                    "duration_ms": report.duration_ms, "summary": report.summary,
                }),
            };
            ctx.event("progress", data);
        };
        let report = factory::run(&pipeline, &request, &out, &progress).await;
        let outcome = async {
            let report = report.map_err(|e| format!("{e:#}"))?;
            let capsule = capsule(&out, &task.job_id).map_err(|e| format!("packing the capsule: {e:#}"))?;
            self.db.put_artifact(&task.job_id, "application/gzip", &capsule).await.map_err(|e| format!("{e}"))?;
            serde_json::to_value(&report).map_err(|e| e.to_string())
        }
        .await;
        let _ = std::fs::remove_dir_all(&out);
        outcome
    }
}

/// Packs `dir` as a gzip-compressed tar under the folder `name/`, files in name order, with
/// fixed times and modes so the same files give the same bytes.
pub fn capsule(dir: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(encoder);
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    files.sort();
    for relative in files {
        let data = std::fs::read(dir.join(&relative))?;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, Path::new(name).join(&relative), data.as_slice())?;
    }
    Ok(tar.into_inner()?.finish()?)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect(root, &entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path().strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}
