//! Jobs: what a tenant asked the host to do (a plugin call, a factory run), persisted before it
//! is acknowledged, with its progress events and its output artifact. Every lookup takes the
//! caller's tenant; another tenant's job is reported as missing.

use crate::{DbError, now_ms, random_hex, sha256_hex};
use sqlx::Row;
use sqlx::any::AnyRow;

/// What kind of work a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Invoke an installed tool plugin with a JSON input.
    Call,
    /// Run the factory pipeline on a requirement.
    Run,
}

impl JobKind {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Call => "call",
            JobKind::Run => "run",
        }
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Persisted, waiting for capacity.
    Queued,
    /// Being worked on.
    Running,
    /// Done, with an output.
    Succeeded,
    /// Done, with an error.
    Failed,
    /// Stopped at the caller's request.
    Cancelled,
}

impl JobStatus {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }

    fn parse(s: &str) -> Result<Self, DbError> {
        Ok(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            other => return Err(DbError::Invalid(format!("stored job status `{other}` is unknown"))),
        })
    }
}

/// A job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Job {
    /// `job_<hex>`; ids sort by creation time.
    pub id: String,
    /// The tenant it belongs to.
    pub tenant_id: String,
    /// What it does.
    pub kind: JobKind,
    /// Where it is.
    pub status: JobStatus,
    /// Higher runs first within the tenant.
    pub priority: i32,
    /// The caller's idempotency key, if one was given.
    pub idempotency_key: Option<String>,
    /// The job's input.
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    /// The result, once succeeded.
    #[schema(value_type = Option<Object>)]
    pub output: Option<serde_json::Value>,
    /// What went wrong, once failed or cancelled.
    pub error: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
    /// Unix milliseconds, once over.
    pub finished_at: Option<i64>,
    /// When the job is given up if not done (unix ms).
    pub deadline_at: Option<i64>,
    /// How many tasks it has.
    pub task_count: i32,
}

/// One progress event of a job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct JobEvent {
    /// 1, 2, 3... within the job.
    pub seq: i64,
    /// Unix milliseconds.
    pub at: i64,
    /// `queued`, `started`, `progress`, `succeeded`, `failed`, `cancelled`.
    pub kind: String,
    /// Details.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
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
    /// When to give it up (unix ms).
    pub deadline_at: Option<i64>,
    /// Its tasks (at least one).
    pub tasks: Vec<crate::NewTask>,
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

/// A job's stored artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Its media type.
    pub media_type: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

