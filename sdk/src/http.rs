//! Outbound HTTP for providers, over `wasi:http`. The host lets a request through only to the
//! hosts the plugin's install granted; a refused request is [`HttpError::Denied`].
//!
//! Redirects are followed (up to [`MAX_REDIRECTS`]); each hop is a new request that the host
//! checks again, and credentials are dropped when a redirect leaves the original host.
//!
//! ```no_run
//! use qlayer_sdk::http::Request;
//! let reply = Request::post("https://api.example.com/v1/chat/completions")
//!     .header("content-type", "application/json")
//!     .body(br#"{"model":"m"}"#.to_vec())
//!     .send()?;
//! let text = reply.text(1 << 20)?;
//! # Ok::<(), qlayer_sdk::http::HttpError>(())
//! ```

use crate::PluginError;
use std::fmt;
use std::time::Duration;
use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingResponse, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasi::io::streams::{InputStream, StreamError};

/// A `Retry-After` header's delay in milliseconds: seconds, possibly fractional, as LLM APIs send
/// it. HTTP dates, which they do not send, give `None`.
///
/// ```
/// assert_eq!(qlayer_sdk::http::retry_after_ms("2"), Some(2000));
/// assert_eq!(qlayer_sdk::http::retry_after_ms("0.5"), Some(500));
/// assert_eq!(qlayer_sdk::http::retry_after_ms("Wed, 21 Oct 2015 07:28:00 GMT"), None);
/// ```
pub fn retry_after_ms(value: &str) -> Option<u64> {
    value.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0).map(|s| (s * 1000.0) as u64)
}

/// How many redirects [`Request::send`] follows.
pub const MAX_REDIRECTS: usize = 5;

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The URL could not be used.
    InvalidUrl(String),
    /// The host refused the request: the plugin's install did not grant this host.
    Denied(String),
    /// Connecting, or waiting for the response, took too long.
    Timeout(String),
    /// The server could not be reached or broke the connection.
    Connection(String),
    /// The body was larger than the caller allowed.
    TooLarge(usize),
    /// Any other protocol failure.
    Protocol(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::InvalidUrl(m) => write!(f, "invalid URL: {m}"),
            HttpError::Denied(m) => write!(f, "request refused by the host: {m} is not granted to this plugin"),
            HttpError::Timeout(m) => write!(f, "timed out: {m}"),
            HttpError::Connection(m) => write!(f, "connection failed: {m}"),
            HttpError::TooLarge(max) => write!(f, "response body is larger than {max} bytes"),
            HttpError::Protocol(m) => write!(f, "HTTP error: {m}"),
        }
    }
}

impl std::error::Error for HttpError {}

impl From<HttpError> for PluginError {
    /// Maps transport failures onto the contract: a refused host is `unauthorized`, timeouts are
    /// `timeout`, the rest are `unavailable` (worth a retry or a fallback).
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Denied(_) => PluginError::Unauthorized(e.to_string()),
            HttpError::Timeout(_) => PluginError::Timeout,
            HttpError::InvalidUrl(_) => PluginError::InvalidInput(e.to_string()),
            _ => PluginError::Unavailable(e.to_string()),
        }
    }
}

/// An outgoing request being built.
#[derive(Debug, Clone)]
pub struct Request {
    method: &'static str,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Option<Duration>,
}

impl Request {
    /// A GET request.
    ///
    /// ```no_run
    /// let models = qlayer_sdk::http::Request::get("https://api.example.com/v1/models").send();
    /// ```
    pub fn get(url: impl Into<String>) -> Self {
        Request { method: "GET", url: url.into(), headers: Vec::new(), body: Vec::new(), timeout: None }
    }

    /// A POST request.
    ///
    /// ```no_run
    /// let r = qlayer_sdk::http::Request::post("https://api.example.com/v1/embeddings");
    /// ```
    pub fn post(url: impl Into<String>) -> Self {
        Request { method: "POST", ..Request::get(url) }
    }

    /// Adds a header.
    ///
    /// ```no_run
    /// let r = qlayer_sdk::http::Request::get("https://x.test/").header("accept", "application/json");
    /// ```
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    ///
    /// ```no_run
    /// let r = qlayer_sdk::http::Request::post("https://x.test/").body(b"{}".to_vec());
    /// ```
    pub fn body(mut self, body: Vec<u8>) -> Self {
        self.body = body;
        self
    }

