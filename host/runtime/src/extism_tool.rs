//! Extism tool plugins: core modules built with an Extism PDK, run through the `extism` crate
//! under the same rules as components.
//!
//! - **Contract**: the module exports `invoke`, which takes the input JSON and returns the output
//!   JSON (the `tool-plugin` world's `invoke`). An error whose text starts with `invalid-input:`,
//!   `unauthorized:`, `unavailable:` or `timeout` maps to that `plugin-error` case; any other is
//!   `internal`. It may import only `extism:host/env` (no WASI: no files, no environment, no clock
//!   beyond what Extism gives).
//! - **Limits**: the manifest's memory (in 64 KiB pages) and per-call timeout, clamped by the host
//!   policy, as for components; each tenant gets its own `extism::Plugin` (its own store).
//! - **Network**: Extism's built-in `http_request` is replaced by the host's: every request, and
//!   every hop of a redirect, is checked against the install's granted hosts (host and port) and
//!   is refused otherwise; credentials are dropped on a cross-host redirect; the request is bounded
//!   by the call's remaining time. Nothing else in the process is reachable.

use super::logs::LogMeter;
use super::outbound::Outbound;
use super::{CallError, CallErrorKind, Grants, PluginError};
use extism::{CurrentPlugin, EXTISM_ENV_MODULE, Function, UserData, Val, ValType};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

/// Largest HTTP response body handed to an Extism plugin.
const MAX_HTTP_RESPONSE: usize = 16 * 1024 * 1024;
/// Redirect hops followed (each one checked against the grants).
const MAX_REDIRECTS: usize = 5;

/// Checks a core module is an Extism tool: exports `invoke`, imports only `extism:host/env`.
pub(crate) fn check_module(wasm: &[u8]) -> Result<(), String> {
    use wasmparser::{Parser, Payload};
    let mut exports = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(|e| e.to_string())? {
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.map_err(|e| e.to_string())?;
                    if import.module != EXTISM_ENV_MODULE {
                        return Err(format!(
                            "imports `{}::{}`; an Extism plugin may import only `{EXTISM_ENV_MODULE}` (no WASI)",
                            import.module, import.name
                        ));
                    }
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    exports.push(export.map_err(|e| e.to_string())?.name.to_string());
                }
            }
            _ => {}
        }
    }
    if !exports.iter().any(|e| e == "invoke") {
        return Err(format!(
            "does not export `invoke` (it exports: {})",
            if exports.is_empty() { "nothing".into() } else { exports.join(", ") }
        ));
    }
    Ok(())
}

/// Per-install HTTP state shared by the host functions: the grants and the client. Each
/// instance's last response status and headers live in that instance's own Extism vars.
struct HttpState {
    tenant_plugin: String,
    grants: Arc<Grants>,
    outbound: Arc<Outbound>,
    /// Each live instance's log budget (with its tenant), by the instance's Extism id.
    logs: LogMeters,
}

/// The log budgets of an install's live instances, by Extism instance id.
pub(crate) type LogMeters = Arc<std::sync::Mutex<HashMap<u128, Arc<LogMeter>>>>;

/// An Extism module compiled for one install, and its instances' log budgets.
pub(crate) struct Compiled {
    pub(crate) plugin: extism::CompiledPlugin,
    pub(crate) logs: LogMeters,
}

/// The instance var holding the last response's status (2 bytes, big-endian).
const STATUS_VAR: &str = "qlayer.http.status";
/// The instance var holding the last response's headers (JSON object).
const HEADERS_VAR: &str = "qlayer.http.headers";

