//! What the scheduler runs: calls, call graphs and factory runs as DAGs of their steps.
//! May depend on: `qlayer-runtime`, `qlayer-db`, `qlayer-scheduler`, `qlayer-gateway`,
//! `qlayer-marketplace`, `qlayer-factory`, `qlayer-bundled`, `qlayer-registry`.
//!
//! The host's jobs: what a tenant asks for (a plugin call, a DAG of calls, a factory run),
//! planned into tasks for the core scheduler ([`qlayer_scheduler`]), and how each task runs: a
//! call loads the tenant's installed tool and invokes it under the job's deadline.
//!
//! A factory run is a DAG of its pipeline's steps ([`qlayer_factory::pipeline`]), each a task:
//! with the default pipeline, `product-manager` → `architect` → `developer` and `devops` (in
//! parallel) → `qa-engineer` → `reviewer` → `validate-syntax` → `review`. The review decides
//! what comes next: with errors left (validators' diagnostics, and agents' findings such as the
//! reviewer's) and repair rounds to go, it adds the next round's tasks (`developer-repair-1`,
//! `qa-engineer-repair-1`, ..., `review-repair-1`) to the job; otherwise it writes the report
//! and the tar.gz capsule, which end the job in one transaction. A run's pipeline is resolved
//! (a stored one by name) and checked against the tenant's installs when it is submitted, and
//! stored inline with the job, so that changing the stored pipeline does not change runs that
//! have started.
//! Every step's output (its artifacts or findings, and its report line) is stored with its task,
//! so a host killed mid-run resumes from the last finished step, and a step that fails in a
//! retryable way is retried alone.

use futures::future::BoxFuture;
use qlayer_bundled::{self as embedded, ProviderChoice};
use qlayer_db::{Db, Job, JobKind, JsonText, NewJob, NewTask, Task, TaskStatus};
use qlayer_factory::pipeline::{self, PluginRef, Shard, Step, TaskRole, round_name};
pub use qlayer_factory::pipeline::{Pipeline, valid_pipeline_name};
use qlayer_factory::{self as factory, DiagnosticReport, RunReport, StepReport, StoredArtifact};
use qlayer_gateway::service::{Caller, Gateway, TableModel};
use qlayer_gateway::{Router, TokenCount};
use qlayer_marketplace::Install;
use qlayer_marketplace::Marketplace;
use qlayer_runtime::{
    Artifact, CallError, CallErrorKind, Grants, Installed, Kind, Plugin, PluginError, Runtime, ToolHandler, ToolInfo,
};
use qlayer_scheduler::{Execute, Scheduler, SchedulerConfig, SubmitError, TaskContext, TaskError, TaskResult};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a run's capsule is published as (`POST /v1/runs/{id}/publish`): the OCI config (the
/// report in the capsule, byte for byte) and the manifest's annotations. The capsule is checked
/// first (every file against its report).
pub fn capsule_publication(
    run_id: &str,
    capsule: &[u8],
) -> anyhow::Result<(Vec<u8>, std::collections::BTreeMap<String, String>)> {
    let contents = factory::read_capsule(capsule)?;
    let annotations = factory::capsule_annotations(run_id, &contents.report);
    Ok((contents.report_bytes, annotations))
}

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
    /// Repair rounds after the first validation (0-5; default: the pipeline's, else 2).
    #[serde(default)]
    #[schema(maximum = 5)]
    pub max_repair_rounds: Option<u32>,
    /// Tokens the whole run may spend (prompt and completion, over every step). A step that
    /// would start with the budget spent fails the run, naming the budget. Default: no limit.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 9223372036854775807_u64)]
    pub token_budget: Option<u64>,
    /// The pipeline: the name of one stored for the tenant (`default` is the bundled one unless
    /// the tenant stored its own of that name), or a definition. Default: `default`. A stored
    /// run holds its pipeline's definition, as it was when the run was submitted.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "pipeline_choice")]
    pub pipeline: Option<PipelineChoice>,
}

/// Which pipeline a run follows.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum PipelineChoice {
    /// The name of a pipeline stored for the tenant (or `default`).
    Name(String),
    /// A definition.
    Inline(Box<Pipeline>),
}

/// Reads a run's `pipeline`: a name, or a definition checked here, at submission.
pub fn pipeline_choice<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PipelineChoice>, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(name) => Ok(Some(PipelineChoice::Name(name))),
        value @ serde_json::Value::Object(_) => Pipeline::from_json(value)
            .map(|p| Some(PipelineChoice::Inline(Box::new(p))))
            .map_err(serde::de::Error::custom),
        _ => Err(serde::de::Error::custom("give a stored pipeline's name or a pipeline definition (an object)")),
    }
}

/// The name a stored run's pipeline goes by when it names none.
pub const DEFAULT_PIPELINE: &str = "default";

/// The most repair rounds a run may ask for.
pub const MAX_REPAIR_ROUNDS: u32 = pipeline::MAX_REPAIR_ROUNDS;

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
    /// The reply (`""` for a rule that only calls tools).
    pub reply: String,
    /// Tools the reply calls (only when the request offers tools and allows them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ScriptToolCall>,
}

/// A tool call a [`ScriptRule`] makes.
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScriptToolCall {
    /// The tool.
    pub name: String,
    /// Its arguments.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub arguments: serde_json::Map<String, serde_json::Value>,
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
            "script is not a script for the scripted provider ({{\"rules\": [{{\"role\", \"contains\", \"reply\", \"tool_calls\"}}]}}){at}: {e}"
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
    let nodes: Vec<(&str, &[String])> = graph.tasks.iter().map(|t| (t.name.as_str(), t.after.as_slice())).collect();
    let stuck = pipeline::unordered(&nodes);
    if !stuck.is_empty() {
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
            run_tasks(&run.pipeline()?, 0, max_attempts)
        }
    })
}

