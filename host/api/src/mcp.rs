//! The tenant's installed tool plugins as an MCP server (Model Context Protocol, through `rmcp`):
//! Streamable HTTP at `/mcp` on `qlayer serve`, authenticated with the tenant's API key, and stdio
//! for `qlayer mcp --tenant T`.
//!
//! Each installed tool plugin is one MCP tool: its name, the description and input schema of its
//! manifest's `[tool]` table (an open object schema when it has none). A call runs in the
//! tenant's own sandboxed instance with the install's grants and limits, admitted by the
//! scheduler's fair sharing like the gateway's requests, and is counted and audited
//! (`tool.call`). Another tenant's tool is an unknown tool, exactly like a missing one.
//!
//! Protocol 2026-07-28 is served statelessly (it has no sessions); older clients' `initialize`
//! handshake is answered too, statelessly, so a client that opens a thousand sessions makes the
//! host hold nothing for them.

use super::AppState;
use super::auth::{Caller, client_of, resolve};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use qlayer_db::{AuditEntry, Db};
use qlayer_marketplace::Marketplace;
use qlayer_runtime::{Kind, Runtime};
use qlayer_scheduler::interactive::Admission;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation, JsonObject, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use std::sync::Arc;
use std::time::Instant;

/// `[mcp]` of `qlayer serve`'s config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct McpSection {
    /// The `Host` names (`name` for any port, or `name:port`) `/mcp` answers; a request naming
    /// another is refused with 403 before anything else, so a page that rebinds its own DNS name
    /// to this server reaches nothing. Loopback names by default: add the name clients use for
    /// a server they reach over the network, or `"*"` to accept any.
    #[serde(default = "loopback")]
    pub allowed_hosts: Vec<String>,
    /// Browser origins (`https://app.example.com:443`, `http://localhost:*`) that may call
    /// `/mcp`; a request with another `Origin` is refused. Empty (the default): the `Origin`
    /// header is not checked (clients outside browsers send none).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

fn loopback() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

impl Default for McpSection {
    fn default() -> Self {
        McpSection { allowed_hosts: loopback(), allowed_origins: Vec::new() }
    }
}

/// Who the MCP requests are for.
#[derive(Debug, Clone)]
pub struct McpCaller {
    /// The tenant's id (instances, admission, audit).
    pub tenant_id: String,
    /// The tenant's name (installs are kept by it).
    pub tenant_name: String,
    /// The key id (or `local`) recorded as the actor in the audit log.
    pub actor: String,
    /// Whether it may call tools (a viewer key may only list them).
    pub can_call: bool,
}

impl From<&Caller> for McpCaller {
    fn from(c: &Caller) -> Self {
        McpCaller {
            tenant_id: c.tenant_id().to_string(),
            tenant_name: c.tenant_name().to_string(),
            actor: c.actor().to_string(),
            can_call: c.require_write().is_ok(),
        }
    }
}

/// The MCP server of a tenant's tools.
#[derive(Clone)]
pub struct McpTools {
    marketplace: Arc<Marketplace>,
    runtime: Arc<Runtime>,
    admission: Arc<Admission>,
    db: Db,
    /// The one caller of a stdio server; for HTTP, each request's authenticated caller.
    fixed: Option<Arc<McpCaller>>,
}

impl McpTools {
    /// For `qlayer serve`: each request's caller comes from its API key.
    pub fn http(marketplace: Arc<Marketplace>, runtime: Arc<Runtime>, admission: Arc<Admission>, db: Db) -> Self {
        McpTools { marketplace, runtime, admission, db, fixed: None }
    }

    /// For `qlayer mcp --tenant T` over stdio: every request is `caller`'s.
    pub fn local(
        marketplace: Arc<Marketplace>,
        runtime: Arc<Runtime>,
        admission: Arc<Admission>,
        db: Db,
        caller: McpCaller,
    ) -> Self {
        McpTools { marketplace, runtime, admission, db, fixed: Some(Arc::new(caller)) }
    }

