//! Tasks: the units the scheduler runs. A job is a DAG of tasks, inserted with it in one
//! transaction. A task is `waiting` for its dependencies, then `ready`, then `leased` by one
//! node until its lease expires, then `succeeded`, `failed` or `cancelled`.
//!
//! Every lease increments `attempts`; completing, retrying or failing a task names the lease
//! (owner and attempt), so a node whose lease was lost (it stalled, another node took the task
//! over) cannot record a late result. Writes that touch a job's tasks start by updating the job
//! row, which serialises them per job on both databases (a row lock on PostgreSQL, the write
//! lock on SQLite), so two tasks of one job finishing at once still see each other.
//!
//! Submitting and cancelling a job live here too, since both write its tasks. This module builds
//! on `jobs` (the job rows, their events and how a job ends); `jobs` knows nothing of tasks.

use crate::jobs::{JOB_COLUMNS, Job, JobKind, JobStatus, event_in, events_in, finish_job_in, job_of};
use crate::{DbError, now_ms, random_hex, sha256_hex};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

/// The kind of an approval gate's task: once its dependencies are done it is held (it stays
/// `waiting`, and its job shows as waiting) until [`crate::Db::decide_gate`] makes it ready.
pub const GATE_KIND: &str = "gate";

/// What deciding at a gate did.
#[derive(Debug)]
pub enum GateOutcome {
    /// The tenant has no such job.
    NotFound,
    /// The job does not wait at a gate (it is shown as it is).
    NotWaiting(Job),
    /// The gate task is ready, with the decision as its input: offer it to the scheduler.
    Decided(Task),
}

/// A task to create with its job.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// Unique within the job.
    pub name: String,
    /// `call` (a tool call), or a factory run's step: `agent`, `validate` or `review`.
    pub kind: String,
    /// The plugin it calls.
    pub plugin: String,
    /// Its input; `null` with dependencies means "the outputs of my dependencies, by name".
    pub input: serde_json::Value,
    /// Names of the tasks it waits for.
    pub depends_on: Vec<String>,
    /// How many times it may be leased before it is given up.
    pub max_attempts: i32,
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Waiting for its dependencies.
    Waiting,
    /// Ready to run (perhaps not before `not_before`).
    Ready,
    /// Leased by a node.
    Leased,
    /// Done, with an output.
    Succeeded,
    /// Given up.
    Failed,
    /// Its job was cancelled or failed.
    Cancelled,
}

impl TaskStatus {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Waiting => "waiting",
            TaskStatus::Ready => "ready",
            TaskStatus::Leased => "leased",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Result<Self, DbError> {
        Ok(match s {
            "waiting" => TaskStatus::Waiting,
            "ready" => TaskStatus::Ready,
            "leased" => TaskStatus::Leased,
            "succeeded" => TaskStatus::Succeeded,
            "failed" => TaskStatus::Failed,
            "cancelled" => TaskStatus::Cancelled,
            other => return Err(DbError::Invalid(format!("stored task status `{other}` is unknown"))),
        })
    }

    /// Whether the task is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled)
    }
}

/// A stored task.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Task {
    /// `<job id>.<index>`.
    pub id: String,
    /// Its job.
    pub job_id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// Its name in the job.
    pub name: String,
    /// `call` (a tool call), or a factory run's step: `agent`, `validate` or `review`.
    pub kind: String,
    /// The plugin it calls.
    pub plugin: String,
    /// Its input (once ready: with its dependencies' outputs filled in): any JSON value.
    // Kept as its text (see JsonText), like the output.
    #[schema(value_type = serde_json::Value)]
    pub input: crate::JsonText,
    /// Names of the tasks it waits for.
    pub depends_on: Vec<String>,
    /// Higher runs first within the tenant.
    pub priority: i32,
    /// Where it is.
    pub status: TaskStatus,
    /// Leases so far.
    pub attempts: i32,
    /// Leases allowed.
    pub max_attempts: i32,
    /// Not to start before (unix ms).
    pub not_before: i64,
    /// The job's deadline (unix ms).
    pub deadline_at: Option<i64>,
    /// The node holding it.
    #[serde(skip)]
    pub lease_owner: Option<String>,
    /// Whether an earlier lease on it was handed back or lost (this run resumes it).
    pub resumed: bool,
    /// Its result, once succeeded: any JSON value.
    // Kept as its text (see JsonText).
    #[schema(value_type = Option<serde_json::Value>)]
    pub output: Option<crate::JsonText>,
    /// The last error.
    pub error: Option<String>,
}

/// A lease on a task: who holds it and which attempt it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The task.
    pub task_id: String,
    /// Its job.
    pub job_id: String,
    /// The holding node.
    pub owner: String,
    /// The attempt (fencing token).
    pub attempt: i32,
}

