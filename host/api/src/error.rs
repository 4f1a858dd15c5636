//! One error shape for every route: `{"error": {"code": "...", "message": "..."}}` with a stable
//! `code`, and extractors that turn axum's rejections into it. Internal failures are logged with
//! the request id and answered with a generic message: internals never leak.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderValue, StatusCode, request::Parts};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `unauthenticated`, `forbidden`, `not_found`, `malformed_json`,
    /// `invalid_request`, `unsupported_media_type`, `body_too_large`, `conflict`, `rate_limited`, `queue_full`,
    /// `method_not_allowed`, `timeout`, `registry_unavailable`, `internal`.
    pub code: &'static str,
    /// For people: names the field or the object concerned.
    pub message: String,
}

/// An error answered to the caller.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a status, a code and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), retry_after: None }
    }

    /// 401.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404: also what another tenant's object gets.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 400 for input that parsed but is not acceptable.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 429 with `Retry-After`: too many failed authentications from the client's address.
    pub fn auth_throttled(retry_after_secs: u64) -> Self {
        Self::retry_after("too many failed authentications from this address", retry_after_secs)
    }

    /// 429 with `Retry-After`: the tenant is over its request rate.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::retry_after("too many requests for this tenant", retry_after_secs)
    }

    fn retry_after(what: &str, secs: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("{what}; retry after {secs} s"));
        e.retry_after = Some(secs);
        e
    }

    /// 429 `queue_full`: the tenant has as many open tasks as it may have.
    pub fn queue_full(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", message);
        e.retry_after = Some(1);
        e
    }

    /// 500: the cause goes to the log, not to the caller.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the server log has the details under this response's x-request-id",
        )
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<qlayer_db::DbError> for ApiError {
    fn from(e: qlayer_db::DbError) -> Self {
        match e {
            qlayer_db::DbError::Invalid(m) => ApiError::invalid(m),
            qlayer_db::DbError::Conflict(m) => ApiError::conflict(m),
            other => ApiError::internal(other),
        }
    }
}

impl From<qlayer_scheduler::SubmitError> for ApiError {
    fn from(e: qlayer_scheduler::SubmitError) -> Self {
        match e {
            qlayer_scheduler::SubmitError::QueueFull { .. } => ApiError::queue_full(e.to_string()),
            qlayer_scheduler::SubmitError::Db(e) => e.into(),
        }
    }
}

/// An error response's code and message, kept on the response so that a route answering in
/// another API's shape (the OpenAI-compatible gateway) can say the same in its own.
#[derive(Debug, Clone)]
pub struct ErrorInfo {
    /// The stable code.
    pub code: &'static str,
    /// The message.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("qlayer_http_errors_total", "code" => self.code).increment(1);
        let info = ErrorInfo { code: self.code, message: self.message.clone() };
        let body = ErrorBody { error: ErrorDetail { code: self.code, message: self.message } };
        let mut response = (self.status, axum::Json(body)).into_response();
        response.extensions_mut().insert(info);
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A JSON body whose rejections (malformed JSON, wrong types, unknown fields, a body over the
/// limit, a missing content type) are answered in the one error shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !json_content_type(req.headers()) {
            return Err(not_json());
        }
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(bytes) => bytes,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_large()),
            Err(e) => return Err(ApiError::invalid(e.body_text())),
        };
        // serde reads a struct from an array too (`[1, 2]` as its fields in order): every body
        // here is an object.
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') | None => {}
            Some(_) => return Err(ApiError::invalid("the body must be a JSON object")),
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => match integral_floats_as_integers(&bytes) {
                Some(value) => Ok(ApiJson(value)),
                None => Err(json_rejection(rejection)),
            },
        }
    }
}