    fn caller(&self, context: &RequestContext<RoleServer>) -> Result<Arc<McpCaller>, ErrorData> {
        if let Some(fixed) = &self.fixed {
            return Ok(fixed.clone());
        }
        context
            .extensions
            .get::<http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Caller>())
            .map(|c| Arc::new(McpCaller::from(c)))
            .ok_or_else(|| ErrorData::internal_error("an MCP request ran without authentication", None))
    }

    /// A page of the tenant's tools, by name, as MCP lists them: at most [`TOOLS_PAGE`] after
    /// `cursor` (one this server gave: the last name of the page before, hex-encoded), and the
    /// cursor of the next page while there is one. Only the page's plugins are loaded.
    pub async fn tools(
        &self,
        caller: &McpCaller,
        cursor: Option<&str>,
    ) -> Result<(Vec<Tool>, Option<String>), ErrorData> {
        let mut installs: Vec<_> = self
            .marketplace
            .list(&caller.tenant_name)
            .await
            .map_err(internal)?
            .into_iter()
            .filter(|i| i.kind == Kind::Tool)
            .collect();
        installs.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<&str> = installs.iter().map(|i| i.name.as_str()).collect();
        let (range, next) = page(&names, cursor, TOOLS_PAGE)?;
        let mut tools = Vec::with_capacity(range.len());
        for install in &installs[range] {
            match self.marketplace.load_install(&self.runtime, install).await {
                Ok(installed) => tools.push(describe(installed.plugin().manifest())),
                // One plugin the host cannot load does not hide the others.
                Err(e) => {
                    tracing::warn!(tool = %install.name, error = %format!("{e:#}"), "an installed tool does not load")
                }
            }
        }
        Ok((tools, next))
    }

    /// Runs tool `name` with `arguments` for `caller`: a result (an error result when the tool
    /// failed, so the model sees why), or a protocol error for an unknown tool.
    pub async fn call(
        &self,
        caller: &McpCaller,
        name: &str,
        arguments: Option<JsonObject>,
    ) -> Result<CallToolResult, ErrorData> {
        let unknown = || ErrorData::invalid_params(format!("unknown tool `{name}`"), None);
        let install = match self.marketplace.get(&caller.tenant_name, name).await {
            Ok(install) if install.kind == Kind::Tool => install,
            Ok(_) => return Err(unknown()),
            Err(e) if matches!(e.downcast_ref(), Some(qlayer_marketplace::InstallError::NotInstalled { .. })) => {
                return Err(unknown());
            }
            // The store failing is not the tool being unknown.
            Err(e) => return Err(internal(e)),
        };
        if !caller.can_call {
            return Err(ErrorData::invalid_request(
                "this API key has the viewer role, which may list tools but not call them",
                None,
            ));
        }
        let input = serde_json::Value::Object(arguments.unwrap_or_default()).to_string();
        let started = Instant::now();
        let outcome = async {
            let _permit = self.admission.admit(&caller.tenant_id).await;
            let installed =
                self.marketplace.load_install(&self.runtime, &install).await.map_err(|e| format!("{e:#}"))?;
            let mut tool = installed.any_tool(&caller.tenant_id).await.map_err(|e| e.to_string())?;
            tool.invoke(&input).await.map_err(|e| e.to_string())
        }
        .await;
        qlayer_jobs::record_tool_call(&install.name, outcome.is_ok(), started.elapsed());
        let label = if outcome.is_ok() { "ok" } else { "error" };
        metrics::counter!("qlayer_mcp_tool_calls_total", "outcome" => label).increment(1);
        let entry = AuditEntry {
            actor: caller.actor.clone(),
            tenant_id: caller.tenant_id.clone(),
            action: "tool.call".into(),
            target: install.name.clone(),
            outcome: if outcome.is_ok() { "ok".into() } else { "error: tool_failed".into() },
        };
        if let Err(e) = self.db.audit(entry).await {
            tracing::error!(error = %e, "writing the audit record of a tool call failed");
        }
        Ok(match outcome {
            Ok(output) => {
                // A JSON object answer is also given as structured content.
                let structured = serde_json::from_str::<serde_json::Value>(&output).ok().filter(|v| v.is_object());
                let mut result = CallToolResult::success(vec![ContentBlock::text(output)]);
                result.structured_content = structured;
                result
            }
            Err(message) => CallToolResult::error(vec![ContentBlock::text(message)]),
        })
    }
}

/// The most tools one `tools/list` answer holds.
pub const TOOLS_PAGE: usize = 50;

/// The page of `sorted` names after `cursor` (the hex of the last name of the page before),
/// at most `size` long, and the next page's cursor while one is left.
fn page(
    sorted: &[&str],
    cursor: Option<&str>,
    size: usize,
) -> Result<(std::ops::Range<usize>, Option<String>), ErrorData> {
    let start = match cursor {
        None => 0,
        Some(cursor) => {
            let after = hex::decode(cursor).ok().and_then(|b| String::from_utf8(b).ok()).ok_or_else(|| {
                ErrorData::invalid_params(format!("cursor `{cursor}` is not one this server gave"), None)
            })?;
            sorted.partition_point(|name| *name <= after.as_str())
        }
    };
    let end = sorted.len().min(start + size);
    let next = (end < sorted.len() && end > start).then(|| hex::encode(sorted[end - 1]));
    Ok((start..end, next))
}

/// The MCP tool a tool plugin's manifest describes.
pub fn describe(manifest: &qlayer_runtime::Manifest) -> Tool {
    let description = manifest.tool_description().to_string();
    Tool::new(manifest.name.clone(), description, Arc::new(manifest.tool_input_schema()))
}

fn internal(e: anyhow::Error) -> ErrorData {
    ErrorData::internal_error(format!("{e:#}"), None)
}

impl ServerHandler for McpTools {
    fn get_info(&self) -> ServerConfig {
        let mut config = ServerConfig::new(ServerCapabilities::builder().enable_tools().build());
        config.server_info = Implementation::new("qlayer", env!("CARGO_PKG_VERSION"));
        config.instructions = Some(
            "The tenant's installed QuantumLayer tool plugins. Each runs in its own WebAssembly sandbox with \
             the grants of its install."
                .into(),
        );
        config
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let caller = self.caller(&context)?;
        let cursor = request.as_ref().and_then(|r| r.cursor.as_deref());
        let (tools, next) = self.tools(&caller, cursor).await?;
        let mut page = ListToolsResult::with_all_items(tools);
        page.next_cursor = next;
        Ok(page)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let caller = self.caller(&context)?;
        self.call(&caller, &request.name, request.arguments).await.map(Into::into)
    }
}