/// What a task that succeeded leaves behind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskResult {
    /// Its output: stored with it, and given to dependants that have no input of their own.
    pub output: crate::JsonText,
    /// Tasks to add to its job, in the same transaction as the result: a step that decides what
    /// comes next (the factory's review adds the next repair round). Their dependencies may name
    /// any task of the job.
    pub then: Vec<NewTask>,
    /// When the job ends with this task, its output is the job's output (the factory's report)
    /// instead of every task's output by name.
    pub job_output: bool,
    /// The job's artifact (the factory's capsule), stored in the same transaction.
    pub artifact: Option<crate::jobs::Artifact>,
}

impl From<crate::JsonText> for TaskResult {
    fn from(output: crate::JsonText) -> Self {
        TaskResult { output, ..Default::default() }
    }
}

impl From<serde_json::Value> for TaskResult {
    fn from(output: serde_json::Value) -> Self {
        TaskResult { output: output.into(), ..Default::default() }
    }
}

/// What recording a task's end did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Recorded {
    /// False when the lease had been lost: nothing was recorded.
    pub recorded: bool,
    /// Tasks of the job that became ready.
    pub ready: Vec<Task>,
    /// The job's end, if it ended.
    pub job_finished: Option<JobStatus>,
    /// The ready task leased in the same transaction, when the caller asked to take one (see
    /// [`Takeover`]); it is not in `ready`.
    pub taken: Option<Task>,
    /// The job's tasks as the transaction left them, outputs included, when a task was taken:
    /// what the taken task's run reads, handed over without reading them again.
    pub tasks: Vec<Task>,
}

/// A node's offer to run one of the tasks a completion makes ready itself, leased in the
/// completion's transaction: one transaction instead of two, and no trip through the ready
/// queue (the scheduler offers this only when no queued task would have started first).
pub struct Takeover<'a> {
    /// The node.
    pub owner: &'a str,
    /// The lease's length.
    pub lease_ms: i64,
    /// Whether the node may start this task now (its plugin's circuit is closed, say); the
    /// first ready task it accepts is taken.
    pub accepts: &'a (dyn Fn(&Task) -> bool + Send + Sync),
}

pub(crate) const TASK_COLUMNS: &str = "id, job_id, tenant_id, name, kind, plugin, input, depends_on, priority, status, \
     attempts, max_attempts, not_before, deadline_at, lease_owner, resumed, output, error";

/// Retries a transaction that lost a race (a concurrent event append, a serialisation failure
/// or deadlock on PostgreSQL).
macro_rules! retrying {
    ($body:expr) => {{
        let mut tries = 0;
        loop {
            let outcome: Result<_, DbError> = $body.await;
            match outcome {
                Err(DbError::Sql(sqlx::Error::Database(e)))
                    if tries < 8
                        && (e.is_unique_violation() || matches!(e.code().as_deref(), Some("40001" | "40P01"))) =>
                {
                    tries += 1;
                }
                other => break other,
            }
        }
    }};
}

/// Locks the job row for the rest of the transaction; returns its task count, or `None` if the
/// job is over.
async fn lock_live_job(tx: &mut Transaction<'_, Any>, job_id: &str, now: i64) -> Result<Option<i32>, DbError> {
    let row = sqlx::query(
        "UPDATE jobs SET status = 'running', updated_at = $1 WHERE id = $2 AND status IN ('queued', 'running') \
         RETURNING task_count",
    )
    .bind(now)
    .bind(job_id)
    .fetch_optional(&mut **tx)
    .await?;
    row.map(|r| r.try_get::<i32, _>("task_count")).transpose().map_err(DbError::from)
}

/// The gate task a waiting job holds: a gate task still waiting whose dependencies all succeeded.
fn held_gate(tasks: &[Task]) -> Option<&Task> {
    let succeeded = |name: &str| tasks.iter().any(|t| t.name == name && t.status == TaskStatus::Succeeded);
    tasks
        .iter()
        .find(|t| t.kind == GATE_KIND && t.status == TaskStatus::Waiting && t.depends_on.iter().all(|d| succeeded(d)))
}

/// Inserts a job's tasks (in the submitting transaction, or a running task's), numbered from
/// `first`; `all_wait`: every one starts `waiting` (tasks added by a running job, made ready by
/// the caller's readiness pass).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn insert_tasks(
    tx: &mut Transaction<'_, Any>,
    job_id: &str,
    tenant_id: &str,
    priority: i32,
    deadline_at: Option<i64>,
    tasks: &[NewTask],
    first: usize,
    all_wait: bool,
    now: i64,
) -> Result<(), DbError> {
    for (i, task) in tasks.iter().enumerate() {
        let index = first + i;
        let input = serde_json::to_string(&task.input).map_err(|e| DbError::Invalid(e.to_string()))?;
        let deps = serde_json::to_string(&task.depends_on).map_err(|e| DbError::Invalid(e.to_string()))?;
        let status = if task.depends_on.is_empty() && !all_wait { "ready" } else { "waiting" };
        sqlx::query(
            "INSERT INTO tasks (id, job_id, tenant_id, name, kind, plugin, input, depends_on, priority, status, \
             max_attempts, not_before, deadline_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $12, $12)",
        )
        .bind(format!("{job_id}.{index:03}"))
        .bind(job_id)
        .bind(tenant_id)
        .bind(&task.name)
        .bind(&task.kind)
        .bind(&task.plugin)
        .bind(input)
        .bind(deps)
        .bind(priority)
        .bind(status)
        .bind(task.max_attempts.max(1))
        .bind(now)
        .bind(deadline_at)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// A new job.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// Its tenant.
    pub tenant_id: &'a str,
    /// What it does.
    pub kind: JobKind,
    /// Its input.
    pub input: &'a serde_json::Value,
    /// Its priority.
    pub priority: i32,
    /// The caller's idempotency key.
    pub idempotency_key: Option<&'a str>,
    /// How long it may take from its submission (ms); it is given up after that.
    pub deadline_ms: Option<i64>,
    /// Its tasks (at least one).
    pub tasks: Vec<NewTask>,
}

/// What [`crate::Db::cancel_job`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// It was queued or running and is now cancelled.
    Cancelled(Job),
    /// It had already finished; nothing changed.
    AlreadyFinished(Job),
    /// No such job in the tenant.
    NotFound,
}

