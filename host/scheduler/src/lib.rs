//! The core scheduler: durable DAG jobs, leases, fair sharing, retries, breakers, NATS scale mode.
//! May depend on: `qlayer-db`.
//!
//! The core scheduler: every unit of work (a plugin call, a factory run, a DAG of calls) is a
//! durable job made of tasks, stored before it is acknowledged and run under a lease.
//!
//! - **Durability.** A node leases a task for `lease_ms` and renews its leases on a heartbeat;
//!   a lease names its attempt, so a node that lost it cannot record a late result. A node
//!   keeps its identity across restarts (in its data dir, under a lock), so after a crash it
//!   takes back its own leases at once; leases of other nodes are taken over when they expire.
//!   A graceful stop hands running tasks back without counting the attempt.
//! - **Fairness.** Ready tasks wait in a per-node weighted fair queue ([`fair`]): capacity is
//!   shared between tenants by weight, priorities order work within a tenant, and per-tenant
//!   and global limits cap what runs at once. A full worker pool queues; it never fails work.
//! - **Resilience.** Only retryable errors (rate-limited, unavailable, timeout) are retried, with
//!   exponential backoff, jitter and the plugin's retry-after; circuit breakers ([`breaker`])
//!   hold a failing plugin's tasks back and probe it half-open.
//! - **Deadlines and cancellation** reach a running plugin call: its future is dropped and the
//!   guest stops at its next epoch tick.

pub mod breaker;
pub mod fair;
pub mod interactive;
pub mod nats;

use breaker::{BreakerPolicy, Breakers, State, Transition};
use fair::{Charge, Entry, FairQueue};
use futures::StreamExt as _;
use futures::future::BoxFuture;
pub use qlayer_db::TaskResult;
use qlayer_db::{Db, DbError, Job, Lease, NewJob, Takeover, Task};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, watch};

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// This node's identity (stable across restarts).
    pub node_id: String,
    /// Tasks this node runs at once.
    pub concurrency: usize,
    /// Tasks one tenant may run at once on this node unless its own limit says otherwise (0:
    /// only the global limit).
    pub tenant_concurrency: usize,
    /// How long a lease lasts without renewal, in ms.
    pub lease_ms: i64,
    /// Attempts a task gets by default (leases, counting retries and crashed runs).
    pub max_attempts: i32,
    /// First retry delay, in ms; doubles each attempt.
    pub retry_base_ms: i64,
    /// Longest retry delay, in ms (a plugin's retry-after is honoured up to 10 times this).
    pub retry_max_ms: i64,
    /// Circuit breakers.
    pub breaker: BreakerPolicy,
    /// Open tasks (waiting, ready, running) a tenant may have; more are refused (0: no limit).
    pub max_open_per_tenant: i64,
    /// Scale mode: a NATS URL; tasks then travel on a JetStream work-queue stream.
    pub queue_url: Option<String>,
    /// Scale mode: deliveries of a task message after which it is dead-lettered.
    pub max_deliver: i64,
    /// Interactive requests (the gateway's) this node serves at once, shared fairly between
    /// tenants by the same weights ([`interactive`]); each tenant's `max_running` applies too.
    pub interactive_concurrency: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            node_id: "node".into(),
            concurrency: 16,
            tenant_concurrency: 0,
            lease_ms: 15_000,
            max_attempts: 5,
            retry_base_ms: 200,
            retry_max_ms: 30_000,
            breaker: BreakerPolicy::default(),
            max_open_per_tenant: 10_000,
            queue_url: None,
            max_deliver: 20,
            interactive_concurrency: 512,
        }
    }
}

/// Why a task failed, as the scheduler needs to know it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskError {
    /// What went wrong, in words (stored with the task and the job).
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// How long the plugin asked to be left alone.
    pub retry_after: Option<Duration>,
    /// Whether the failure says the plugin is in trouble (counts towards its circuit breaker).
    pub against_plugin: bool,
}

impl TaskError {
    /// A failure that no retry fixes (bad input, a missing plugin).
    pub fn fatal(message: impl Into<String>) -> Self {
        TaskError { message: message.into(), retryable: false, retry_after: None, against_plugin: false }
    }
}

/// What a task may use while it runs. (Its progress is its job's events: `started` with the
/// lease, `progress` with each finished task of a larger job, both written by the scheduler.)
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// When the job's deadline passes, if it has one.
    pub deadline: Option<Instant>,
    /// The job's tasks (outputs included) as the completion that handed this task over left
    /// them, when the slot that ran its predecessor took it over: what its run would otherwise
    /// read from the store. Tasks outside its ancestry may have moved on since.
    pub job_tasks: Option<Arc<[Task]>>,
}

/// Runs tasks: the host's plugin calls, or a test's stand-in.
pub trait Execute: Send + Sync + 'static {
    /// Runs one task to its result: its output, and what it adds to its job.
    fn execute<'a>(&'a self, task: &'a Task, ctx: TaskContext) -> BoxFuture<'a, Result<TaskResult, TaskError>>;
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The tenant has too many open tasks.
    #[error("the tenant has {open} open tasks, the most it may have is {limit}; wait for some to finish")]
    QueueFull {
        /// Its open tasks.
        open: i64,
        /// The limit.
        limit: i64,
    },
    /// The store refused it.
    #[error(transparent)]
    Db(#[from] DbError),
}

struct RunningTask {
    job_id: Arc<str>,
    stop: watch::Sender<Stop>,
}

