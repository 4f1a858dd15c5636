//! Jobs: what a tenant asked the host to do (a plugin call, a factory run), persisted before it
//! is acknowledged, with its progress events and its output artifact. Every lookup takes the
//! caller's tenant; another tenant's job is reported as missing.

use crate::{DbError, now_ms};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

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
    /// Running, and paused at an approval gate until a person decides (stored as `running`,
    /// with `waiting_at`).
    Waiting,
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
            JobStatus::Waiting => "waiting",
        }
    }

    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }

    /// Every status, in the order a job may pass through them.
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Waiting,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    /// The status named `name` (as [`JobStatus::as_str`] spells it).
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// A stored status (`waiting` is stored as `running`, with `waiting_at`).
    fn parse(s: &str) -> Result<Self, DbError> {
        match Self::named(s) {
            Some(JobStatus::Waiting) | None => Err(DbError::Invalid(format!("stored job status `{s}` is unknown"))),
            Some(status) => Ok(status),
        }
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
    /// The result, once succeeded: any JSON value.
    // Kept as its text (see JsonText).
    #[schema(value_type = Option<serde_json::Value>)]
    pub output: Option<crate::JsonText>,
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
    /// Since when it waits at an approval gate (unix ms), while it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_at: Option<i64>,
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

/// A job's stored artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Its media type.
    pub media_type: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

pub(crate) const JOB_COLUMNS: &str = "id, tenant_id, kind, status, priority, idempotency_key, input, output, error, \
     created_at, updated_at, finished_at, deadline_at, task_count, waiting_at";

impl crate::Db {
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
    /// one kind and in one status, at most `limit`.
    pub async fn jobs(
        &self,
        tenant_id: &str,
        kind: Option<JobKind>,
        status: Option<JobStatus>,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Job>, DbError> {
        // As `job_of` tells them apart: a job waiting at a gate is stored as running.
        let status = match status {
            None => String::new(),
            Some(JobStatus::Waiting) => " AND status = 'running' AND waiting_at IS NOT NULL".into(),
            Some(JobStatus::Running) => " AND status = 'running' AND waiting_at IS NULL".into(),
            Some(other) => format!(" AND status = '{}'", other.as_str()),
        };
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE tenant_id = $1 AND ($2 = '' OR id < $2) AND ($3 = '' OR kind = $3){status} ORDER BY id DESC LIMIT $4"
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
    let waiting_at: Option<i64> = r.try_get("waiting_at")?;
    let status = match JobStatus::parse(&r.try_get::<String, _>("status")?)? {
        JobStatus::Running if waiting_at.is_some() => JobStatus::Waiting,
        status => status,
    };
    Ok(Job {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        kind,
        status,
        waiting_at: if status == JobStatus::Waiting { waiting_at } else { None },
        priority: r.try_get("priority")?,
        idempotency_key: r.try_get("idempotency_key")?,
        input: parse_json(&r.try_get::<String, _>("input")?)?,
        output: r.try_get::<Option<String>, _>("output")?.map(crate::json::stored).transpose()?,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        finished_at: r.try_get("finished_at")?,
        deadline_at: r.try_get("deadline_at")?,
        task_count: r.try_get("task_count")?,
    })
}

/// Appends an event inside a transaction.
pub(crate) async fn event_in(
    tx: &mut Transaction<'_, Any>,
    job_id: &str,
    kind: &str,
    data: &serde_json::Value,
) -> Result<(), DbError> {
    let data = serde_json::to_string(data).map_err(|e| DbError::Invalid(e.to_string()))?;
    sqlx::query(
        "INSERT INTO job_events (job_id, seq, at, kind, data) \
         VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = $1), $2, $3, $4)",
    )
    .bind(job_id)
    .bind(now_ms())
    .bind(kind)
    .bind(data)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Appends events, in order, inside a transaction, in one statement.
pub(crate) async fn events_in(
    tx: &mut Transaction<'_, Any>,
    job_id: &str,
    events: &[(&str, serde_json::Value)],
) -> Result<(), DbError> {
    if let [(kind, data)] = events {
        return event_in(tx, job_id, kind, data).await;
    }
    if events.is_empty() {
        return Ok(());
    }
    // The sequence numbers follow the job's last one, read once (before any row goes in).
    let rows: Vec<String> = (0..events.len())
        .map(|i| {
            format!("SELECT {} AS n, CAST(${} AS TEXT) AS kind, CAST(${} AS TEXT) AS data", i + 1, 3 + 2 * i, 4 + 2 * i)
        })
        .collect();
    let sql = format!(
        "INSERT INTO job_events (job_id, seq, at, kind, data) \
         SELECT $1, last.seq + new.n, $2, new.kind, new.data \
         FROM (SELECT COALESCE(MAX(seq), 0) AS seq FROM job_events WHERE job_id = $1) AS last, ({}) AS new",
        rows.join(" UNION ALL ")
    );
    let mut query = sqlx::query(&sql).bind(job_id).bind(now_ms());
    for (kind, data) in events {
        let data = serde_json::to_string(data).map_err(|e| DbError::Invalid(e.to_string()))?;
        query = query.bind(*kind).bind(data);
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// Ends a job inside a transaction (the job row is already locked).
pub(crate) async fn finish_job_in(
    tx: &mut Transaction<'_, Any>,
    job_id: &str,
    status: JobStatus,
    output: Option<&str>,
    error: Option<&str>,
    now: i64,
) -> Result<(), DbError> {
    sqlx::query(
        "UPDATE jobs SET status = $1, output = $2, error = $3, updated_at = $4, finished_at = $4 WHERE id = $5",
    )
    .bind(status.as_str())
    .bind(output)
    .bind(error)
    .bind(now)
    .bind(job_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
