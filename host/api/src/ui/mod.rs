//! The dashboard at `/ui`: server-rendered pages (maud, so every value is escaped by
//! construction) with one small script for live updates and one style sheet, both embedded in
//! the binary: no CDN, no Node toolchain, and every page works with JavaScript off.
//!
//! A person signs in with an API key. The key is checked once and never stored: the browser gets
//! a random session token in an `HttpOnly`, `SameSite=Strict` cookie (only its SHA-256 is kept),
//! and the session acts as that key (same tenant, same role) until it expires, the person signs
//! out, or the key is revoked. Every page goes through the same operations as the REST API, so a
//! viewer can change nothing and another tenant's object is the not-found page. Forms carry the
//! session's anti-forgery token; pages send a strict Content-Security-Policy.

mod pages;

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use std::collections::HashMap;

/// The session cookie.
pub const COOKIE: &str = "qlayer_session";
/// How long a session lasts.
pub const SESSION_TTL_MS: i64 = 8 * 3600 * 1000;

/// Every dashboard response's security headers: scripts, styles and images only from the
/// dashboard itself (no inline script or style), no framing, forms only to itself.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const CSS: &str = include_str!("app.css");
const JS: &str = include_str!("app.js");

/// The dashboard's routes.
pub fn router(state: &AppState) -> axum::Router<AppState> {
    let signed_in = axum::Router::new()
        .route("/ui/runs", get(pages::runs).post(pages::start_run))
        .route("/ui/runs/{id}", get(pages::run))
        .route("/ui/runs/{id}/events", get(pages::run_events))
        .route("/ui/runs/{id}/capsule", get(pages::capsule))
        .route("/ui/runs/{id}/approve", post(pages::approve))
        .route("/ui/runs/{id}/reject", post(pages::reject))
        .route("/ui/jobs", get(pages::jobs))
        .route("/ui/jobs/{id}", get(pages::job))
        .route("/ui/plugins", get(pages::plugins).post(pages::install))
        .route("/ui/plugins/{name}/remove", post(pages::remove))
        .route("/ui/plugins/{name}/upgrade", post(pages::upgrade))
        .route("/ui/usage", get(pages::usage))
        .route("/ui/operators", get(pages::operators))
        .route("/ui/operators/tenants/{id}", get(pages::operator_tenant))
        .route("/ui/sign-out", post(sign_out))
        .route("/ui/{*rest}", get(|visitor: Visitor| async move { not_found(&visitor, "There is no such page.") }))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), session));
    axum::Router::new()
        .route("/ui", get(|| async { see_other("/ui/runs") }))
        .route("/ui/", get(|| async { see_other("/ui/runs") }))
        .route("/ui/sign-in", get(sign_in_page).post(sign_in))
        .route("/ui/assets/app.css", get(|| async { asset("text/css; charset=utf-8", CSS) }))
        .route("/ui/assets/app.js", get(|| async { asset("text/javascript; charset=utf-8", JS) }))
        .merge(signed_in)
        .layer(axum::middleware::from_fn(security_headers))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=3600")], body).into_response()
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A 303 to `to`.
pub(crate) fn see_other(to: &str) -> Response {
    match HeaderValue::from_str(to) {
        Ok(location) => (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response(),
        Err(_) => (StatusCode::SEE_OTHER, [(header::LOCATION, HeaderValue::from_static("/ui/runs"))]).into_response(),
    }
}

/// The signed-in person: the session's caller and its anti-forgery token.
#[derive(Debug, Clone)]
pub struct Visitor {
    /// Acts as the key the session was opened with.
    pub caller: Caller,
    /// The session's anti-forgery token.
    pub csrf: String,
}

impl Visitor {
    /// Whether the key may change things (not a viewer).
    pub fn can_write(&self) -> bool {
        self.caller.require_write().is_ok()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Visitor {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        parts.extensions.get::<Visitor>().cloned().ok_or_else(|| see_other("/ui/sign-in"))
    }
}

/// The value of cookie `name`.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The session behind the request's cookie, or the sign-in page (with where to come back to).
async fn session(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let token = cookie(req.headers(), COOKIE).map(str::to_string);
    let found = match &token {
        Some(token) => state.db.session(token).await,
        None => Ok(None),
    };
    match found {
        Ok(Some(session)) => {
            if let Err(wait) = state.limiter.check(&session.principal.tenant_id) {
                let mut r = message_page(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Slow down",
                    &format!("Too many requests for this tenant; try again in {} s.", wait.as_secs().max(1)),
                );
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs().max(1)));
                return r;
            }
            let span = tracing::Span::current();
            span.record("tenant", session.principal.tenant_name.as_str());
            span.record("key", session.principal.key_id.as_str());
            req.extensions_mut().insert(Visitor { caller: Caller(session.principal), csrf: session.csrf });
            next.run(req).await
        }
        Ok(None) => {
            let back = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/ui/runs");
            let to = if req.method() == axum::http::Method::GET && !back.ends_with("/events") {
                format!(
                    "/ui/sign-in?next={}",
                    url::form_urlencoded::byte_serialize(back.as_bytes()).collect::<String>()
                )
            } else {
                "/ui/sign-in".to_string()
            };
            let mut r = see_other(&to);
            if token.is_some() {
                r.headers_mut().insert(header::SET_COOKIE, clear_cookie());
            }
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "reading a dashboard session failed");
            message_page(StatusCode::INTERNAL_SERVER_ERROR, "Something went wrong", "The session could not be read.")
        }
    }
}