impl RunInput {
    /// The pipeline a stored run follows: its definition, or the bundled default. A name is
    /// resolved at submission ([`JobRunner::prepare_run`]): one still here is an error.
    pub fn pipeline(&self) -> Result<Pipeline, String> {
        match &self.pipeline {
            None => Ok(Pipeline::default_pipeline()),
            Some(PipelineChoice::Inline(p)) => Ok((**p).clone()),
            Some(PipelineChoice::Name(name)) => {
                Err(format!("pipeline `{name}` was not resolved before the run was stored"))
            }
        }
    }
}

/// The tasks of a run's repair round `round` (0: the first development), as the scheduler's.
fn run_tasks(pipeline: &Pipeline, round: u32, max_attempts: i32) -> Vec<NewTask> {
    pipeline
        .round(round)
        .into_iter()
        .map(|t| NewTask {
            name: t.name,
            kind: t.kind.to_string(),
            plugin: t.plugin,
            input: serde_json::Value::Null,
            depends_on: t.after,
            max_attempts,
        })
        .collect()
}

/// Why a run's pipeline was refused at submission.
#[derive(Debug, thiserror::Error)]
pub enum RunRefused {
    /// The run or its pipeline is wrong; the message names the step and field.
    #[error("{0}")]
    Invalid(String),
    /// It names a stored pipeline the tenant does not have.
    #[error("{0}")]
    NotFound(String),
    /// The store failed.
    #[error("{0}")]
    Store(String),
}

/// Whether `install` may serve as a `kind` plugin pinned to `digest` (its OCI manifest digest
/// or its binary's); the message says what is wrong.
pub fn check_install(install: &Install, kind: Kind, digest: Option<&str>) -> Result<(), String> {
    let name = &install.name;
    if install.kind != kind {
        return Err(format!("installed plugin `{name}` is of kind `{}`, not `{kind}`", install.kind));
    }
    if let Some(pin) = digest
        && pin != install.digest
        && pin != install.blob
    {
        return Err(format!(
            "installed plugin `{name}` is pinned to {pin}, but the install is {} (binary {})",
            install.digest, install.blob
        ));
    }
    Ok(())
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
        let _ = executor.admission.set(scheduler.admission().clone());
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

    /// A run's input ready to store: its pipeline resolved for the tenant (a stored one by name)
    /// and checked against the tenant's installs, then held inline, named.
    pub async fn prepare_run(
        &self,
        tenant_id: &str,
        input: &serde_json::Value,
    ) -> Result<serde_json::Value, RunRefused> {
        let mut run: RunInput =
            serde_json::from_value(input.clone()).map_err(|e| RunRefused::Invalid(format!("input: {e}")))?;
        run.check().map_err(RunRefused::Invalid)?;
        let mut pipeline = match run.pipeline.take() {
            None => Pipeline::default_pipeline(),
            Some(PipelineChoice::Inline(p)) => *p,
            Some(PipelineChoice::Name(name)) => {
                let stored =
                    self.executor.db.pipeline(tenant_id, &name).await.map_err(|e| RunRefused::Store(e.to_string()))?;
                match stored {
                    Some(entry) => {
                        let value = serde_json::from_str(&entry.definition)
                            .map_err(|e| RunRefused::Store(format!("stored pipeline `{name}`: {e}")))?;
                        let mut p = Pipeline::from_json(value)
                            .map_err(|e| RunRefused::Store(format!("stored pipeline `{name}`: {e}")))?;
                        p.name = Some(name);
                        p
                    }
                    None if name == DEFAULT_PIPELINE => Pipeline::default_pipeline(),
                    None => {
                        return Err(RunRefused::NotFound(format!(
                            "pipeline: no pipeline `{name}` is stored for this tenant"
                        )));
                    }
                }
            }
        };
        if run.max_repair_rounds.is_none() && pipeline.repair.rounds.is_none() {
            pipeline.repair.rounds = Some(pipeline::DEFAULT_REPAIR_ROUNDS);
        }
        self.check_pipeline(tenant_id, &pipeline).await?;
        run.pipeline = Some(PipelineChoice::Inline(Box::new(pipeline)));
        serde_json::to_value(&run).map_err(|e| RunRefused::Store(e.to_string()))
    }

    /// Checks every plugin `pipeline` names against the bundled ones and the tenant's installs,
    /// and each step's model against the tenant's model table; the message names the step.
    pub async fn check_pipeline(&self, tenant_id: &str, pipeline: &Pipeline) -> Result<(), RunRefused> {
        let tenant = self.executor.tenant_name(tenant_id).await.map_err(RunRefused::Store)?;
        self.executor.check_pipeline(&tenant, pipeline).await?;
        let Some(gateway) = self.executor.gateway() else { return Ok(()) };
        for (i, step) in pipeline.steps.iter().enumerate() {
            let Some(model) = &step.model else { continue };
            match gateway.has_model(tenant_id, model).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(RunRefused::Invalid(format!(
                        "steps[{i}] (`{}`): model: `{model}` is not a model of this tenant's table (PUT /v1/models/{{name}})",
                        step.name
                    )));
                }
                Err(e) => return Err(RunRefused::Store(e.message)),
            }
        }
        Ok(())
    }

    /// Gives steps that name a model of the tenant's table the gateway to ask it through.
    pub fn set_gateway(&self, gateway: &Arc<Gateway>) {
        let _ = self.executor.gateway.set(Arc::downgrade(gateway));
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
        let invalid = |e: String| SubmitError::Db(qlayer_db::DbError::Invalid(e));
        let prepared;
        let input = match kind {
            JobKind::Run => {
                prepared = self.prepare_run(tenant_id, input).await.map_err(|e| invalid(e.to_string()))?;
                &prepared
            }
            JobKind::Call => input,
        };
        let tasks = plan(kind, input, attempts).map_err(invalid)?;
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
    /// Runs' inputs and pipelines, read once per run (a job's input never changes), by
    /// `<tenant id>/<job id>`; at most [`MAX_CACHED`], then emptied.
    plans: Mutex<HashMap<String, Arc<RunPlan>>>,
    /// Tenants' names by id (a tenant is never renamed); at most [`MAX_CACHED`], then emptied.
    tenant_names: Mutex<HashMap<String, String>>,
    /// The gateway, through which a step that names a model of the tenant's table asks it (set
    /// once the service has one; weak, since the gateway's providers hold the runner).
    gateway: std::sync::OnceLock<std::sync::Weak<Gateway>>,
    /// The scheduler's fair sharing of interactive work: a step's tool calls take their turn in
    /// it, as the tenant's MCP calls do.
    admission: std::sync::OnceLock<Arc<qlayer_scheduler::interactive::Admission>>,
}