    /// Bounds connecting, the wait for the first byte, and each gap between bytes.
    ///
    /// ```no_run
    /// let r = qlayer_sdk::http::Request::get("https://x.test/").timeout(std::time::Duration::from_secs(30));
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the request, following redirects.
    ///
    /// ```no_run
    /// let reply = qlayer_sdk::http::Request::get("https://x.test/").send()?;
    /// assert_eq!(reply.status(), 200);
    /// # Ok::<(), qlayer_sdk::http::HttpError>(())
    /// ```
    pub fn send(self) -> Result<Response, HttpError> {
        let mut current = self;
        let origin = Url::parse(&current.url)?.authority;
        for _ in 0..=MAX_REDIRECTS {
            let url = Url::parse(&current.url)?;
            let response = send_once(&current, &url)?;
            let status = response.status();
            let location = response.header("location").map(str::to_string);
            match (status, location) {
                (301 | 302 | 303 | 307 | 308, Some(location)) => {
                    let next = url.join(&location)?;
                    if status == 303 || (matches!(status, 301 | 302) && current.method == "POST") {
                        current.method = "GET";
                        current.body.clear();
                    }
                    if Url::parse(&next)?.authority != origin {
                        // Never hand credentials to another host.
                        current.headers.retain(|(n, _)| {
                            !n.eq_ignore_ascii_case("authorization") && !n.eq_ignore_ascii_case("x-api-key")
                        });
                    }
                    current.url = next;
                }
                _ => return Ok(response),
            }
        }
        Err(HttpError::Protocol(format!("more than {MAX_REDIRECTS} redirects")))
    }
}

struct Url {
    scheme: String,
    authority: String,
    path: String,
}

impl Url {
    fn parse(url: &str) -> Result<Url, HttpError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| HttpError::InvalidUrl(format!("`{url}` has no scheme (http:// or https://)")))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(HttpError::InvalidUrl(format!("`{url}`: only http and https are supported")));
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(HttpError::InvalidUrl(format!("`{url}` has no usable host")));
        }
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
        Ok(Url { scheme, authority: authority.to_string(), path })
    }

    fn join(&self, location: &str) -> Result<String, HttpError> {
        if location.contains("://") {
            Ok(location.to_string())
        } else if location.starts_with("//") {
            Ok(format!("{}:{location}", self.scheme))
        } else if location.starts_with('/') {
            Ok(format!("{}://{}{location}", self.scheme, self.authority))
        } else {
            let base = self.path.split('?').next().unwrap_or("/");
            let dir = &base[..base.rfind('/').map(|i| i + 1).unwrap_or(0)];
            Ok(format!("{}://{}{dir}{location}", self.scheme, self.authority))
        }
    }
}

fn send_once(request: &Request, url: &Url) -> Result<Response, HttpError> {
    let headers = Fields::new();
    for (name, value) in &request.headers {
        headers
            .append(name, value.as_bytes())
            .map_err(|e| HttpError::Protocol(format!("header `{name}` refused: {e:?}")))?;
    }
    let outgoing = OutgoingRequest::new(headers);
    let method = if request.method == "POST" { Method::Post } else { Method::Get };
    let scheme = if url.scheme == "https" { Scheme::Https } else { Scheme::Http };
    let bad = |what: &str| HttpError::InvalidUrl(format!("{what} refused"));
    outgoing.set_method(&method).map_err(|_| bad("method"))?;
    outgoing.set_scheme(Some(&scheme)).map_err(|_| bad("scheme"))?;
    outgoing.set_authority(Some(&url.authority)).map_err(|_| bad("authority"))?;
    outgoing.set_path_with_query(Some(&url.path)).map_err(|_| bad("path"))?;
    let body = outgoing.body().map_err(|_| HttpError::Protocol("request body unavailable".into()))?;

    let options = request.timeout.map(|t| {
        let options = RequestOptions::new();
        let nanos = t.as_nanos().min(u64::MAX as u128) as u64;
        let _ = options.set_connect_timeout(Some(nanos));
        let _ = options.set_first_byte_timeout(Some(nanos));
        let _ = options.set_between_bytes_timeout(Some(nanos));
        options
    });
    let future = outgoing_handler::handle(outgoing, options).map_err(|e| map_error(e, &url.authority))?;
    write_body(body, &request.body)?;
    future.subscribe().block();
    let response = match future.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(e))) => return Err(map_error(e, &url.authority)),
        Some(Err(())) | None => return Err(HttpError::Protocol("response already taken".into())),
    };
    Response::new(response)
}

