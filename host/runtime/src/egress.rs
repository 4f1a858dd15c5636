//! An HTTP proxy on loopback for the host's own registry client, so that every connection it
//! makes is checked against the operator's [`NetworkPolicy`] on the addresses it really goes to,
//! when it connects: to the registry (a name that resolved to a public address when the install
//! was checked and to an internal one a moment later, DNS rebinding, does not pass), to the token
//! realm the registry names, and to wherever a blob download is redirected. oci-client takes no
//! resolver and follows redirects itself; its proxy settings are the one hook it has.
//!
//! It answers `CONNECT host:port` (HTTPS: the TLS session stays end to end between the client
//! and the registry) and absolute-form requests (plain-HTTP registries the operator listed as
//! insecure). A refused destination gets `403` naming the policy; nothing is sent to it.
//! Registries the operator listed by name (`insecure-registries`) are trusted as listed, as the
//! install check trusts them.

use crate::network::NetworkPolicy;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;

type Body = BoxBody<Bytes, hyper::Error>;

/// A running egress proxy; stops when dropped.
pub struct EgressProxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressProxy").field("addr", &self.addr).finish()
    }
}

impl EgressProxy {
    /// Starts a proxy on a free loopback port whose connections pass `policy`, or go to one of
    /// `trusted` (`host` or `host:port`, as the operator listed them).
    pub async fn start(policy: NetworkPolicy, trusted: Vec<String>) -> std::io::Result<EgressProxy> {
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let policy = Arc::new(Destinations { policy, trusted });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of file handles, say: let some close rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let policy = policy.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(req, policy.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(EgressProxy { addr, task })
    }

    /// `http://127.0.0.1:<port>`, for a client's proxy setting.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn answer(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response
}

/// Where the proxy may connect.
struct Destinations {
    policy: NetworkPolicy,
    trusted: Vec<String>,
}

impl Destinations {
    fn trusts(&self, host: &str, port: u16) -> bool {
        let with_port = format!("{host}:{port}");
        self.trusted
            .iter()
            .any(|t| t.eq_ignore_ascii_case(&with_port) || (t.eq_ignore_ascii_case(host) && matches!(port, 80 | 443)))
    }
}

/// Resolves and checks `host:port` (unless the operator listed it), then connects to the first
/// address that answers; else the status and text to answer with.
async fn connect(to: &Destinations, host: &str, port: u16) -> Result<tokio::net::TcpStream, (StatusCode, String)> {
    let addrs = if to.trusts(host, port) {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let found = tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| (StatusCode::BAD_GATEWAY, format!("`{bare}` could not be resolved: {e}")))?;
        found.collect::<Vec<_>>()
    } else {
        to.policy.resolve(host, port).await.map_err(|e| {
            tracing::warn!(host, port, "registry connection refused: {e}");
            (StatusCode::FORBIDDEN, format!("{} {host}:{port}: {e}", qlayer_registry::EGRESS_REFUSED))
        })?
    };
    tokio::net::TcpStream::connect(&addrs[..])
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, format!("cannot connect to {host}:{port}: {e}")))
}

async fn handle(req: Request<Incoming>, policy: Arc<Destinations>) -> Result<Response<Body>, hyper::Error> {
    let Some(authority) = req.uri().authority().cloned() else {
        return Ok(answer(StatusCode::BAD_REQUEST, "a proxy request names its destination".into()));
    };
    let host = authority.host().to_string();
    if req.method() == Method::CONNECT {
        let Some(port) = authority.port_u16() else {
            return Ok(answer(StatusCode::BAD_REQUEST, "CONNECT needs host:port".into()));
        };
        let mut upstream = match connect(&policy, &host, port).await {
            Ok(stream) => stream,
            Err((status, text)) => return Ok(answer(status, text)),
        };
        tokio::spawn(async move {
            if let Ok(upgraded) = hyper::upgrade::on(req).await {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut upstream).await;
            }
        });
        return Ok(Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed()));
    }
    if req.uri().scheme_str() != Some("http") {
        return Ok(answer(StatusCode::BAD_REQUEST, "only http:// requests and CONNECT are proxied".into()));
    }
    let port = authority.port_u16().unwrap_or(80);
    let upstream = match connect(&policy, &host, port).await {
        Ok(stream) => stream,
        Err((status, text)) => return Ok(answer(status, text)),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await?;
    tokio::spawn(connection);
    // Forwarded in origin form, with its Host header (which the client set for the destination).
    let (mut parts, body) = req.into_parts();
    parts.uri = parts.uri.path_and_query().map_or("/", |p| p.as_str()).parse().unwrap_or_default();
    let response = sender.send_request(Request::from_parts(parts, body)).await?;
    Ok(response.map(|body| body.boxed()))
}
