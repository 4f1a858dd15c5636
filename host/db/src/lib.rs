//! The SQL state (tenants, keys, audit, jobs and tasks, installs, model tables, usage) on SQLite or PostgreSQL.
//! May depend on: nothing of ours.
//!
//! QuantumLayer's SQL state, on SQLite (embedded default: a file in the data dir, WAL) or
//! PostgreSQL (scale mode), through one code path (sqlx's Any driver) and one set of migrations,
//! applied at open.
//!
//! - **Tenants**, and **API keys** with a role (`admin`, `developer`, `viewer`). A key is shown
//!   once, at creation; only its SHA-256 is stored (keys are 256-bit random, so a fast hash is
//!   enough), with a short prefix for people to recognise it.
//! - **The audit log**: append-only records of who did what to which object, when, and how it
//!   ended. Each record's hash covers its fields and the previous record's hash, so
//!   [`Db::verify_audit`] finds a record that was changed, removed from the middle, or moved.
//! - Another tenant's object is reported exactly like a missing one: lookups take the caller's
//!   tenant and return `None` for anything outside it.

mod gateway;
mod installs;
mod jobs;
mod json;
mod pipelines;
mod quota;
mod sessions;
mod tasks;

pub use gateway::{ModelEntry, UsageFilter, UsageGroup, UsageRecord, UsageSum};
pub use jobs::{Artifact, Job, JobEvent, JobKind, JobStatus};
pub use json::JsonText;
pub use pipelines::PipelineEntry;
pub use quota::{GrantAsk, GrantOutcome, QuotaLimits};
pub use sessions::{NewSession, Session};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use std::fmt;
use std::time::Duration;
pub use tasks::{
    CancelOutcome, GATE_KIND, GateOutcome, Lease, NewJob, NewTask, Recorded, Takeover, Task, TaskResult, TaskStatus,
};

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The input is not acceptable; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// Something that must be unique is taken; the message says what.
    #[error("{0}")]
    Conflict(String),
    /// The tenant has as many open tasks as it may (see [`Db::submit_job_within`]).
    #[error("the tenant has {open} open tasks, the most it may have is {limit}; wait for some to finish")]
    Full {
        /// Its open tasks (waiting, ready or running).
        open: i64,
        /// The limit.
        limit: i64,
    },
    /// The database failed.
    #[error("database: {0}")]
    Sql(sqlx::Error),
    /// The database could not be reached.
    #[error("cannot reach `{target}`: {message}")]
    Connect {
        /// `host[:port]/name` from the URL (never its password).
        target: String,
        /// Why.
        message: String,
    },
    /// Migrations failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// What a database URL points at, for messages: `host[:port]/name` (a PostgreSQL URL without
/// its user and password) or the SQLite path.
fn connect_target(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split('?').next().unwrap_or(rest).to_string()
}

impl From<sqlx::Error> for DbError {
    /// PostgreSQL refuses a NUL character in text (22021) and `\u0000` in JSON (22P05), which
    /// SQLite stores: that is bad input, never a database failure.
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(d) = &e
            && matches!(d.code().as_deref(), Some("22021" | "22P05"))
        {
            return DbError::Invalid("text may not contain a NUL character (\\u0000)".into());
        }
        DbError::Sql(e)
    }
}

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file (WAL).
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including tenants and keys.
    Admin,
    /// Read, and change its tenant's plugins, jobs and runs.
    Developer,
    /// Read only.
    Viewer,
}

impl Role {
    /// The role's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Developer => "developer",
            Role::Viewer => "viewer",
        }
    }

    /// Whether this role may change anything.
    pub fn can_write(self) -> bool {
        self != Role::Viewer
    }
}

