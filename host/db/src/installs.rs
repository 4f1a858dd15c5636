//! Marketplace install records: one row per (tenant, plugin name), shared by every node that uses
//! the database. The record itself is the marketplace's JSON; the store only keys and fences it.

use crate::{Db, DbError, now_ms};
use sqlx::Row;

impl Db {
    /// Records a new install. `false` when the tenant already has a plugin of that name.
    pub async fn insert_install(&self, tenant: &str, name: &str, blob: &str, record: &str) -> Result<bool, DbError> {
        let done = sqlx::query(
            "INSERT INTO installs (tenant, name, blob, record, installed_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant, name) DO NOTHING",
        )
        .bind(tenant)
        .bind(name)
        .bind(blob)
        .bind(record)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Replaces the install whose record is still `expected` (an upgrade). `false` when it was
    /// removed or changed meanwhile.
    pub async fn replace_install(
        &self,
        tenant: &str,
        name: &str,
        expected: &str,
        blob: &str,
        record: &str,
    ) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE installs SET blob = $1, record = $2, installed_at = $3
             WHERE tenant = $4 AND name = $5 AND record = $6",
        )
        .bind(blob)
        .bind(record)
        .bind(now_ms())
        .bind(tenant)
        .bind(name)
        .bind(expected)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The install records of `tenant`, by plugin name.
    pub async fn installs(&self, tenant: &str) -> Result<Vec<String>, DbError> {
        let rows = sqlx::query("SELECT record FROM installs WHERE tenant = $1 ORDER BY name")
            .bind(tenant)
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(|r| Ok(r.try_get("record")?)).collect()
    }

    /// One install record of `tenant` (`None` also for another tenant's).
    pub async fn install(&self, tenant: &str, name: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT record FROM installs WHERE tenant = $1 AND name = $2")
            .bind(tenant)
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.try_get("record")).transpose()?)
    }

    /// Removes an install; returns its record (`None` when there was none).
    pub async fn delete_install(&self, tenant: &str, name: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query("DELETE FROM installs WHERE tenant = $1 AND name = $2 RETURNING record")
            .bind(tenant)
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.try_get("record")).transpose()?)
    }

    /// Whether any tenant's install uses the binary `blob`.
    pub async fn blob_installed(&self, blob: &str) -> Result<bool, DbError> {
        let row =
            sqlx::query("SELECT COUNT(*) AS n FROM installs WHERE blob = $1").bind(blob).fetch_one(self.pool()).await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }
}
