//! Dashboard sessions: a random token (kept by the browser in an HttpOnly cookie; only its
//! SHA-256 is stored) that acts as the API key it was opened with, until it expires, is ended,
//! or the key is revoked.

use crate::{DbError, Principal, now_ms, random_hex, sha256_hex};
use sqlx::Row as _;

/// A session just opened: the token for the cookie (not stored, cannot be shown again) and the
/// session's anti-forgery token.
#[derive(Clone)]
pub struct NewSession {
    /// `qs_<64 hex>`.
    pub token: String,
    /// For the forms of the session's pages.
    pub csrf: String,
    /// Unix ms.
    pub expires_at: i64,
}

impl std::fmt::Debug for NewSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSession").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// A live session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who it acts as.
    pub principal: Principal,
    /// Its anti-forgery token.
    pub csrf: String,
    /// Unix ms.
    pub expires_at: i64,
}

impl crate::Db {
    /// Opens a session for the live key `key_id`, lasting `ttl_ms`. Expired sessions are removed
    /// on the way.
    pub async fn open_session(&self, key_id: &str, ttl_ms: i64) -> Result<NewSession, DbError> {
        let now = now_ms();
        sqlx::query("DELETE FROM ui_sessions WHERE expires_at <= $1").bind(now).execute(self.pool()).await?;
        let session =
            NewSession { token: format!("qs_{}", random_hex(32)), csrf: random_hex(16), expires_at: now + ttl_ms };
        sqlx::query("INSERT INTO ui_sessions (id, key_id, csrf, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(sha256_hex(session.token.as_bytes()))
            .bind(key_id)
            .bind(&session.csrf)
            .bind(now)
            .bind(session.expires_at)
            .execute(self.pool())
            .await?;
        Ok(session)
    }

    /// The live session of `token`: not expired, and its key not revoked.
    pub async fn session(&self, token: &str) -> Result<Option<Session>, DbError> {
        if !token.starts_with("qs_") || token.len() != 67 {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT s.csrf, s.expires_at, k.id, k.tenant_id, k.role, t.name FROM ui_sessions s \
             JOIN api_keys k ON k.id = s.key_id JOIN tenants t ON t.id = k.tenant_id \
             WHERE s.id = $1 AND s.expires_at > $2 AND k.revoked_at IS NULL",
        )
        .bind(sha256_hex(token.as_bytes()))
        .bind(now_ms())
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok(Session {
                principal: Principal {
                    key_id: r.try_get("id")?,
                    tenant_id: r.try_get("tenant_id")?,
                    role: r.try_get::<String, _>("role")?.parse()?,
                    tenant_name: r.try_get("name")?,
                },
                csrf: r.try_get("csrf")?,
                expires_at: r.try_get("expires_at")?,
            })
        })
        .transpose()
    }

    /// Ends the session of `token`; `false` when there was none.
    pub async fn end_session(&self, token: &str) -> Result<bool, DbError> {
        let done = sqlx::query("DELETE FROM ui_sessions WHERE id = $1")
            .bind(sha256_hex(token.as_bytes()))
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
