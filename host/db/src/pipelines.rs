//! Factory pipelines stored for a tenant: the store keys them; the factory owns their meaning.

use crate::{Db, DbError, now_ms};
use sqlx::Row;

/// A stored pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineEntry {
    /// Its name.
    pub name: String,
    /// The definition as JSON text.
    pub definition: String,
    /// Unix ms of its first store.
    pub created_at: i64,
    /// Unix ms of the last change.
    pub updated_at: i64,
}

fn entry(r: &sqlx::any::AnyRow) -> Result<PipelineEntry, DbError> {
    Ok(PipelineEntry {
        name: r.try_get("name")?,
        definition: r.try_get("definition")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

impl Db {
    /// Creates or replaces `tenant_id`'s pipeline `name`; `true` when it is new.
    pub async fn put_pipeline(
        &self,
        tenant_id: &str,
        name: &str,
        definition: &str,
    ) -> Result<(PipelineEntry, bool), DbError> {
        let at = now_ms();
        let before = self.pipeline(tenant_id, name).await?;
        sqlx::query(
            "INSERT INTO pipelines (tenant_id, name, definition, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (tenant_id, name) DO UPDATE SET definition = excluded.definition, updated_at = excluded.updated_at",
        )
        .bind(tenant_id)
        .bind(name)
        .bind(definition)
        .bind(at)
        .execute(self.pool())
        .await?;
        let created_at = before.as_ref().map_or(at, |b| b.created_at);
        let entry =
            PipelineEntry { name: name.to_string(), definition: definition.to_string(), created_at, updated_at: at };
        Ok((entry, before.is_none()))
    }

    /// `tenant_id`'s pipeline `name`; `None` when it has none (or another tenant has it).
    pub async fn pipeline(&self, tenant_id: &str, name: &str) -> Result<Option<PipelineEntry>, DbError> {
        let row = sqlx::query(
            "SELECT name, definition, created_at, updated_at FROM pipelines WHERE tenant_id = $1 AND name = $2",
        )
        .bind(tenant_id)
        .bind(name)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(entry).transpose()
    }

    /// `tenant_id`'s pipelines, by name.
    pub async fn pipelines(&self, tenant_id: &str) -> Result<Vec<PipelineEntry>, DbError> {
        let rows = sqlx::query(
            "SELECT name, definition, created_at, updated_at FROM pipelines WHERE tenant_id = $1 ORDER BY name",
        )
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(entry).collect()
    }

    /// Removes `tenant_id`'s pipeline `name`; `false` when it had none (or another tenant has it).
    pub async fn delete_pipeline(&self, tenant_id: &str, name: &str) -> Result<bool, DbError> {
        let done = sqlx::query("DELETE FROM pipelines WHERE tenant_id = $1 AND name = $2")
            .bind(tenant_id)
            .bind(name)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