/// The most entries each of the executor's caches holds.
const MAX_CACHED: usize = 1024;

/// What every step of a run reads first: its input, its pipeline, when it was submitted.
struct RunPlan {
    created_at: i64,
    input: RunInput,
    pipeline: Pipeline,
}

/// Inserts into a bounded cache: emptied when full (the entries are cheap to read again).
fn remember<V>(cache: &Mutex<HashMap<String, V>>, key: String, value: V) {
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert(key, value);
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
                "agent" | "validate" | "review" | "gate" => self.step(task, &ctx).await,
                // A run stored as one task (before runs were DAGs of their steps) becomes one.
                "run" => Ok(TaskResult {
                    output: serde_json::json!({ "planned": "the run's steps" }).into(),
                    then: run_tasks(&Pipeline::default_pipeline(), 0, task.max_attempts),
                    ..Default::default()
                }),
                other => Err(TaskError::fatal(format!("unknown task kind `{other}`"))),
            }
        })
    }
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
    /// Set on a step that did not run: a gate before it was rejected in its round.
    #[serde(default)]
    skipped: Option<String>,
    /// A gate's decision.
    #[serde(default)]
    decision: Option<GateDecision>,
}

/// A person's decision at an approval gate: the gate task's input, and its output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateDecision {
    /// Whether the step's work may go on.
    pub approved: bool,
    /// What the person said: for a rejection, the feedback the step gets in the next round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Who decided (an API key's id, or `cli`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// The rule of the error a rejection at a gate becomes (its validator is the gate's task).
pub const REJECTED: &str = "rejected";

/// The longest comment a gate decision may carry, in characters.
pub const MAX_GATE_COMMENT_CHARS: usize = 16 * 1024;

impl GateDecision {
    /// Checks a decision a person gave: a rejection says why (its comment is the step's
    /// feedback); a comment has at most [`MAX_GATE_COMMENT_CHARS`] characters.
    pub fn check(&self) -> Result<(), String> {
        let comment = self.comment.as_deref().unwrap_or_default();
        if !self.approved && comment.trim().is_empty() {
            return Err("a rejection needs a `comment`: it is the feedback the step gets in its next round".into());
        }
        if comment.chars().count() > MAX_GATE_COMMENT_CHARS {
            return Err(format!("`comment` is longer than {MAX_GATE_COMMENT_CHARS} characters"));
        }
        Ok(())
    }
}

/// What a run's finished tasks produced, by task name: what every step works from. A step's
/// files are those of its pipeline ancestors (each at its latest round), so a task gets the
/// same input whichever node runs it and however often it is retried.
struct RunOutputs {
    done: HashMap<String, StepOutput>,
}

impl RunOutputs {
    fn read(tasks: &[Task]) -> Result<Self, String> {
        let mut done = HashMap::new();
        for task in tasks.iter().filter(|t| t.status == TaskStatus::Succeeded && t.kind != "call") {
            let Some(output) = &task.output else { continue };
            let step: StepOutput = output.read().map_err(|e| format!("the output of step `{}`: {e}", task.name))?;
            // A step a rejected gate skipped left nothing: its latest output is an earlier round's.
            if step.skipped.is_none() {
                done.insert(task.name.clone(), step);
            }
        }
        Ok(RunOutputs { done })
    }

    /// The output of `base`'s task at its latest round up to `round`.
    fn latest(&self, base: &str, round: u32) -> Option<&StepOutput> {
        self.latest_round(base, round).map(|(_, out)| out)
    }

    /// [`Self::latest`], with the round it is of.
    fn latest_round(&self, base: &str, round: u32) -> Option<(u32, &StepOutput)> {
        (0..=round).rev().find_map(|r| Some((r, self.done.get(&round_name(base, r))?)))
    }

    /// The paths of `files` that no validator task of `pipeline` (at its latest round up to
    /// `round`) was given and read: each was given the files of its step and the step's
    /// ancestors, and names those it could not read as `unchecked`.
    fn unchecked(&self, pipeline: &Pipeline, round: u32, files: &[Artifact]) -> Result<Vec<String>, String> {
        let mut checked = std::collections::HashSet::new();
        for (base, step) in pipeline.validator_tasks() {
            let Some((at, out)) = self.latest_round(&base, round) else { continue };
            let mut steps = pipeline.ancestors(step);
            steps.push(step);
            let (given, _) = self.files(&steps, at, None)?;
            checked.extend(factory::checked_files(&out.diagnostics, &given).into_iter().map(str::to_string));
        }
        let mut unchecked: Vec<String> =
            files.iter().map(|f| f.path.clone()).filter(|p| !checked.contains(p)).collect();
        unchecked.sort();
        Ok(unchecked)
    }

