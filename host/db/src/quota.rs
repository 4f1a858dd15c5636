//! Gateway limits (rows of `quota_limits`) and the quota grants that hold them across nodes
//! (`quota_grants`): see [`Db::grant_quota`].

use crate::{Backend, Db, DbError, now_ms, random_hex};
use sqlx::Row;

/// A tenant's or a key's limits; `None` is no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Requests per minute.
    pub rpm: Option<i64>,
    /// Tokens (input plus output) per minute.
    pub tpm: Option<i64>,
    /// Spend per UTC day, in billionths of the price table's currency unit.
    pub daily_nanos: Option<i64>,
    /// Spend per UTC month, in billionths.
    pub monthly_nanos: Option<i64>,
}

impl QuotaLimits {
    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == QuotaLimits::default()
    }
}

/// What [`Db::grant_quota`] is asked.
#[derive(Debug, Clone, Copy)]
pub struct GrantAsk<'a> {
    /// The limit's key (scope, unit and, for a day or a month, the period).
    pub key: &'a str,
    /// What every grant alive at once may add up to.
    pub limit: i64,
    /// The least that is worth granting (what the request at hand needs).
    pub min: i64,
    /// What the node would like (a chunk, so that it asks again rarely); at least `min`.
    pub want: i64,
    /// How long, from the store's now, the grant counts against the limit.
    pub alive_ms: i64,
    /// Grant `min` whatever the limit says: for usage already spent beyond its reservation,
    /// which must still count against what follows.
    pub force: bool,
}

/// The store's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantOutcome {
    /// `amount` (from `min` to `want`) was granted as grant `id`.
    Granted {
        /// The grant, to give unused quota back to.
        id: String,
        /// What was granted.
        amount: i64,
        /// What every grant alive now adds up to, this one included.
        used: i64,
    },
    /// Not even `min` fits now.
    Refused {
        /// What every grant alive now adds up to.
        used: i64,
        /// In how many ms enough grants will have died for `min` to fit; `None` when `min` is
        /// more than the limit itself.
        room_in_ms: Option<i64>,
    },
}

impl Db {
    /// The store's clock in unix ms: PostgreSQL's, so that every node sharing it agrees on when
    /// a grant dies; SQLite's store is one machine's, so that machine's.
    async fn store_now(&self, conn: &mut sqlx::AnyConnection) -> Result<i64, DbError> {
        match self.backend {
            Backend::Sqlite => Ok(now_ms()),
            Backend::Postgres => {
                let row = sqlx::query("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT) AS now")
                    .fetch_one(&mut *conn)
                    .await?;
                Ok(row.try_get("now")?)
            }
        }
    }

    /// Grants quota of `ask.key`: the most from `ask.min` to `ask.want` that keeps the sum of
    /// every grant still alive within `ask.limit` (or `ask.min` regardless, when forced).
    ///
    /// Grants of one key are decided one after the other on every node: each transaction first
    /// writes the key's row in `quota_keys` (a row lock on PostgreSQL, the write lock on SQLite),
    /// then sums what is alive. So no two grants can both fit in the same room, and the limit
    /// holds however many nodes ask at once.
    pub async fn grant_quota(&self, ask: GrantAsk<'_>) -> Result<GrantOutcome, DbError> {
        if ask.min < 0 || ask.want < ask.min || ask.limit < 0 || ask.alive_ms < 0 {
            return Err(DbError::Invalid(format!("a quota grant of {ask:?} is malformed")));
        }
        let mut tx = self.pool.begin().await?;
        let now = self.store_now(&mut tx).await?;
        sqlx::query(
            "INSERT INTO quota_keys (key, touched) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET touched = excluded.touched",
        )
        .bind(ask.key)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(
            "SELECT amount, alive_until FROM quota_grants WHERE key = $1 AND alive_until > $2 ORDER BY alive_until",
        )
        .bind(ask.key)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut alive = Vec::with_capacity(rows.len());
        for r in &rows {
            alive.push((r.try_get::<i64, _>("amount")?, r.try_get::<i64, _>("alive_until")?));
        }
        let used: i64 = alive.iter().map(|(amount, _)| amount).sum();
        let room = (ask.limit - used).max(0);
        let amount = if ask.force { ask.min } else { ask.want.min(room) };
        if amount < ask.min || (amount == 0 && ask.min > 0) {
            tx.rollback().await?;
            return Ok(GrantOutcome::Refused { used, room_in_ms: room_in(&alive, used, ask.min, ask.limit, now) });
        }
        let id = format!("qg_{}", random_hex(12));
        sqlx::query("INSERT INTO quota_grants (id, key, amount, granted_at, alive_until) VALUES ($1, $2, $3, $4, $5)")
            .bind(&id)
            .bind(ask.key)
            .bind(amount)
            .bind(now)
            .bind(now.saturating_add(ask.alive_ms))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(GrantOutcome::Granted { id, amount, used: used + amount })
    }