/// Whether the request says its body is JSON (`application/json`, or a `+json` type), as axum's
/// `Json` asks.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// `body` read as `T` where the only trouble is integers written with a fraction of zero
/// (`272.0`, which JSON Schema counts as an integer): each such number at the path serde names
/// becomes the integer, and nothing else of the body changes (free-form JSON in it keeps its
/// numbers as sent). `None` when anything else is wrong.
fn integral_floats_as_integers<T: DeserializeOwned>(body: &[u8]) -> Option<T> {
    use serde_path_to_error::Segment;
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    for _ in 0..64 {
        let e = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(read) => return Some(read),
            Err(e) => e,
        };
        if !e.inner().to_string().starts_with("invalid type: floating point") {
            return None;
        }
        let mut at = &mut value;
        for segment in e.path().iter() {
            at = match segment {
                Segment::Seq { index } => at.get_mut(*index)?,
                Segment::Map { key } | Segment::Enum { variant: key } => at.get_mut(key.as_str())?,
                Segment::Unknown => return None,
            };
        }
        let f = at.as_f64()?;
        if !at.is_f64() || f.fract() != 0.0 || f.abs() > 9_007_199_254_740_992.0 {
            return None;
        }
        *at = if f < 0.0 { serde_json::Value::from(f as i64) } else { serde_json::Value::from(f as u64) };
    }
    None
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        // "Failed to deserialize the JSON body into the target type: name: invalid type..." names
        // the field and what was expected.
        JsonRejection::JsonDataError(e) => ApiError::invalid(e.body_text()),
        JsonRejection::JsonSyntaxError(e) => ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.body_text()),
        JsonRejection::MissingJsonContentType(_) => not_json(),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        other => ApiError::invalid(other.body_text()),
    }
}

fn not_json() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "the body must be JSON, sent with `Content-Type: application/json`",
    )
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        "the request body is larger than this server accepts ([limits] max-body-bytes)",
    )
}

/// Query parameters, with rejections in the one error shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => Err(ApiError::invalid(e.body_text())),
            Err(other) => Err(ApiError::invalid(other.body_text())),
        }
    }
}

/// A path parameter (an id or a name), with rejections in the one error shape: one that is not
/// valid UTF-8 once percent-decoded, or holds a control character (a NUL byte, which PostgreSQL
/// cannot store, a newline), is a 400 naming the problem, the same on every database.
#[derive(Debug, Clone)]
pub struct ApiPath(pub String);

impl<S> FromRequestParts<S> for ApiPath
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) if value.chars().any(char::is_control) => {
                Err(ApiError::invalid("the path parameter contains a control character (such as %00)"))
            }
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(axum::extract::rejection::PathRejection::FailedToDeserializePathParams(e))
                if matches!(e.kind(), axum::extract::path::ErrorKind::InvalidUtf8InPathParam { .. }) =>
            {
                Err(ApiError::invalid("the path parameter is not valid UTF-8 once percent-decoded"))
            }
            Err(other) => Err(ApiError::invalid(other.body_text())),
        }
    }
}

/// The largest page a list returns.
pub const MAX_PAGE_SIZE: u32 = 100;
/// The page size when none is asked for.
pub const DEFAULT_PAGE_SIZE: u32 = 20;

/// `?limit=&after=` on every list.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// 1-100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
}

impl PageQuery {
    /// The page size, refusing sizes over the cap.
    pub fn limit(&self) -> Result<u32, ApiError> {
        page_size(self.limit)
    }
}

/// A requested page size checked against the cap (the default when none is asked for).
pub fn page_size(asked: Option<u32>) -> Result<u32, ApiError> {
    match asked {
        None => Ok(DEFAULT_PAGE_SIZE),
        Some(n) if (1..=MAX_PAGE_SIZE).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(format!("limit {n} is out of range: pages hold 1 to {MAX_PAGE_SIZE} items"))),
    }
}

#[cfg(test)]
mod integral_float_tests {
    #![allow(clippy::unwrap_used)]
    use super::integral_floats_as_integers;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        weight: i64,
        #[serde(default)]
        inner: Option<Inner>,
        #[serde(default)]
        input: serde_json::Value,
    }

    #[derive(Debug, serde::Deserialize)]
    struct Inner {
        counts: Vec<u32>,
    }

    #[test]
    fn integers_written_with_a_zero_fraction_are_read_and_nothing_else_changes() {
        let body: Body =
            integral_floats_as_integers(br#"{"weight": 272.0, "inner": {"counts": [1, 2.0]}, "input": {"x": 1.0}}"#)
                .unwrap();
        assert_eq!((body.weight, body.inner.unwrap().counts), (272, vec![1, 2]));
        assert!(body.input["x"].is_f64(), "free-form JSON keeps its numbers as sent: {}", body.input);
        assert!(integral_floats_as_integers::<Body>(br#"{"weight": 272.5}"#).is_none());
        assert!(integral_floats_as_integers::<Body>(br#"{"weight": -3.0}"#).is_some_and(|b| b.weight == -3));
        assert!(integral_floats_as_integers::<Body>(br#"{"weight": 1e300}"#).is_none());
        assert!(integral_floats_as_integers::<Body>(br#"{"weight": 1.0, "other": 1}"#).is_none());
    }
}