    /// The files of `steps` (in pipeline order; a fanned-out step's shards in order), each at its
    /// latest round up to `round`, one owner per path (the task's base name: the step's, or its
    /// shard's); `own` adds a step at another round (a repaired step's previous files).
    fn files(
        &self,
        steps: &[&Step],
        round: u32,
        own: Option<(&Step, u32)>,
    ) -> Result<(Vec<Artifact>, HashMap<String, String>), String> {
        let mut outputs = Vec::new();
        let at = steps.iter().map(|s| (*s, round)).chain(own);
        for (step, round) in at {
            for base in step.agent_tasks() {
                if let Some(out) = self.latest(&base, round) {
                    let files = out.artifacts.iter().map(StoredArtifact::artifact).collect::<Result<Vec<_>, _>>()?;
                    outputs.push((base, files));
                }
            }
        }
        Ok(factory::merge_files(outputs))
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
        PluginExecutor {
            db,
            runtime,
            marketplace,
            provider: None,
            bundled: Mutex::default(),
            plans: Mutex::default(),
            tenant_names: Mutex::default(),
            gateway: Default::default(),
            admission: Default::default(),
        }
    }

    /// The service's gateway, while it runs.
    fn gateway(&self) -> Option<Arc<Gateway>> {
        self.gateway.get().and_then(std::sync::Weak::upgrade)
    }

    /// Runs every factory step with `provider`, whatever the run's input names.
    pub fn with_provider(mut self, provider: ProviderChoice) -> Self {
        self.provider = Some(provider);
        self
    }

    async fn tenant_name(&self, tenant_id: &str) -> Result<String, String> {
        if let Some(name) = self.tenant_names.lock().unwrap_or_else(|e| e.into_inner()).get(tenant_id) {
            return Ok(name.clone());
        }
        match self.db.tenant(tenant_id).await {
            Ok(Some(t)) => {
                remember(&self.tenant_names, tenant_id.to_string(), t.name.clone());
                Ok(t.name)
            }
            Ok(None) => Err("the tenant no longer exists".into()),
            Err(e) => Err(format!("{e}")),
        }
    }

    /// A run's input and pipeline, checked, read from its job once.
    async fn plan(&self, task: &Task) -> Result<Arc<RunPlan>, TaskError> {
        let key = format!("{}/{}", task.tenant_id, task.job_id);
        if let Some(plan) = self.plans.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(plan.clone());
        }
        let job = self
            .db
            .job(&task.tenant_id, &task.job_id)
            .await
            .map_err(fatal)?
            .ok_or_else(|| fatal("the job no longer exists"))?;
        let input: RunInput = serde_json::from_value(job.input).map_err(|e| fatal(format!("input: {e}")))?;
        input.check().map_err(TaskError::fatal)?;
        let pipeline = input.pipeline().map_err(TaskError::fatal)?;
        let plan = Arc::new(RunPlan { created_at: job.created_at, input, pipeline });
        remember(&self.plans, key, plan.clone());
        Ok(plan)
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

    /// Runs one step of a factory run.
    async fn step(&self, task: &Task, ctx: &TaskContext) -> Result<TaskResult, TaskError> {
        let plan = self.plan(task).await?;
        let (input, pipeline) = (&plan.input, &plan.pipeline);
        // The run's tasks as the previous step's completion left them, when it handed this step
        // to the same slot; else as stored.
        let tasks: Arc<[Task]> = match &ctx.job_tasks {
            Some(tasks) => tasks.clone(),
            None => self.db.job_tasks(&task.tenant_id, &task.job_id).await.map_err(fatal)?.into(),
        };
        let outputs = RunOutputs::read(&tasks).map_err(TaskError::fatal)?;
        let run = Run { task, created_at: plan.created_at, input, pipeline, outputs: &outputs, all: &tasks };
        match (task.kind.as_str(), pipeline.task(&task.name)) {
            ("agent", Some((TaskRole::Agent(step), round))) => self.agent(&run, ctx, step, None, round).await,
            ("agent", Some((TaskRole::Shard(step, shard), round))) => {
                self.agent(&run, ctx, step, Some(shard), round).await
            }
            ("validate", Some((TaskRole::Validate { step, validator }, round))) => {
                self.validate(&run, ctx, step, validator, round).await
            }
            ("review", Some((TaskRole::Review, round))) => self.review(&run, round).await,
            ("gate", Some((TaskRole::Gate(step), _))) => Self::gate(task, step),
            (kind, _) => Err(fatal(format!("task `{}` ({kind}) is not a step of the run's pipeline", task.name))),
        }
    }

    /// A plugin a pipeline names, for `tenant`: bundled, or the tenant's install (of `kind`,
    /// with the pinned digest).
    async fn pipeline_plugin(
        &self,
        tenant: &str,
        pipeline: &Pipeline,
        reference: &str,
        kind: Kind,
    ) -> Result<Installed, TaskError> {
        match pipeline::plugin_ref(reference).map_err(fatal)? {
            PluginRef::Bundled(name) => {
                // A bundled plugin gets the configuration its pipeline gives it, and nothing else.
                let grants =
                    Grants { config: pipeline.config.get(name).cloned().unwrap_or_default(), ..Grants::default() };
                self.bundled(name).await?.install(grants).map_err(fatal)
            }
            PluginRef::Installed { name, digest } => self.installed(tenant, name, kind, digest).await,
        }
    }

