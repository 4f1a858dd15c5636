//! The gateway's state: each tenant's model table, and usage records (written in batches by the
//! gateway's meter, read back summed by [`Db::usage`]).

use crate::{Db, DbError, now_ms, random_hex};
use sqlx::Row;

/// One entry of a tenant's model table, as stored: the gateway owns the meaning of `spec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    /// The name clients ask for.
    pub name: String,
    /// The entry as JSON text.
    pub spec: String,
    /// Unix ms of the last change.
    pub updated_at: i64,
}

/// What one gateway request used and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageRecord {
    /// The tenant's id.
    pub tenant_id: String,
    /// The API key that made the request.
    pub key_id: String,
    /// `chat`, `messages` or `embeddings`.
    pub endpoint: String,
    /// The model name asked for.
    pub model: String,
    /// `plugin/upstream-model` of the deployment that answered (empty when none did).
    pub deployment: String,
    /// Input tokens.
    pub prompt_tokens: i64,
    /// Output tokens.
    pub completion_tokens: i64,
    /// In billionths of the price table's currency unit.
    pub cost_nanos: i64,
    /// From the request's arrival to its last byte, in µs.
    pub latency_us: i64,
    /// Time to first token of a stream, in µs.
    pub ttft_us: Option<i64>,
    /// `miss`, `hit` or `skip`.
    pub cache: String,
    /// `ok`, or the error code the client got.
    pub status: String,
    /// Unix ms.
    pub at: i64,
}

/// How [`Db::usage`] groups its sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageGroup {
    /// One row for everything that matched.
    #[default]
    All,
    /// One row per UTC day (`key` is the day's first unix ms).
    Day,
    /// One row per model name.
    Model,
    /// One row per API key id.
    Key,
    /// One row per deployment.
    Deployment,
}

/// Which usage records [`Db::usage`] sums.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    /// From this unix ms (inclusive).
    pub from: Option<i64>,
    /// Up to this unix ms (exclusive).
    pub to: Option<i64>,
    /// Only this key id.
    pub key_id: Option<String>,
    /// Only this model name.
    pub model: Option<String>,
}

/// Sums over a group of usage records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageSum {
    /// The group's value (empty for [`UsageGroup::All`]; a unix ms for days).
    pub key: String,
    /// Requests.
    pub requests: i64,
    /// Requests that failed.
    pub errors: i64,
    /// Requests answered from a cache.
    pub cache_hits: i64,
    /// Input tokens.
    pub prompt_tokens: i64,
    /// Output tokens.
    pub completion_tokens: i64,
    /// In billionths of the currency unit.
    pub cost_nanos: i64,
}

const DAY_MS: i64 = 86_400_000;

impl Db {
    /// Creates or replaces `tenant_id`'s model `name`.
    pub async fn put_model(&self, tenant_id: &str, name: &str, spec: &str) -> Result<ModelEntry, DbError> {
        let at = now_ms();
        sqlx::query(
            "INSERT INTO models (tenant_id, name, spec, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant_id, name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
        )
        .bind(tenant_id)
        .bind(name)
        .bind(spec)
        .bind(at)
        .execute(self.pool())
        .await?;
        Ok(ModelEntry { name: name.to_string(), spec: spec.to_string(), updated_at: at })
    }

