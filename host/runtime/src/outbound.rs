//! Plugins' outbound HTTP: one pooled client for the process, its connections checked against
//! the operator's [`NetworkPolicy`] on the addresses they really go to, and the requests in
//! flight bounded per instance, per tenant and for the process.
//!
//! - **Reuse**: connections to the same upstream are kept (up to [`IDLE_PER_HOST`], for
//!   [`IDLE_TIMEOUT`]) and reused by every instance, as any HTTP client does; credentials travel
//!   per request, never with the connection.
//! - **Bounds**: an instance may have [`PER_INSTANCE`] requests in flight (an Extism instance
//!   one: its call blocks in it), a tenant [`PER_TENANT`] (`HostPolicy::outbound_per_tenant`),
//!   components' and Extism plugins' together, the process a share of its file handles that leaves a reserve for its own
//!   listeners and database ([`process_limit`]). Past a bound a request fails at once with
//!   "connection limit reached"; it never waits on other tenants.
//! - **Where to**: the connector resolves the name, checks every address against the policy and
//!   connects only then, so DNS rebinding meets the same check. A refused destination is
//!   `destination IP prohibited` to the guest, before any packet is sent, so the error says
//!   nothing about whether a port is open.

use crate::network::{NetworkPolicy, ResolveError};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime_wasi_http::{Error as HttpError, WasiBody};

/// Requests one instance may have in flight.
pub const PER_INSTANCE: usize = 16;
/// Requests one tenant's instances may have in flight together.
pub const PER_TENANT: usize = 256;
/// Idle connections kept per upstream.
pub const IDLE_PER_HOST: usize = 16;
/// How long an idle connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// File handles kept for the host's own use (listeners, database, compile cache, logs).
const FD_RESERVE: u64 = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests the process may have in flight: half the file handles left after the reserve (each
/// request may hold an idle pooled connection too), at least 16. Raises the soft limit on open
/// files to the hard limit first, as servers commonly do.
fn process_limit() -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (limit.current, limit.maximum)
        && cur < max
    {
        limit.current = Some(max);
        if setrlimit(Resource::Nofile, limit).is_err() {
            limit.current = Some(cur);
        }
    }
    // `None` is unlimited.
    let soft = limit.current.unwrap_or(u64::MAX);
    (soft.saturating_sub(FD_RESERVE) / 2).clamp(16, 65_536) as usize
}

/// The process's outbound client.
pub(crate) struct Outbound {
    client: Client<Connector, WasiBody>,
    policy: Arc<NetworkPolicy>,
    process: Arc<Semaphore>,
    process_limit: usize,
    /// Requests one tenant may have in flight.
    per_tenant: usize,
    tenants: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
}

impl Outbound {
    pub(crate) fn new(policy: NetworkPolicy, per_tenant: usize) -> Self {
        qlayer_registry::install_tls_provider();
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.into() };
        let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let policy = Arc::new(policy);
        let connector = Connector { policy: policy.clone(), tls: tokio_rustls::TlsConnector::from(Arc::new(tls)) };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(IDLE_PER_HOST)
            .build(connector);
        let process_limit = process_limit();
        Outbound {
            client,
            policy,
            process: Arc::new(Semaphore::new(process_limit)),
            process_limit,
            per_tenant: per_tenant.max(1),
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// The policy connections are checked against.
    pub(crate) fn policy(&self) -> &NetworkPolicy {
        &self.policy
    }

    fn tenant_slots(&self, tenant: &Arc<str>) -> Arc<Semaphore> {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        if tenants.len() > 10_000 {
            // Forget idle tenants (every permit back).
            tenants.retain(|_, s| s.available_permits() < self.per_tenant);
        }
        tenants.entry(tenant.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant))).clone()
    }

    /// Takes the permits for one request of `tenant` from `instance`'s slots; which bound was
    /// reached, if one was.
    pub(crate) fn permits(&self, tenant: &Arc<str>, instance: &Arc<Semaphore>) -> Result<Permits, &'static str> {
        let one = instance.clone().try_acquire_owned().map_err(|_| "this instance's")?;
        let two = self.tenant_slots(tenant).try_acquire_owned().map_err(|_| "this tenant's")?;
        let three = self.process.clone().try_acquire_owned().map_err(|_| "the host's")?;
        Ok(Permits { _held: vec![one, two, three] })
    }

    /// The tenant's and the process's permits, for an Extism call's request: such a call makes
    /// one request at a time (its instance is blocked in it), so the instance bound holds by
    /// construction.
    pub(crate) fn tenant_permit(&self, tenant: &Arc<str>) -> Result<Permits, &'static str> {
        let two = self.tenant_slots(tenant).try_acquire_owned().map_err(|_| "this tenant's")?;
        let three = self.process.clone().try_acquire_owned().map_err(|_| "the host's")?;
        Ok(Permits { _held: vec![two, three] })
    }

    /// The requests the process may have in flight.
    pub(crate) fn process_limit(&self) -> usize {
        self.process_limit
    }

    /// Sends `request` (its URI absolute), holding `permits` until the response body is done.
    pub(crate) async fn send(
        &self,
        request: http::Request<WasiBody>,
        first_byte_timeout: Option<Duration>,
        permits: Permits,
    ) -> Result<http::Response<WasiBody>, HttpError> {
        let pending = self.client.request(request);
        let response = match first_byte_timeout {
            Some(t) => tokio::time::timeout(t, pending).await.map_err(|_| HttpError::ConnectionReadTimeout)?,
            None => pending.await,
        }
        .map_err(client_error)?;
        Ok(response.map(|body| {
            Held { body: body.map_err(|e| hyper_error(&e)).boxed_unsync(), _permits: permits }.boxed_unsync()
        }))
    }
}