    async fn installed(
        &self,
        tenant: &str,
        name: &str,
        kind: Kind,
        digest: Option<&str>,
    ) -> Result<Installed, TaskError> {
        let install = self.marketplace.get(tenant, name).await.map_err(|e| fatal(format!("{e:#}")))?;
        check_install(&install, kind, digest).map_err(TaskError::fatal)?;
        self.marketplace.load_install(&self.runtime, &install).await.map_err(load_error)
    }

    /// Checks every plugin `pipeline` names against the bundled ones and `tenant`'s installs;
    /// the message names the step.
    async fn check_pipeline(&self, tenant: &str, pipeline: &Pipeline) -> Result<(), RunRefused> {
        let bundled = |name: &str, list: &[&str], what: &str| {
            if list.contains(&name) {
                Ok(())
            } else {
                Err(format!(
                    "`{name}` is not a bundled {what} (bundled: {}); an installed plugin is `installed:<name>`",
                    list.join(", ")
                ))
            }
        };
        for (name, keys) in &pipeline.config {
            let at = format!("config.{name}");
            if !embedded::AGENTS.contains(&name.as_str()) && !embedded::VALIDATORS.contains(&name.as_str()) {
                return Err(RunRefused::Invalid(format!(
                    "{at}: `{name}` is not a bundled plugin; an installed plugin's configuration is its install's grants"
                )));
            }
            let plugin = self.bundled(name).await.map_err(|e| RunRefused::Store(e.message))?;
            let asked = &plugin.manifest().capabilities.config;
            if let Some(key) = keys.keys().find(|k| !asked.contains(k)) {
                let asked = if asked.is_empty() { "none".to_string() } else { asked.join(", ") };
                return Err(RunRefused::Invalid(format!(
                    "{at}: `{name}` reads no config key `{key}` (it reads: {asked})"
                )));
            }
        }
        for (i, step) in pipeline.steps.iter().enumerate() {
            let at = format!("steps[{i}] (`{}`)", step.name);
            if let Ok(PluginRef::Bundled(role)) = pipeline::plugin_ref(&step.role)
                && step.shards() > 1
                && !FANS_OUT.contains(&role)
            {
                return Err(RunRefused::Invalid(format!(
                    "{at}: fan-out: the bundled `{role}` role does not split its work into shards (of the bundled roles, {} does); an installed role may, by reading its `shard` option",
                    FANS_OUT.join(", ")
                )));
            }
            let checks = std::iter::once(("role", step.role.as_str(), Kind::Agent))
                .chain(step.validators.iter().map(|v| ("validators", v.as_str(), Kind::Validator)))
                .chain(step.tools.iter().map(|t| ("tools", t.as_str(), Kind::Tool)));
            for (field, reference, kind) in checks {
                let parsed =
                    if field == "tools" { pipeline::tool_ref(reference) } else { pipeline::plugin_ref(reference) };
                let found = match parsed.map_err(|e| RunRefused::Invalid(format!("{at}: {field}: {e}")))? {
                    PluginRef::Bundled(name) if kind == Kind::Agent => bundled(name, embedded::AGENTS, "role"),
                    PluginRef::Bundled(name) => bundled(name, embedded::VALIDATORS, "validator"),
                    PluginRef::Installed { name, digest } => match self.marketplace.get(tenant, name).await {
                        Ok(install) => check_install(&install, kind, digest),
                        Err(e)
                            if matches!(
                                e.downcast_ref(),
                                Some(qlayer_marketplace::InstallError::NotInstalled { .. })
                            ) =>
                        {
                            Err(format!("no plugin `{name}` is installed for this tenant"))
                        }
                        Err(e) => return Err(RunRefused::Store(format!("{e:#}"))),
                    },
                };
                found.map_err(|e| RunRefused::Invalid(format!("{at}: {field}: {e}")))?;
            }
        }
        Ok(())
    }