pub(crate) const JOB_COLUMNS: &str = "id, tenant_id, kind, status, priority, idempotency_key, input, output, error, \
     created_at, updated_at, finished_at, deadline_at, task_count";

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
            && (key.is_empty() || key.len() > 255)
        {
            return Err(DbError::Invalid("idempotency_key must be 1-255 characters".into()));
        }
        let input = serde_json::to_string(new.input).map_err(|e| DbError::Invalid(e.to_string()))?;
        let request_hash = sha256_hex(format!("{}\n{}\n{}", new.kind.as_str(), new.priority, input).as_bytes());
        let now = now_ms();
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
        .bind(new.deadline_at)
        .bind(new.tasks.len() as i32)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {
                crate::tasks::insert_tasks(
                    &mut tx,
                    &id,
                    new.tenant_id,
                    new.priority,
                    new.deadline_at,
                    &new.tasks,
                    0,
                    false,
                    now,
                )
                .await?;
                crate::tasks::event_in(&mut tx, &id, "queued", &serde_json::json!({})).await?;
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
                        "a different request with this idempotency_key; use a new key for a new request".into(),
                    ));
                }
                Ok((job_of(&row)?, false))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A job of `tenant_id`.
    pub async fn job(&self, tenant_id: &str, id: &str) -> Result<Option<Job>, DbError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND tenant_id = $2"))
            .bind(id)
            .bind(tenant_id)
            .fetch_optional(self.pool())
            .await?;
        row.map(|r| job_of(&r)).transpose()
    }

    /// Jobs of `tenant_id`, newest first, older than `before` (keyset pagination), optionally of
    /// one kind, at most `limit`.
    pub async fn jobs(
        &self,
        tenant_id: &str,
        kind: Option<JobKind>,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Job>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant_id = $1 AND ($2 = '' OR id < $2) AND ($3 = '' OR kind = $3) ORDER BY id DESC LIMIT $4"
        ))
        .bind(tenant_id)
        .bind(before.unwrap_or(""))
        .bind(kind.map(JobKind::as_str).unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(job_of).collect()
    }

    /// Jobs not yet over (any tenant), oldest first: what a restarted host picks up again.
    pub async fn unfinished_jobs(&self) -> Result<Vec<Job>, DbError> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE status IN ('queued', 'running') ORDER BY priority DESC, id"
        ))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(job_of).collect()
    }

    /// How many jobs are queued and running (for the queue-depth gauge).
    pub async fn job_counts(&self) -> Result<(i64, i64), DbError> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(CASE WHEN status = 'queued' THEN 1 ELSE 0 END), 0) AS queued, \
                    COALESCE(SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END), 0) AS running \
             FROM jobs WHERE status IN ('queued', 'running')",
        )
        .fetch_one(self.pool())
        .await?;
        Ok((row.try_get("queued")?, row.try_get("running")?))
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
            crate::tasks::event_in(&mut tx, id, "cancelled", &serde_json::json!({ "reason": reason })).await?;
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

    /// Events of a job of `tenant_id` after `after`, in order (empty for another tenant's job).
    pub async fn job_events(&self, tenant_id: &str, job_id: &str, after: i64) -> Result<Vec<JobEvent>, DbError> {
        let rows = sqlx::query(
            "SELECT e.seq, e.at, e.kind, e.data FROM job_events e JOIN jobs j ON j.id = e.job_id \
             WHERE e.job_id = $1 AND j.tenant_id = $2 AND e.seq > $3 ORDER BY e.seq LIMIT 1000",
        )
        .bind(job_id)
        .bind(tenant_id)
        .bind(after)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JobEvent {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    kind: r.try_get("kind")?,
                    data: parse_json(&r.try_get::<String, _>("data")?)?,
                })
            })
            .collect()
    }

    /// The artifact of a job of `tenant_id`, if it has one.
    pub async fn artifact(&self, tenant_id: &str, job_id: &str) -> Result<Option<Artifact>, DbError> {
        let row = sqlx::query(
            "SELECT a.media_type, a.bytes FROM job_artifacts a JOIN jobs j ON j.id = a.job_id \
             WHERE a.job_id = $1 AND j.tenant_id = $2",
        )
        .bind(job_id)
        .bind(tenant_id)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| Ok(Artifact { media_type: r.try_get("media_type")?, bytes: r.try_get("bytes")? })).transpose()
    }
}

fn parse_json(text: &str) -> Result<serde_json::Value, DbError> {
    serde_json::from_str(text).map_err(|e| DbError::Invalid(format!("stored JSON is unreadable: {e}")))
}

pub(crate) fn job_of(r: &AnyRow) -> Result<Job, DbError> {
    let kind = match r.try_get::<String, _>("kind")?.as_str() {
        "call" => JobKind::Call,
        "run" => JobKind::Run,
        other => return Err(DbError::Invalid(format!("stored job kind `{other}` is unknown"))),
    };
    Ok(Job {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        kind,
        status: JobStatus::parse(&r.try_get::<String, _>("status")?)?,
        priority: r.try_get("priority")?,
        idempotency_key: r.try_get("idempotency_key")?,
        input: parse_json(&r.try_get::<String, _>("input")?)?,
        output: r.try_get::<Option<String>, _>("output")?.map(|s| parse_json(&s)).transpose()?,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        finished_at: r.try_get("finished_at")?,
        deadline_at: r.try_get("deadline_at")?,
        task_count: r.try_get("task_count")?,
    })
}