fn session_cookie(token: &str, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let value =
        format!("{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{secure}", SESSION_TTL_MS / 1000);
    HeaderValue::from_str(&value).unwrap_or_else(|_| clear_cookie())
}

fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("qlayer_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// A form body's fields (the first of each name).
pub(crate) fn form(body: &[u8]) -> HashMap<String, String> {
    let mut fields = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        fields.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    fields
}

/// A form refused before it is read: sent from another site, or without the session's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused(&'static str);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        message_page(StatusCode::FORBIDDEN, "Refused", self.0)
    }
}

const CROSS_SITE: Refused = Refused("This form was sent from another site. Open the dashboard and send it from there.");

/// Refuses a form posted from another site: a browser's `Sec-Fetch-Site` or `Origin` that is
/// not this host.
fn same_origin(headers: &HeaderMap) -> Result<(), Refused> {
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site" || v == "same-site")
    {
        return Err(CROSS_SITE);
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        let bare = origin.split_once("://").map(|(_, rest)| rest);
        if bare != Some(host) {
            return Err(CROSS_SITE);
        }
    }
    Ok(())
}

/// Checks a signed-in form: same origin, and the session's anti-forgery token.
pub(crate) fn check_form(
    visitor: &Visitor,
    headers: &HeaderMap,
    fields: &HashMap<String, String>,
) -> Result<(), Refused> {
    same_origin(headers)?;
    let sent = fields.get("csrf").map(String::as_str).unwrap_or("");
    let expected = visitor.csrf.as_bytes();
    let equal = sent.len() == expected.len() && sent.bytes().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if !equal {
        return Err(Refused("The form's anti-forgery token is missing or stale. Reload the page and send it again."));
    }
    Ok(())
}

/// A signed-in form's fields, once [`check_form`] passed: what every dashboard `POST` takes.
pub(crate) struct Posted(pub HashMap<String, String>);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Posted {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let visitor = req.extensions().get::<Visitor>().cloned().ok_or_else(|| see_other("/ui/sign-in"))?;
        let headers = req.headers().clone();
        let body = axum::body::Bytes::from_request(req, state).await.map_err(IntoResponse::into_response)?;
        let fields = form(&body);
        check_form(&visitor, &headers, &fields).map_err(IntoResponse::into_response)?;
        Ok(Posted(fields))
    }
}

/// The anti-forgery field of a form.
pub(crate) fn csrf_field(visitor: &Visitor) -> Markup {
    html! { input type="hidden" name="csrf" value=(visitor.csrf); }
}