    /// A step's agent (or one shard of it): its ancestors' files (and, repairing, its step's), the
    /// review's errors that are its to fix, the tools its step grants.
    async fn agent(
        &self,
        run: &Run<'_>,
        ctx: &TaskContext,
        step: &Step,
        shard: Option<Shard>,
        round: u32,
    ) -> Result<TaskResult, TaskError> {
        // The task's base name: the step's, or its shard's (`developer-shard-2`).
        let base = shard.map_or_else(|| step.name.clone(), |s| step.shard_task(s.index));
        let Run { task, input, pipeline, outputs, .. } = *run;
        if let Some(skipped) = rejected_before(pipeline, outputs, step, round) {
            return Ok(skipped);
        }
        let tenant = self.tenant_name(&task.tenant_id).await.map_err(TaskError::fatal)?;
        // What earlier steps spent counts against the run's budget.
        let budget = match input.token_budget {
            Some(budget) => {
                let spent = finished_steps(run.all)
                    .map_err(TaskError::fatal)?
                    .iter()
                    .fold(TokenCount::default(), |sum, s| sum.plus(s.tokens))
                    .total();
                if spent >= budget {
                    return Err(fatal(format!("the run's token budget of {budget} is spent ({spent} tokens used)")));
                }
                Some(budget - spent)
            }
            None => None,
        };
        let agent = within(self.pipeline_plugin(&tenant, pipeline, &step.role, Kind::Agent).await?, ctx);
        let mut priced = None;
        let router = Arc::new(match (&step.model, self.gateway()) {
            (Some(model), Some(gateway)) => {
                let caller = Caller {
                    tenant_id: task.tenant_id.clone(),
                    tenant_name: tenant.clone(),
                    key_id: format!("run:{}", task.job_id),
                };
                let table = Arc::new(TableModel::new(gateway, caller, model, agent.timeout()));
                priced = Some(table.clone());
                Router::through(table, budget)
            }
            (Some(model), None) => {
                let provider = self.provider(input, &tenant).await?;
                let upstream =
                    UpstreamModel { router: Router::new(vec![within(provider, ctx)], None), model: model.clone() };
                Router::through(Arc::new(upstream), budget)
            }
            // A step on a model of the table does not load the run's provider.
            (None, _) => Router::new(vec![within(self.provider(input, &tenant).await?, ctx)], budget),
        });
        let ancestors = pipeline.ancestors(step);
        let own = (round > 0).then(|| (step, round - 1));
        let (inputs, _) = outputs.files(&ancestors, round, own).map_err(TaskError::fatal)?;
        let feedback = match round {
            0 => vec![],
            _ => {
                let everyone: Vec<&Step> = pipeline.steps.iter().collect();
                let (_, owners) = outputs.files(&everyone, round - 1, None).map_err(TaskError::fatal)?;
                let review = outputs.latest(&round_name("review", round - 1), 0);
                let errors = review.map(|r| r.feedback.as_slice()).unwrap_or_default();
                // An error in a file this step owns is its to fix; one in a file no repeated
                // step owns (or in no file), or a failing test's assertion, goes to every
                // repeated step.
                errors
                    .iter()
                    .filter(|d| {
                        // A rejection's validator is its gate (`approve-<step>`); a validator
                        // plugin may have a name like that too, so the rule is checked as well.
                        let gated = d
                            .validator
                            .strip_prefix(pipeline::GATE_PREFIX)
                            .filter(|g| d.rule == REJECTED && pipeline.step(g).is_some_and(|s| s.gate));
                        match (gated, d.path.as_ref().and_then(|p| owners.get(p))) {
                            // A rejection at a gate is the gated step's to answer (each shard's).
                            (Some(gated), _) => gated == step.name,
                            // A failing assertion sits in the test, but the code it tests
                            // may be what is wrong: every repeated step sees it.
                            (None, Some(_)) if d.rule == factory::TEST_FAILED => true,
                            // The owner is the task that wrote the file: a step, or one shard.
                            // A message that names a file of this task's (an import that
                            // `pyproject.toml` does not declare) is its to fix too: with a
                            // fanned-out step, the manifest may be another shard's.
                            (None, Some(owner)) => {
                                owner == &base
                                    || !pipeline.agent_step(owner).is_some_and(|s| pipeline.repeats(&s.name))
                                    || owners.iter().any(|(path, o)| o == &base && names_file(&d.message, path))
                            }
                            (None, None) => true,
                        }
                    })
                    .map(DiagnosticReport::diagnostic)
                    .collect()
            }
        };
        let label = factory::step_label(&base, round);
        // A shard with nothing to fix in a repair round keeps its files: its share of the plan
        // was written against the design, and asking the model again would only spend tokens.
        if let Some(s) = shard
            && round > 0
            && feedback.is_empty()
            && let Some(previous) = outputs.latest(&base, round - 1)
        {
            let summary = format!(
                "shard {} of {}: no finding is its to fix; its {} files are kept",
                s.index,
                s.of,
                previous.artifacts.len()
            );
            let report =
                factory::step_report(&label, &agent, Instant::now(), TokenCount::default(), Ok(summary.as_str()));
            return Ok(serde_json::json!({
                "step": report, "artifacts": previous.artifacts, "diagnostics": previous.diagnostics,
            })
            .into());
        }
        let run_options = input.options.as_ref().map(|o| o.to_string()).unwrap_or_else(|| "{}".into());
        let job_task = qlayer_runtime::Task {
            requirement: input.requirement.clone(),
            inputs,
            feedback,
            options_json: pipeline.options_for(step, &run_options, shard),
        };
        let tools = match step.tools.is_empty() {
            true => None,
            false => Some(Arc::new(self.step_tools(&tenant, &task.tenant_id, step, ctx).await?)),
        };
        let access = match &tools {
            None => factory::Access::router(router),
            Some(tools) => factory::Access {
                llm: Arc::new(factory::tools::ToolLoop::new(
                    router.clone(),
                    tools.clone(),
                    step.tool_rounds.unwrap_or(pipeline::DEFAULT_TOOL_ROUNDS),
                )),
                router,
                tools: Some(tools.clone()),
            },
        };
        let (mut report, result) = factory::agent_step(&label, &agent, access, &task.tenant_id, job_task).await;
        report.tool_calls = tools.as_ref().map_or(0, |t| t.calls());
        report.cost = priced.as_ref().map(|t| t.cost_nanos() as f64 / 1e9);
        let out = result.map_err(|e| task_error(&e))?;
        // A reviewer's findings count as validators' diagnostics do.
        let found =
            factory::findings(&out.artifacts, &step.name).map_err(|e| fatal(format!("step `{}`: {e}", step.name)))?;
        let artifacts: Vec<StoredArtifact> = out.artifacts.iter().map(StoredArtifact::from).collect();
        Ok(serde_json::json!({ "step": report, "artifacts": artifacts, "diagnostics": found }).into())
    }

