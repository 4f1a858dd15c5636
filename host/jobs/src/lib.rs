//! What the scheduler runs: calls, call graphs and factory runs as DAGs of their steps.
//! May depend on: `qlayer-runtime`, `qlayer-db`, `qlayer-scheduler`, `qlayer-gateway`,
//! `qlayer-marketplace`, `qlayer-factory`, `qlayer-bundled`, `qlayer-registry`.
//!
//! The host's jobs: what a tenant asks for (a plugin call, a DAG of calls, a factory run),
//! planned into tasks for the core scheduler ([`qlayer_scheduler`]), and how each task runs: a
//! call loads the tenant's installed tool and invokes it under the job's deadline.
//!
//! A factory run is a DAG of its steps, each a task: `product-manager` → `developer` → one
//! `validate-<validator>` per validator (in parallel) → `review`. The review decides what comes
//! next: with validator errors left and repair rounds to go, it adds the next round's tasks
//! (`developer-repair-1`, `validate-syntax-repair-1`, `review-repair-1`, ...) to the job;
//! otherwise it writes the report and the tar.gz capsule, which end the job in one transaction.
//! Every step's output (its artifacts or findings, and its report line) is stored with its task,
//! so a host killed mid-run resumes from the last finished step, and a step that fails in a
//! retryable way is retried alone.

use futures::future::BoxFuture;
use qlayer_bundled::{self as embedded, ProviderChoice};
use qlayer_db::{Db, Job, JobKind, JsonText, NewJob, NewTask, Task, TaskStatus};
use qlayer_factory::{self as factory, DiagnosticReport, RunReport, RunRequest, StepReport, StoredArtifact};
use qlayer_gateway::{Router, TokenCount};
use qlayer_marketplace::Marketplace;
use qlayer_runtime::{Artifact, CallError, CallErrorKind, Grants, Installed, Kind, Plugin, PluginError, Runtime};
use qlayer_scheduler::{Execute, Scheduler, SchedulerConfig, SubmitError, TaskContext, TaskError, TaskResult};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
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
    pub input: serde_json::Value,
}

/// The input of a `run` job: a factory run.
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunInput {
    /// What to build, in words (at most 16,384 characters, not all white space).
    #[schema(min_length = 1, max_length = 16384, pattern = r"\S")]
    pub requirement: String,
    /// `scripted` (the built-in offline test double; the default) or the name of an LLM provider
    /// plugin installed for the tenant.
    #[serde(default)]
    pub provider: Option<String>,
    /// For `scripted`: a script to answer from instead of its built-in rules.
    #[serde(default, deserialize_with = "script_or_its_text")]
    pub script: Option<Script>,
    /// Options for the agents, e.g. `{"language": "python"}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub options: Option<serde_json::Value>,
    /// Repair rounds after the first validation (0-5, default 2).
    #[serde(default)]
    #[schema(maximum = 5)]
    pub max_repair_rounds: Option<u32>,
    /// Tokens the whole run may spend (prompt and completion, over every step). A step that
    /// would start with the budget spent fails the run, naming the budget. Default: no limit.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub token_budget: Option<u64>,
}

/// The most repair rounds a run may ask for.
pub const MAX_REPAIR_ROUNDS: u32 = 5;