/// Which section of the navigation a page is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Runs,
    Jobs,
    Plugins,
    Usage,
    Operators,
    None,
}

/// A page's head: its title, the style sheet, and (signed in) the script.
fn head(title: &str, script: bool) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · qlayer" }
            link rel="stylesheet" href="/ui/assets/app.css";
            @if script {
                script src="/ui/assets/app.js" defer {}
            }
        }
    }
}

/// A signed-in page.
pub(crate) fn layout(visitor: &Visitor, section: Section, title: &str, body: Markup) -> Markup {
    let caller = &visitor.caller;
    let mut links = vec![
        (Section::Runs, "/ui/runs", "Runs"),
        (Section::Jobs, "/ui/jobs", "Jobs"),
        (Section::Plugins, "/ui/plugins", "Plugins"),
        (Section::Usage, "/ui/usage", "Usage"),
    ];
    if caller.is_operator() {
        links.push((Section::Operators, "/ui/operators", "Operators"));
    }
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, true))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    span.brand { "qlayer" }
                    nav aria-label="Sections" {
                        ul {
                            @for (s, href, label) in &links {
                                li {
                                    @if *s == section {
                                        a href=(href) aria-current="page" { (label) }
                                    } @else {
                                        a href=(href) { (label) }
                                    }
                                }
                            }
                        }
                    }
                    div.who {
                        span #who { "Tenant " strong { (caller.tenant_name()) } " · " (caller.0.role.to_string()) }
                        form method="post" action="/ui/sign-out" {
                            (csrf_field(visitor))
                            button type="submit" #sign-out { "Sign out" }
                        }
                    }
                }
                main #main tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page without a session (sign-in, errors before sign-in).
fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, false))
            body {
                main #main.narrow {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page with a status, a title and a message (no session needed).
pub(crate) fn message_page(status: StatusCode, title: &str, message: &str) -> Response {
    let page =
        bare(title, html! { p.error role="alert" { (message) } p { a href="/ui/runs" { "Back to the dashboard" } } });
    (status, axum::response::Html(page.into_string())).into_response()
}

/// The not-found page: the same for a missing object and another tenant's.
pub(crate) fn not_found(visitor: &Visitor, message: &str) -> Response {
    let page = layout(
        visitor,
        Section::None,
        "Not found",
        html! {
            p.error #not-found role="alert" { (message) }
            p { a href="/ui/runs" { "Back to the runs" } }
        },
    );
    (StatusCode::NOT_FOUND, axum::response::Html(page.into_string())).into_response()
}

/// An API error as a page: its status, in the dashboard's layout.
pub(crate) fn error_page(visitor: &Visitor, e: &ApiError) -> Response {
    if e.status() == StatusCode::NOT_FOUND {
        return not_found(visitor, e.message());
    }
    let title = match e.status() {
        StatusCode::FORBIDDEN => "Not allowed",
        StatusCode::CONFLICT => "Not now",
        s if s.is_client_error() => "Refused",
        _ => "Something went wrong",
    };
    let page = layout(
        visitor,
        Section::None,
        title,
        html! {
            p.error role="alert" { (e.message()) }
            p { a href="/ui/runs" { "Back to the runs" } }
        },
    );
    (e.status(), axum::response::Html(page.into_string())).into_response()
}

/// A rendered page with 200.
pub(crate) fn page(markup: Markup) -> Response {
    axum::response::Html(markup.into_string()).into_response()
}

/// Where to go after signing in: only a dashboard path of this host.
fn next_path(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("/ui//") && !n.contains('\\') && !n.contains("://") => {
            n.to_string()
        }
        _ => "/ui/runs".to_string(),
    }
}

fn sign_in_form(next: &str, error: Option<&str>) -> Markup {
    bare(
        "Sign in",
        html! {
            p { "Sign in with an API key of your tenant. The key is checked once and not kept by the browser: "
                "the session lasts " (SESSION_TTL_MS / 3_600_000) " hours, or until you sign out or the key is revoked." }
            @if let Some(error) = error {
                p.error #sign-in-error role="alert" { (error) }
            }
            form method="post" action="/ui/sign-in" {
                input type="hidden" name="next" value=(next);
                label for="key" { "API key" }
                input #key type="password" name="key" autocomplete="off" required placeholder="ql_…" spellcheck="false";
                button type="submit" { "Sign in" }
            }
        },
    )
}