/// Compiles an Extism module for one install: its limits, its config, and the host's HTTP.
pub(crate) fn compile(
    name: &str,
    wasm: &[u8],
    grants: Arc<Grants>,
    memory_bytes: usize,
    timeout: Duration,
    outbound: Arc<Outbound>,
    cache_config: Option<&std::path::Path>,
) -> anyhow::Result<Compiled> {
    let manifest = extism::Manifest::new([extism::Wasm::data(wasm.to_vec())])
        .with_memory_max((memory_bytes / 65536).max(1) as u32)
        .with_timeout(timeout)
        .with_config(grants.config.iter().map(|(k, v)| (k.clone(), v.clone())));
    let meters = LogMeters::default();
    let state = UserData::new(HttpState { tenant_plugin: name.to_string(), grants, outbound, logs: meters.clone() });
    let functions = [
        Function::new("http_request", [ValType::I64, ValType::I64], [ValType::I64], state.clone(), http_request)
            .with_namespace(EXTISM_ENV_MODULE),
        Function::new("http_status_code", [], [ValType::I32], state.clone(), http_status_code)
            .with_namespace(EXTISM_ENV_MODULE),
        Function::new("http_headers", [], [ValType::I64], state.clone(), http_headers)
            .with_namespace(EXTISM_ENV_MODULE),
    ];
    // Extism's own log functions print whole messages (16 MiB lines) with an instance UUID; these
    // replace them: the budget, cut and escaping of components' logs, with the tenant and plugin.
    let levels = [
        ("log_error", tracing::Level::ERROR),
        ("log_warn", tracing::Level::WARN),
        ("log_info", tracing::Level::INFO),
        ("log_debug", tracing::Level::DEBUG),
        ("log_trace", tracing::Level::TRACE),
    ];
    let log_functions = levels.into_iter().map(|(name, level)| {
        Function::new(
            name,
            [ValType::I64],
            [],
            state.clone(),
            move |plugin: &mut CurrentPlugin, inputs: &[Val], _: &mut [Val], state: UserData<HttpState>| {
                guest_log(level, plugin, inputs, &state)
            },
        )
        .with_namespace(EXTISM_ENV_MODULE)
    });
    let builder = extism::PluginBuilder::new(manifest).with_wasi(false);
    // Compiled once per module and kept on disk when the runtime has a compile cache; never from
    // Extism's defaults (the user's ~/.config/wasmtime or EXTISM_CACHE_CONFIG).
    let builder = match cache_config {
        Some(config) => builder.with_cache_config(config),
        None => builder.with_cache_disabled(),
    };
    let plugin = builder.with_functions(functions.into_iter().chain(log_functions)).compile()?;
    Ok(Compiled { plugin, logs: meters })
}

fn guest_log(
    level: tracing::Level,
    plugin: &mut CurrentPlugin,
    inputs: &[Val],
    state: &UserData<HttpState>,
) -> Result<(), extism::Error> {
    let Some(handle) = plugin.memory_from_val(&inputs[0]) else { return Ok(()) };
    let meter = {
        let state = state.get()?;
        let state = state.lock().map_err(|_| anyhow::anyhow!("http state poisoned"))?;
        let meters = state.logs.lock().map_err(|_| anyhow::anyhow!("log state poisoned"))?;
        meters.get(&plugin.id().as_u128()).cloned()
    };
    if let Some(meter) = meter {
        meter.write(level, plugin.memory_str(handle).unwrap_or("(not UTF-8)"));
    }
    plugin.memory_free(handle)?;
    Ok(())
}

#[derive(serde::Deserialize)]
struct HttpRequest {
    url: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    method: Option<String>,
}

fn http_request(
    plugin: &mut CurrentPlugin,
    inputs: &[Val],
    outputs: &mut [Val],
    state: UserData<HttpState>,
) -> Result<(), extism::Error> {
    let request_handle =
        plugin.memory_from_val(&inputs[0]).ok_or_else(|| anyhow::anyhow!("http_request: invalid request handle"))?;
    let request: HttpRequest = serde_json::from_slice(plugin.memory_bytes(request_handle)?)
        .map_err(|e| anyhow::anyhow!("http_request: malformed request: {e}"))?;
    plugin.memory_free(request_handle)?;
    let body = match plugin.memory_from_val(&inputs[1]) {
        Some(handle) if handle.offset() != 0 => {
            let bytes = plugin.memory_bytes(handle)?.to_vec();
            plugin.memory_free(handle)?;
            bytes
        }
        _ => Vec::new(),
    };
    let remaining = plugin.time_remaining().unwrap_or(Duration::from_secs(30));
    let state = state.get()?;
    let (outbound, grants, who, tenant) = {
        let s = state.lock().map_err(|_| anyhow::anyhow!("http state poisoned"))?;
        // The instance's tenant, from its log budget (registered before its first call).
        let meters = s.logs.lock().map_err(|_| anyhow::anyhow!("log state poisoned"))?;
        let tenant = meters.get(&plugin.id().as_u128()).map(|m| m.tenant.clone());
        let tenant = tenant.ok_or_else(|| anyhow::anyhow!("http_request: the instance has no tenant"))?;
        (s.outbound.clone(), s.grants.clone(), s.tenant_plugin.clone(), tenant)
    };
    let response = tokio::runtime::Handle::try_current()
        .map_err(|_| anyhow::anyhow!("http_request: no async runtime"))?
        .block_on(send(&outbound, &grants, &who, &tenant, request, body, remaining))?;
    let (status, headers, body) = response;
    plugin.vars_mut().insert(STATUS_VAR.into(), status.to_be_bytes().to_vec());
    plugin.vars_mut().insert(HEADERS_VAR.into(), serde_json::to_vec(&headers)?);
    let handle = plugin.memory_new(&body[..])?;
    outputs[0] = plugin.memory_to_val(handle);
    Ok(())
}