impl RunInput {
    /// Checks what can be checked before the job is accepted.
    pub fn check(&self) -> Result<(), String> {
        if self.requirement.trim().is_empty() {
            return Err("requirement is empty: say what to build".into());
        }
        let chars = self.requirement.chars().count();
        if chars > factory::MAX_REQUIREMENT_CHARS {
            return Err(format!("requirement is {chars} characters; the limit is {}", factory::MAX_REQUIREMENT_CHARS));
        }
        if self.max_repair_rounds.is_some_and(|n| n > MAX_REPAIR_ROUNDS) {
            return Err(format!("max_repair_rounds must be 0-{MAX_REPAIR_ROUNDS}"));
        }
        if self.token_budget.is_some_and(|b| b == 0 || b > i64::MAX as u64) {
            return Err(format!("token_budget must be 1 to {}", i64::MAX));
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

/// A script for the scripted provider (`plugins/providers/scripted`): the first rule whose role
/// and text match answers.
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// Tried in order.
    pub rules: Vec<ScriptRule>,
}

/// One rule of a [`Script`].
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScriptRule {
    /// Only for this agent role (default: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Only when the prompt contains this text (default: any prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
    /// The reply.
    pub reply: String,
}

/// Reads a run's `script`: the script as JSON, or (as earlier versions took it, and as gRPC sends
/// it) its JSON text. Either way it is checked here, when the run is submitted, instead of
/// failing its first step; the message names the field at fault.
pub fn script_or_its_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Script>, D::Error> {
    let value = serde_json::Value::deserialize(d)?;
    parse_script(value).map_err(serde::de::Error::custom)
}

/// A script from its JSON (or its JSON text), or `None` for null.
pub fn parse_script(value: serde_json::Value) -> Result<Option<Script>, String> {
    let explain = |at: String, e: &dyn std::fmt::Display| {
        let at = if at == "." { String::new() } else { format!(" at `{at}`") };
        format!(
            "script is not a script for the scripted provider ({{\"rules\": [{{\"role\", \"contains\", \"reply\"}}]}}){at}: {e}"
        )
    };
    match value {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(text) => {
            let mut json = serde_json::Deserializer::from_str(&text);
            serde_path_to_error::deserialize(&mut json).map(Some).map_err(|e| explain(e.path().to_string(), e.inner()))
        }
        value => {
            serde_path_to_error::deserialize(value).map(Some).map_err(|e| explain(e.path().to_string(), e.inner()))
        }
    }
}

/// One task of a `call` job given as a graph.
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GraphTask {
    /// Unique in the job: 1-64 letters, digits, `-` or `_`.
    #[schema(pattern = r"^[A-Za-z0-9_-]{1,64}$")]
    pub name: String,
    /// The installed tool plugin it invokes.
    pub plugin: String,
    /// What to pass it. Without it, a task with dependencies gets their outputs, by name.
    #[serde(default)]
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
    #[schema(min_items = 1, max_items = 64)]
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
            let _: RunInput = serde_json::from_value(input.clone()).map_err(|e| format!("input: {e}"))?;
            run_tasks(max_attempts)
        }
    })
}

/// The validators every factory run uses: the bundled ones.
pub const RUN_VALIDATORS: &[&str] = &["syntax"];

/// The first tasks of a factory run: the product manager, then round 0.
fn run_tasks(max_attempts: i32) -> Vec<NewTask> {
    let mut tasks = vec![step_task(PRODUCT_MANAGER, "agent", PRODUCT_MANAGER, vec![], max_attempts)];
    tasks.extend(round_tasks(0, max_attempts));
    tasks
}

const PRODUCT_MANAGER: &str = "product-manager";

/// Task names in repair round `round` (0: the first development).
fn round_name(base: &str, round: u32) -> String {
    if round == 0 { base.to_string() } else { format!("{base}-repair-{round}") }
}

/// The round a step task belongs to, from its name.
fn round_of(name: &str) -> u32 {
    name.rsplit_once("-repair-").and_then(|(_, n)| n.parse().ok()).unwrap_or(0)
}

/// Round `round`: the developer (after the PRD and, on a repair round, the previous round's
/// files and review), each validator (after the PRD and the files), and the review (after all).
fn round_tasks(round: u32, max_attempts: i32) -> Vec<NewTask> {
    let developer = round_name("developer", round);
    let mut after = vec![PRODUCT_MANAGER.to_string()];
    if round > 0 {
        after.push(round_name("developer", round - 1));
        after.push(round_name("review", round - 1));
    }
    let mut tasks = vec![step_task(&developer, "agent", "developer", after, max_attempts)];
    let mut reviewed = vec![PRODUCT_MANAGER.to_string(), developer.clone()];
    for validator in RUN_VALIDATORS {
        let name = round_name(&format!("validate-{validator}"), round);
        let after = vec![PRODUCT_MANAGER.to_string(), developer.clone()];
        tasks.push(step_task(&name, "validate", validator, after, max_attempts));
        reviewed.push(name);
    }
    tasks.push(step_task(&round_name("review", round), "review", "factory", reviewed, max_attempts));
    tasks
}