impl crate::Db {
    /// Persists a job as `queued`. With an idempotency key already used in the tenant, returns
    /// that job and `false` (nothing new is created) when the request is the same, and a
    /// conflict when it differs.
    pub async fn submit_job(&self, new: NewJob<'_>) -> Result<(Job, bool), DbError> {
        self.submit_job_within(new, 0).await
    }

    /// [`Db::submit_job`], refusing it with [`DbError::Full`] when the tenant's open tasks and
    /// the job's would exceed `max_open` (0: no limit). The count and the insert are one
    /// transaction that holds the tenant's row, so concurrent submissions (from any node) cannot
    /// together go past the limit.
    pub async fn submit_job_within(&self, new: NewJob<'_>, max_open: i64) -> Result<(Job, bool), DbError> {
        if let Some(key) = new.idempotency_key
            && (key.is_empty() || key.chars().count() > 255)
        {
            return Err(DbError::Invalid("idempotency_key must be 1-255 characters".into()));
        }
        let input = serde_json::to_string(new.input).map_err(|e| DbError::Invalid(e.to_string()))?;
        // What makes two submissions under one idempotency key the same request: everything the
        // caller chose (the deadline as given, not the instant it falls on; each task's attempts).
        let attempts: Vec<String> = new.tasks.iter().map(|t| t.max_attempts.to_string()).collect();
        let request_hash = sha256_hex(
            format!(
                "{}\n{}\n{}\n{:?}\n{}",
                new.kind.as_str(),
                new.priority,
                input,
                new.deadline_ms,
                attempts.join(",")
            )
            .as_bytes(),
        );
        let now = now_ms();
        let deadline_at = new.deadline_ms.map(|ms| now + ms);
        // Creation time, then a process-wide sequence (so ids made in the same millisecond still
        // sort in creation order), then random bits (so other processes' ids never collide).
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xff_ffff;
        let id = format!("job_{now:012x}{seq:06x}{}", random_hex(5));
        if new.tasks.is_empty() {
            return Err(DbError::Invalid("a job needs at least one task".into()));
        }
        let mut tx = self.pool().begin().await?;
        if max_open > 0 {
            // Serialise the tenant's submissions: a row lock on PostgreSQL, the write lock on SQLite.
            sqlx::query("UPDATE tenants SET weight = weight WHERE id = $1")
                .bind(new.tenant_id)
                .execute(&mut *tx)
                .await?;
            let row = sqlx::query(
                "SELECT COUNT(*) AS n FROM tasks WHERE tenant_id = $1 AND status IN ('waiting', 'ready', 'leased')",
            )
            .bind(new.tenant_id)
            .fetch_one(&mut *tx)
            .await?;
            let open: i64 = row.try_get("n")?;
            if open + new.tasks.len() as i64 > max_open {
                return Err(DbError::Full { open, limit: max_open });
            }
        }
        let inserted = sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, input, priority, idempotency_key, request_hash, status, created_at, \
             updated_at, deadline_at, task_count) VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $8, $9, $10)",
        )
        .bind(&id)
        .bind(new.tenant_id)
        .bind(new.kind.as_str())
        .bind(&input)
        .bind(new.priority)
        .bind(new.idempotency_key)
        .bind(&request_hash)
        .bind(now)
        .bind(deadline_at)
        .bind(new.tasks.len() as i32)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {
                insert_tasks(&mut tx, &id, new.tenant_id, new.priority, deadline_at, &new.tasks, 0, false, now).await?;
                event_in(&mut tx, &id, "queued", &serde_json::json!({})).await?;
                tx.commit().await?;
                let job = self.job(new.tenant_id, &id).await?.ok_or_else(|| DbError::Invalid("job vanished".into()))?;
                Ok((job, true))
            }
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() && new.idempotency_key.is_some() => {
                drop(tx);
                let row = sqlx::query(&format!(
                    "SELECT {JOB_COLUMNS}, request_hash FROM jobs WHERE tenant_id = $1 AND idempotency_key = $2"
                ))
                .bind(new.tenant_id)
                .bind(new.idempotency_key)
                .fetch_one(self.pool())
                .await?;
                if row.try_get::<String, _>("request_hash")? != request_hash {
                    return Err(DbError::Conflict(
                        "idempotency_key was used for a different request; use a new key for a new request".into(),
                    ));
                }
                Ok((job_of(&row)?, false))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Cancels a queued or running job of `tenant_id`, and its tasks.
    pub async fn cancel_job(&self, tenant_id: &str, id: &str, reason: &str) -> Result<CancelOutcome, DbError> {
        let now = now_ms();
        let mut tx = self.pool().begin().await?;
        let done = sqlx::query(
            "UPDATE jobs SET status = 'cancelled', error = $1, updated_at = $2, finished_at = $2 \
             WHERE id = $3 AND tenant_id = $4 AND status IN ('queued', 'running')",
        )
        .bind(reason)
        .bind(now)
        .bind(id)
        .bind(tenant_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 {
            sqlx::query(
                "UPDATE tasks SET status = 'cancelled', lease_owner = NULL, lease_expires = NULL, updated_at = $1 \
                 WHERE job_id = $2 AND status IN ('waiting', 'ready', 'leased')",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            event_in(&mut tx, id, "cancelled", &serde_json::json!({ "reason": reason })).await?;
        }
        tx.commit().await?;
        let Some(job) = self.job(tenant_id, id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        if done.rows_affected() == 1 {
            Ok(CancelOutcome::Cancelled(job))
        } else {
            Ok(CancelOutcome::AlreadyFinished(job))
        }
    }

    /// Decides at the gate `tenant_id`'s job waits at: its held gate task becomes ready with
    /// `decision` as its input, the job stops waiting, and an event of `kind` (`approved`,
    /// `rejected`) records it. Exactly one decision is taken per gate: a second one finds the job
    /// no longer waiting.
    pub async fn decide_gate(
        &self,
        tenant_id: &str,
        job_id: &str,
        decision: &serde_json::Value,
        kind: &str,
    ) -> Result<GateOutcome, DbError> {
        let input = serde_json::to_string(decision).map_err(|e| DbError::Invalid(e.to_string()))?;
        retrying!(async {
            let now = now_ms();
            let mut tx = self.pool().begin().await?;
            // The job row first: it serialises this with the job's other writes.
            let locked = sqlx::query(
                "UPDATE jobs SET waiting_at = NULL, updated_at = $1                  WHERE id = $2 AND tenant_id = $3 AND status = 'running' AND waiting_at IS NOT NULL",
            )
            .bind(now)
            .bind(job_id)
            .bind(tenant_id)
            .execute(&mut *tx)
            .await?;
            if locked.rows_affected() != 1 {
                drop(tx);
                return Ok(match self.job(tenant_id, job_id).await? {
                    Some(job) => GateOutcome::NotWaiting(job),
                    None => GateOutcome::NotFound,
                });
            }
            let rows = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE job_id = $1 ORDER BY id"))
                .bind(job_id)
                .fetch_all(&mut *tx)
                .await?;
            let tasks = rows.iter().map(task_of).collect::<Result<Vec<_>, _>>()?;
            let Some(held) = held_gate(&tasks) else {
                return Err(DbError::Invalid(format!("job `{job_id}` was marked waiting with no gate held")));
            };
            sqlx::query(
                "UPDATE tasks SET status = 'ready', input = $1, not_before = $2, updated_at = $2                  WHERE id = $3 AND status = 'waiting'",
            )
            .bind(&input)
            .bind(now)
            .bind(&held.id)
            .execute(&mut *tx)
            .await?;
            let mut data = decision.clone();
            if let Some(map) = data.as_object_mut() {
                map.insert("gate".into(), serde_json::Value::String(held.name.clone()));
            }
            event_in(&mut tx, job_id, kind, &data).await?;
            tx.commit().await?;
            let mut task = held.clone();
            task.status = TaskStatus::Ready;
            task.not_before = now;
            task.input = crate::JsonText::of(decision);
            Ok(GateOutcome::Decided(task))
        })
    }

    /// The gate tasks held by jobs whose deadline passed while they waited for a decision (a
    /// waiting job holds no lease, so no lease check ever sees its deadline). Each job has at
    /// most one held gate: the one whose dependencies all succeeded.
    pub async fn overdue_gates(&self) -> Result<Vec<Task>, DbError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id FROM jobs WHERE status = 'running' AND waiting_at IS NOT NULL \
             AND deadline_at IS NOT NULL AND deadline_at <= $1 ORDER BY id",
        )
        .bind(now_ms())
        .fetch_all(self.pool())
        .await?;
        let mut held = Vec::new();
        for row in &rows {
            let (id, tenant): (String, String) = (row.try_get("id")?, row.try_get("tenant_id")?);
            let tasks = self.job_tasks(&tenant, &id).await?;
            held.extend(held_gate(&tasks).cloned());
        }
        Ok(held)
    }

    /// Leases a ready task (or one whose lease expired: its node died) for `lease_ms`, and
    /// records a `started` event with it: `None` if it is not ready (held under a live lease,
    /// cancelled, not due) or its job is over.
    pub async fn lease_task(&self, task_id: &str, owner: &str, lease_ms: i64) -> Result<Option<Task>, DbError> {
        let now = now_ms();
        let Some(job_id) = task_id.rsplit_once('.').map(|(j, _)| j) else {
            return Err(DbError::Invalid(format!("`{task_id}` is not a task id")));
        };
        retrying!(async {
            let mut tx = self.pool().begin().await?;
            if lock_live_job(&mut tx, job_id, now).await?.is_none() {
                return Ok(None);
            }
            let row = sqlx::query(&format!(
                "UPDATE tasks SET status = 'leased', lease_owner = $1, lease_expires = $2, attempts = attempts + 1, \
                 resumed = CASE WHEN status = 'leased' THEN 1 ELSE resumed END, updated_at = $3 \
                 WHERE id = $4 AND not_before <= $3 \
                 AND (status = 'ready' OR (status = 'leased' AND lease_expires < $3)) RETURNING {TASK_COLUMNS}"
            ))
            .bind(owner)
            .bind(now + lease_ms)
            .bind(now)
            .bind(task_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let task = task_of(&row)?;
            event_in(&mut tx, job_id, "started", &started(&task, owner)).await?;
            tx.commit().await?;
            Ok(Some(task))
        })
    }

    /// Extends every lease `owner` holds; returns the ids of the tasks it still holds (a task
    /// missing from the list was cancelled or taken over: stop working on it).
    pub async fn renew_leases(&self, owner: &str, lease_ms: i64) -> Result<Vec<String>, DbError> {
        let now = now_ms();
        sqlx::query("UPDATE tasks SET lease_expires = $1 WHERE lease_owner = $2 AND status = 'leased'")
            .bind(now + lease_ms)
            .bind(owner)
            .execute(self.pool())
            .await?;
        let rows = sqlx::query("SELECT id FROM tasks WHERE lease_owner = $1 AND status = 'leased'")
            .bind(owner)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(|r| Ok(r.try_get("id")?)).collect()
    }

    /// Makes leased tasks ready again: those of `owner` (a node restarting under the same
    /// identity knows its old leases are dead), or, with `None`, those whose lease expired.
    pub async fn reclaim_leases(&self, owner: Option<&str>) -> Result<Vec<Task>, DbError> {
        let now = now_ms();
        let rows = match owner {
            Some(owner) => {
                sqlx::query(&format!(
                    "UPDATE tasks SET status = 'ready', lease_owner = NULL, lease_expires = NULL, resumed = 1, \
                     updated_at = $1 WHERE status = 'leased' AND lease_owner = $2 RETURNING {TASK_COLUMNS}"
                ))
                .bind(now)
                .bind(owner)
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "UPDATE tasks SET status = 'ready', lease_owner = NULL, lease_expires = NULL, resumed = 1, \
                     updated_at = $1 WHERE status = 'leased' AND lease_expires < $1 RETURNING {TASK_COLUMNS}"
                ))
                .bind(now)
                .fetch_all(self.pool())
                .await?
            }
        };
        rows.iter().map(task_of).collect()
    }

    /// Hands back what `owner` holds at a graceful stop: ready again, the attempt not counted.
    pub async fn release_leases(&self, owner: &str) -> Result<u64, DbError> {
        let done = sqlx::query(
            "UPDATE tasks SET status = 'ready', lease_owner = NULL, lease_expires = NULL, attempts = attempts - 1, \
             resumed = 1, updated_at = $1 WHERE lease_owner = $2 AND status = 'leased'",
        )
        .bind(now_ms())
        .bind(owner)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Every ready task, oldest first: what a starting node queues.
    pub async fn ready_tasks(&self) -> Result<Vec<Task>, DbError> {
        let rows = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE status = 'ready' ORDER BY id"))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(task_of).collect()
    }

    /// Ready tasks untouched for `idle_ms` (a work queue lost their message): to offer again.
    pub async fn idle_ready_tasks(&self, idle_ms: i64) -> Result<Vec<Task>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE status = 'ready' AND updated_at < $1 ORDER BY id LIMIT 10000"
        ))
        .bind(now_ms() - idle_ms)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(task_of).collect()
    }

    /// A task by id (any tenant: for the scheduler).
    pub async fn task(&self, task_id: &str) -> Result<Option<Task>, DbError> {
        let row = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"))
            .bind(task_id)
            .fetch_optional(self.pool())
            .await?;
        row.map(|r| task_of(&r)).transpose()
    }

    /// The tasks of a job of `tenant_id`, in order (empty for another tenant's job).
    pub async fn job_tasks(&self, tenant_id: &str, job_id: &str) -> Result<Vec<Task>, DbError> {
        let rows =
            sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE job_id = $1 AND tenant_id = $2 ORDER BY id"))
                .bind(job_id)
                .bind(tenant_id)
                .fetch_all(self.pool())
                .await?;
        rows.iter().map(task_of).collect()
    }

    /// Records a task's success under its lease, with the tasks it adds to its job and the job's
    /// artifact: its dependants whose inputs are now all there become ready, and when it was the
    /// job's last task the job succeeds (its output is that task's output for a one-task job or
    /// when the result says so, else every task's output by name). A task of a larger job gets a
    /// `progress` event saying it succeeded.
    pub async fn complete_task(&self, lease: &Lease, result: &TaskResult) -> Result<Recorded, DbError> {
        self.complete_and_take(lease, result, None).await
    }

    /// [`Self::complete_task`], and with `takeover`, one of the tasks it makes ready is leased
    /// to the taking node in the same transaction (with its `started` event), and the job's
    /// tasks come back with it.
    pub async fn complete_and_take(
        &self,
        lease: &Lease,
        result: &TaskResult,
        takeover: Option<Takeover<'_>>,
    ) -> Result<Recorded, DbError> {
        let text = result.output.get();
        retrying!(async {
            let now = now_ms();
            let mut tx = self.pool().begin().await?;
            let Some(task_count) = lock_live_job(&mut tx, &lease.job_id, now).await? else {
                return Ok(Recorded::default());
            };
            let done = sqlx::query(
                "UPDATE tasks SET status = 'succeeded', output = $1, error = NULL, lease_owner = NULL, \
                 lease_expires = NULL, updated_at = $2 \
                 WHERE id = $3 AND status = 'leased' AND lease_owner = $4 AND attempts = $5",
            )
            .bind(text)
            .bind(now)
            .bind(&lease.task_id)
            .bind(&lease.owner)
            .bind(lease.attempt)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                return Ok(Recorded::default());
            }
            if let Some(artifact) = &result.artifact {
                sqlx::query("DELETE FROM job_artifacts WHERE job_id = $1")
                    .bind(&lease.job_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO job_artifacts (job_id, media_type, bytes) VALUES ($1, $2, $3)")
                    .bind(&lease.job_id)
                    .bind(&artifact.media_type)
                    .bind(artifact.bytes.as_slice())
                    .execute(&mut *tx)
                    .await?;
            }
            if !result.then.is_empty() {
                let row = sqlx::query("SELECT tenant_id, priority, deadline_at FROM jobs WHERE id = $1")
                    .bind(&lease.job_id)
                    .fetch_one(&mut *tx)
                    .await?;
                let (tenant, priority, deadline): (String, i32, Option<i64>) =
                    (row.try_get("tenant_id")?, row.try_get("priority")?, row.try_get("deadline_at")?);
                // Added tasks always wait first: the readiness pass below promotes those whose
                // dependencies are done, with their inputs filled in.
                let first = task_count as usize;
                insert_tasks(&mut tx, &lease.job_id, &tenant, priority, deadline, &result.then, first, true, now)
                    .await?;
                sqlx::query("UPDATE jobs SET task_count = $1 WHERE id = $2")
                    .bind(task_count + result.then.len() as i32)
                    .bind(&lease.job_id)
                    .execute(&mut *tx)
                    .await?;
            }
            if task_count == 1 && result.then.is_empty() {
                // The hot path: a one-task job ends with its task.
                finish_job_in(&mut tx, &lease.job_id, JobStatus::Succeeded, Some(text), None, now).await?;
                event_in(&mut tx, &lease.job_id, "succeeded", &serde_json::json!({})).await?;
                tx.commit().await?;
                return Ok(Recorded { recorded: true, job_finished: Some(JobStatus::Succeeded), ..Default::default() });
            }
            let rows = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE job_id = $1 ORDER BY id"))
                .bind(&lease.job_id)
                .fetch_all(&mut *tx)
                .await?;
            let mut tasks = rows.iter().map(task_of).collect::<Result<Vec<_>, _>>()?;
            // A step of a larger job says it is done, in the same transaction, so the event comes
            // before anything its dependants record. The events go in at the end, in one statement.
            let mut events = Vec::new();
            if let Some(done) = tasks.iter().find(|t| t.id == lease.task_id) {
                let data = serde_json::json!({ "task": done.name, "state": "succeeded", "attempt": lease.attempt });
                events.push(("progress", data));
            }
            let succeeded = |name: &str| tasks.iter().any(|t| t.name == name && t.status == TaskStatus::Succeeded);
            let (mut ready, mut taken) = (Vec::new(), None);
            for task in tasks.iter().filter(|t| t.status == TaskStatus::Waiting) {
                if !task.depends_on.iter().all(|d| succeeded(d)) {
                    continue;
                }
                if task.kind == GATE_KIND {
                    // Held for a person's decision: no lease, no slot; the job says it waits.
                    sqlx::query("UPDATE jobs SET waiting_at = $1 WHERE id = $2")
                        .bind(now)
                        .bind(&lease.job_id)
                        .execute(&mut *tx)
                        .await?;
                    events.push(("waiting", serde_json::json!({ "gate": task.name })));
                    continue;
                }
                let mut task = task.clone();
                if task.input.is_null() && !task.depends_on.is_empty() {
                    task.input = by_name(tasks.iter().filter(|t| task.depends_on.contains(&t.name)));
                }
                task.not_before = now;
                // The first ready task the taking node accepts is leased to it by the same
                // update that makes it ready (as `lease_task` would lease it).
                if let Some(takeover) = takeover.as_ref().filter(|t| taken.is_none() && (t.accepts)(&task)) {
                    let row = sqlx::query(&format!(
                        "UPDATE tasks SET status = 'leased', input = $1, not_before = $2, updated_at = $2, \
                         lease_owner = $3, lease_expires = $4, attempts = attempts + 1 \
                         WHERE id = $5 AND status = 'waiting' RETURNING {TASK_COLUMNS}"
                    ))
                    .bind(task.input.get())
                    .bind(now)
                    .bind(takeover.owner)
                    .bind(now + takeover.lease_ms)
                    .bind(&task.id)
                    .fetch_optional(&mut *tx)
                    .await?;
                    // (The job's row is locked: nothing else moves its tasks meanwhile.)
                    if let Some(row) = row {
                        let task = task_of(&row)?;
                        events.push(("started", started(&task, takeover.owner)));
                        taken = Some(task);
                    }
                    continue;
                }
                sqlx::query(
                    "UPDATE tasks SET status = 'ready', input = $1, not_before = $2, updated_at = $2 \
                     WHERE id = $3 AND status = 'waiting'",
                )
                .bind(task.input.get())
                .bind(now)
                .bind(&task.id)
                .execute(&mut *tx)
                .await?;
                task.status = TaskStatus::Ready;
                ready.push(task);
            }
            let mut job_finished = None;
            if tasks.iter().all(|t| t.status == TaskStatus::Succeeded) {
                // This task's output (no copy of it), or every task's by name.
                let all = (tasks.len() > 1 && !result.job_output).then(|| by_name(tasks.iter()));
                let output = all.as_ref().map_or(text, crate::JsonText::get);
                finish_job_in(&mut tx, &lease.job_id, JobStatus::Succeeded, Some(output), None, now).await?;
                events.push(("succeeded", serde_json::json!({})));
                job_finished = Some(JobStatus::Succeeded);
            }
            events_in(&mut tx, &lease.job_id, &events).await?;
            tx.commit().await?;
            if let Some(taken) = &taken {
                // The job's tasks as they now stand, for the taken task's run.
                for task in &mut tasks {
                    if let Some(fresh) = ready.iter().chain(std::iter::once(taken)).find(|t| t.id == task.id) {
                        *task = fresh.clone();
                    }
                }
            } else {
                tasks.clear();
            }
            Ok(Recorded { recorded: true, ready, job_finished, taken, tasks })
        })
    }

    /// Puts a task back to wait for another attempt from `not_before` on, under its lease, with
    /// an event saying why and when.
    pub async fn retry_task(
        &self,
        lease: &Lease,
        not_before: i64,
        error: &str,
        event: &serde_json::Value,
    ) -> Result<bool, DbError> {
        retrying!(async {
            let now = now_ms();
            let mut tx = self.pool().begin().await?;
            if lock_live_job(&mut tx, &lease.job_id, now).await?.is_none() {
                return Ok(false);
            }
            let done = sqlx::query(
                "UPDATE tasks SET status = 'ready', not_before = $1, error = $2, lease_owner = NULL, \
                 lease_expires = NULL, updated_at = $3 \
                 WHERE id = $4 AND status = 'leased' AND lease_owner = $5 AND attempts = $6",
            )
            .bind(not_before)
            .bind(error)
            .bind(now)
            .bind(&lease.task_id)
            .bind(&lease.owner)
            .bind(lease.attempt)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                return Ok(false);
            }
            event_in(&mut tx, &lease.job_id, "retrying", event).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Gives a task up (under its lease, or with `None` for one that never started): the job
    /// fails with `error`, and its other tasks are cancelled. `false` if the job was already over
    /// or the lease was lost.
    pub async fn fail_task(&self, task_id: &str, lease: Option<&Lease>, error: &str) -> Result<bool, DbError> {
        let Some(job_id) = task_id.rsplit_once('.').map(|(j, _)| j.to_string()) else {
            return Err(DbError::Invalid(format!("`{task_id}` is not a task id")));
        };
        retrying!(async {
            let now = now_ms();
            let mut tx = self.pool().begin().await?;
            if lock_live_job(&mut tx, &job_id, now).await?.is_none() {
                return Ok(false);
            }
            let mut update = sqlx::query(
                "UPDATE tasks SET status = 'failed', error = $1, lease_owner = NULL, lease_expires = NULL, \
                 updated_at = $2 WHERE id = $3 AND status IN ('ready', 'leased', 'waiting') \
                 AND ($4 = '' OR (lease_owner = $4 AND attempts = $5))",
            )
            .bind(error)
            .bind(now)
            .bind(task_id)
            .bind(lease.map(|l| l.owner.as_str()).unwrap_or(""));
            update = update.bind(lease.map(|l| l.attempt).unwrap_or(0));
            if update.execute(&mut *tx).await?.rows_affected() != 1 {
                return Ok(false);
            }
            sqlx::query(
                "UPDATE tasks SET status = 'cancelled', lease_owner = NULL, lease_expires = NULL, updated_at = $1 \
                 WHERE job_id = $2 AND status IN ('waiting', 'ready', 'leased')",
            )
            .bind(now)
            .bind(&job_id)
            .execute(&mut *tx)
            .await?;
            finish_job_in(&mut tx, &job_id, JobStatus::Failed, None, Some(error), now).await?;
            event_in(&mut tx, &job_id, "failed", &serde_json::json!({ "error": error })).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Jobs left queued or running without tasks (stored before the scheduler had tasks).
    pub async fn jobs_without_tasks(&self) -> Result<Vec<Job>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM jobs j WHERE status IN ('queued', 'running') \
             AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.job_id = j.id) ORDER BY id",
            JOB_COLUMNS
        ))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(job_of).collect()
    }

    /// Gives an existing job its tasks (see [`crate::Db::jobs_without_tasks`]).
    pub async fn add_tasks(&self, job: &Job, tasks: &[NewTask]) -> Result<(), DbError> {
        let mut tx = self.pool().begin().await?;
        insert_tasks(&mut tx, &job.id, &job.tenant_id, job.priority, job.deadline_at, tasks, 0, false, now_ms())
            .await?;
        sqlx::query("UPDATE jobs SET task_count = $1 WHERE id = $2")
            .bind(tasks.len() as i32)
            .bind(&job.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// How many tasks of `tenant_id` are not over (waiting, ready or running).
    pub async fn open_tasks(&self, tenant_id: &str) -> Result<i64, DbError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM tasks WHERE tenant_id = $1 AND status IN ('waiting', 'ready', 'leased')",
        )
        .bind(tenant_id)
        .fetch_one(self.pool())
        .await?;
        Ok(row.try_get("n")?)
    }

    /// Tenants whose scheduler share is not the default: (id, weight, max running).
    pub async fn tenant_shares(&self) -> Result<Vec<(String, i64, i64)>, DbError> {
        let rows = sqlx::query("SELECT id, weight, max_running FROM tenants WHERE weight <> 1 OR max_running <> 0")
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("id")?,
                    r.try_get::<i32, _>("weight")?.into(),
                    r.try_get::<i32, _>("max_running")?.into(),
                ))
            })
            .collect()
    }

    /// Sets a tenant's scheduler share: its weight (1-1000) and its own cap on running tasks
    /// (0: the host's default). `false` when there is no such tenant.
    pub async fn set_tenant_share(&self, tenant_id: &str, weight: i64, max_running: i64) -> Result<bool, DbError> {
        if !(1..=1000).contains(&weight) {
            return Err(DbError::Invalid(format!("weight {weight} is out of range: 1 to 1000")));
        }
        if !(0..=100_000).contains(&max_running) {
            return Err(DbError::Invalid(format!("max_running {max_running} is out of range: 0 to 100000")));
        }
        let done = sqlx::query("UPDATE tenants SET weight = $1, max_running = $2 WHERE id = $3")
            .bind(weight as i32)
            .bind(max_running as i32)
            .bind(tenant_id)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// A `started` event's data: the task, its attempt, and the node that took it.
fn started(task: &Task, owner: &str) -> serde_json::Value {
    serde_json::json!({ "task": task.name, "attempt": task.attempts, "resumed": task.resumed, "node": owner })
}

/// The outputs of `tasks` by name (`null` for one without), as one JSON object, built from their
/// text.
fn by_name<'a>(tasks: impl Iterator<Item = &'a Task>) -> crate::JsonText {
    let all: std::collections::BTreeMap<&str, &serde_json::value::RawValue> = tasks
        .map(|t| (t.name.as_str(), t.output.as_ref().map_or(serde_json::value::RawValue::NULL, |o| o.as_raw())))
        .collect();
    crate::JsonText::of(&all)
}

pub(crate) fn task_of(r: &AnyRow) -> Result<Task, DbError> {
    Ok(Task {
        id: r.try_get("id")?,
        job_id: r.try_get("job_id")?,
        tenant_id: r.try_get("tenant_id")?,
        name: r.try_get("name")?,
        kind: r.try_get("kind")?,
        plugin: r.try_get("plugin")?,
        input: crate::json::stored(r.try_get::<String, _>("input")?)?,
        depends_on: serde_json::from_str(&r.try_get::<String, _>("depends_on")?)
            .map_err(|e| DbError::Invalid(format!("stored depends_on is unreadable: {e}")))?,
        priority: r.try_get("priority")?,
        status: TaskStatus::parse(&r.try_get::<String, _>("status")?)?,
        attempts: r.try_get("attempts")?,
        max_attempts: r.try_get("max_attempts")?,
        not_before: r.try_get("not_before")?,
        deadline_at: r.try_get("deadline_at")?,
        lease_owner: r.try_get("lease_owner")?,
        resumed: r.try_get::<i32, _>("resumed")? != 0,
        output: r.try_get::<Option<String>, _>("output")?.map(crate::json::stored).transpose()?,
        error: r.try_get("error")?,
    })
}