fn write_body(body: OutgoingBody, bytes: &[u8]) -> Result<(), HttpError> {
    {
        let stream = body.write().map_err(|_| HttpError::Protocol("request body stream unavailable".into()))?;
        // `blocking-write-and-flush` takes at most 4096 bytes a call.
        for chunk in bytes.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| HttpError::Connection(format!("writing the request body: {e:?}")))?;
        }
    }
    OutgoingBody::finish(body, None).map_err(|e| HttpError::Protocol(format!("finishing the request body: {e:?}")))
}

fn map_error(e: ErrorCode, authority: &str) -> HttpError {
    match e {
        ErrorCode::HttpRequestDenied => HttpError::Denied(authority.to_string()),
        ErrorCode::ConnectionTimeout | ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => {
            HttpError::Timeout(format!("{authority}: {e:?}"))
        }
        ErrorCode::DnsTimeout => HttpError::Timeout(format!("{authority}: DNS lookup")),
        ErrorCode::ConnectionRefused
        | ErrorCode::ConnectionTerminated
        | ErrorCode::ConnectionLimitReached
        | ErrorCode::DestinationNotFound
        | ErrorCode::DestinationUnavailable
        | ErrorCode::DestinationIpUnroutable
        | ErrorCode::DnsError(_) => HttpError::Connection(format!("{authority}: {e:?}")),
        other => HttpError::Protocol(format!("{authority}: {other:?}")),
    }
}

/// A response whose body has not been read yet.
pub struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    // Drop order matters: the stream before the body, the body before the response.
    stream: InputStream,
    _body: IncomingBody,
    _response: IncomingResponse,
    buffered: Vec<u8>,
    finished: bool,
}

/// Percent-encodes everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`), as a
/// URL path segment or query value, or AWS's canonical request, wants it.
///
/// ```
/// assert_eq!(qlayer_sdk::http::percent_encode("v1:0 a/b"), "v1%3A0%20a%2Fb");
/// ```
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A provider's error for an upstream that sent something it cannot read: `unavailable` (another
/// attempt, or another deployment, may do better).
pub fn malformed(what: &str, e: impl fmt::Display) -> PluginError {
    PluginError::Unavailable(format!("upstream sent a malformed {what}: {e}"))
}

