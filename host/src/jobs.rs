//! Runs the jobs the service accepts: a job is persisted (`queued`) before it is acknowledged,
//! then runs when a worker slot is free; its progress is stored as events and announced to event
//! streams; its output (and a run's tar.gz capsule) is stored with it. Cancelling drops the work
//! in progress: a plugin call stops at its next epoch tick.
//!
//! This is the service's in-process executor. At start it picks up the jobs a previous process
//! left queued or running. Leases, fair sharing between tenants, retries and several nodes are
//! the core scheduler's (issue 5).

use crate::embedded::{self, ProviderChoice};
use crate::factory::{self, Progress, RunRequest};
use crate::marketplace::Marketplace;
use crate::runtime::{Kind, Runtime};
use qlayer_db::{Db, Job, JobKind, JobStatus};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{Semaphore, broadcast, watch};

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

/// What the executor needs.
pub struct JobRunner {
    db: Db,
    runtime: Arc<Runtime>,
    marketplace: Arc<Marketplace>,
    data_dir: PathBuf,
    slots: Arc<Semaphore>,
    cancels: Mutex<HashMap<String, watch::Sender<bool>>>,
    events: broadcast::Sender<String>,
    tasks: tokio::sync::Mutex<tokio::task::JoinSet<()>>,
}

impl std::fmt::Debug for JobRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRunner").field("free_slots", &self.slots.available_permits()).finish()
    }
}