/// The permits one request holds.
pub(crate) struct Permits {
    _held: Vec<OwnedSemaphorePermit>,
}

/// A response body that keeps its request's permits until it is read to the end or dropped.
struct Held {
    body: WasiBody,
    _permits: Permits,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = HttpError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, HttpError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

fn hyper_error(e: &hyper::Error) -> HttpError {
    if e.is_timeout() {
        HttpError::HttpResponseTimeout
    } else if e.is_incomplete_message() {
        HttpError::HttpResponseIncomplete
    } else {
        HttpError::HttpProtocolError
    }
}

/// What a failed request was, from the client's error chain.
fn client_error(e: hyper_util::client::legacy::Error) -> HttpError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(connect) = err.downcast_ref::<ConnectError>() {
            return match connect {
                ConnectError::Refused(r) => {
                    tracing::warn!(reason = %r, "outbound request refused by the network policy");
                    HttpError::DestinationIpProhibited
                }
                ConnectError::Lookup(_) => HttpError::DestinationNotFound,
                ConnectError::Timeout => HttpError::ConnectionTimeout,
                ConnectError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                    HttpError::ConnectionRefused
                }
                ConnectError::Io(_) => HttpError::DestinationUnavailable,
                ConnectError::Tls(_) => HttpError::TlsProtocolError,
                ConnectError::BadUri => HttpError::HttpRequestUriInvalid,
            };
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            return hyper_error(h);
        }
        source = err.source();
    }
    HttpError::InternalError(Some(e.to_string()))
}

/// Why a connection was not made.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Refused(crate::network::Refused),
    #[error("{0}")]
    Lookup(String),
    #[error("connecting timed out")]
    Timeout,
    #[error("{0}")]
    Io(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("the request URI has no host")]
    BadUri,
}

/// Resolves, checks against the policy, connects, and speaks TLS for `https`.
#[derive(Clone)]
struct Connector {
    policy: Arc<NetworkPolicy>,
    tls: tokio_rustls::TlsConnector,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = ConnectError;
    type Future = BoxFuture<'static, Result<Self::Response, ConnectError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or(ConnectError::BadUri)?.to_string();
            let tls = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
            let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
            let addrs = this.policy.resolve(&host, port).await.map_err(|e| match e {
                ResolveError::Refused(r) => ConnectError::Refused(r),
                ResolveError::Lookup(m) => ConnectError::Lookup(m),
            })?;
            let mut last = None;
            let mut stream = None;
            for addr in addrs {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                    Ok(Ok(s)) => {
                        stream = Some(s);
                        break;
                    }
                    Ok(Err(e)) => last = Some(ConnectError::Io(e)),
                    Err(_) => last = Some(ConnectError::Timeout),
                }
            }
            let stream = stream.ok_or_else(|| last.unwrap_or(ConnectError::Timeout))?;
            let _ = stream.set_nodelay(true);
            if !tls {
                return Ok(TokioIo::new(Stream::Plain(stream)));
            }
            let name =
                rustls::pki_types::ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
                    .map_err(|e| ConnectError::Tls(std::io::Error::other(e)))?;
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, this.tls.connect(name, stream))
                .await
                .map_err(|_| ConnectError::Timeout)?
                .map_err(ConnectError::Tls)?;
            Ok(TokioIo::new(Stream::Tls(Box::new(stream))))
        })
    }
}

/// A plain or TLS connection.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