    /// `tenant_id`'s model table, by name.
    pub async fn models(&self, tenant_id: &str) -> Result<Vec<ModelEntry>, DbError> {
        let rows = sqlx::query("SELECT name, spec, updated_at FROM models WHERE tenant_id = $1 ORDER BY name")
            .bind(tenant_id)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ModelEntry {
                    name: r.try_get("name")?,
                    spec: r.try_get("spec")?,
                    updated_at: r.try_get("updated_at")?,
                })
            })
            .collect()
    }

    /// Removes `tenant_id`'s model `name`; `false` when it had none (or another tenant has it).
    pub async fn delete_model(&self, tenant_id: &str, name: &str) -> Result<bool, DbError> {
        let done = sqlx::query("DELETE FROM models WHERE tenant_id = $1 AND name = $2")
            .bind(tenant_id)
            .bind(name)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Writes usage records in one transaction.
    pub async fn record_usage(&self, records: &[UsageRecord]) -> Result<(), DbError> {
        let mut tx = self.pool().begin().await?;
        // 14 columns; SQLite allows 32,766 parameters per statement.
        for chunk in records.chunks(500) {
            let mut sql = String::from(
                "INSERT INTO usage_records (id, tenant_id, key_id, endpoint, model, deployment, prompt_tokens, \
                 completion_tokens, cost_nanos, latency_us, ttft_us, cache, status, at) VALUES ",
            );
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                let p: Vec<String> = (1..=14).map(|c| format!("${}", i * 14 + c)).collect();
                sql.push('(');
                sql.push_str(&p.join(", "));
                sql.push(')');
            }
            let mut query = sqlx::query(&sql);
            for r in chunk {
                query = query
                    .bind(format!("us_{}", random_hex(12)))
                    .bind(&r.tenant_id)
                    .bind(&r.key_id)
                    .bind(&r.endpoint)
                    .bind(&r.model)
                    .bind(&r.deployment)
                    .bind(r.prompt_tokens)
                    .bind(r.completion_tokens)
                    .bind(r.cost_nanos)
                    .bind(r.latency_us)
                    .bind(r.ttft_us)
                    .bind(&r.cache)
                    .bind(&r.status)
                    .bind(r.at);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// `tenant_id`'s usage matching `filter`, summed per `group` (largest cost first for models,
    /// keys and deployments; in time order for days). At most 1,000 groups.
    pub async fn usage(
        &self,
        tenant_id: &str,
        filter: &UsageFilter,
        group: UsageGroup,
    ) -> Result<Vec<UsageSum>, DbError> {
        let key = match group {
            UsageGroup::All => "''".to_string(),
            // Integer division on both databases.
            UsageGroup::Day => format!("CAST((at / {DAY_MS}) * {DAY_MS} AS TEXT)"),
            UsageGroup::Model => "model".into(),
            UsageGroup::Key => "key_id".into(),
            UsageGroup::Deployment => "deployment".into(),
        };
        let order = match group {
            UsageGroup::Day => "grp",
            _ => "cost DESC, grp",
        };
        let sql = format!(
            "SELECT {key} AS grp, COUNT(*) AS requests,
                    CAST(COALESCE(SUM(CASE WHEN status = 'ok' THEN 0 ELSE 1 END), 0) AS BIGINT) AS errors,
                    CAST(COALESCE(SUM(CASE WHEN cache IN ('hit', 'semantic-hit') THEN 1 ELSE 0 END), 0) AS BIGINT) AS hits,
                    CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS prompt,
                    CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS completion,
                    CAST(COALESCE(SUM(cost_nanos), 0) AS BIGINT) AS cost
             FROM usage_records
             WHERE tenant_id = $1 AND at >= $2 AND at < $3 AND ($4 = '' OR key_id = $4) AND ($5 = '' OR model = $5)
             GROUP BY grp ORDER BY {order} LIMIT 1000"
        );
        let rows = sqlx::query(&sql)
            .bind(tenant_id)
            .bind(filter.from.unwrap_or(0))
            .bind(filter.to.unwrap_or(i64::MAX))
            .bind(filter.key_id.clone().unwrap_or_default())
            .bind(filter.model.clone().unwrap_or_default())
            .fetch_all(self.pool())
            .await?;
        let mut sums = Vec::with_capacity(rows.len());
        for r in &rows {
            let requests: i64 = r.try_get("requests")?;
            if requests == 0 {
                continue;
            }
            sums.push(UsageSum {
                key: r.try_get("grp")?,
                requests,
                errors: r.try_get("errors")?,
                cache_hits: r.try_get("hits")?,
                prompt_tokens: r.try_get("prompt")?,
                completion_tokens: r.try_get("completion")?,
                cost_nanos: r.try_get("cost")?,
            });
        }
        Ok(sums)
    }
}
