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

/// The bearer token of a request, if it has one; else its `x-api-key` header (what Anthropic's
/// SDKs send).
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return headers.get("x-api-key")?.to_str().ok().map(str::trim);
    };
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Checks the key and the tenant's rate, and records the tenant on the request's span.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let client = client_of(&req);
    let principal = match resolve(&state, req.headers(), client).await {
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

/// The address a REST request came from, when the server recorded it.
pub fn client_of(req: &Request) -> Option<std::net::IpAddr> {
    req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip())
}

/// The principal behind a request's bearer key, from `client` (when known).
///
/// Failed authentications are limited per client address ([`AuthGuard`]): past the limit the
/// client gets 429 with `Retry-After` before any key is looked at. A key just found unknown is
/// remembered for a while, so a flood of the same bad key does not reach the database.
pub async fn resolve(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    client: Option<std::net::IpAddr>,
) -> Result<Principal, ApiError> {
    let guard = &state.auth_guard;
    if let Some(ip) = client
        && let Err(wait) = guard.failures.peek(&ip.to_string())
    {
        return Err(ApiError::auth_throttled(wait.as_secs_f64().ceil().max(1.0) as u64));
    }
    let failed = |message: &str| {
        if let Some(ip) = client {
            let _ = guard.failures.check(&ip.to_string());
        }
        metrics::counter!("qlayer_auth_failures_total").increment(1);
        ApiError::unauthenticated(message.to_string())
    };
    let Some(token) = bearer(headers) else {
        return Err(failed("missing credentials: send `Authorization: Bearer <api key>`"));
    };
    const INVALID: &str = "the API key is not valid: unknown, malformed or revoked";
    if guard.known_unknown(token) {
        return Err(failed(INVALID));
    }
    let digest = qlayer_db::key_digest(token);
    if let Some(p) = guard.known(&digest) {
        return Ok(p);
    }
    match state.db.authenticate(token).await {
        Ok(Some(p)) => {
            guard.remember_known(digest, &p);
            Ok(p)
        }
        Ok(None) => {
            guard.remember_unknown(token);
            Err(failed(INVALID))
        }
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// Bounds what unauthenticated clients can make the service do.
#[derive(Debug)]
pub struct AuthGuard {
    /// Failed authentications per client address.
    failures: RateLimiter,
    /// Hashes of keys recently found unknown, with when.
    unknown: Mutex<HashMap<u64, Instant>>,
    /// Keys recently verified, by their SHA-256 (never the key), with whom they belong to and
    /// when: a request does not query the database for its key again within [`KNOWN_TTL`].
    known: Mutex<HashMap<[u8; 32], (Principal, Instant)>>,
}

/// How long a verified key is answered from memory. A key revoked through this node stops at
/// once ([`AuthGuard::forget_key`]); through another node sharing the database, within this.
pub const KNOWN_TTL: Duration = Duration::from_secs(2);
/// Verified keys remembered at most.
const KNOWN_MAX: usize = 10_000;

/// How long a key found unknown is answered from memory.
const UNKNOWN_TTL: Duration = Duration::from_secs(30);
/// Unknown keys remembered at most; past that the memory starts afresh.
const UNKNOWN_MAX: usize = 10_000;

impl AuthGuard {
    /// `per_second` failures a second per client address on average, bursts of `burst`.
    pub fn new(per_second: f64, burst: f64) -> Self {
        AuthGuard {
            failures: RateLimiter::new(per_second, burst),
            unknown: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
        }
    }

    fn known(&self, digest: &[u8; 32]) -> Option<Principal> {
        let map = self.known.lock().unwrap_or_else(|p| p.into_inner());
        map.get(digest).filter(|(_, at)| at.elapsed() < KNOWN_TTL).map(|(p, _)| p.clone())
    }

    fn remember_known(&self, digest: [u8; 32], principal: &Principal) {
        let mut map = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= KNOWN_MAX {
            map.retain(|_, (_, at)| at.elapsed() < KNOWN_TTL);
            if map.len() >= KNOWN_MAX {
                map.clear();
            }
        }
        map.insert(digest, (principal.clone(), Instant::now()));
    }

    /// Forgets a key this node verified (it was just revoked).
    pub fn forget_key(&self, key_id: &str) {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, (p, _)| p.key_id != key_id);
    }

    fn fingerprint(token: &str) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        // Keyed per process (RandomState): the map's keys say nothing of the tokens.
        static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
        let mut h = KEY.get_or_init(Default::default).build_hasher();
        h.write(token.as_bytes());
        h.finish()
    }

    fn known_unknown(&self, token: &str) -> bool {
        let map = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&Self::fingerprint(token)).is_some_and(|at| at.elapsed() < UNKNOWN_TTL)
    }

    fn remember_unknown(&self, token: &str) {
        let mut map = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= UNKNOWN_MAX {
            map.retain(|_, at| at.elapsed() < UNKNOWN_TTL);
            if map.len() >= UNKNOWN_MAX {
                map.clear();
            }
        }
        map.insert(Self::fingerprint(token), Instant::now());
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

    /// Whether `key` has a token now, without taking it; or how long until it has one.
    pub fn peek(&self, key: &str) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match buckets.get(key) {
            Some((tokens, last)) => {
                let tokens = (tokens + last.elapsed().as_secs_f64() * self.rate).min(self.burst);
                if tokens >= 1.0 { Ok(()) } else { Err(Duration::from_secs_f64((1.0 - tokens) / self.rate)) }
            }
            None => Ok(()),
        }
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
        assert!(limiter.peek("a").is_err() && limiter.peek("c").is_ok(), "peek takes nothing");
    }

    #[test]
    fn verified_keys_are_remembered_by_digest_and_forgotten_when_revoked() {
        let guard = AuthGuard::new(1.0, 5.0);
        let principal = Principal {
            key_id: "key_1".into(),
            tenant_id: "tn_1".into(),
            tenant_name: "acme".into(),
            role: qlayer_db::Role::Admin,
        };
        let digest = qlayer_db::key_digest("ql_good");
        assert!(guard.known(&digest).is_none());
        guard.remember_known(digest, &principal);
        assert_eq!(guard.known(&digest), Some(principal.clone()));
        assert!(guard.known(&qlayer_db::key_digest("ql_other")).is_none(), "another key is not it");
        guard.forget_key("key_2");
        assert!(guard.known(&digest).is_some(), "another key's revocation leaves it");
        guard.forget_key("key_1");
        assert!(guard.known(&digest).is_none(), "its revocation forgets it");
    }

    #[test]
    fn unknown_keys_are_remembered_for_a_while() {
        let guard = AuthGuard::new(1.0, 5.0);
        assert!(!guard.known_unknown("ql_bad"));
        guard.remember_unknown("ql_bad");
        assert!(guard.known_unknown("ql_bad") && !guard.known_unknown("ql_other"));
    }
}