    /// The tools `step` grants, loaded for this attempt.
    async fn step_tools(
        &self,
        tenant: &str,
        tenant_id: &str,
        step: &Step,
        ctx: &TaskContext,
    ) -> Result<StepTools, TaskError> {
        let mut tools = Vec::new();
        for reference in &step.tools {
            let PluginRef::Installed { name, digest } = pipeline::tool_ref(reference).map_err(fatal)? else {
                return Err(fatal(format!("tool `{reference}` is not an installed tool")));
            };
            let installed = within(self.installed(tenant, name, Kind::Tool, digest).await?, ctx);
            let manifest = installed.plugin().manifest();
            let info = ToolInfo {
                name: name.to_string(),
                description: manifest.tool_description().to_string(),
                input_schema_json: serde_json::Value::Object(manifest.tool_input_schema()).to_string(),
            };
            tools.push((info, installed));
        }
        Ok(StepTools {
            tenant_id: tenant_id.to_string(),
            tools,
            calls: std::sync::atomic::AtomicU32::new(0),
            admission: self.admission.get().cloned(),
        })
    }

    /// A validator after `step`: the files of the step and its ancestors.
    async fn validate(
        &self,
        run: &Run<'_>,
        ctx: &TaskContext,
        step: &Step,
        validator: &str,
        round: u32,
    ) -> Result<TaskResult, TaskError> {
        let Run { task, pipeline, outputs, .. } = *run;
        if let Some(skipped) = rejected_before(pipeline, outputs, step, round) {
            return Ok(skipped);
        }
        let tenant = self.tenant_name(&task.tenant_id).await.map_err(TaskError::fatal)?;
        let plugin = within(self.pipeline_plugin(&tenant, pipeline, validator, Kind::Validator).await?, ctx);
        let mut steps = pipeline.ancestors(step);
        steps.push(step);
        let (files, _) = outputs.files(&steps, round, None).map_err(TaskError::fatal)?;
        let name = pipeline::plugin_ref(validator).map(|r| r.name().to_string()).unwrap_or_default();
        let mut label = factory::validate_step_name(&name);
        if pipeline.validator_task(step, validator) != format!("validate-{name}") {
            label = format!("{label} (after {})", step.name);
        }
        let (report, result) = factory::validate_step(&label, &plugin, &task.tenant_id, &files).await;
        let found = result.map_err(|e| task_error(&e))?;
        Ok(serde_json::json!({ "step": report, "diagnostics": found }).into())
    }

    /// The end of a round: another round while validator errors remain and rounds are left,
    /// else the report and the capsule.
    async fn review(&self, run: &Run<'_>, round: u32) -> Result<TaskResult, TaskError> {
        let Run { task, created_at, input, pipeline, outputs, .. } = *run;
        // The validators' diagnostics and the agents' findings (a reviewer's), each at its
        // latest round; one of each when two validators report the same.
        let mut diagnostics: Vec<DiagnosticReport> = Vec::new();
        let bases = pipeline.validator_tasks().into_iter().map(|(base, _)| base);
        let agents = pipeline.steps.iter().flat_map(Step::agent_tasks);
        for out in bases.chain(agents).filter_map(|b| outputs.latest(&b, round)) {
            for d in &out.diagnostics {
                if !diagnostics.iter().any(|seen| seen == d) {
                    diagnostics.push(d.clone());
                }
            }
        }
        // A gate rejected in this round: its comment is an error, the gated step's to answer.
        for step in pipeline.steps.iter().filter(|s| s.gate) {
            let gate = round_name(&Pipeline::gate_task(step), round);
            if let Some(GateDecision { approved: false, comment, .. }) =
                outputs.done.get(&gate).and_then(|o| o.decision.clone())
            {
                diagnostics.push(DiagnosticReport {
                    severity: "error".into(),
                    rule: REJECTED.into(),
                    path: None,
                    line: None,
                    column: None,
                    message: format!("rejected at the gate after `{}`: {}", step.name, comment.unwrap_or_default()),
                    validator: Pipeline::gate_task(step),
                });
            }
        }
        let errors: Vec<&DiagnosticReport> = diagnostics.iter().filter(|d| d.is_error()).collect();
        let repeated = pipeline.repair_steps();
        if !errors.is_empty() && round < pipeline.rounds(input.max_repair_rounds) && !repeated.is_empty() {
            let next: Vec<String> = repeated.iter().map(|s| factory::step_label(&s.name, round + 1)).collect();
            return Ok(TaskResult {
                output: serde_json::json!({
                    "round": round, "errors": errors.len(), "next": next.join(", "), "feedback": errors,
                })
                .into(),
                then: run_tasks(pipeline, round + 1, task.max_attempts),
                ..Default::default()
            });
        }
        let tenant = self.tenant_name(&task.tenant_id).await.map_err(TaskError::fatal)?;
        let provider = self.choice(input, &tenant);
        let steps = finished_steps(run.all).map_err(TaskError::fatal)?;
        let everyone: Vec<&Step> = pipeline.steps.iter().collect();
        let (files, _) = outputs.files(&everyone, round, None).map_err(TaskError::fatal)?;
        let unchecked = outputs.unchecked(pipeline, round, &files).map_err(TaskError::fatal)?;
        let (status, stop_reason) = factory::verdict(&diagnostics, round, &unchecked);
        let file_reports = factory::file_reports(&files).map_err(|e| fatal(format!("{e:#}")))?;
        let report = RunReport {
            requirement: input.requirement.clone(),
            status: status.to_string(),
            stop_reason,
            provider: provider.label(),
            pipeline: pipeline.name.clone(),
            repair_rounds: round,
            tokens: steps.iter().fold(TokenCount::default(), |sum, s| sum.plus(s.tokens)),
            cost: steps.iter().filter_map(|s| s.cost).reduce(|a, b| a + b),
            currency: steps
                .iter()
                .any(|s| s.cost.is_some())
                .then(|| self.gateway().map(|g| g.currency().to_string()))
                .flatten(),
            steps,
            diagnostics,
            files: file_reports,
            unchecked,
            duration_ms: (now_ms() - created_at).max(0) as u64,
            started_at: (created_at / 1000).max(0) as u64,
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

/// The bundled roles that write only their shard's share of the file plan when their step fans
/// out.
const FANS_OUT: &[&str] = &["developer"];

/// Whether `message` names the file `path` as a whole (`pyproject.toml`, not `x/pyproject.toml`).
fn names_file(message: &str, path: &str) -> bool {
    let part = |c: char| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '/');
    message.match_indices(path).any(|(at, _)| {
        let before_ok = !message[..at].chars().next_back().is_some_and(part);
        let rest = &message[at + path.len()..];
        let after_ok = match rest.chars().next() {
            None => true,
            // A sentence's full stop ends the name.
            Some('.') => !rest[1..].chars().next().is_some_and(part),
            Some(c) => !part(c),
        };
        before_ok && after_ok
    })
}

/// The output of a step that does not run because a gate before it was rejected in `round`
/// (the next round repeats it), or `None` when it runs.
fn rejected_before(pipeline: &Pipeline, outputs: &RunOutputs, step: &Step, round: u32) -> Option<TaskResult> {
    let rejected = pipeline.gates_before(step).into_iter().find(|gated| {
        let gate = round_name(&Pipeline::gate_task(gated), round);
        outputs.done.get(&gate).and_then(|o| o.decision.as_ref()).is_some_and(|d| !d.approved)
    })?;
    let why = format!("the gate after `{}` was rejected in this round", rejected.name);
    Some(serde_json::json!({ "skipped": why }).into())
}

impl PluginExecutor {
    /// An approval gate, once a person decided (the decision is its input): it records the
    /// decision; on a rejection the steps after it skip this round, and the review sends the
    /// comment back to the gated step.
    fn gate(task: &Task, step: &Step) -> Result<TaskResult, TaskError> {
        let decision: GateDecision =
            task.input.read().map_err(|e| fatal(format!("the gate after `{}` has no decision: {e}", step.name)))?;
        Ok(serde_json::json!({ "decision": decision }).into())
    }
}

/// The run's provider asked for a step's `model` (where there is no gateway: `qlayer run`).
struct UpstreamModel {
    router: Router,
    model: String,
}

impl qlayer_runtime::LlmHandler for UpstreamModel {
    fn complete<'a>(
        &'a self,
        tenant: &'a str,
        mut request: qlayer_runtime::CompletionRequest,
    ) -> BoxFuture<'a, Result<qlayer_runtime::Completion, PluginError>> {
        request.model = self.model.clone();
        self.router.complete(tenant, request)
    }
}