/// A task a completion leased for the slot that ran its predecessor, with the job's tasks as
/// that completion left them.
struct Taken {
    task: Task,
    job_tasks: Arc<[Task]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Go,
    /// The job was cancelled or failed, or the lease was lost: drop the work, record nothing.
    Abandon,
}

struct Inner {
    queue: FairQueue,
    breakers: Breakers,
    running: HashMap<Arc<str>, RunningTask>,
}

/// The scheduler of one node.
pub struct Scheduler {
    db: Db,
    config: SchedulerConfig,
    executor: Arc<dyn Execute>,
    inner: Mutex<Inner>,
    wake: Notify,
    slots: Arc<Semaphore>,
    events: broadcast::Sender<String>,
    stopping: watch::Sender<bool>,
    loops: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    workers: tokio::sync::Mutex<tokio::task::JoinSet<()>>,
    nats: std::sync::OnceLock<Arc<nats::NatsQueue>>,
    admission: Arc<interactive::Admission>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("node", &self.config.node_id).finish()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn entry_of(task: &Task) -> Entry {
    Entry {
        task_id: Arc::from(task.id.as_str()),
        job_id: Arc::from(task.job_id.as_str()),
        tenant_id: Arc::from(task.tenant_id.as_str()),
        plugin: Arc::from(task.plugin.as_str()),
        priority: task.priority,
    }
}

/// The delay before attempt `attempt + 1`: exponential from `base`, capped at `max`, with
/// "equal jitter" (half fixed, half random) so that failing callers spread out; never shorter
/// than the plugin's retry-after (itself capped at ten times `max`).
pub fn backoff(attempt: i32, base_ms: i64, max_ms: i64, retry_after: Option<Duration>) -> i64 {
    let exp = base_ms.saturating_mul(1i64 << attempt.clamp(1, 30).saturating_sub(1)).min(max_ms).max(1);
    let jittered = exp / 2 + fastrand::i64(0..=exp / 2);
    let asked = retry_after.map(|d| (d.as_millis() as i64).min(max_ms.saturating_mul(10))).unwrap_or(0);
    jittered.max(asked)
}

impl Scheduler {
    /// A scheduler over `db` running tasks with `executor`. [`Scheduler::start`] sets it going.
    pub fn new(db: Db, config: SchedulerConfig, executor: Arc<dyn Execute>) -> Arc<Self> {
        let (events, _) = broadcast::channel(4096);
        let (stopping, _) = watch::channel(false);
        let admission = interactive::Admission::new(config.interactive_concurrency, config.tenant_concurrency);
        Arc::new(Scheduler {
            admission,
            inner: Mutex::new(Inner {
                queue: FairQueue::new(config.tenant_concurrency),
                breakers: Breakers::new(config.breaker),
                running: HashMap::new(),
            }),
            slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
            db,
            config,
            executor,
            wake: Notify::new(),
            events,
            stopping,
            loops: Mutex::new(Vec::new()),
            workers: tokio::sync::Mutex::new(tokio::task::JoinSet::new()),
            nats: std::sync::OnceLock::new(),
        })
    }

    fn nats(&self) -> Option<&Arc<nats::NatsQueue>> {
        self.nats.get()
    }