fn permits(grants: &Grants, url: &url::Url) -> bool {
    if !url.username().is_empty() || url.password().is_some() {
        return false;
    }
    let Some(host) = url.host_str() else { return false };
    let Some(port) = url.port_or_known_default() else { return false };
    matches!(url.scheme(), "http" | "https") && grants.outbound_hosts.iter().any(|p| p.matches(host, port))
}

async fn send(
    outbound: &Outbound,
    grants: &Grants,
    who: &str,
    tenant: &Arc<str>,
    request: HttpRequest,
    body: Vec<u8>,
    remaining: Duration,
) -> anyhow::Result<(u16, HashMap<String, String>, Vec<u8>)> {
    use http_body_util::BodyExt;
    let deadline = tokio::time::Instant::now() + remaining;
    let mut url = url::Url::parse(&request.url).map_err(|e| anyhow::anyhow!("invalid URL `{}`: {e}", request.url))?;
    let mut method = http::Method::from_bytes(request.method.as_deref().unwrap_or("GET").to_uppercase().as_bytes())
        .map_err(|e| anyhow::anyhow!("invalid HTTP method: {e}"))?;
    let mut headers = request.headers;
    let mut body = Some(bytes::Bytes::from(body));
    for _ in 0..=MAX_REDIRECTS {
        if !permits(grants, &url) {
            tracing::warn!(plugin = %who, host = url.host_str().unwrap_or(""), "outbound request refused: host not granted to this plugin");
            anyhow::bail!(
                "outbound request to {}://{}:{} refused: that host is not granted to this plugin",
                url.scheme(),
                url.host_str().unwrap_or(""),
                url.port_or_known_default().unwrap_or(0)
            );
        }
        // Never log headers: they carry the credentials the plugin was granted.
        tracing::debug!(plugin = %who, method = %method, uri = %url, "outbound request");
        let mut builder = http::Request::builder().method(method.clone()).uri(url.as_str());
        for (k, v) in &headers {
            if !k.eq_ignore_ascii_case("host") {
                builder = builder.header(k, v);
            }
        }
        let payload = body.clone().unwrap_or_default();
        let outgoing = builder
            .body(http_body_util::Full::new(payload).map_err(|never| match never {}).boxed_unsync())
            .map_err(|e| anyhow::anyhow!("invalid HTTP request: {e}"))?;
        let slot = outbound.tenant_permit(tenant).map_err(|whose| {
            anyhow::anyhow!("outbound request refused: {whose} requests in flight are at their limit")
        })?;
        let response = tokio::time::timeout_at(deadline, outbound.send(outgoing, None, slot))
            .await
            .map_err(|_| anyhow::anyhow!("timeout"))?
            .map_err(|e| anyhow::anyhow!("HTTP request to {} failed: {e}", url.host_str().unwrap_or("")))?;
        if response.status().is_redirection()
            && let Some(location) = response.headers().get(http::header::LOCATION).and_then(|l| l.to_str().ok())
        {
            let next = url.join(location).map_err(|e| anyhow::anyhow!("bad redirect location: {e}"))?;
            if next.host_str() != url.host_str() || next.port_or_known_default() != url.port_or_known_default() {
                headers.retain(|k, _| {
                    !["authorization", "cookie", "proxy-authorization"].contains(&k.to_lowercase().as_str())
                });
            }
            if matches!(response.status().as_u16(), 301..=303) && method != http::Method::HEAD {
                method = http::Method::GET;
                body = None;
            }
            url = next;
            continue;
        }
        let status = response.status().as_u16();
        let response_headers = response
            .headers()
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_string(), v.to_string())))
            .collect();
        let mut out = Vec::new();
        let mut body = response.into_body();
        loop {
            let frame = tokio::time::timeout_at(deadline, body.frame())
                .await
                .map_err(|_| anyhow::anyhow!("timeout"))?
                .transpose()
                .map_err(|e| anyhow::anyhow!("reading the HTTP response: {e}"))?;
            let Some(frame) = frame else { break };
            let Ok(chunk) = frame.into_data() else { continue };
            if out.len() + chunk.len() > MAX_HTTP_RESPONSE {
                anyhow::bail!("HTTP response is larger than {MAX_HTTP_RESPONSE} bytes");
            }
            out.extend_from_slice(&chunk);
        }
        return Ok((status, response_headers, out));
    }
    anyhow::bail!("more than {MAX_REDIRECTS} redirects")
}