fn step_task(name: &str, kind: &str, plugin: &str, after: Vec<String>, max_attempts: i32) -> NewTask {
    NewTask {
        name: name.to_string(),
        kind: kind.to_string(),
        plugin: plugin.to_string(),
        input: serde_json::Value::Null,
        depends_on: after,
        max_attempts,
    }
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
    /// Jobs over the executor's database, whose tasks `executor` runs, scheduled as `config` says.
    pub fn new(executor: PluginExecutor, config: SchedulerConfig) -> Arc<Self> {
        let default_attempts = config.max_attempts;
        let executor = Arc::new(executor);
        let scheduler = Scheduler::new(executor.db.clone(), config, executor.clone());
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
        let deadline_ms = limits.deadline_ms.map(|ms| ms as i64);
        self.scheduler.submit(NewJob { tenant_id, kind, input, priority, idempotency_key, deadline_ms, tasks }).await
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

/// Runs the host's tasks: tool calls and factory steps, with the tenant's installed plugins.
pub struct PluginExecutor {
    db: Db,
    runtime: Arc<Runtime>,
    marketplace: Arc<Marketplace>,
    /// The model provider every run uses, whatever its input names (the CLI's, given by flags
    /// and never stored).
    provider: Option<ProviderChoice>,
    /// The first-party plugins the factory's steps use, loaded once.
    bundled: Mutex<HashMap<String, Arc<Plugin>>>,
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
    fn execute<'a>(&'a self, task: &'a Task, ctx: TaskContext) -> BoxFuture<'a, Result<TaskResult, TaskError>> {
        Box::pin(async move {
            match task.kind.as_str() {
                "call" => self.call(task, &ctx).await.map(TaskResult::from),
                "agent" | "validate" | "review" => self.step(task, &ctx).await,
                // A run stored as one task (before runs were DAGs of their steps) becomes one.
                "run" => Ok(TaskResult {
                    output: serde_json::json!({ "planned": "the run's steps" }).into(),
                    then: run_tasks(task.max_attempts),
                    ..Default::default()
                }),
                other => Err(TaskError::fatal(format!("unknown task kind `{other}`"))),
            }
        })
    }
}

/// What a factory step's dependencies produced, read from its input (their outputs by name).
#[derive(Default)]
struct StepInputs {
    prd: Vec<Artifact>,
    files: Vec<Artifact>,
    diagnostics: Vec<DiagnosticReport>,
    feedback: Vec<DiagnosticReport>,
}

/// A factory step's output, as stored with its task.
#[derive(Deserialize)]
struct StepOutput {
    #[serde(default)]
    artifacts: Vec<StoredArtifact>,
    #[serde(default)]
    diagnostics: Vec<DiagnosticReport>,
    #[serde(default)]
    feedback: Vec<DiagnosticReport>,
}

impl StepInputs {
    fn parse(input: &JsonText) -> Result<Self, String> {
        let mut out = StepInputs::default();
        // A step's input is its dependencies' outputs by name, or nothing.
        let Ok(deps) = input.read::<BTreeMap<String, &serde_json::value::RawValue>>() else {
            return Ok(out);
        };
        for (name, value) in deps {
            let step: StepOutput =
                serde_json::from_str(value.get()).map_err(|e| format!("the output of step `{name}`: {e}"))?;
            let artifacts = step.artifacts.iter().map(StoredArtifact::artifact).collect::<Result<Vec<_>, _>>()?;
            if name == PRODUCT_MANAGER {
                out.prd = artifacts;
            } else if name.starts_with("developer") {
                out.files = artifacts;
            }
            out.diagnostics.extend(step.diagnostics);
            out.feedback.extend(step.feedback);
        }
        Ok(out)
    }
}

/// The reports of a run's finished steps (its succeeded agent and validate tasks), in the order
/// they were planned.
pub fn finished_steps(tasks: &[Task]) -> Result<Vec<StepReport>, String> {
    tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Succeeded && matches!(t.kind.as_str(), "agent" | "validate"))
        .filter_map(|t| {
            #[derive(Deserialize)]
            struct Step<'a> {
                #[serde(borrow)]
                step: Option<&'a serde_json::value::RawValue>,
            }
            let step = t.output.as_ref()?.read::<Step>().ok()?.step?;
            Some(serde_json::from_str::<StepReport>(step.get()))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| format!("a step's stored report: {e}"))
}

/// Loading an installed plugin failed: retryable when the registry it is pulled from (on a node
/// that has no copy yet) could not be reached, fatal otherwise (not installed, tampered, refused).
/// Counts a tool call (`qlayer_plugin_calls_total` by plugin and outcome) and its duration,
/// whether a job or an MCP client made it.
pub fn record_tool_call(plugin: &str, ok: bool, took: Duration) {
    let outcome = if ok { "ok" } else { "error" };
    metrics::counter!("qlayer_plugin_calls_total", "plugin" => plugin.to_string(), "outcome" => outcome).increment(1);
    metrics::histogram!("qlayer_plugin_call_duration_seconds", "plugin" => plugin.to_string())
        .record(took.as_secs_f64());
}

fn load_error(e: anyhow::Error) -> TaskError {
    let unreachable = e.chain().any(|c| {
        matches!(c.downcast_ref::<qlayer_registry::RegistryError>(), Some(qlayer_registry::RegistryError::Transport(_)))
    });
    TaskError { retryable: unreachable, ..TaskError::fatal(format!("{e:#}")) }
}

fn fatal(e: impl std::fmt::Display) -> TaskError {
    TaskError::fatal(e.to_string())
}

/// A step's plugin call never outlives the job's deadline.
fn within(installed: Installed, ctx: &TaskContext) -> Installed {
    match ctx.deadline {
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            let timeout = installed.timeout().min(left);
            installed.with_timeout(timeout)
        }
        None => installed,
    }
}

