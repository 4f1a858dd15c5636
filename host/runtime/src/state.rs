//! What one `Store` holds: the tenant and plugin it belongs to, the WASI context (with nothing
//! granted but captured stdout/stderr), the outbound-HTTP policy, the memory limiter and the
//! host imports (`host`, `llm`).

use super::LlmHandler;
use super::bindings::{host, llm, v0_1, v0_2::types, v0_3};
use super::compat::Conv;
use super::grants::Grants;
use super::logs::{self, LogMeter, TenantBudgets};
use super::outbound::{self, Outbound};
use qlayer_manifest::HostPattern;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

pub(crate) struct StoreState {
    pub(crate) tenant: Arc<str>,
    pub(crate) plugin: Arc<str>,
    /// When the current call must be finished; read by the epoch callback.
    pub(crate) deadline: Instant,
    pub(crate) limiter: Limiter,
    /// The instance's log budget, shared with its stdout and stderr.
    pub(crate) log: Arc<LogMeter>,
    grants: Arc<Grants>,
    llm: Option<Arc<dyn LlmHandler>>,
    /// What an agent's `tools` import reaches: the tools its step was granted (none when unset).
    pub(crate) tools: Option<Arc<dyn crate::ToolHandler>>,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    hooks: OutboundPolicy,
    table: ResourceTable,
}

impl StoreState {
    pub(crate) fn new(
        tenant: Arc<str>,
        plugin: Arc<str>,
        grants: Arc<Grants>,
        memory_bytes: usize,
        llm: Option<Arc<dyn LlmHandler>>,
        tenant_logs: Arc<TenantBudgets>,
        outbound: Arc<Outbound>,
    ) -> Self {
        let log = Arc::new(LogMeter::new(tenant.clone(), plugin.clone(), tenant_logs));
        // Nothing is inherited from the host process: no environment, no arguments, no preopened
        // directories, no sockets. Guest stdout/stderr become tracing events, within the log budget.
        let wasi = WasiCtx::builder()
            .stdout(GuestOutput { log: log.clone(), stream: "stdout" })
            .stderr(GuestOutput { log: log.clone(), stream: "stderr" })
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        // What the guest makes the host hold for it is bounded too: the resource table (headers,
        // requests, streams, pollables) has at most MAX_RESOURCES entries, and one header map at
        // most `field_bytes`, so header maps can hold no more than about the instance's own memory
        // limit (and never more than MAX_RESOURCES x 64 KiB).
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(field_bytes(memory_bytes));
        StoreState {
            hooks: OutboundPolicy {
                tenant: tenant.clone(),
                plugin: plugin.clone(),
                allowed: grants.outbound_hosts.clone(),
                outbound,
                slots: Arc::new(tokio::sync::Semaphore::new(outbound::PER_INSTANCE)),
                log: log.clone(),
                waited: Arc::default(),
            },
            tenant,
            plugin,
            deadline: Instant::now(),
            limiter: Limiter::new(memory_bytes),
            log,
            grants,
            llm,
            tools: None,
            wasi,
            http,
            table,
        }
    }
}

impl StoreState {
    /// Time the instance's outbound requests waited for their response heads since the last
    /// take (overlapping requests count each); the counter starts again from zero.
    pub(crate) fn take_outbound_wait(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.hooks.waited.swap(0, std::sync::atomic::Ordering::Relaxed))
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for StoreState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.hooks }
    }
}

/// Host resources (wasi handles: header maps, requests, responses, streams, pollables) one
/// instance may hold at once. An ordinary call holds a few dozen.
pub(crate) const MAX_RESOURCES: usize = 1000;

/// The size limit of one header map for an instance with `memory_bytes` of memory: its share of
/// the memory limit over [`MAX_RESOURCES`] maps, between 8 and 64 KiB.
pub(crate) fn field_bytes(memory_bytes: usize) -> usize {
    (memory_bytes / MAX_RESOURCES).clamp(8 * 1024, 64 * 1024)
}

/// Caps one store's linear memories (all of them together: a component has several core
/// instances, each may have a memory), tables and instances, and remembers a refused growth so a
/// resulting trap can be reported as "out of memory" rather than as a bare `unreachable`.
pub(crate) struct Limiter {
    pub(crate) memory_bytes: usize,
    /// Bytes of linear memory the store's memories hold together.
    pub(crate) memory_used: usize,
    pub(crate) refused_growth: Option<usize>,
}

const MAX_TABLE_ELEMENTS: usize = 100_000;
const MAX_INSTANCES: usize = 32;
const MAX_TABLES: usize = 32;
const MAX_MEMORIES: usize = 4;

