//! Who is calling: `Authorization: Bearer <api key>` on every `/v1` route, then the caller's
//! tenant's request-rate limit.

use super::AppState;
use super::error::ApiError;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use qlayer_db::{Principal, Role};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl Caller {
    /// The caller's tenant id.
    pub fn tenant_id(&self) -> &str {
        &self.0.tenant_id
    }

    /// The caller's tenant name.
    pub fn tenant_name(&self) -> &str {
        &self.0.tenant_name
    }

    /// The key that is acting, for the audit log.
    pub fn actor(&self) -> &str {
        &self.0.key_id
    }

    /// Refuses viewers.
    pub fn require_write(&self) -> Result<(), ApiError> {
        if self.0.role.can_write() {
            Ok(())
        } else {
            Err(ApiError::forbidden("this API key has the viewer role, which cannot change anything"))
        }
    }

    /// Refuses all but the tenant's admins.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.0.role == Role::Admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("this needs an admin key; this API key has the {} role", self.0.role)))
        }
    }

    /// Whether this is an admin of the `system` tenant (manages tenants).
    pub fn is_operator(&self) -> bool {
        self.0.role == Role::Admin && self.0.tenant_name == "system"
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::internal("a /v1 route ran without the authentication middleware"))
    }
}

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Checks the key and the tenant's rate, and records the tenant on the request's span.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let principal = match resolve(&state, req.headers()).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if let Err(wait) = state.limiter.check(&principal.tenant_id) {
        return ApiError::rate_limited(wait.as_secs_f64().ceil().max(1.0) as u64).into_response();
    }
    let span = tracing::Span::current();
    span.record("tenant", principal.tenant_name.as_str());
    span.record("key", principal.key_id.as_str());
    req.extensions_mut().insert(Caller(principal));
    next.run(req).await
}

/// The principal behind a request's bearer key.
pub async fn resolve(state: &AppState, headers: &axum::http::HeaderMap) -> Result<Principal, ApiError> {
    let Some(token) = bearer(headers) else {
        return Err(ApiError::unauthenticated("missing credentials: send `Authorization: Bearer <api key>`"));
    };
    match state.db.authenticate(token).await {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(ApiError::unauthenticated("the API key is not valid: unknown, malformed or revoked")),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// A token bucket per tenant: `rate` requests per second on average, bursts up to `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `rate` 0 turns the limit off.
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter { rate, burst: burst.max(1.0), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes a token for `key`, or says how long until one is available.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate_and_keeps_tenants_apart() {
        let limiter = RateLimiter::new(1.0, 3.0);
        for _ in 0..3 {
            assert!(limiter.check("a").is_ok());
        }
        let wait = limiter.check("a").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(limiter.check("b").is_ok(), "another tenant has its own bucket");
        assert!(RateLimiter::new(0.0, 0.0).check("a").is_ok(), "rate 0 is off");
    }
}