/// What a step of a run is given to work with.
#[derive(Clone, Copy)]
struct Run<'a> {
    task: &'a Task,
    /// When the run's job was submitted (unix ms).
    created_at: i64,
    input: &'a RunInput,
    pipeline: &'a Pipeline,
    outputs: &'a RunOutputs,
    all: &'a [Task],
}

/// The tools a step grants its agent: each call takes its turn in the scheduler's fair sharing
/// between tenants and runs in the tool's own sandboxed instance, with its install's grants and
/// limits, within the step's deadline.
struct StepTools {
    tenant_id: String,
    tools: Vec<(ToolInfo, Installed)>,
    calls: std::sync::atomic::AtomicU32,
    /// Where each call takes its turn among the tenants (none: a bare executor, in tests).
    admission: Option<Arc<qlayer_scheduler::interactive::Admission>>,
}

impl StepTools {
    /// Calls made so far.
    fn calls(&self) -> u32 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl ToolHandler for StepTools {
    fn list<'a>(&'a self, _tenant: &'a str) -> BoxFuture<'a, Vec<ToolInfo>> {
        Box::pin(async move { self.tools.iter().map(|(info, _)| info.clone()).collect() })
    }

    fn invoke<'a>(
        &'a self,
        _tenant: &'a str,
        name: &'a str,
        input_json: &'a str,
    ) -> BoxFuture<'a, Result<String, PluginError>> {
        Box::pin(async move {
            let Some((_, installed)) = self.tools.iter().find(|(info, _)| info.name == name) else {
                let granted: Vec<&str> = self.tools.iter().map(|(info, _)| info.name.as_str()).collect();
                return Err(PluginError::InvalidInput(format!(
                    "tool `{name}` is not granted to this step (granted: {})",
                    granted.join(", ")
                )));
            };
            self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _turn = match &self.admission {
                Some(admission) => Some(admission.admit(&self.tenant_id).await),
                None => None,
            };
            let started = Instant::now();
            let outcome = async {
                let mut tool = installed.any_tool(&self.tenant_id).await?;
                tool.invoke(input_json).await
            }
            .await
            .map_err(|e| e.to_plugin_error());
            record_tool_call(name, outcome.is_ok(), started.elapsed());
            outcome
        })
    }
}

#[cfg(test)]
mod tests {
    use super::names_file;

    #[test]
    fn a_message_names_a_file_only_as_a_whole() {
        let m = "`requests` is imported but pyproject.toml does not declare it";
        assert!(names_file(m, "pyproject.toml"));
        assert!(names_file("declare it in `pyproject.toml`.", "pyproject.toml"));
        assert!(names_file("declare it in pyproject.toml.", "pyproject.toml"));
        assert!(!names_file(m, "toml"));
        assert!(!names_file("declare it in app/pyproject.toml", "pyproject.toml"));
        assert!(!names_file("see pyproject.toml.bak", "pyproject.toml"));
    }
}