impl Limiter {
    fn new(memory_bytes: usize) -> Self {
        Limiter { memory_bytes, memory_used: 0, refused_growth: None }
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        // A new memory arrives with current = 0; memories never shrink.
        let total = self.memory_used.saturating_sub(current).saturating_add(desired);
        if total > self.memory_bytes {
            self.refused_growth = Some(total);
            return Ok(false);
        }
        self.memory_used = total;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }
    fn tables(&self) -> usize {
        MAX_TABLES
    }
    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// Decides where a plugin's outbound HTTP requests may go. It runs on every request the guest
/// sends, on the URL the request actually goes to: wasi:http never follows redirects by itself, so
/// each hop of a redirect chain is a new request that passes through here again. The `Host`
/// header is forbidden to guests (wasmtime's default list) and set from this same authority, so
/// it cannot be used to reach another virtual host.
struct OutboundPolicy {
    tenant: Arc<str>,
    plugin: Arc<str>,
    allowed: Vec<HostPattern>,
    outbound: Arc<Outbound>,
    /// This instance's requests in flight.
    slots: Arc<tokio::sync::Semaphore>,
    /// The instance's log budget: a guest that makes refused requests in a loop must not flood
    /// the host's log with the refusals either.
    log: Arc<LogMeter>,
    /// Time the instance's requests waited for their upstream's response head, in nanoseconds,
    /// since it was last taken (see [`StoreState::take_outbound_wait`]).
    waited: Arc<std::sync::atomic::AtomicU64>,
}

impl OutboundPolicy {
    fn permits(&self, uri: &http::Uri) -> bool {
        // An authority with userinfo (`user:pass@host`) is refused outright: the grant check
        // would see the host after the `@`, and what connects may not.
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return false;
        }
        let Some(host) = uri.host() else { return false };
        let port = uri.port_u16().unwrap_or(if uri.scheme() == Some(&http::uri::Scheme::HTTP) { 80 } else { 443 });
        self.allowed.iter().any(|p| p.matches(host, port))
    }
}

type SendFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<wasmtime_wasi_http::WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendFuture {
        if !self.permits(request.uri()) {
            if self.log.admit(0) {
                tracing::warn!(
                    tenant = %self.tenant,
                    plugin = %self.plugin,
                    host = request.uri().authority().map(|a| a.as_str()).unwrap_or(""),
                    "outbound request refused: host not granted to this plugin"
                );
            }
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let permits = match self.outbound.permits(&self.tenant, &self.slots) {
            Ok(permits) => permits,
            Err(whose) => {
                if self.log.admit(0) {
                    tracing::warn!(
                        tenant = %self.tenant,
                        plugin = %self.plugin,
                        "outbound request refused: {whose} requests in flight are at their limit"
                    );
                }
                return Box::new(async { Err(wasmtime_wasi_http::Error::ConnectionLimitReached) });
            }
        };
        // Never log headers: they carry the credentials the plugin was granted.
        tracing::debug!(
            tenant = %self.tenant,
            plugin = %self.plugin,
            method = %request.method(),
            uri = %request.uri(),
            "outbound request"
        );
        let outbound = self.outbound.clone();
        let first_byte = options.and_then(|o| o.first_byte_timeout);
        let waited = self.waited.clone();
        Box::new(async move {
            let began = Instant::now();
            let response = outbound.send(request, first_byte, permits).await;
            waited.fetch_add(began.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
            let response = response?;
            // The pooled client drives its connections itself: nothing more to run per request.
            Ok((
                response,
                Box::new(async { Ok(()) }) as Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            ))
        })
    }
}

/// Guest stdout or stderr, forwarded line by line to tracing with the tenant and plugin.
#[derive(Clone)]
struct GuestOutput {
    log: Arc<LogMeter>,
    stream: &'static str,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineLogger { out: self.clone(), pending: Vec::new() })
    }
}

use logs::MAX_LINE;

struct LineLogger {
    out: GuestOutput,
    pending: Vec<u8>,
}

impl LineLogger {
    fn emit(&self, line: &[u8]) {
        let log = &self.out.log;
        if !log.admit(line.len()) {
            return;
        }
        let text = String::from_utf8_lossy(&line[..line.len().min(MAX_LINE)]);
        let text = logs::escape(text.trim_end());
        tracing::info!(tenant = %log.tenant, plugin = %log.plugin, stream = self.out.stream, "{text}");
    }
}