impl Response {
    /// This response when its status is 2xx; otherwise the contract's error for it, quoting the
    /// upstream's own message (`error.message` of a JSON body, as OpenAI's and Anthropic's APIs
    /// send it, else the body's start): 429 `rate-limited` with its Retry-After, 401/403
    /// `unauthorized`, 408 and 5xx `unavailable`, the rest `invalid-input`.
    pub fn error_for_status(self) -> Result<Response, PluginError> {
        let status = self.status();
        if (200..300).contains(&status) {
            return Ok(self);
        }
        let retry_after = self.header("retry-after").and_then(retry_after_ms);
        let body = self.text(64 * 1024).unwrap_or_default();
        let detail = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.chars().take(300).collect());
        let message = format!("upstream answered {status}: {detail}");
        Err(match status {
            429 => PluginError::RateLimited(retry_after),
            401 | 403 => PluginError::Unauthorized(message),
            408 | 500..=599 => PluginError::Unavailable(message),
            _ => PluginError::InvalidInput(message),
        })
    }

    fn new(response: IncomingResponse) -> Result<Self, HttpError> {
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let body = response.consume().map_err(|_| HttpError::Protocol("response body already taken".into()))?;
        let stream = body.stream().map_err(|_| HttpError::Protocol("response body stream unavailable".into()))?;
        Ok(Response {
            status,
            headers,
            stream,
            _body: body,
            _response: response,
            buffered: Vec::new(),
            finished: false,
        })
    }

    /// The status code.
    ///
    /// ```no_run
    /// # let reply = qlayer_sdk::http::Request::get("https://x.test/").send().unwrap();
    /// if reply.status() == 429 { /* slow down */ }
    /// ```
    pub fn status(&self) -> u16 {
        self.status
    }

    /// A header's value (names are case-insensitive).
    ///
    /// ```no_run
    /// # let reply = qlayer_sdk::http::Request::get("https://x.test/").send().unwrap();
    /// let retry = reply.header("retry-after");
    /// ```
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// Reads the whole body, refusing more than `max` bytes.
    ///
    /// ```no_run
    /// # let reply = qlayer_sdk::http::Request::get("https://x.test/").send().unwrap();
    /// let bytes = reply.bytes(1 << 20)?;
    /// # Ok::<(), qlayer_sdk::http::HttpError>(())
    /// ```
    pub fn bytes(mut self, max: usize) -> Result<Vec<u8>, HttpError> {
        let mut out = std::mem::take(&mut self.buffered);
        while let Some(chunk) = self.read_chunk()? {
            if out.len() + chunk.len() > max {
                return Err(HttpError::TooLarge(max));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Reads the whole body as text (invalid UTF-8 is replaced), refusing more than `max` bytes.
    ///
    /// ```no_run
    /// # let reply = qlayer_sdk::http::Request::get("https://x.test/").send().unwrap();
    /// let text = reply.text(1 << 20)?;
    /// # Ok::<(), qlayer_sdk::http::HttpError>(())
    /// ```
    pub fn text(self, max: usize) -> Result<String, HttpError> {
        self.bytes(max).map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// The next line of the body (without its line ending), or `None` at the end. For
    /// line-oriented bodies such as server-sent events. A line longer than `max` is an error.
    ///
    /// ```no_run
    /// # let mut reply = qlayer_sdk::http::Request::get("https://x.test/").send().unwrap();
    /// while let Some(line) = reply.next_line(1 << 16)? {
    ///     if let Some(data) = line.strip_prefix("data: ") { /* one event */ }
    /// }
    /// # Ok::<(), qlayer_sdk::http::HttpError>(())
    /// ```
    pub fn next_line(&mut self, max: usize) -> Result<Option<String>, HttpError> {
        loop {
            if let Some(i) = self.buffered.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffered.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line);
                return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
            }
            if self.buffered.len() > max {
                return Err(HttpError::TooLarge(max));
            }
            match self.read_chunk()? {
                Some(chunk) => self.buffered.extend_from_slice(&chunk),
                None if self.buffered.is_empty() => return Ok(None),
                None => {
                    let rest = std::mem::take(&mut self.buffered);
                    return Ok(Some(String::from_utf8_lossy(&rest).trim_end_matches('\r').to_string()));
                }
            }
        }
    }

    /// The next `n` bytes of the body, or `None` at its end. For binary framed bodies such as
    /// AWS's event streams. A body that ends inside the `n` bytes is an error.
    ///
    /// ```no_run
    /// # let mut reply = qlayer_sdk::http::Request::get("https://x.test/").send().unwrap();
    /// while let Some(prelude) = reply.read_exact(12)? { /* a frame's prelude */ }
    /// # Ok::<(), qlayer_sdk::http::HttpError>(())
    /// ```
    pub fn read_exact(&mut self, n: usize) -> Result<Option<Vec<u8>>, HttpError> {
        while self.buffered.len() < n {
            match self.read_chunk()? {
                Some(chunk) => self.buffered.extend_from_slice(&chunk),
                None if self.buffered.is_empty() => return Ok(None),
                None => {
                    return Err(HttpError::Connection(format!(
                        "the body ended {} bytes into a read of {n}",
                        self.buffered.len()
                    )));
                }
            }
        }
        Ok(Some(self.buffered.drain(..n).collect()))
    }

    fn read_chunk(&mut self) -> Result<Option<Vec<u8>>, HttpError> {
        if self.finished {
            return Ok(None);
        }
        match self.stream.blocking_read(64 * 1024) {
            Ok(chunk) => Ok(Some(chunk)),
            Err(StreamError::Closed) => {
                self.finished = true;
                Ok(None)
            }
            Err(StreamError::LastOperationFailed(e)) => {
                self.finished = true;
                let detail = e.to_debug_string();
                if detail.contains("Timeout") {
                    Err(HttpError::Timeout(format!("reading the response body: {detail}")))
                } else {
                    Err(HttpError::Connection(format!("reading the response body: {detail}")))
                }
            }
        }
    }
}