impl PluginExecutor {
    /// Runs tasks with the plugins installed in `marketplace` (and the bundled first-party ones),
    /// storing results in `db`.
    pub fn new(db: Db, runtime: Arc<Runtime>, marketplace: Arc<Marketplace>) -> Self {
        PluginExecutor { db, runtime, marketplace, provider: None, bundled: Mutex::default() }
    }

    /// Runs every factory step with `provider`, whatever the run's input names.
    pub fn with_provider(mut self, provider: ProviderChoice) -> Self {
        self.provider = Some(provider);
        self
    }

    async fn tenant_name(&self, tenant_id: &str) -> Result<String, String> {
        match self.db.tenant(tenant_id).await {
            Ok(Some(t)) => Ok(t.name),
            Ok(None) => Err("the tenant no longer exists".into()),
            Err(e) => Err(format!("{e}")),
        }
    }

    async fn call(&self, task: &Task, ctx: &TaskContext) -> Result<JsonText, TaskError> {
        let tenant = self.tenant_name(&task.tenant_id).await.map_err(TaskError::fatal)?;
        let started = Instant::now();
        let outcome = async {
            let installed = self.marketplace.load(&self.runtime, &tenant, &task.plugin).await.map_err(load_error)?;
            let mut tool = within(installed, ctx).any_tool(&task.tenant_id).await.map_err(|e| task_error(&e))?;
            // A JSON string input is handed over as its text; any other value as its JSON.
            let text = match task.input.get().starts_with('"') {
                true => task.input.read::<String>().map_err(|e| TaskError::fatal(e.to_string()))?,
                false => task.input.get().to_string(),
            };
            tool.invoke(&text).await.map_err(|e| task_error(&e))
        }
        .await;
        record_tool_call(&task.plugin, outcome.is_ok(), started.elapsed());
        // Kept as its text: a large output is checked, never built into a tree.
        Ok(JsonText::or_string(outcome?))
    }