impl tokio::io::AsyncWrite for LineLogger {
    fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let mut rest = buf;
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            let mut line = std::mem::take(&mut self.pending);
            let room = MAX_LINE.saturating_sub(line.len());
            line.extend_from_slice(&rest[..i.min(room)]);
            self.emit(&line);
            rest = &rest[i + 1..];
        }
        if self.pending.len() < MAX_LINE {
            let room = MAX_LINE - self.pending.len();
            self.pending.extend_from_slice(&rest[..rest.len().min(room)]);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.emit(&self.pending);
        }
    }
}

impl types::Host for StoreState {}

impl v0_3::types::Host for StoreState {}

impl host::Host for StoreState {
    async fn log(&mut self, level: types::LogLevel, message: String) {
        let level = match level {
            types::LogLevel::Trace => tracing::Level::TRACE,
            types::LogLevel::Debug => tracing::Level::DEBUG,
            types::LogLevel::Info => tracing::Level::INFO,
            types::LogLevel::Warn => tracing::Level::WARN,
            types::LogLevel::Error => tracing::Level::ERROR,
        };
        self.log.write(level, &message);
    }

    async fn config(&mut self, key: String) -> Option<String> {
        self.grants.config.get(&key).cloned()
    }

    async fn secret(&mut self, key: String) -> Option<String> {
        self.grants.secrets.get(&key).map(|s| s.expose().to_string())
    }
}

impl llm::Host for StoreState {
    async fn complete(&mut self, request: types::CompletionRequest) -> Result<types::Completion, types::PluginError> {
        match &self.llm {
            Some(llm) => llm.complete(&self.tenant, request).await,
            None => Err(types::PluginError::Unavailable("no LLM is routed to this plugin".into())),
        }
    }
}

/// An agent's `tools` import: the tools its step was granted, through the host's handler.
impl super::bindings::v0_2::agent::quantumlayer::plugin::tools::Host for StoreState {
    async fn list(&mut self) -> Vec<crate::ToolInfo> {
        match &self.tools {
            Some(tools) => tools.list(&self.tenant).await,
            None => Vec::new(),
        }
    }

    async fn invoke(&mut self, name: String, input_json: String) -> Result<String, types::PluginError> {
        match &self.tools {
            Some(tools) => tools.invoke(&self.tenant, &name, &input_json).await,
            None => Err(types::PluginError::InvalidInput(format!(
                "no tool `{name}` is granted to this step (it was granted none)"
            ))),
        }
    }
}

impl v0_1::types::Host for StoreState {}

/// A 0.1.0 plugin's `host` calls: the same as 0.2.0's.
impl v0_1::host::Host for StoreState {
    async fn log(&mut self, level: v0_1::types::LogLevel, message: String) {
        host::Host::log(self, level.conv(), message).await
    }

    async fn config(&mut self, key: String) -> Option<String> {
        host::Host::config(self, key).await
    }

    async fn secret(&mut self, key: String) -> Option<String> {
        host::Host::secret(self, key).await
    }
}

/// A 0.1.0 agent's `llm` calls, answered through the same router as 0.2.0's.
impl v0_1::llm::Host for StoreState {
    async fn complete(
        &mut self,
        request: v0_1::types::CompletionRequest,
    ) -> Result<v0_1::types::Completion, v0_1::types::PluginError> {
        llm::Host::complete(self, request.conv()).await.map(Conv::conv).map_err(Conv::conv)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A core module with one memory of `pages` 64 KiB pages.
    fn module_with_memory(pages: u8) -> Vec<u8> {
        let mut wasm = b"\0asm\x01\0\0\0".to_vec();
        // Memory section: one memory, no maximum, `pages` minimum (LEB128; `pages` < 128).
        wasm.extend_from_slice(&[5, 3, 1, 0, pages]);
        wasm
    }

    #[test]
    fn the_memory_limit_holds_for_all_memories_of_a_store_together() {
        let engine = wasmtime::Engine::default();
        // Each 6 MiB: one fits a 16 MiB limit, two fit, the third would make 18 MiB.
        let module = wasmtime::Module::new(&engine, module_with_memory(96)).unwrap();
        let mut store = wasmtime::Store::new(&engine, Limiter::new(16 << 20));
        store.limiter(|l| l);
        wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
        assert!(wasmtime::Instance::new(&mut store, &module, &[]).is_err());
        assert_eq!(store.data().refused_growth, Some(18 << 20));
        assert_eq!(store.data().memory_used, 12 << 20);
    }

    #[test]
    fn header_maps_get_a_share_of_the_memory_limit() {
        assert_eq!(field_bytes(16 << 20), 16_777);
        assert_eq!(field_bytes(1 << 20), 8 * 1024);
        assert_eq!(field_bytes(512 << 20), 64 * 1024);
    }
}