    /// Gives `amount` of grant `id` back (it was not used, or a reservation settled lower).
    pub async fn give_back_quota(&self, id: &str, amount: i64) -> Result<(), DbError> {
        if amount <= 0 {
            return Ok(());
        }
        sqlx::query("UPDATE quota_grants SET amount = CASE WHEN amount > $2 THEN amount - $2 ELSE 0 END WHERE id = $1")
            .bind(id)
            .bind(amount)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// What the grants of `key` alive now add up to.
    pub async fn quota_used(&self, key: &str) -> Result<i64, DbError> {
        let mut conn = self.pool.acquire().await?;
        let now = self.store_now(&mut conn).await?;
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS used FROM quota_grants WHERE key = $1 AND alive_until > $2",
        )
        .bind(key)
        .bind(now)
        .fetch_one(&mut *conn)
        .await?;
        Ok(row.try_get("used")?)
    }

    /// Removes grants that no longer count, and keys not asked for in two days; how many
    /// grants went.
    pub async fn prune_quota(&self) -> Result<u64, DbError> {
        let mut conn = self.pool.acquire().await?;
        let now = self.store_now(&mut conn).await?;
        let gone =
            sqlx::query("DELETE FROM quota_grants WHERE alive_until <= $1").bind(now).execute(&mut *conn).await?;
        sqlx::query("DELETE FROM quota_keys WHERE touched < $1").bind(now - 2 * 86_400_000).execute(&mut *conn).await?;
        Ok(gone.rows_affected())
    }

    /// Sets the limits of `tenant_id` (`key_id` empty) or of one of its keys; all `None`
    /// removes them.
    pub async fn set_quota_limits(&self, tenant_id: &str, key_id: &str, limits: &QuotaLimits) -> Result<(), DbError> {
        if limits.is_empty() {
            sqlx::query("DELETE FROM quota_limits WHERE tenant_id = $1 AND key_id = $2")
                .bind(tenant_id)
                .bind(key_id)
                .execute(self.pool())
                .await?;
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO quota_limits (tenant_id, key_id, rpm, tpm, daily_nanos, monthly_nanos, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (tenant_id, key_id) DO UPDATE SET rpm = excluded.rpm, tpm = excluded.tpm,
                 daily_nanos = excluded.daily_nanos, monthly_nanos = excluded.monthly_nanos,
                 updated_at = excluded.updated_at",
        )
        .bind(tenant_id)
        .bind(key_id)
        .bind(limits.rpm)
        .bind(limits.tpm)
        .bind(limits.daily_nanos)
        .bind(limits.monthly_nanos)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Every limit row of `tenant_id`: its own (key id `""`) and its keys'.
    pub async fn quota_limits(&self, tenant_id: &str) -> Result<Vec<(String, QuotaLimits)>, DbError> {
        let rows = sqlx::query(
            "SELECT key_id, rpm, tpm, daily_nanos, monthly_nanos FROM quota_limits WHERE tenant_id = $1 ORDER BY key_id",
        )
        .bind(tenant_id)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("key_id")?,
                    QuotaLimits {
                        rpm: r.try_get("rpm")?,
                        tpm: r.try_get("tpm")?,
                        daily_nanos: r.try_get("daily_nanos")?,
                        monthly_nanos: r.try_get("monthly_nanos")?,
                    },
                ))
            })
            .collect()
    }
}

/// When `min` more fits: the grants alive (by when they die, soonest first) must free
/// `used + min - limit`.
fn room_in(alive: &[(i64, i64)], used: i64, min: i64, limit: i64, now: i64) -> Option<i64> {
    if min > limit {
        return None;
    }
    let must_free = used + min - limit;
    let mut freed = 0;
    for (amount, until) in alive {
        freed += amount;
        if freed >= must_free {
            return Some((until - now).max(1));
        }
    }
    Some(1)
}

#[cfg(test)]
mod tests {
    use super::room_in;

    #[test]
    fn room_comes_when_enough_grants_have_died() {
        // Limit 10, alive: 4 dying at 100, 3 at 200, 3 at 300 (used 10).
        let alive = [(4, 100), (3, 200), (3, 300)];
        assert_eq!(room_in(&alive, 10, 1, 10, 50), Some(50));
        assert_eq!(room_in(&alive, 10, 5, 10, 50), Some(150));
        assert_eq!(room_in(&alive, 10, 10, 10, 50), Some(250));
        assert_eq!(room_in(&alive, 10, 11, 10, 50), None);
    }
}
