//! The CLI's work through the core scheduler: `qlayer run` and `qlayer plugin call` submit a job
//! to a scheduler in their own process, on a scratch SQLite database that goes away with it. A
//! run is the service's run — the same DAG of step tasks, leases, retries with backoff, circuit
//! breakers and repair rounds — with the provider given by the command line (flags, an API key)
//! and never stored; a call is the service's one-task call job.

use anyhow::Context as _;
use qlayer_bundled::ProviderChoice;
use qlayer_db::{Db, Job, JobEvent, JobKind, JobStatus, JsonText, Task, TaskStatus};
use qlayer_factory::{RunReport, StepReport};
use qlayer_gateway::TokenCount;
use qlayer_jobs::{self as jobs, JobLimits, JobRunner, PluginExecutor, RunInput};
use qlayer_marketplace::Marketplace;
use qlayer_runtime::{Kind, Runtime};
use qlayer_scheduler::SchedulerConfig;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// What to run.
pub struct LocalRun {
    /// The runtime (its compile cache is the data dir's).
    pub runtime: Arc<Runtime>,
    /// Where installed plugins come from (an installed provider).
    pub marketplace: Marketplace,
    /// The model provider every step uses.
    pub provider: ProviderChoice,
    /// The tenant the run belongs to (whose installs it may use).
    pub tenant: String,
    /// The run.
    pub input: RunInput,
    /// Decides at each approval gate the run reaches (the gate task's name, `approve-<step>`).
    pub gate: Box<Decide>,
}

/// Decides at an approval gate, given the gate's task name.
pub type Decide = dyn FnMut(&str) -> anyhow::Result<jobs::GateDecision> + Send;

/// What the run is doing, as it happens.
#[derive(Debug)]
pub enum Update {
    /// A step started (attempt 2 and on: a retry).
    Started {
        /// The task's name.
        task: String,
        /// Its attempt.
        attempt: i64,
    },
    /// A step finished.
    Step {
        /// The task's name.
        task: String,
        /// What it did.
        report: StepReport,
    },
    /// A task that is not a step finished (a gate, a round's review, a step a rejected gate
    /// skipped).
    Ended {
        /// The task's name.
        task: String,
    },
    /// The review found errors and planned another round.
    Repair {
        /// The round planned.
        round: u32,
        /// Validator errors it is to fix.
        errors: u64,
    },
    /// A step's attempt failed (it may be retried).
    Failed {
        /// The task's name.
        task: String,
        /// Why.
        error: String,
    },
}

/// How the run ended.
pub struct Finished {
    /// The report: the job's output, or, when a step failed, a `failed` report naming why.
    pub report: RunReport,
    /// The tar.gz capsule (files and report) of a run that got to its review.
    pub capsule: Option<Vec<u8>>,
}

/// Called as a job goes on, with its new events and all its tasks.
type Follow<'a> = dyn FnMut(&[JobEvent], &[Task]) -> anyhow::Result<()> + Send + 'a;

/// A scheduler of this process's own, on a scratch SQLite database that goes with it.
struct Local {
    _scratch: tempfile::TempDir,
    db: Db,
}

impl Local {
    async fn open() -> anyhow::Result<Local> {
        let scratch = tempfile::Builder::new().prefix("qlayer-").tempdir().context("creating a scratch directory")?;
        let db = Db::open_sqlite(&scratch.path().join("jobs.db")).await?;
        Ok(Local { _scratch: scratch, db })
    }

    /// Starts a scheduler running `executor`'s tasks, submits one job for `tenant` and follows it
    /// to its end, calling `each` with the job's tasks whenever something happened.
    async fn job(
        &self,
        executor: PluginExecutor,
        tenant: &str,
        kind: JobKind,
        input: &serde_json::Value,
        each: &mut Follow<'_>,
        mut gate: Option<&mut Decide>,
    ) -> anyhow::Result<(Job, Vec<Task>)> {
        let db = &self.db;
        let tenant = db.create_tenant(tenant).await.with_context(|| format!("tenant `{tenant}`"))?;
        let config = SchedulerConfig { node_id: format!("cli-{}", std::process::id()), ..SchedulerConfig::default() };
        let runner = JobRunner::new(executor, config);
        runner.start().await?;
        let mut wake = runner.subscribe();
        let submitted = runner.submit(&tenant.id, kind, input, 0, None, JobLimits::default()).await;
        let (job, _) = submitted.map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut after = 0;
        let outcome = loop {
            // The job first: once it has ended, the events and tasks read next are its last.
            let current = db.job(&tenant.id, &job.id).await?.context("the job disappeared")?;
            let events = db.job_events(&tenant.id, &job.id, after).await?;
            after = events.last().map(|e| e.seq).unwrap_or(after);
            let tasks = db.job_tasks(&tenant.id, &job.id).await?;
            each(&events, &tasks)?;
            if current.status.is_terminal() {
                break (current, tasks);
            }
            if current.status == JobStatus::Waiting
                && let Some(decide) = gate.as_deref_mut()
            {
                let held = tasks.iter().find(|t| t.kind == qlayer_db::GATE_KIND && t.status == TaskStatus::Waiting);
                let name = held.map(|t| t.name.clone()).unwrap_or_default();
                // The decision may wait for a person at the terminal.
                let decision = match tokio::task::block_in_place(|| decide(&name)) {
                    Ok(decision) => decision,
                    Err(e) => {
                        runner.shutdown(Duration::from_secs(1)).await;
                        return Err(e);
                    }
                };
                decision.check().map_err(anyhow::Error::msg)?;
                let kind = if decision.approved { "approved" } else { "rejected" };
                runner.scheduler().decide_gate(&tenant.id, &job.id, &serde_json::to_value(&decision)?, kind).await?;
                continue;
            }
            // A new event wakes the loop at once; the timeout covers announcements it missed.
            let _ = tokio::time::timeout(Duration::from_millis(250), wake.recv()).await;
        };
        runner.shutdown(Duration::from_secs(1)).await;
        Ok(outcome)
    }