/// `/mcp` on `qlayer serve`: the Streamable HTTP transport behind the tenant's API key.
pub fn router(state: &AppState) -> axum::Router<AppState> {
    use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
    use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
    let runner = &state.runner;
    let tools = McpTools::http(
        runner.marketplace().clone(),
        runner.runtime().clone(),
        runner.scheduler().admission().clone(),
        state.db.clone(),
    );
    let mut config = StreamableHttpServerConfig::default()
        // Protocol 2026-07-28 has no sessions; older clients get none either (stateless).
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_max_request_body_bytes(state.limits.max_body_bytes);
    // Every call needs an API key, which a rebinding page does not have; the Host check (and the
    // Origin check, when origins are listed) refuse such a page too, as the MCP spec asks.
    config = match state.mcp.allowed_hosts.iter().any(|h| h == "*") {
        true => config.disable_allowed_hosts(),
        false => config.with_allowed_hosts(state.mcp.allowed_hosts.clone()),
    };
    if !state.mcp.allowed_origins.is_empty() {
        config = config.with_allowed_origins(state.mcp.allowed_origins.clone());
    }
    // No sessions are kept at all: every request stands alone.
    let service: StreamableHttpService<McpTools, NeverSessionManager> =
        StreamableHttpService::new(move || Ok(tools.clone()), Default::default(), config);
    axum::Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
}

/// The API key check of `/v1`, answering in JSON-RPC's error shape (with the HTTP status, and
/// `WWW-Authenticate` on 401) so MCP clients show the reason.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let client = client_of(&req);
    let refused = |status: StatusCode, message: String, retry_after: Option<u64>| {
        let body = serde_json::json!({
            "jsonrpc": "2.0",
            "id": null,
            "error": {"code": -32001, "message": message}
        });
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = retry_after {
            response.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    };
    let principal = match resolve(&state, req.headers(), client).await {
        Ok(p) => p,
        Err(e) => {
            let response = e.into_response();
            let status = response.status();
            let retry = response.headers().get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()?.parse().ok());
            let message = match response.extensions().get::<super::error::ErrorInfo>() {
                Some(info) => info.message.clone(),
                None => "authentication failed".into(),
            };
            return refused(status, message, retry);
        }
    };
    if let Err(wait) = state.limiter.check(&principal.tenant_id) {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        return refused(StatusCode::TOO_MANY_REQUESTS, "over the tenant's request rate".into(), Some(secs));
    }
    let span = tracing::Span::current();
    span.record("tenant", principal.tenant_name.as_str());
    span.record("key", principal.key_id.as_str());
    req.extensions_mut().insert(Caller(principal));
    as_json_rpc(next.run(req).await).await
}

/// The transport refuses a body that is not JSON-RPC (malformed JSON, a batch, a wrong content
/// type) with a plain-text 4xx; clients expect a JSON-RPC error: -32700 when the body does not
/// parse, -32600 otherwise, keeping the status and the transport's reason.
async fn as_json_rpc(response: Response) -> Response {
    let plain = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|t| !t.starts_with("application/json") && !t.starts_with("text/event-stream"));
    if !response.status().is_client_error() || !plain {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let reason = String::from_utf8_lossy(&text).trim().to_string();
    let code = if reason.contains("deserialize") || reason.contains("parse") { -32700 } else { -32600 };
    let message = match code {
        -32700 => format!("parse error: the body is not a JSON-RPC message ({reason})"),
        _ if reason.is_empty() => format!("invalid request ({})", parts.status),
        _ => format!("invalid request: {reason}"),
    };
    let body = serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}});
    let mut response = (parts.status, axum::Json(body)).into_response();
    for (name, value) in &parts.headers {
        if name != http::header::CONTENT_TYPE && name != http::header::CONTENT_LENGTH {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tools_come_in_pages_after_the_cursor_and_a_foreign_cursor_is_refused() {
        let names = ["a", "b", "c", "d", "e"];
        let (first, next) = page(&names, None, 2).unwrap();
        assert_eq!((first, next.as_deref()), (0..2, Some(hex::encode("b").as_str())));
        let (second, next) = page(&names, next.as_deref(), 2).unwrap();
        assert_eq!(second, 2..4);
        let (last, next) = page(&names, next.as_deref(), 2).unwrap();
        assert_eq!((last, next), (4..5, None));
        // A tool removed between pages does not shift the next page.
        let fewer = ["a", "c", "d", "e"];
        assert_eq!(page(&fewer, Some(&hex::encode("b")), 2).unwrap().0, 1..3);
        assert_eq!(page(&[], None, 2).unwrap(), (0..0, None));
        assert!(page(&names, Some("not hex"), 2).is_err());
    }
}
