//! `qlayer run`: one factory run through the core scheduler, in this process, on a scratch SQLite
//! database that goes away with the run. It is the service's run — the same DAG of step tasks,
//! leases, retries with backoff, circuit breakers and repair rounds — with the provider given by
//! the command line (flags, an API key) and never stored.

use crate::embedded::ProviderChoice;
use crate::factory::{RunReport, StepReport};
use crate::jobs::{self, JobLimits, JobRunner, PluginExecutor, RunInput};
use crate::marketplace::Marketplace;
use crate::router::TokenCount;
use crate::runtime::Runtime;
use crate::scheduler::SchedulerConfig;
use anyhow::Context as _;
use qlayer_db::{Db, JobKind, JobStatus, TaskStatus};
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
}

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
    Step(StepReport),
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

/// Runs `run` through a scheduler on a scratch database, calling `on` as steps start and finish.
pub async fn run(run: LocalRun, on: &(dyn Fn(Update) + Send + Sync)) -> anyhow::Result<Finished> {
    let scratch = tempfile::Builder::new().prefix("qlayer-run-").tempdir().context("creating a scratch directory")?;
    let db = Db::open_sqlite(&scratch.path().join("run.db")).await?;
    let outcome = run_on(&db, run, on).await;
    db.close().await;
    outcome
}

async fn run_on(db: &Db, run: LocalRun, on: &(dyn Fn(Update) + Send + Sync)) -> anyhow::Result<Finished> {
    let tenant = db.create_tenant(&run.tenant).await.with_context(|| format!("tenant `{}`", run.tenant))?;
    let label = run.provider.label();
    let executor = PluginExecutor::new(db.clone(), run.runtime, Arc::new(run.marketplace)).with_provider(run.provider);
    let config = SchedulerConfig { node_id: format!("cli-{}", std::process::id()), ..SchedulerConfig::default() };
    let runner = JobRunner::new(executor, config);
    runner.start().await?;
    let mut wake = runner.subscribe();
    let input = serde_json::to_value(&run.input)?;
    let (job, _) = runner
        .submit(&tenant.id, JobKind::Run, &input, 0, None, JobLimits::default())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let (mut after, mut seen) = (0, HashSet::new());
    let job = loop {
        for event in db.job_events(&tenant.id, &job.id, after).await? {
            after = event.seq;
            let task = event.data["task"].as_str().unwrap_or_default();
            if event.kind == "started" && !task.starts_with("review") {
                on(Update::Started { task: task.to_string(), attempt: event.data["attempt"].as_i64().unwrap_or(1) });
            }
        }
        let tasks = db.job_tasks(&tenant.id, &job.id).await?;
        for task in &tasks {
            let key = (task.id.clone(), task.attempts, task.status.as_str());
            if !matches!(task.status, TaskStatus::Succeeded | TaskStatus::Failed) || !seen.insert(key) {
                continue;
            }
            let output = task.output.as_ref();
            match (task.status, output.and_then(|o| o.get("step"))) {
                (TaskStatus::Succeeded, Some(step)) => on(Update::Step(serde_json::from_value(step.clone())?)),
                (TaskStatus::Succeeded, None) => {
                    if let Some(errors) = output.and_then(|o| o.get("errors")).and_then(|e| e.as_u64()) {
                        let round = output.and_then(|o| o["round"].as_u64()).unwrap_or(0) as u32 + 1;
                        on(Update::Repair { round, errors });
                    }
                }
                _ => on(Update::Failed { task: task.name.clone(), error: task.error.clone().unwrap_or_default() }),
            }
        }
        let current = db.job(&tenant.id, &job.id).await?.context("the run's job disappeared")?;
        if current.status.is_terminal() {
            break current;
        }
        // A new event wakes the loop at once; the timeout covers announcements it missed.
        let _ = tokio::time::timeout(Duration::from_millis(250), wake.recv()).await;
    };
    runner.shutdown(Duration::from_secs(1)).await;

    if job.status == JobStatus::Succeeded {
        let output = job.output.context("the run ended without a report")?;
        let report: RunReport = serde_json::from_value(output).context("the run's report")?;
        let capsule = db.artifact(&tenant.id, &job.id).await?.map(|a| a.bytes);
        return Ok(Finished { report, capsule });
    }
    // A step failed (or gave up): report what ran and why it stopped.
    let tasks = db.job_tasks(&tenant.id, &job.id).await?;
    let steps = jobs::finished_steps(&tasks).map_err(anyhow::Error::msg)?;
    let rounds = tasks.iter().filter(|t| t.kind == "review" && t.status == TaskStatus::Succeeded).count() as u32;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64)?;
    Ok(Finished {
        report: RunReport {
            requirement: run.input.requirement,
            status: "failed".into(),
            stop_reason: job.error.unwrap_or_else(|| format!("the run was {}", job.status.as_str())),
            provider: label,
            repair_rounds: rounds,
            tokens: steps.iter().fold(TokenCount::default(), |sum, s| sum.plus(s.tokens)),
            steps,
            diagnostics: vec![],
            files: vec![],
            duration_ms: (now - job.created_at).max(0) as u64,
            started_at: (job.created_at / 1000).max(0) as u64,
        },
        capsule: None,
    })
}