fn http_status_code(
    plugin: &mut CurrentPlugin,
    _inputs: &[Val],
    outputs: &mut [Val],
    _state: UserData<HttpState>,
) -> Result<(), extism::Error> {
    let status = match plugin.vars().get(STATUS_VAR).map(Vec::as_slice) {
        Some(&[hi, lo]) => u16::from_be_bytes([hi, lo]),
        _ => 0,
    };
    outputs[0] = Val::I32(status as i32);
    Ok(())
}

fn http_headers(
    plugin: &mut CurrentPlugin,
    _inputs: &[Val],
    outputs: &mut [Val],
    _state: UserData<HttpState>,
) -> Result<(), extism::Error> {
    match plugin.vars().get(HEADERS_VAR).cloned() {
        Some(json) => {
            let handle = plugin.memory_new(&json[..])?;
            outputs[0] = plugin.memory_to_val(handle);
        }
        None => outputs[0] = Val::I64(0),
    }
    Ok(())
}

/// A live Extism tool for one tenant.
pub struct ExtismInstance {
    pub(crate) plugin: Option<extism::Plugin>,
    pub(crate) name: Arc<str>,
    pub(crate) tenant: Arc<str>,
    pub(crate) timeout: Duration,
    pub(crate) memory_bytes: usize,
    pub(crate) output_limit: usize,
    /// This instance's log budget, registered under its Extism id in `logs`.
    pub(crate) log: Arc<LogMeter>,
    pub(crate) logs: LogMeters,
    pub(crate) id: u128,
    pub(crate) poisoned: bool,
    /// The pool slot; while a call runs, the call's thread holds it, so that it is released only
    /// once the guest has really stopped.
    pub(crate) slot: Option<OwnedSemaphorePermit>,
    /// The compilation (and so the engine) this instance runs on, held like the slot: while it
    /// is held, no other instance gets it (a cancel bumps the whole engine's epoch).
    pub(crate) lease: Option<Arc<Compiled>>,
    /// The tool's input schema, checked before each call enters the guest.
    pub(crate) input: Option<Arc<qlayer_manifest::InputChecker>>,
}

/// How a call and whoever stops it meet: `stopped` is set before the first cancel, and the call
/// checks it before it starts; `ended` is set once the call has returned.
#[derive(Default)]
struct CallStop {
    stopped: std::sync::atomic::AtomicBool,
    ended: std::sync::atomic::AtomicBool,
}

/// How often a cancel is sent again until the call has ended.
const CANCEL_REPEAT: Duration = Duration::from_millis(10);

/// Stops an Extism call at its deadline, or when dropped before it was disarmed (a cancelled
/// job), instead of letting it run on to its manifest timeout. Extism ignores a cancel that
/// reaches its timer before the call has started (the call then runs to its manifest timeout,
/// up to 300 s), so a call checks `stopped` before it starts, and the cancel is sent again every
/// 10 ms until the call has ended.
struct CancelOnDrop {
    handle: Option<extism::CancelHandle>,
    stop: Arc<CallStop>,
}