impl std::str::FromStr for Role {
    type Err = DbError;
    fn from_str(s: &str) -> Result<Self, DbError> {
        match s {
            "admin" => Ok(Role::Admin),
            "developer" => Ok(Role::Developer),
            "viewer" => Ok(Role::Viewer),
            other => Err(DbError::Invalid(format!("unknown role `{other}`: expected admin, developer or viewer"))),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Tenant {
    /// `tn_<hex>`.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Its share of the scheduler relative to other tenants (1-1000; default 1).
    pub weight: i32,
    /// Its own cap on running tasks per node (0: the host's default).
    pub max_running: i32,
}

/// An API key's record (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    /// `key_<hex>`.
    pub id: String,
    /// The tenant it acts for.
    pub tenant_id: String,
    /// A label.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The key's first characters, for recognising it.
    pub prefix: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
}

/// A key's secret, shown once. Its `Debug` does not show it.
pub struct KeySecret(String);

impl KeySecret {
    /// The key, to hand to its owner once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeySecret([redacted])")
    }
}

/// Who is calling, from an authenticated key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's id.
    pub key_id: String,
    /// The key's tenant.
    pub tenant_id: String,
    /// The key's role.
    pub role: Role,
    /// The key's tenant's name.
    pub tenant_name: String,
}

/// One audit record, as given to [`Db::audit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// The key id (or `system`) that acted.
    pub actor: String,
    /// The tenant it acted in.
    pub tenant_id: String,
    /// What it did, e.g. `tenant.create`.
    pub action: String,
    /// What it acted on.
    pub target: String,
    /// `ok`, or what went wrong.
    pub outcome: String,
}

/// A stored audit record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditRecord {
    /// 1, 2, 3...
    pub seq: i64,
    /// Unix milliseconds.
    pub at: i64,
    /// See [`AuditEntry`].
    pub actor: String,
    /// See [`AuditEntry`].
    pub tenant_id: String,
    /// See [`AuditEntry`].
    pub action: String,
    /// See [`AuditEntry`].
    pub target: String,
    /// See [`AuditEntry`].
    pub outcome: String,
    /// The previous record's hash (64 zeros for the first).
    pub prev_hash: String,
    /// SHA-256 over this record's fields and `prev_hash`.
    pub hash: String,
}