    /// A first-party plugin, loaded (compiled, or read from the compile cache) once per process,
    /// off the async workers.
    async fn bundled(&self, name: &str) -> Result<Arc<Plugin>, TaskError> {
        if let Some(plugin) = self.bundled.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(plugin.clone());
        }
        let wasm = embedded::bundled_plugin(name)
            .ok_or_else(|| fatal(format!("the first-party plugin `{name}` is not in this build")))?;
        let runtime = self.runtime.clone();
        let plugin = tokio::task::spawn_blocking(move || runtime.load(wasm))
            .await
            .map_err(fatal)?
            .map_err(|e| fatal(format!("loading the bundled `{name}` plugin: {e}")))?;
        self.bundled.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), plugin.clone());
        Ok(plugin)
    }

    /// The model provider a run uses.
    fn choice(&self, input: &RunInput, tenant: &str) -> ProviderChoice {
        if let Some(choice) = &self.provider {
            return choice.clone();
        }
        match input.provider.as_deref() {
            None | Some("scripted") => {
                ProviderChoice::Scripted { script: input.script.as_ref().and_then(|s| serde_json::to_string(s).ok()) }
            }
            Some(name) => ProviderChoice::Installed { name: name.to_string(), tenant: tenant.to_string() },
        }
    }

    /// The model provider a run uses, installed for this step.
    async fn provider(&self, input: &RunInput, tenant: &str) -> Result<Installed, TaskError> {
        let choice = self.choice(input, tenant);
        let ProviderChoice::Installed { name, tenant } = &choice else {
            let (bundled, grants) =
                choice.bundled_grants().map_err(|e| fatal(format!("{e:#}")))?.ok_or_else(|| fatal("no provider"))?;
            return self.bundled(bundled).await?.install(grants).map_err(fatal);
        };
        let install = self.marketplace.get(tenant, name).await.map_err(|e| fatal(format!("{e:#}")))?;
        if install.kind != Kind::Provider {
            return Err(fatal(format!("installed plugin `{name}` is a {} plugin, not a provider", install.kind)));
        }
        self.marketplace.load(&self.runtime, tenant, name).await.map_err(load_error)
    }

    /// The reports of the run's steps that have finished, in the order they were planned.
    async fn finished_steps(&self, task: &Task) -> Result<Vec<StepReport>, TaskError> {
        let tasks = self.db.job_tasks(&task.tenant_id, &task.job_id).await.map_err(fatal)?;
        finished_steps(&tasks).map_err(TaskError::fatal)
    }

    /// Runs one step of a factory run.
    async fn step(&self, task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError> {
        let job = self
            .db
            .job(&task.tenant_id, &task.job_id)
            .await
            .map_err(fatal)?
            .ok_or_else(|| fatal("the job no longer exists"))?;
        let input: RunInput = serde_json::from_value(job.input.clone()).map_err(|e| fatal(format!("input: {e}")))?;
        input.check().map_err(TaskError::fatal)?;
        let request = RunRequest {
            requirement: input.requirement.clone(),
            options_json: input.options.as_ref().map(|o| o.to_string()).unwrap_or_else(|| "{}".into()),
            max_repair_rounds: input.max_repair_rounds.unwrap_or(2),
            tenant: task.tenant_id.clone(),
        };
        let deps = StepInputs::parse(&task.input).map_err(TaskError::fatal)?;
        let round = round_of(&task.name);
        match task.kind.as_str() {
            "agent" => {
                let tenant = self.tenant_name(&task.tenant_id).await.map_err(TaskError::fatal)?;
                let provider = self.provider(&input, &tenant).await?;
                // What earlier steps spent counts against the run's budget.
                let budget = match input.token_budget {
                    Some(budget) => {
                        let spent = self
                            .finished_steps(task)
                            .await?
                            .iter()
                            .fold(TokenCount::default(), |sum, s| sum.plus(s.tokens))
                            .total();
                        if spent >= budget {
                            return Err(fatal(format!(
                                "the run's token budget of {budget} is spent ({spent} tokens used)"
                            )));
                        }
                        Some(budget - spent)
                    }
                    None => None,
                };
                let router = Arc::new(Router::new(vec![within(provider, ctx)], budget));
                let agent = within(self.bundled(&task.plugin).await?.install(Grants::default()).map_err(fatal)?, ctx);
                let (step, inputs, feedback) = if task.name == PRODUCT_MANAGER {
                    (PRODUCT_MANAGER.to_string(), vec![], vec![])
                } else {
                    let mut inputs = deps.prd;
                    inputs.extend(deps.files);
                    (factory::developer_step(round), inputs, deps.feedback.iter().map(|d| d.diagnostic()).collect())
                };
                let (report, result) = factory::agent_step(&step, &agent, &router, &request, inputs, feedback).await;
                let out = result.map_err(|e| task_error(&e))?;
                let artifacts: Vec<StoredArtifact> = out.artifacts.iter().map(StoredArtifact::from).collect();
                Ok(serde_json::json!({ "step": report, "artifacts": artifacts }).into())
            }
            "validate" => {
                let validator =
                    within(self.bundled(&task.plugin).await?.install(Grants::default()).map_err(fatal)?, ctx);
                let mut all = deps.prd;
                all.extend(deps.files);
                let step = factory::validate_step_name(&task.plugin);
                let (report, result) = factory::validate_step(&step, &validator, &task.tenant_id, &all).await;
                let found = result.map_err(|e| task_error(&e))?;
                Ok(serde_json::json!({ "step": report, "diagnostics": found }).into())
            }
            _ => self.review(task, &job, &input, &request, deps, round).await,
        }
    }

    /// The end of a round: another round while validator errors remain and rounds are left,
    /// else the report and the capsule.
    async fn review(
        &self,
        task: &Task,
        job: &Job,
        input: &RunInput,
        request: &RunRequest,
        deps: StepInputs,
        round: u32,
    ) -> Result<TaskResult, TaskError> {
        let errors: Vec<&DiagnosticReport> = deps.diagnostics.iter().filter(|d| d.is_error()).collect();
        if !errors.is_empty() && round < request.max_repair_rounds {
            return Ok(TaskResult {
                output: serde_json::json!({
                    "round": round, "errors": errors.len(), "next": factory::developer_step(round + 1),
                    "feedback": errors,
                })
                .into(),
                then: round_tasks(round + 1, task.max_attempts),
                ..Default::default()
            });
        }
        let tenant = self.tenant_name(&task.tenant_id).await.map_err(TaskError::fatal)?;
        let provider = self.choice(input, &tenant);
        let steps = self.finished_steps(task).await?;
        let (status, stop_reason) = factory::verdict(&deps.diagnostics, round);
        let files = factory::run_files(deps.prd, deps.files);
        let file_reports = factory::file_reports(&files).map_err(|e| fatal(format!("{e:#}")))?;
        let report = RunReport {
            requirement: request.requirement.clone(),
            status: status.to_string(),
            stop_reason,
            provider: provider.label(),
            repair_rounds: round,
            tokens: steps.iter().fold(TokenCount::default(), |sum, s| sum.plus(s.tokens)),
            steps,
            diagnostics: deps.diagnostics,
            files: file_reports,
            duration_ms: (now_ms() - job.created_at).max(0) as u64,
            started_at: (job.created_at / 1000).max(0) as u64,
        };
        let capsule = factory::capsule(&task.job_id, &files, &report)
            .map_err(|e| fatal(format!("packing the capsule: {e:#}")))?;
        Ok(TaskResult {
            output: JsonText::of(&report),
            job_output: true,
            artifact: Some(qlayer_db::Artifact { media_type: "application/gzip".into(), bytes: capsule }),
            then: vec![],
        })
    }
}