impl JobRunner {
    /// An executor running at most `concurrency` jobs at once.
    pub fn new(
        db: Db,
        runtime: Arc<Runtime>,
        marketplace: Arc<Marketplace>,
        data_dir: PathBuf,
        concurrency: usize,
    ) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(JobRunner {
            db,
            runtime,
            marketplace,
            data_dir,
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
            cancels: Mutex::new(HashMap::new()),
            events,
            tasks: tokio::sync::Mutex::new(tokio::task::JoinSet::new()),
        })
    }

    /// The marketplace jobs load plugins from.
    pub fn marketplace(&self) -> &Arc<Marketplace> {
        &self.marketplace
    }

    /// The runtime jobs run on.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Announcements of new events: the id of the job that has one.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    /// Picks up what a previous process left queued or running.
    pub async fn resume(self: &Arc<Self>) -> Result<usize, qlayer_db::DbError> {
        let jobs = self.db.unfinished_jobs().await?;
        let n = jobs.len();
        for job in jobs {
            self.spawn(job, true).await;
        }
        Ok(n)
    }

    /// Starts a persisted job in the background.
    pub async fn spawn(self: &Arc<Self>, job: Job, restart: bool) {
        let (cancel_tx, cancel_rx) = watch::channel(false);
        self.lock_cancels().insert(job.id.clone(), cancel_tx);
        let this = self.clone();
        let mut tasks = self.tasks.lock().await;
        // Reap finished ones so the set holds only live jobs.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            let id = job.id.clone();
            this.drive(job, restart, cancel_rx).await;
            this.lock_cancels().remove(&id);
        });
    }

    /// Stops a job's work in progress (its status is already `cancelled` in the store).
    pub fn cancel(&self, job_id: &str) {
        if let Some(tx) = self.lock_cancels().get(job_id) {
            let _ = tx.send(true);
        }
        let _ = self.events.send(job_id.to_string());
    }

    /// Waits up to `grace` for running jobs; what is left stays queued or running in the store
    /// and is picked up at the next start.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        let mut tasks = self.tasks.lock().await;
        let all_done = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            tracing::warn!("jobs still running at the end of the grace period are handed back to the next start");
        }
        tasks.abort_all();
    }

    fn lock_cancels(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<bool>>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn event(&self, job_id: &str, kind: &str, data: serde_json::Value) {
        if let Err(e) = self.db.add_job_event(job_id, kind, &data).await {
            tracing::error!(job = job_id, error = %e, "storing a job event failed");
        }
        let _ = self.events.send(job_id.to_string());
    }

    async fn drive(self: &Arc<Self>, job: Job, restart: bool, mut cancel: watch::Receiver<bool>) {
        let span = tracing::info_span!("job", job = %job.id, kind = job.kind.as_str(), tenant = %job.tenant_id, plugin = tracing::field::Empty);
        let _permit = tokio::select! {
            permit = self.slots.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => return },
            _ = cancel.wait_for(|c| *c) => return,
        };
        match self.db.start_job(&job.id, restart).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(parent: &span, job = %job.id, error = %e, "starting a job failed");
                return;
            }
        }
        self.event(&job.id, "started", serde_json::json!({ "resumed": restart })).await;
        let work = async {
            match job.kind {
                JobKind::Call => self.call(&job, &span).await,
                JobKind::Run => self.run(&job).await,
            }
        };
        let outcome = tokio::select! {
            outcome = work => outcome,
            _ = cancel.wait_for(|c| *c) => return,
        };
        let (status, output, error) = match outcome {
            Ok(output) => (JobStatus::Succeeded, Some(output), None),
            Err(error) => (JobStatus::Failed, None, Some(error)),
        };
        match self.db.finish_job(&job.id, status, output.as_ref(), error.as_deref()).await {
            Ok(true) => {
                let data = match &error {
                    Some(e) => serde_json::json!({ "error": e }),
                    None => serde_json::json!({}),
                };
                self.event(&job.id, status.as_str(), data).await;
                metrics::counter!("qlayer_jobs_finished_total", "kind" => job.kind.as_str(), "status" => status.as_str())
                    .increment(1);
            }
            Ok(false) => {}
            Err(e) => tracing::error!(parent: &span, error = %e, "recording a job's end failed"),
        }
    }

    async fn call(&self, job: &Job, span: &tracing::Span) -> Result<serde_json::Value, String> {
        let input: CallInput = serde_json::from_value(job.input.clone()).map_err(|e| format!("input: {e}"))?;
        span.record("plugin", input.plugin.as_str());
        let tenant = self.tenant_name(&job.tenant_id).await?;
        let started = std::time::Instant::now();
        let outcome = async {
            let installed =
                self.marketplace.load(&self.runtime, &tenant, &input.plugin).map_err(|e| format!("{e:#}"))?;
            let mut tool = installed.any_tool(&job.tenant_id).await.map_err(|e| e.to_string())?;
            let text = match &input.input {
                serde_json::Value::String(s) => s.clone(),
                other => serde_json::to_string(other).map_err(|e| e.to_string())?,
            };
            tool.invoke(&text).await.map_err(|e| e.to_string())
        }
        .await;
        let label = if outcome.is_ok() { "ok" } else { "error" };
        metrics::counter!("qlayer_plugin_calls_total", "plugin" => input.plugin.clone(), "outcome" => label)
            .increment(1);
        metrics::histogram!("qlayer_plugin_call_duration_seconds", "plugin" => input.plugin.clone())
            .record(started.elapsed().as_secs_f64());
        let text = outcome?;
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }

    async fn tenant_name(&self, tenant_id: &str) -> Result<String, String> {
        match self.db.tenant(tenant_id).await {
            Ok(Some(t)) => Ok(t.name),
            Ok(None) => Err("the tenant no longer exists".into()),
            Err(e) => Err(format!("{e}")),
        }
    }

    async fn run(&self, job: &Job) -> Result<serde_json::Value, String> {
        let input: RunInput = serde_json::from_value(job.input.clone()).map_err(|e| format!("input: {e}"))?;
        input.check()?;
        let tenant = self.tenant_name(&job.tenant_id).await?;
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
        let out = self.data_dir.join("runs").join(&job.id);
        let _ = std::fs::remove_dir_all(&out);
        factory::prepare(&input.requirement, &out, true).map_err(|e| format!("{e:#}"))?;
        let request = RunRequest {
            requirement: input.requirement.clone(),
            options_json: input.options.as_ref().map(|o| o.to_string()).unwrap_or_else(|| "{}".into()),
            max_repair_rounds: input.max_repair_rounds.unwrap_or(2),
            tenant: job.tenant_id.clone(),
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
        let progress = move |p: Progress| {
            let data = match p {
                Progress::Started { step } => serde_json::json!({ "step": step, "state": "started" }),
                Progress::Finished(report) => serde_json::json!({
                    "step": report.step, "state": report.outcome, "plugin": report.plugin,
                    "duration_ms": report.duration_ms, "summary": report.summary,
                }),
            };
            let _ = tx.send(data);
        };
        let forward = async {
            while let Some(data) = rx.recv().await {
                self.event(&job.id, "progress", data).await;
            }
        };
        let run = async {
            let report = factory::run(&pipeline, &request, &out, &progress).await;
            drop(progress);
            report
        };
        let (report, ()) = tokio::join!(run, forward);
        let outcome = async {
            let report = report.map_err(|e| format!("{e:#}"))?;
            let capsule = capsule(&out, &job.id).map_err(|e| format!("packing the capsule: {e:#}"))?;
            self.db.put_artifact(&job.id, "application/gzip", &capsule).await.map_err(|e| format!("{e}"))?;
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