/// What [`Db::verify_audit`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditCheck {
    /// Every record is intact and in order.
    Intact {
        /// How many records.
        records: i64,
        /// The last record's hash: keep it elsewhere to detect removal of records at the end.
        head: String,
    },
    /// The first place the chain breaks.
    Broken {
        /// The sequence number where it breaks.
        seq: i64,
        /// What is wrong there.
        problem: String,
    },
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn random_hex(bytes: usize) -> String {
    use rand_core::RngCore as _;
    let mut buf = vec![0u8; bytes];
    rand_core::OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

/// The SHA-256 of an API key, as a cache of verified keys may hold it instead of the key.
pub fn key_digest(secret: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref());
    out
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

/// The hash of a record: SHA-256 over its fields, length-prefixed so no two field lists collide.
fn record_hash(seq: i64, at: i64, entry: &AuditEntry, prev_hash: &str) -> String {
    let mut data = Vec::new();
    for field in [
        seq.to_string().as_str(),
        at.to_string().as_str(),
        &entry.actor,
        &entry.tenant_id,
        &entry.action,
        &entry.target,
        &entry.outcome,
        prev_hash,
    ] {
        data.extend_from_slice(&(field.len() as u64).to_be_bytes());
        data.extend_from_slice(field.as_bytes());
    }
    sha256_hex(&data)
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// The store.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    audit_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db").field("backend", &self.backend).finish()
    }
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Db {
    /// Opens `url` (`sqlite://<path>` or `postgres://...`) and applies the migrations. A SQLite
    /// file is created if missing and put in WAL mode.
    pub async fn open(url: &str) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(DbError::Invalid(format!(
                "database URL must start with sqlite:// or postgres:// (got `{}`)",
                url.split("://").next().unwrap_or(url)
            )));
        };
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                format!("{url}{}mode=rwc", if url.contains('?') { "&" } else { "?" })
            }
            _ => url.to_string(),
        };
        let mut options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        if backend == Backend::Sqlite {
            options = options.max_connections(8).after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA busy_timeout = 5000").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                    Ok(())
                })
            });
        }
        let pool = options.connect(&url).await.map_err(|e| match e {
            // Say where: "failed to lookup address information" alone names no host.
            sqlx::Error::Io(io) => DbError::Connect { target: connect_target(&url), message: io.to_string() },
            sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => {
                DbError::Connect { target: connect_target(&url), message: e.to_string() }
            }
            e => DbError::from(e),
        })?;
        MIGRATOR.run(&pool).await?;
        Ok(Db { pool, backend, audit_lock: Default::default() })
    }

    /// Opens (creating) the SQLite file `path`.
    pub async fn open_sqlite(path: &std::path::Path) -> Result<Db, DbError> {
        Db::open(&format!("sqlite://{}", path.display())).await
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Whether the database answers (for readiness).
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Creates a tenant. Names are 1-64 lowercase letters, digits, `-` or `_`.
    pub async fn create_tenant(&self, name: &str) -> Result<Tenant, DbError> {
        if !valid_name(name) {
            return Err(DbError::Invalid(format!(
                "tenant name `{name}` must be 1-64 lowercase letters, digits, `-` or `_`"
            )));
        }
        let tenant = Tenant {
            id: format!("tn_{}", random_hex(12)),
            name: name.to_string(),
            created_at: now_ms(),
            weight: 1,
            max_running: 0,
        };
        let inserted = sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(&tenant.id)
            .bind(&tenant.name)
            .bind(tenant.created_at)
            .execute(&self.pool)
            .await;
        match inserted {
            Ok(_) => Ok(tenant),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(DbError::Conflict(format!("a tenant named `{name}` already exists")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A tenant by id.
    pub async fn tenant(&self, id: &str) -> Result<Option<Tenant>, DbError> {
        self.tenant_where("SELECT id, name, created_at, weight, max_running FROM tenants WHERE id = $1", id).await
    }

    async fn tenant_where(&self, query: &'static str, value: &str) -> Result<Option<Tenant>, DbError> {
        let row = sqlx::query(query).bind(value).fetch_optional(&self.pool).await?;
        row.map(|r| tenant_of(&r)).transpose()
    }

    /// A tenant by name.
    pub async fn tenant_named(&self, name: &str) -> Result<Option<Tenant>, DbError> {
        self.tenant_where("SELECT id, name, created_at, weight, max_running FROM tenants WHERE name = $1", name).await
    }

    /// Tenants ordered by id, after `after` (keyset pagination), at most `limit`.
    pub async fn tenants(&self, after: Option<&str>, limit: u32) -> Result<Vec<Tenant>, DbError> {
        let rows = sqlx::query(
            "SELECT id, name, created_at, weight, max_running FROM tenants WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(tenant_of).collect()
    }

    /// Creates a key for `tenant_id`; returns its record and the key, which is not stored and
    /// cannot be shown again. `None` when the tenant does not exist.
    pub async fn create_key(
        &self,
        tenant_id: &str,
        name: &str,
        role: Role,
    ) -> Result<Option<(ApiKey, KeySecret)>, DbError> {
        if name.is_empty() || name.chars().count() > 128 {
            return Err(DbError::Invalid("key name must be 1-128 characters".into()));
        }
        if self.tenant(tenant_id).await?.is_none() {
            return Ok(None);
        }
        let secret = format!("ql_{}", random_hex(32));
        let key = ApiKey {
            id: format!("key_{}", random_hex(12)),
            tenant_id: tenant_id.to_string(),
            name: name.to_string(),
            role,
            prefix: secret[..11].to_string(),
            created_at: now_ms(),
            revoked_at: None,
        };
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, role, prefix, hash, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&key.id)
        .bind(&key.tenant_id)
        .bind(&key.name)
        .bind(role.as_str())
        .bind(&key.prefix)
        .bind(sha256_hex(secret.as_bytes()))
        .bind(key.created_at)
        .execute(&self.pool)
        .await?;
        Ok(Some((key, KeySecret(secret))))
    }

    /// Who `secret` is, if it is a live key.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<Principal>, DbError> {
        if !secret.starts_with("ql_") || secret.len() != 67 {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT k.id, k.tenant_id, k.role, t.name FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             WHERE k.hash = $1 AND k.revoked_at IS NULL",
        )
        .bind(sha256_hex(secret.as_bytes()))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Principal {
                key_id: r.try_get("id")?,
                tenant_id: r.try_get("tenant_id")?,
                role: r.try_get::<String, _>("role")?.parse()?,
                tenant_name: r.try_get("name")?,
            })
        })
        .transpose()
    }

    /// The keys of `tenant_id` (records only).
    pub async fn keys(&self, tenant_id: &str) -> Result<Vec<ApiKey>, DbError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, name, role, prefix, created_at, revoked_at FROM api_keys WHERE tenant_id = $1 ORDER BY id",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_of).collect()
    }

    /// The tenant a key (live or revoked) belongs to, if the key exists.
    pub async fn key_tenant(&self, key_id: &str) -> Result<Option<String>, DbError> {
        let row =
            sqlx::query("SELECT tenant_id FROM api_keys WHERE id = $1").bind(key_id).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.try_get("tenant_id")).transpose()?)
    }

    /// Revokes a key of `tenant_id`. `false` when there is no such live key in that tenant.
    ///
    /// A tenant's last admin key is not revoked ([`DbError::Conflict`]): nothing could mint it a
    /// new one through the API. Concurrent revocations are serialised on the tenant's row, so two
    /// of them cannot take the last two keys.
    pub async fn revoke_key(&self, tenant_id: &str, key_id: &str) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        // A row lock on PostgreSQL, the write lock on SQLite.
        sqlx::query("UPDATE tenants SET weight = weight WHERE id = $1").bind(tenant_id).execute(&mut *tx).await?;
        let Some(row) =
            sqlx::query("SELECT role FROM api_keys WHERE id = $1 AND tenant_id = $2 AND revoked_at IS NULL")
                .bind(key_id)
                .bind(tenant_id)
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(false);
        };
        if row.try_get::<String, _>("role")? == "admin" {
            let admins: i64 = sqlx::query(
                "SELECT COUNT(*) AS n FROM api_keys WHERE tenant_id = $1 AND role = 'admin' AND revoked_at IS NULL",
            )
            .bind(tenant_id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
            if admins <= 1 {
                return Err(DbError::Conflict(format!(
                    "key `{key_id}` is the tenant's last admin key; create another admin key first (an operator \
                     can issue one with POST /v1/keys and tenant_id, or `qlayer keys create` on the host)"
                )));
            }
        }
        let done = sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND tenant_id = $3")
            .bind(now_ms())
            .bind(key_id)
            .bind(tenant_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Makes sure an admin can get in: with `configured` (a `ql_…` key from config or the
    /// environment), that key is registered as an admin key of the `system` tenant, unless it was
    /// revoked (it stays revoked, with a warning); otherwise, on first start only, an admin key is
    /// generated and returned to be shown once.
    pub async fn bootstrap_admin(&self, configured: Option<&str>) -> Result<Option<KeySecret>, DbError> {
        let system =
            match sqlx::query("SELECT id FROM tenants WHERE name = 'system'").fetch_optional(&self.pool).await? {
                Some(row) => row.try_get::<String, _>("id")?,
                None => self.create_tenant("system").await?.id,
            };
        if let Some(secret) = configured {
            if !secret.starts_with("ql_") || secret.len() != 67 || !secret[3..].bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(DbError::Invalid("the admin bootstrap key must be `ql_` followed by 64 hex digits".into()));
            }
            let hash = sha256_hex(secret.as_bytes());
            let known = sqlx::query("SELECT revoked_at FROM api_keys WHERE hash = $1")
                .bind(&hash)
                .fetch_optional(&self.pool)
                .await?
                .map(|row| row.try_get::<Option<i64>, _>("revoked_at"))
                .transpose()?;
            if let Some(Some(_)) = known {
                // Revoked through the API: configuration does not bring it back.
                tracing::warn!(
                    "the configured admin key (QLAYER_ADMIN_KEY / [auth] admin-key) was revoked; it stays revoked: \
                     configure another key to get in"
                );
            }
            if known.is_none() {
                sqlx::query(
                    "INSERT INTO api_keys (id, tenant_id, name, role, prefix, hash, created_at) VALUES ($1, $2, 'bootstrap', 'admin', $3, $4, $5)",
                )
                .bind(format!("key_{}", random_hex(12)))
                .bind(&system)
                .bind(&secret[..11])
                .bind(&hash)
                .bind(now_ms())
                .execute(&self.pool)
                .await?;
            }
            return Ok(None);
        }
        let admins = sqlx::query("SELECT COUNT(*) AS n FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL")
            .fetch_one(&self.pool)
            .await?
            .try_get::<i64, _>("n")?;
        if admins > 0 {
            return Ok(None);
        }
        Ok(self.create_key(&system, "bootstrap", Role::Admin).await?.map(|(_, secret)| secret))
    }

    /// Appends an audit record, chained to the previous one.
    pub async fn audit(&self, entry: AuditEntry) -> Result<AuditRecord, DbError> {
        // One appender at a time in this process; the primary key refuses a concurrent append
        // from another process, which then retries on the new head.
        let _guard = self.audit_lock.lock().await;
        for _ in 0..10 {
            let last = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
            let (seq, prev_hash) = match last {
                Some(row) => (row.try_get::<i64, _>("seq")? + 1, row.try_get::<String, _>("hash")?),
                None => (1, GENESIS.to_string()),
            };
            let at = now_ms();
            let hash = record_hash(seq, at, &entry, &prev_hash);
            let inserted = sqlx::query(
                "INSERT INTO audit_log (seq, at, actor, tenant_id, action, target, outcome, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(seq)
            .bind(at)
            .bind(&entry.actor)
            .bind(&entry.tenant_id)
            .bind(&entry.action)
            .bind(&entry.target)
            .bind(&entry.outcome)
            .bind(&prev_hash)
            .bind(&hash)
            .execute(&self.pool)
            .await;
            match inserted {
                Ok(_) => {
                    return Ok(AuditRecord {
                        seq,
                        at,
                        actor: entry.actor,
                        tenant_id: entry.tenant_id,
                        action: entry.action,
                        target: entry.target,
                        outcome: entry.outcome,
                        prev_hash,
                        hash,
                    });
                }
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(DbError::Conflict(
            "an audit record with the next sequence number already exists (too many concurrent appenders)".into(),
        ))
    }

    /// Audit records after `after_seq`, oldest first, at most `limit`; with `tenant_id`, only
    /// that tenant's.
    pub async fn audit_records(
        &self,
        tenant_id: Option<&str>,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, DbError> {
        let rows = match tenant_id {
            Some(t) => {
                sqlx::query("SELECT * FROM audit_log WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3")
                    .bind(t)
                    .bind(after_seq)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2")
                    .bind(after_seq)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(record_of).collect()
    }

    /// Walks the whole chain: every record must hash to its stored hash, name its predecessor's
    /// hash, and follow it by exactly one sequence number.
    pub async fn verify_audit(&self) -> Result<AuditCheck, DbError> {
        let mut expected_seq = 1i64;
        let mut prev = GENESIS.to_string();
        loop {
            let page = self.audit_records(None, expected_seq - 1, 1000).await?;
            if page.is_empty() {
                return Ok(AuditCheck::Intact { records: expected_seq - 1, head: prev });
            }
            for r in page {
                if r.seq != expected_seq {
                    return Ok(AuditCheck::Broken {
                        seq: expected_seq,
                        problem: format!("record {expected_seq} is missing (the next one is {})", r.seq),
                    });
                }
                if r.prev_hash != prev {
                    return Ok(AuditCheck::Broken {
                        seq: r.seq,
                        problem: "it does not follow the record before it (records removed or reordered)".into(),
                    });
                }
                let entry = AuditEntry {
                    actor: r.actor.clone(),
                    tenant_id: r.tenant_id.clone(),
                    action: r.action.clone(),
                    target: r.target.clone(),
                    outcome: r.outcome.clone(),
                };
                if record_hash(r.seq, r.at, &entry, &r.prev_hash) != r.hash {
                    return Ok(AuditCheck::Broken { seq: r.seq, problem: "its contents were changed".into() });
                }
                prev = r.hash;
                expected_seq += 1;
            }
        }
    }

    /// The pool, for code that needs a raw query (tests, migrations of other parts).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

fn tenant_of(r: &AnyRow) -> Result<Tenant, DbError> {
    Ok(Tenant {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
        weight: r.try_get("weight")?,
        max_running: r.try_get("max_running")?,
    })
}

fn key_of(r: &AnyRow) -> Result<ApiKey, DbError> {
    Ok(ApiKey {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        name: r.try_get("name")?,
        role: r.try_get::<String, _>("role")?.parse()?,
        prefix: r.try_get("prefix")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

fn record_of(r: &AnyRow) -> Result<AuditRecord, DbError> {
    Ok(AuditRecord {
        seq: r.try_get("seq")?,
        at: r.try_get("at")?,
        actor: r.try_get("actor")?,
        tenant_id: r.try_get("tenant_id")?,
        action: r.try_get("action")?,
        target: r.try_get("target")?,
        outcome: r.try_get("outcome")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
    })
}