    /// This node's identity.
    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// The store.
    pub fn db(&self) -> &Db {
        &self.db
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes back this node's leases from before a restart, queues every ready task (or, in scale
    /// mode, connects to NATS and offers tasks whose message may be missing), and starts
    /// dispatching. Returns how many tasks were queued or offered.
    pub async fn start(self: &Arc<Self>) -> anyhow::Result<usize> {
        let reclaimed = self.db.reclaim_leases(Some(&self.config.node_id)).await?;
        if !reclaimed.is_empty() {
            tracing::info!(tasks = reclaimed.len(), "took back the tasks this node was running when it stopped");
        }
        self.refresh_shares().await?;
        let mut loops = Vec::new();
        let n = if let Some(url) = &self.config.queue_url {
            let queue = nats::NatsQueue::connect(
                url,
                Duration::from_millis(self.config.lease_ms as u64),
                self.config.max_deliver,
            )
            .await?;
            let queue = Arc::new(queue);
            let _ = self.nats.set(queue.clone());
            // Reclaimed tasks, and ready ones whose message may have been lost, are offered again
            // (a duplicate finds its task taken and is acked away).
            let mut offer = reclaimed;
            offer.extend(self.db.idle_ready_tasks(self.config.lease_ms).await?);
            queue.publish(&offer).await?;
            loops.push(tokio::spawn({
                let this = self.clone();
                async move { this.fetch_loop().await }
            }));
            let mut cancels = queue.client().subscribe(nats::CANCEL_SUBJECT).await?;
            loops.push(tokio::spawn({
                let this = self.clone();
                async move {
                    while let Some(message) = cancels.next().await {
                        if let Ok(job) = std::str::from_utf8(&message.payload) {
                            this.abandon_job(job);
                        }
                    }
                }
            }));
            offer.len()
        } else {
            let ready = self.db.ready_tasks().await?;
            self.enqueue(&ready);
            ready.len()
        };
        loops.push(tokio::spawn({
            let this = self.clone();
            async move { this.dispatch().await }
        }));
        loops.push(tokio::spawn({
            let this = self.clone();
            async move { this.heartbeat().await }
        }));
        self.loops.lock().unwrap_or_else(|p| p.into_inner()).extend(loops);
        Ok(n)
    }

    /// New ready work: queued here, or (scale mode) published for any node.
    async fn offer(&self, tasks: &[Task]) {
        match self.nats() {
            Some(queue) => {
                if let Err(e) = queue.publish(tasks).await {
                    tracing::error!(error = %e, tasks = tasks.len(),
                        "publishing ready tasks failed; they are offered again when found idle");
                }
            }
            None => self.enqueue(tasks),
        }
    }

    /// A task to try again from `due` on: queued here, or (scale mode) its message delivered
    /// again after the delay, to any node.
    async fn requeue(&self, task: &Task, due: i64) {
        match self.nats() {
            Some(queue) if queue.holds(&task.id) => {
                let delay = Duration::from_millis((due - now_ms()).max(0) as u64);
                queue.nak(&task.id, Some(delay)).await;
            }
            Some(_) => self.offer(std::slice::from_ref(task)).await,
            None => {
                let mut again = task.clone();
                again.not_before = due;
                self.enqueue(&[again]);
            }
        }
    }

    /// The task's message (scale mode) is done with.
    async fn settled(&self, task_id: &str) {
        if let Some(queue) = self.nats() {
            queue.ack(task_id).await;
        }
    }

    /// Scale mode: keeps the local fair queue stocked from the stream, tenant by tenant in
    /// fair-queue order, up to twice this node's concurrency.
    async fn fetch_loop(self: Arc<Self>) {
        let Some(queue) = self.nats().cloned() else { return };
        let mut wake = match queue.client().subscribe(nats::WAKE_SUBJECT).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "subscribing to wake-ups failed; polling only");
                None
            }
        };
        let mut stopping = self.stopping.subscribe();
        let capacity = self.config.concurrency * 2;
        loop {
            loop {
                let (held, order) = {
                    let inner = self.lock();
                    (inner.queue.len() + inner.running.len(), inner.queue.tenant_order())
                };
                let room = capacity.saturating_sub(held);
                if room == 0 {
                    break;
                }
                let mut pending = match queue.pending_tenants().await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the task stream failed");
                        break;
                    }
                };
                if pending.is_empty() {
                    break;
                }
                // Tenants the fair queue owes most go first; unknown ones are new (owed most).
                pending.sort_by_key(|(t, _)| order.iter().position(|o| &**o == t.as_str()).map_or(0, |p| p + 1));
                let per = (room / pending.len()).max(1);
                let (mut left, mut got) = (room, 0);
                for (tenant, count) in pending {
                    if left == 0 {
                        break;
                    }
                    let want = per.min(left).min(count as usize);
                    match queue.fetch(&tenant, want).await {
                        Ok(deliveries) => {
                            left = left.saturating_sub(deliveries.len());
                            got += deliveries.len();
                            let now = now_ms();
                            let mut inner = self.lock();
                            for d in deliveries {
                                let e = d.envelope;
                                let entry = Entry {
                                    task_id: Arc::from(e.task_id.as_str()),
                                    job_id: Arc::from(e.job_id.as_str()),
                                    tenant_id: Arc::from(e.tenant_id.as_str()),
                                    plugin: Arc::from(e.plugin.as_str()),
                                    priority: e.priority,
                                };
                                inner.queue.push(entry, e.not_before, now);
                            }
                        }
                        Err(e) => tracing::warn!(tenant = %tenant, error = %e, "fetching a tenant's tasks failed"),
                    }
                }
                if got == 0 {
                    break;
                }
                self.wake.notify_one();
            }
            let woken = async {
                match wake.as_mut() {
                    Some(w) => {
                        let _ = w.next().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    }

    /// Reads the tenants' weights and limits into the fair queue.
    pub async fn refresh_shares(&self) -> Result<(), DbError> {
        let shares = self.db.tenant_shares().await?;
        let mut inner = self.lock();
        for (tenant, weight, max_running) in shares {
            inner.queue.configure(&tenant, weight as f64, max_running.max(0) as usize);
            self.admission.configure(&tenant, weight as f64, max_running.max(0) as usize);
        }
        Ok(())
    }

    /// Interactive admission (the gateway's completions): not persisted, shared between tenants
    /// by the same weights and limits as tasks.
    pub fn admission(&self) -> &Arc<interactive::Admission> {
        &self.admission
    }

    /// Announcements of new job events: the id of the job that has one.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    fn announce(&self, job_id: &str) {
        let _ = self.events.send(job_id.to_string());
    }

    fn enqueue(&self, tasks: &[Task]) {
        if tasks.is_empty() {
            return;
        }
        let now = now_ms();
        {
            let mut inner = self.lock();
            for task in tasks {
                inner.queue.push(entry_of(task), task.not_before, now);
            }
        }
        self.wake.notify_one();
    }

    /// Stores a job with its tasks (before answering), then queues the ready ones. Returns the
    /// job and whether it is new (`false`: an earlier submission with the same idempotency key).
    pub async fn submit(&self, new: NewJob<'_>) -> Result<(Job, bool), SubmitError> {
        let (job, created) =
            self.db.submit_job_within(new, self.config.max_open_per_tenant).await.map_err(|e| match e {
                DbError::Full { open, limit } => SubmitError::QueueFull { open, limit },
                e => SubmitError::Db(e),
            })?;
        if created {
            let ready: Vec<Task> = self
                .db
                .job_tasks(&job.tenant_id, &job.id)
                .await?
                .into_iter()
                .filter(|t| t.status == qlayer_db::TaskStatus::Ready)
                .collect();
            self.offer(&ready).await;
            self.announce(&job.id);
        }
        Ok((job, created))
    }

    /// Decides at the approval gate a job of `tenant_id` waits at (see
    /// [`Db::decide_gate`](qlayer_db::Db::decide_gate)), and offers the gate task to run.
    pub async fn decide_gate(
        &self,
        tenant_id: &str,
        job_id: &str,
        decision: &serde_json::Value,
        kind: &str,
    ) -> Result<qlayer_db::GateOutcome, DbError> {
        let outcome = self.db.decide_gate(tenant_id, job_id, decision, kind).await?;
        if let qlayer_db::GateOutcome::Decided(task) = &outcome {
            self.offer(std::slice::from_ref(task)).await;
            self.announce(job_id);
        }
        Ok(outcome)
    }

    /// Stops a cancelled job's work here: its queued tasks are dropped and its running plugin
    /// calls stopped (its status is already `cancelled` in the store; other nodes notice at
    /// their next heartbeat).
    pub async fn cancel(&self, job_id: &str) {
        self.abandon_job(job_id);
        if let Some(queue) = self.nats() {
            queue.announce_cancel(job_id).await;
        }
        self.announce(job_id);
    }

    fn abandon_job(&self, job_id: &str) {
        let mut inner = self.lock();
        inner.queue.remove_job(job_id);
        for running in inner.running.values().filter(|r| &*r.job_id == job_id) {
            let _ = running.stop.send(Stop::Abandon);
        }
    }

    async fn dispatch(self: Arc<Self>) {
        let mut stopping = self.stopping.subscribe();
        loop {
            let permit = tokio::select! {
                permit = self.slots.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => return },
                _ = stopping.wait_for(|s| *s) => return,
            };
            let picked = loop {
                let now = now_ms();
                let (picked, next_due) = {
                    let mut inner = self.lock();
                    let Inner { queue, breakers, .. } = &mut *inner;
                    let next_due = queue.promote(now);
                    (queue.pop(now, |e| breakers.admit(&e.tenant_id, &e.plugin, now)), next_due)
                };
                if let Some(picked) = picked {
                    break picked;
                }
                let wait = next_due.map(|due| (due - now).clamp(1, 1_000)).unwrap_or(1_000);
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                    _ = stopping.wait_for(|s| *s) => return,
                }
            };
            let this = self.clone();
            let mut workers = self.workers.lock().await;
            while workers.try_join_next().is_some() {}
            workers.spawn(async move { this.work(picked.0, picked.1, permit).await });
        }
    }

    async fn work(self: Arc<Self>, entry: Entry, charge: Charge, _permit: OwnedSemaphorePermit) {
        let mut next = Some((entry, charge, None));
        while let Some((entry, charge, handed)) = next.take() {
            let began = Instant::now();
            let span =
                tracing::info_span!("task", task = %entry.task_id, tenant = %entry.tenant_id, plugin = %entry.plugin);
            // The tenant is charged for the time its task held the slot running, not for the
            // store's bookkeeping around it (waiting for a write lock says nothing about the tenant).
            let (ran, taken) = tracing::Instrument::instrument(self.run(&entry, handed), span).await;
            let cost = ran.unwrap_or_else(|| began.elapsed());
            {
                let mut inner = self.lock();
                inner.queue.done(&charge, cost.as_secs_f64() * 1000.0);
                // A task its completion took over runs next in this slot, charged as if the
                // queue had handed it out.
                next = taken.map(|taken| {
                    let entry = entry_of(&taken.task);
                    let charge = inner.queue.start(&entry);
                    (entry, charge, Some(taken))
                });
            }
            self.wake.notify_one();
        }
    }

    /// Whether the slot finishing `entry`'s task may take over one of the tasks its completion
    /// makes ready, leased in the same transaction, instead of offering it to the queue: only on
    /// a node that is its own queue (not in scale mode), not stopping, and when no queued task
    /// would start first (another tenant's, or a higher-ranked one of the same tenant's), so
    /// fair sharing and priorities are kept.
    fn may_take_over(&self, entry: &Entry) -> bool {
        self.nats().is_none()
            && !*self.stopping.borrow()
            && !self.lock().queue.ready_ahead_of(&entry.tenant_id, &entry.job_id, entry.priority, now_ms())
    }

    /// Whether this node may start `task` now, taken over by its predecessor's slot: its
    /// plugin's circuit is closed (a probe goes through the queue) and it is not running here.
    fn takes(&self, task: &Task) -> bool {
        let inner = self.lock();
        matches!(inner.breakers.state(&task.tenant_id, &task.plugin), State::Closed { .. })
            && !inner.running.contains_key(task.id.as_str())
            && !inner.queue.holds(&task.id)
    }

    /// Leases and runs one task (or runs the one its predecessor's completion leased for this
    /// slot); returns how long it ran, if it did, and the task its completion took over.
    async fn run(&self, entry: &Entry, handed: Option<Taken>) -> (Option<Duration>, Option<Taken>) {
        let (leased, job_tasks) = match handed {
            Some(Taken { task, job_tasks }) => (task, Some(job_tasks)),
            None => match self.lease(entry).await {
                Some(task) => (task, None),
                None => return (None, None),
            },
        };
        self.run_leased(entry, leased, job_tasks).await
    }

    /// Leases `entry`'s task: `None` if it is not this node's to run now (taken, over, not due).
    async fn lease(&self, entry: &Entry) -> Option<Task> {
        match self.db.lease_task(&entry.task_id, &self.config.node_id, self.config.lease_ms).await {
            Ok(Some(task)) => Some(task),
            Ok(None) => {
                self.lock().breakers.release_probe(&entry.tenant_id, &entry.plugin, now_ms());
                if self.nats().is_some() {
                    // A message early for its backoff waits here; one whose task is taken
                    // (a duplicate, a late redelivery) or over is acked away.
                    match self.db.task(&entry.task_id).await {
                        Ok(Some(t)) if t.status == qlayer_db::TaskStatus::Ready && t.not_before > now_ms() => {
                            self.lock().queue.push(entry.clone(), t.not_before, now_ms());
                        }
                        // Redelivered while the last holder's lease has not quite run out (it
                        // stopped acking: it is likely dead): try again shortly.
                        Ok(Some(t)) if t.status == qlayer_db::TaskStatus::Leased => {
                            if let Some(queue) = self.nats() {
                                let delay = Duration::from_millis((self.config.lease_ms / 4).max(100) as u64);
                                queue.nak(&entry.task_id, Some(delay)).await;
                            }
                        }
                        _ => self.settled(&entry.task_id).await,
                    }
                }
                None
            }
            Err(e) => {
                tracing::error!(task = %entry.task_id, error = %e, "leasing a task failed; trying again in 1 s");
                self.lock().queue.push(entry.clone(), now_ms() + 1_000, now_ms());
                None
            }
        }
    }

    /// Runs a task this node leased; see [`Scheduler::run`].
    async fn run_leased(
        &self,
        entry: &Entry,
        leased: Task,
        job_tasks: Option<Arc<[Task]>>,
    ) -> (Option<Duration>, Option<Taken>) {
        let lease = Lease {
            task_id: leased.id.clone(),
            job_id: leased.job_id.clone(),
            owner: self.config.node_id.clone(),
            attempt: leased.attempts,
        };
        if leased.attempts > leased.max_attempts {
            let error = format!(
                "task `{}` was given up after {} attempts: every run of it was interrupted",
                leased.name, leased.max_attempts
            );
            self.give_up(&leased, &lease, &error, true).await;
            return (None, None);
        }
        if let Some(delivered) = self.nats().and_then(|q| q.delivered(&leased.id))
            && delivered >= self.config.max_deliver
        {
            let error = format!(
                "task `{}` was delivered {delivered} times without finishing (max-deliver); it was dead-lettered",
                leased.name
            );
            self.give_up(&leased, &lease, &error, true).await;
            return (None, None);
        }
        let now = now_ms();
        if let Some(deadline_at) = leased.deadline_at
            && now >= deadline_at
        {
            let error = format!("the job's deadline passed before task `{}` could run", leased.name);
            self.give_up(&leased, &lease, &error, false).await;
            return (None, None);
        }
        // The lease recorded the `started` event.
        self.announce(&leased.job_id);

        let (stop_tx, mut stop_rx) = watch::channel(Stop::Go);
        self.lock().running.insert(entry.task_id.clone(), RunningTask { job_id: entry.job_id.clone(), stop: stop_tx });
        let deadline = leased.deadline_at.map(|d| Instant::now() + Duration::from_millis((d - now).max(0) as u64));
        let ctx = TaskContext { deadline, job_tasks };
        let started = Instant::now();
        enum Ended {
            Done(Result<TaskResult, TaskError>),
            Abandoned,
            Deadline,
        }
        let ended = {
            let work = self.executor.execute(&leased, ctx);
            let past_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                outcome = work => Ended::Done(outcome),
                _ = stop_rx.wait_for(|s| *s == Stop::Abandon) => Ended::Abandoned,
                _ = past_deadline => Ended::Deadline,
            }
        };
        self.lock().running.remove(&entry.task_id);
        let elapsed = started.elapsed();
        let mut taken = None;
        let plugin_label = leased.plugin.clone();
        metrics::histogram!("qlayer_task_duration_seconds", "plugin" => plugin_label.clone())
            .record(elapsed.as_secs_f64());
        match ended {
            Ended::Abandoned => {
                self.lock().breakers.release_probe(&entry.tenant_id, &entry.plugin, now_ms());
                metrics::counter!("qlayer_tasks_total", "outcome" => "abandoned").increment(1);
                // Cancelled or taken over: the message is done with. At a graceful stop it is
                // handed back instead (with the lease), for another node.
                if !*self.stopping.borrow() {
                    self.settled(&entry.task_id).await;
                }
            }
            Ended::Deadline => {
                self.lock().breakers.release_probe(&entry.tenant_id, &entry.plugin, now_ms());
                let error = format!(
                    "the job's deadline passed while task `{}` ran; it was stopped after {} ms",
                    leased.name,
                    elapsed.as_millis()
                );
                self.give_up(&leased, &lease, &error, false).await;
            }
            Ended::Done(Ok(output)) => {
                if let Some(Transition::Closed) = self.lock().breakers.success(&entry.tenant_id, &entry.plugin) {
                    tracing::info!(tenant = %leased.tenant_id, plugin = %leased.plugin, "circuit closed: the probe succeeded");
                }
                metrics::counter!("qlayer_tasks_total", "outcome" => "succeeded").increment(1);
                let accepts = |task: &Task| self.takes(task);
                let takeover = self.may_take_over(entry).then_some(Takeover {
                    owner: &self.config.node_id,
                    lease_ms: self.config.lease_ms,
                    accepts: &accepts,
                });
                match self.db.complete_and_take(&lease, &output, takeover).await {
                    Ok(recorded) if recorded.recorded => {
                        self.offer(&recorded.ready).await;
                        if recorded.job_finished.is_some() {
                            metrics::counter!("qlayer_jobs_finished_total", "status" => "succeeded").increment(1);
                        }
                        self.settled(&leased.id).await;
                        self.announce(&leased.job_id);
                        if let Some(task) = recorded.taken {
                            taken = Some(Taken { task, job_tasks: recorded.tasks.into() });
                        }
                    }
                    Ok(_) => {
                        tracing::warn!(task = %leased.id, "the task's lease was lost before its result was recorded; the result is dropped");
                        self.settled(&leased.id).await;
                    }
                    Err(e) => {
                        tracing::error!(task = %leased.id, error = %e, "recording a task's result failed; its lease will expire and it runs again");
                        if let Some(queue) = self.nats() {
                            queue.forget(&leased.id);
                        }
                    }
                }
            }
            Ended::Done(Err(error)) => self.failed(&leased, &lease, error).await,
        }
        (Some(elapsed), taken)
    }

    async fn failed(&self, task: &Task, lease: &Lease, error: TaskError) {
        let now = now_ms();
        let (tenant, plugin) = (Arc::from(task.tenant_id.as_str()), Arc::from(task.plugin.as_str()));
        let opened = {
            let mut inner = self.lock();
            if error.against_plugin {
                inner.breakers.failure(&tenant, &plugin, now)
            } else {
                inner.breakers.release_probe(&tenant, &plugin, now);
                None
            }
        };
        if let Some(Transition::Opened(until)) = opened {
            tracing::warn!(tenant = %task.tenant_id, plugin = %task.plugin, open_ms = until - now,
                "circuit opened: the plugin keeps failing; its tasks wait");
            metrics::counter!("qlayer_circuit_opened_total", "plugin" => task.plugin.clone()).increment(1);
        }
        let retry_at =
            now + backoff(task.attempts, self.config.retry_base_ms, self.config.retry_max_ms, error.retry_after);
        let in_time = task.deadline_at.is_none_or(|d| retry_at < d);
        if error.retryable && task.attempts < task.max_attempts && in_time {
            metrics::counter!("qlayer_tasks_total", "outcome" => "retried").increment(1);
            let event = serde_json::json!({
                "task": task.name, "attempt": task.attempts, "error": error.message, "delay_ms": retry_at - now,
                "circuit_open_until": match opened { Some(Transition::Opened(until)) => Some(until), _ => None },
            });
            match self.db.retry_task(lease, retry_at, &error.message, &event).await {
                Ok(true) => {
                    self.requeue(task, retry_at).await;
                    self.announce(&task.job_id);
                }
                Ok(false) => self.settled(&task.id).await,
                Err(e) => {
                    tracing::error!(task = %task.id, error = %e, "recording a retry failed; the lease will expire")
                }
            }
            return;
        }
        metrics::counter!("qlayer_tasks_total", "outcome" => "failed").increment(1);
        let why = if !error.retryable {
            error.message
        } else if !in_time {
            format!("{} (no time left before the job's deadline to try again)", error.message)
        } else {
            format!("{} (gave up after {} attempts)", error.message, task.attempts)
        };
        let message = format!("task `{}`: {why}", task.name);
        // A task that kept failing (its retries ran out) is dead-lettered in scale mode.
        self.give_up(task, lease, &message, error.retryable).await;
    }

    /// Fails a task and its job; `dead`: it kept failing, so (scale mode) its message goes to
    /// the dead-letter subject.
    async fn give_up(&self, task: &Task, lease: &Lease, error: &str, dead: bool) {
        match self.db.fail_task(&task.id, Some(lease), error).await {
            Ok(true) => {
                metrics::counter!("qlayer_jobs_finished_total", "status" => "failed").increment(1);
                if dead {
                    metrics::counter!("qlayer_tasks_dead_total").increment(1);
                }
                self.abandon_job(&task.job_id);
                self.announce(&task.job_id);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(task = %task.id, error = %e, "recording a failed task failed");
                if let Some(queue) = self.nats() {
                    queue.forget(&task.id);
                }
                return;
            }
        }
        match (self.nats(), dead) {
            (Some(queue), true) => queue.dead_letter(task, error).await,
            (Some(queue), false) => queue.ack(&task.id).await,
            (None, _) => {}
        }
    }

    async fn heartbeat(self: Arc<Self>) {
        let mut stopping = self.stopping.subscribe();
        let every = Duration::from_millis((self.config.lease_ms / 3).max(50) as u64);
        let mut beats: u64 = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
            beats += 1;
            match self.db.renew_leases(&self.config.node_id, self.config.lease_ms).await {
                Ok(held) => self.stop_unheld(&held.into_iter().collect()).await,
                Err(e) => tracing::error!(error = %e, "renewing this node's leases failed"),
            }
            if let Some(queue) = self.nats() {
                queue.progress_all().await;
            }
            // Embedded: expired leases are taken over here. Scale mode: JetStream redelivers a
            // dead node's messages and the lease is taken over then; this sweep only catches
            // tasks whose message went missing.
            if self.nats().is_none() || beats.is_multiple_of(10) {
                match self.db.reclaim_leases(None).await {
                    Ok(expired) if !expired.is_empty() => {
                        tracing::warn!(
                            tasks = expired.len(),
                            "took over tasks whose lease expired (their node stopped)"
                        );
                        self.offer(&expired).await;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "taking over expired leases failed"),
                }
            }
            // A job waiting at a gate holds no lease, so its deadline is checked here.
            match self.db.overdue_gates().await {
                Ok(gates) => {
                    for gate in gates {
                        let error =
                            format!("the job's deadline passed while it waited at `{}` for a decision", gate.name);
                        match self.db.fail_task(&gate.id, None, &error).await {
                            Ok(true) => {
                                metrics::counter!("qlayer_jobs_finished_total", "status" => "failed").increment(1);
                                self.announce(&gate.job_id);
                            }
                            Ok(false) => {}
                            Err(e) => tracing::error!(task = %gate.id, error = %e, "ending an overdue gate failed"),
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "looking for gates past their job's deadline failed"),
            }
            if self.nats().is_some() && beats.is_multiple_of(30) {
                match self.db.idle_ready_tasks(self.config.lease_ms * 10).await {
                    Ok(idle) if !idle.is_empty() => self.offer(&idle).await,
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "looking for idle ready tasks failed"),
                }
            }
            if beats.is_multiple_of(10)
                && let Err(e) = self.refresh_shares().await
            {
                tracing::error!(error = %e, "reading tenant shares failed");
            }
            let (queued, running) = {
                let inner = self.lock();
                (inner.queue.len(), inner.running.len())
            };
            metrics::gauge!("qlayer_tasks_queued").set(queued as f64);
            metrics::gauge!("qlayer_tasks_running").set(running as f64);
        }
    }

    /// Stops running tasks this node no longer holds a lease on. A task leased a moment ago may
    /// be missing from `held` because the query ran first: such tasks are checked against the
    /// store one by one before being stopped.
    async fn stop_unheld(&self, held: &std::collections::HashSet<String>) {
        let suspects: Vec<Arc<str>> = self.lock().running.keys().filter(|id| !held.contains(&***id)).cloned().collect();
        for task_id in suspects {
            let still_ours = match self.db.task(&task_id).await {
                Ok(Some(task)) => {
                    task.status == qlayer_db::TaskStatus::Leased
                        && task.lease_owner.as_deref() == Some(self.config.node_id.as_str())
                }
                Ok(None) => false,
                Err(_) => true,
            };
            if !still_ours && let Some(running) = self.lock().running.get(&task_id) {
                let _ = running.stop.send(Stop::Abandon);
            }
        }
    }

    /// Stops dispatching; running tasks get `grace` to finish, then are stopped and handed back
    /// (ready again, the attempt not counted) for the next start or another node.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.stopping.send(true);
        for handle in self.loops.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            handle.abort();
        }
        let mut workers = self.workers.lock().await;
        let all_done = async { while workers.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            tracing::warn!("tasks still running at the end of the grace period are handed back");
            {
                let inner = self.lock();
                for running in inner.running.values() {
                    let _ = running.stop.send(Stop::Abandon);
                }
            }
            while workers.join_next().await.is_some() {}
        }
        match self.db.release_leases(&self.config.node_id).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(tasks = n, "handed back unfinished tasks"),
            Err(e) => tracing::error!(error = %e, "handing back leases failed; they are taken back at the next start"),
        }
        if let Some(queue) = self.nats() {
            queue.release_all().await;
        }
    }

    /// Dies as a killed process would: stops at once, releases nothing (its leases expire and
    /// other nodes take its tasks over). For takeover tests and benchmarks.
    #[doc(hidden)]
    pub async fn crash(&self) {
        let _ = self.stopping.send(true);
        for handle in self.loops.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            handle.abort();
        }
        self.workers.lock().await.abort_all();
    }

    /// Tasks queued here and running here, for gauges and tests.
    pub fn load(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.queue.len(), inner.running.len())
    }
}