    async fn close(self) {
        self.db.close().await;
    }
}

/// Calls the tool `plugin`, installed for `tenant` in `marketplace`, with `input` (given to the
/// plugin verbatim) as a one-task job through a scheduler in this process: retryable failures
/// are retried with backoff, like the service's calls. Returns the tool's output.
pub async fn call(
    runtime: Arc<Runtime>,
    marketplace: Marketplace,
    tenant: &str,
    plugin: &str,
    input: &str,
) -> anyhow::Result<JsonText> {
    let install = marketplace.get(tenant, plugin).await?;
    if install.kind != Kind::Tool {
        anyhow::bail!("plugin `{plugin}` is a {} plugin; `qlayer plugin call` invokes tool plugins", install.kind);
    }
    let local = Local::open().await?;
    let executor = PluginExecutor::new(local.db.clone(), runtime, Arc::new(marketplace));
    let job_input = serde_json::json!({ "plugin": plugin, "input": input });
    let outcome = local.job(executor, tenant, JobKind::Call, &job_input, &mut |_, _| Ok(()), None).await;
    local.close().await;
    let (job, _) = outcome?;
    match job.status {
        JobStatus::Succeeded => Ok(job.output.unwrap_or_default()),
        status => Err(anyhow::anyhow!(job.error.unwrap_or_else(|| format!("the call was {}", status.as_str())))),
    }
}

/// Runs `run` through a scheduler in this process, calling `on` as steps start and finish.
pub async fn run(run: LocalRun, on: &(dyn Fn(Update) + Send + Sync)) -> anyhow::Result<Finished> {
    let local = Local::open().await?;
    let label = run.provider.label();
    let executor =
        PluginExecutor::new(local.db.clone(), run.runtime, Arc::new(run.marketplace)).with_provider(run.provider);
    let input = serde_json::to_value(&run.input)?;
    let mut seen = HashSet::new();
    let mut each = |events: &[JobEvent], tasks: &[Task]| -> anyhow::Result<()> {
        for event in events {
            let task = event.data["task"].as_str().unwrap_or_default();
            // The review, the end of a round, is not a step (a step may be named `reviewer`).
            if event.kind == "started" && qlayer_factory::pipeline::split_round(task).0 != "review" {
                on(Update::Started { task: task.to_string(), attempt: event.data["attempt"].as_i64().unwrap_or(1) });
            }
        }
        for task in tasks {
            let key = (task.id.clone(), task.attempts, task.status.as_str());
            if !matches!(task.status, TaskStatus::Succeeded | TaskStatus::Failed) || !seen.insert(key) {
                continue;
            }
            // A factory step's output is small: read it whole.
            let output = task.output.as_ref().map(JsonText::to_value);
            let output = output.as_ref();
            match (task.status, output.and_then(|o| o.get("step"))) {
                (TaskStatus::Succeeded, Some(step)) => {
                    on(Update::Step { task: task.name.clone(), report: serde_json::from_value(step.clone())? })
                }
                (TaskStatus::Succeeded, None) => {
                    on(Update::Ended { task: task.name.clone() });
                    if let Some(errors) = output.and_then(|o| o.get("errors")).and_then(|e| e.as_u64()) {
                        let round = output.and_then(|o| o["round"].as_u64()).unwrap_or(0) as u32 + 1;
                        on(Update::Repair { round, errors });
                    }
                }
                _ => on(Update::Failed { task: task.name.clone(), error: task.error.clone().unwrap_or_default() }),
            }
        }
        Ok(())
    };
    let mut gate = run.gate;
    let outcome = local.job(executor, &run.tenant, JobKind::Run, &input, &mut each, Some(&mut *gate)).await;
    let capsule = match &outcome {
        Ok((job, _)) if job.status == JobStatus::Succeeded => {
            local.db.artifact(&job.tenant_id, &job.id).await?.map(|a| a.bytes)
        }
        _ => None,
    };
    local.close().await;
    let (job, tasks) = outcome?;
    if job.status == JobStatus::Succeeded {
        let output = job.output.context("the run ended without a report")?;
        let report: RunReport = output.read().context("the run's report")?;
        return Ok(Finished { report, capsule });
    }
    // A step failed (or gave up): report what ran and why it stopped.
    let pipeline = run.input.pipeline().ok().and_then(|p| p.name);
    let steps = jobs::finished_steps(&tasks).map_err(anyhow::Error::msg)?;
    let rounds = tasks.iter().filter(|t| t.kind == "review" && t.status == TaskStatus::Succeeded).count() as u32;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64)?;
    Ok(Finished {
        report: RunReport {
            requirement: run.input.requirement,
            status: "failed".into(),
            stop_reason: job.error.unwrap_or_else(|| format!("the run was {}", job.status.as_str())),
            provider: label,
            pipeline,
            repair_rounds: rounds,
            tokens: steps.iter().fold(TokenCount::default(), |sum, s| sum.plus(s.tokens)),
            cost: None,
            currency: None,
            steps,
            diagnostics: vec![],
            files: vec![],
            unchecked: vec![],
            duration_ms: (now - job.created_at).max(0) as u64,
            started_at: (job.created_at / 1000).max(0) as u64,
        },
        capsule: None,
    })
}