async fn sign_in_page(axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>) -> Response {
    page(sign_in_form(&next_path(q.get("next").map(String::as_str)), None))
}

async fn sign_in(State(state): State<AppState>, req: Request) -> Response {
    let client = crate::auth::client_of(&req);
    let headers = req.headers().clone();
    if let Err(refused) = same_origin(&headers) {
        return refused.into_response();
    }
    let secure = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) == Some("https");
    let body = match axum::body::to_bytes(req.into_body(), state.limits.max_body_bytes).await {
        Ok(body) => body,
        Err(_) => return message_page(StatusCode::PAYLOAD_TOO_LARGE, "Refused", "The form is too large."),
    };
    let fields = form(&body);
    let next = next_path(fields.get("next").map(String::as_str));
    let key = fields.get("key").map(|k| k.trim()).unwrap_or("");
    let mut bearer = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {key}")) {
        bearer.insert(header::AUTHORIZATION, v);
    }
    let principal = match crate::auth::resolve(&state, &bearer, client).await {
        Ok(p) => p,
        Err(e) => {
            let status = e.status();
            let message = if status == StatusCode::UNAUTHORIZED {
                "That API key is not valid: unknown, malformed or revoked."
            } else {
                e.message()
            };
            let mut r =
                (status, axum::response::Html(sign_in_form(&next, Some(message)).into_string())).into_response();
            if status == StatusCode::TOO_MANY_REQUESTS {
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            return r;
        }
    };
    let caller = Caller(principal);
    let opened = state.db.open_session(caller.actor(), SESSION_TTL_MS).await.map_err(ApiError::from);
    state.audit(&caller, "ui.sign-in", caller.actor(), &opened).await;
    match opened {
        Ok(session) => {
            let mut r = see_other(&next);
            r.headers_mut().insert(header::SET_COOKIE, session_cookie(&session.token, secure));
            r
        }
        Err(e) => message_page(e.status(), "Something went wrong", e.message()),
    }
}

async fn sign_out(State(state): State<AppState>, visitor: Visitor, headers: HeaderMap, _: Posted) -> Response {
    let ended = match cookie(&headers, COOKIE) {
        Some(token) => state.db.end_session(token).await.map(|_| ()).map_err(ApiError::from),
        None => Ok(()),
    };
    state.audit(&visitor.caller, "ui.sign-out", visitor.caller.actor(), &ended).await;
    let mut r = see_other("/ui/sign-in");
    r.headers_mut().insert(header::SET_COOKIE, clear_cookie());
    r
}

/// Unix ms as `YYYY-MM-DD HH:MM:SS` UTC.
pub(crate) fn when(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = qlayer_gateway::quota::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Unix ms as `YYYY-MM-DD` (UTC).
pub(crate) fn day(ms: i64) -> String {
    let (y, m, d) = qlayer_gateway::quota::civil_from_days(ms.div_euclid(86_400_000));
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(when(0), "1970-01-01 00:00:00");
        assert_eq!(when(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(day(1_796_601_600_000), "2026-12-07");
    }

    #[test]
    fn only_dashboard_paths_are_followed_after_sign_in() {
        assert_eq!(next_path(Some("/ui/runs/job_1")), "/ui/runs/job_1");
        for bad in ["https://evil.example/ui/", "//evil.example", "/ui//evil.example", "/v1/keys", "/ui/\\evil", ""] {
            assert_eq!(next_path(Some(bad)), "/ui/runs", "{bad}");
        }
    }

    #[test]
    fn a_form_from_another_site_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&h).is_ok());
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        assert!(same_origin(&h).is_ok());
        h.insert(header::ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert!(same_origin(&h).is_err());
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(same_origin(&h).is_err());
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&h).is_err());
    }
}