impl CancelOnDrop {
    fn cancel(&mut self) {
        use std::sync::atomic::Ordering::SeqCst;
        let Some(handle) = self.handle.take() else { return };
        self.stop.stopped.store(true, SeqCst);
        let _ = handle.cancel();
        let stop = self.stop.clone();
        // Outside a runtime (one shutting down) only the flag stops a call not yet started.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            drop(runtime.spawn(async move {
                while !stop.ended.load(SeqCst) {
                    tokio::time::sleep(CANCEL_REPEAT).await;
                    if !stop.ended.load(SeqCst) {
                        let _ = handle.cancel();
                    }
                }
            }));
        }
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl ExtismInstance {
    fn error(&self, kind: CallErrorKind) -> CallError {
        CallError { plugin: self.name.clone(), tenant: self.tenant.clone(), kind }
    }

    /// Invokes the tool's `invoke` export with `input_json`.
    pub async fn invoke(&mut self, input_json: &str) -> Result<String, CallError> {
        if self.poisoned {
            return Err(self.error(CallErrorKind::Poisoned));
        }
        if let Some(input) = &self.input
            && let Err(problem) = input.check(input_json)
        {
            return Err(self.error(CallErrorKind::Plugin(PluginError::InvalidInput(problem))));
        }
        let Some(mut plugin) = self.plugin.take() else { return Err(self.error(CallErrorKind::Poisoned)) };
        let input = input_json.to_string();
        // The call's deadline is this instance's (a job's deadline_ms included), not only the
        // timeout compiled into the module: past it the call is cancelled, and so it is when
        // this future is dropped.
        let stop = Arc::new(CallStop::default());
        let mut cancel = CancelOnDrop { handle: Some(plugin.cancel_handle()), stop: stop.clone() };
        let held = (self.slot.take(), self.lease.take());
        let mut call = tokio::task::spawn_blocking(move || {
            use std::sync::atomic::Ordering::SeqCst;
            let result = if stop.stopped.load(SeqCst) {
                // Stopped before it started (the blocking pool was busy past the deadline).
                Err("timeout".to_string())
            } else {
                plugin.call::<&str, String>("invoke", &input).map_err(|e| format!("{e:#}"))
            };
            stop.ended.store(true, SeqCst);
            (plugin, result, held)
        });
        let joined = match tokio::time::timeout(self.timeout, &mut call).await {
            Ok(joined) => joined,
            Err(_) => {
                cancel.cancel();
                call.await
            }
        };
        cancel.handle = None;
        self.log.end_call();
        let (plugin, result) = match joined.map(|(plugin, result, (slot, lease))| {
            (self.slot, self.lease) = (slot, lease);
            (plugin, result)
        }) {
            Ok(done) => done,
            Err(e) => {
                self.poisoned = true;
                return Err(self.error(CallErrorKind::Trap(format!("the call panicked: {e}"))));
            }
        };
        self.plugin = Some(plugin);
        if let Ok(out) = &result
            && out.len() > self.output_limit
        {
            return Err(self.error(CallErrorKind::OutputTooLarge { limit: self.output_limit, size: out.len() }));
        }
        result.map_err(|message| {
            let kind = classify(&message, self.timeout, self.memory_bytes);
            if !matches!(kind, CallErrorKind::Plugin(_)) {
                self.poisoned = true;
            }
            self.error(kind)
        })
    }
}

impl Drop for ExtismInstance {
    fn drop(&mut self) {
        if let Ok(mut meters) = self.logs.lock() {
            meters.remove(&self.id);
        }
    }
}

/// Maps an Extism call error to the host's kinds.
fn classify(message: &str, timeout: Duration, memory_bytes: usize) -> CallErrorKind {
    let trimmed = message.trim();
    if trimmed == "timeout" || trimmed.ends_with(": timeout") {
        return CallErrorKind::Timeout(timeout);
    }
    if trimmed == "oom" || trimmed.ends_with(": oom") {
        return CallErrorKind::OutOfMemory { limit: memory_bytes, requested: 0 };
    }
    let lower = trimmed.to_ascii_lowercase();
    let rest = |prefix: &str| trimmed[prefix.len()..].trim().to_string();
    if lower.starts_with("invalid-input:") {
        CallErrorKind::Plugin(PluginError::InvalidInput(rest("invalid-input:")))
    } else if lower.starts_with("unauthorized:") {
        CallErrorKind::Plugin(PluginError::Unauthorized(rest("unauthorized:")))
    } else if lower.starts_with("unavailable:") {
        CallErrorKind::Plugin(PluginError::Unavailable(rest("unavailable:")))
    } else if lower.contains("refused: that host is not granted") || lower.contains("wasm backtrace") {
        // A host function refused (or the guest trapped): the guest did not finish its call.
        let line = trimmed.lines().find(|l| l.contains("refused")).or(trimmed.lines().next()).unwrap_or(trimmed);
        CallErrorKind::Trap(line.trim().to_string())
    } else {
        CallErrorKind::Plugin(PluginError::Internal(trimmed.to_string()))
    }
}

/// Builds a tenant's instance of a compiled Extism plugin.
pub(crate) fn instantiate(compiled: &Compiled) -> anyhow::Result<extism::Plugin> {
    extism::Plugin::new_from_compiled(&compiled.plugin)
}