/// A node's identity, kept in its data dir under an exclusive lock: two processes can never
/// act as the same node, and a restarted node knows the leases it held before are dead.
pub struct NodeIdentity {
    /// The id.
    pub id: String,
    _lock: std::fs::File,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity").field("id", &self.id).finish()
    }
}

impl NodeIdentity {
    /// Reads (or creates) `<data dir>/node-id` and locks `<data dir>/node.lock`.
    pub fn claim(data_dir: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let lock_path = data_dir.join("node.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another qlayer process is using the data dir {} (its node.lock is held); give each node its own --data-dir",
                data_dir.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", lock_path.display()));
            }
        }
        let id_path = data_dir.join("node-id");
        let id = match std::fs::read_to_string(&id_path) {
            Ok(text) if !text.trim().is_empty() => text.trim().to_string(),
            _ => {
                let id = format!("node_{:016x}", fastrand::u64(..));
                std::fs::write(&id_path, &id).with_context(|| format!("writing {}", id_path.display()))?;
                id
            }
        };
        Ok(NodeIdentity { id, _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlayer_db::{JobKind, NewTask};

    /// Runs every task at once, recording the order, whether its run was handed the job's tasks,
    /// and what the handed tasks said its dependencies output.
    #[derive(Default)]
    struct Recording {
        ran: Mutex<Vec<(String, bool, Vec<String>)>>,
        /// A task that waits, once it is recorded, until it is let go.
        hold: Mutex<Option<(String, Arc<Notify>)>>,
    }

    impl Execute for Recording {
        fn execute<'a>(&'a self, task: &'a Task, ctx: TaskContext) -> BoxFuture<'a, Result<TaskResult, TaskError>> {
            Box::pin(async move {
                let seen = ctx.job_tasks.as_deref().map_or_else(Vec::new, |tasks| {
                    tasks
                        .iter()
                        .filter(|t| task.depends_on.contains(&t.name))
                        .map(|t| t.output.as_ref().map_or_else(|| "none".into(), |o| o.get().to_string()))
                        .collect()
                });
                self.ran.lock().unwrap_or_else(|p| p.into_inner()).push((
                    task.name.clone(),
                    ctx.job_tasks.is_some(),
                    seen,
                ));
                let hold = self.hold.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some((name, until)) = hold
                    && name == task.name
                {
                    until.notified().await;
                }
                Ok(serde_json::json!(format!("{} done", task.name)).into())
            })
        }
    }

    fn chain(names: &[&str]) -> Vec<NewTask> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| NewTask {
                name: name.to_string(),
                kind: "call".into(),
                plugin: "p".into(),
                input: serde_json::json!({}),
                depends_on: if i == 0 { vec![] } else { vec![names[i - 1].to_string()] },
                max_attempts: 3,
            })
            .collect()
    }

    async fn submit(scheduler: &Scheduler, tenant: &str, names: &[&str]) -> Job {
        let input = serde_json::json!({});
        let new = NewJob {
            tenant_id: tenant,
            kind: JobKind::Call,
            input: &input,
            priority: 0,
            idempotency_key: None,
            deadline_ms: None,
            tasks: chain(names),
        };
        scheduler.submit(new).await.map(|(job, _)| job).unwrap_or_else(|e| panic!("submit: {e}"))
    }

    async fn finish(db: &Db, tenant: &str, job: &Job) {
        for _ in 0..600 {
            let now = db.job(tenant, &job.id).await.ok().flatten().map(|j| j.status);
            if now.is_some_and(|s| s.is_terminal()) {
                assert_eq!(now, Some(qlayer_db::JobStatus::Succeeded));
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("job {} did not finish", job.id);
    }

    /// A finished task's slot takes over its successor, leased in the completion's transaction and
    /// handed the job's tasks (with the outputs it needs), when no other tenant waits; when one
    /// waits, the successor goes back to the queue and the other tenant's task runs first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slot_takes_over_its_successor_only_when_no_other_tenant_waits() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let db = Db::open(&format!("sqlite://{}", dir.path().join("q.db").display()))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let a = db.create_tenant("a").await.unwrap_or_else(|e| panic!("{e}")).id;
        let b = db.create_tenant("b").await.unwrap_or_else(|e| panic!("{e}")).id;
        let recording = Arc::new(Recording::default());
        let config = SchedulerConfig { node_id: "n".into(), concurrency: 1, ..Default::default() };
        let scheduler = Scheduler::new(db.clone(), config, recording.clone());

        // Alone: one, two, three run in one slot; two and three were handed the job's tasks.
        let job = submit(&scheduler, &a, &["one", "two", "three"]).await;
        scheduler.start().await.unwrap_or_else(|e| panic!("{e}"));
        finish(&db, &a, &job).await;
        let ran = std::mem::take(&mut *recording.ran.lock().unwrap_or_else(|p| p.into_inner()));
        assert_eq!(
            ran,
            [
                ("one".to_string(), false, vec![]),
                ("two".to_string(), true, vec!["\"one done\"".to_string()]),
                ("three".to_string(), true, vec!["\"two done\"".to_string()]),
            ]
        );
        let events = db.job_events(&a, &job.id, 0).await.unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<String> = events.iter().map(|e| e.kind.clone()).collect();
        assert_eq!(
            kinds,
            ["queued", "started", "progress", "started", "progress", "started", "progress", "succeeded"],
            "each taken-over task still records its start, after its predecessor's progress"
        );

        // With tenant b's task waiting when a's first task ends, a's successor is queued, not
        // taken over, and b's task runs first.
        let held = Arc::new(tokio::sync::Notify::new());
        *recording.hold.lock().unwrap_or_else(|p| p.into_inner()) = Some(("a1".into(), held.clone()));
        let job_a = submit(&scheduler, &a, &["a1", "a2"]).await;
        for _ in 0..600 {
            if recording.ran.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|(name, ..)| name == "a1") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let job_b = submit(&scheduler, &b, &["b1"]).await;
        held.notify_one();
        finish(&db, &a, &job_a).await;
        finish(&db, &b, &job_b).await;
        let ran = std::mem::take(&mut *recording.ran.lock().unwrap_or_else(|p| p.into_inner()));
        let order: Vec<(&str, bool)> = ran.iter().map(|(name, handed, _)| (name.as_str(), *handed)).collect();
        assert_eq!(order, [("a1", false), ("b1", false), ("a2", false)]);
        scheduler.shutdown(Duration::from_secs(5)).await;
    }

    #[test]
    fn backoff_grows_is_jittered_capped_and_honours_retry_after() {
        for attempt in 1..=10 {
            let exp = (200i64 << (attempt - 1)).min(5_000);
            for _ in 0..50 {
                let d = backoff(attempt, 200, 5_000, None);
                assert!(d >= exp / 2 && d <= exp, "attempt {attempt}: {d} not in {}..={exp}", exp / 2);
            }
        }
        assert_eq!(backoff(1, 200, 5_000, Some(Duration::from_secs(3))), 3_000, "retry-after wins when longer");
        assert_eq!(backoff(1, 200, 5_000, Some(Duration::from_secs(3600))), 50_000, "retry-after is capped");
        let spread: std::collections::HashSet<i64> = (0..50).map(|_| backoff(5, 200, 30_000, None)).collect();
        assert!(spread.len() > 10, "jitter spreads retries: {spread:?}");
    }
}
