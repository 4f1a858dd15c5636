//! The gateway: applications' and agents' completions routed to the tenant's LLM provider plugins.
//! May depend on: `qlayer-runtime`, `qlayer-db`, `qlayer-scheduler`.
//!
//! - [`service::Gateway`]: the OpenAI-compatible gateway's request path. A request is admitted
//!   by the scheduler's fair sharing, looked up in the tenant's model table ([`table`]), routed
//!   over the model's deployments by its strategy and their health ([`route`]), answered by a
//!   provider plugin instance, and metered off the path in batches ([`meter`]). [`openai`] is
//!   OpenAI's wire format, in one place.
//! - [`Router`]: agents' `llm.complete` calls during a factory run: a fallback chain, bounded
//!   retries of retryable errors (honouring the provider's retry-after), usage accounting, and a
//!   token budget so that no run can spend without bound.

pub mod anthropic;
pub mod cache;
pub mod meter;
pub mod openai;
pub mod qdrant;
pub mod quota;
pub mod request;
pub mod route;
pub mod semantic;
pub mod service;
pub mod table;

use futures::future::BoxFuture;
use qlayer_runtime::{CallError, Completion, CompletionRequest, Installed, LlmHandler, PluginError, describe};
use std::sync::Mutex;
use std::time::Duration;

/// Retries of one provider before falling back to the next.
const RETRIES: u32 = 2;
/// Longest wait between retries, whatever the provider's retry-after says.
const MAX_BACKOFF: Duration = Duration::from_secs(20);

/// Tokens spent so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenCount {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
    /// Completions made.
    pub calls: u64,
}

impl TokenCount {
    /// Prompt plus completion tokens.
    pub fn total(&self) -> u64 {
        self.prompt + self.completion
    }
    /// Both counts together.
    pub fn plus(&self, other: TokenCount) -> TokenCount {
        TokenCount {
            prompt: self.prompt + other.prompt,
            completion: self.completion + other.completion,
            calls: self.calls + other.calls,
        }
    }
    /// What was spent since `earlier`.
    pub fn since(&self, earlier: TokenCount) -> TokenCount {
        TokenCount {
            prompt: self.prompt - earlier.prompt,
            completion: self.completion - earlier.completion,
            calls: self.calls - earlier.calls,
        }
    }
}

/// Where a [`Router`] sends completions.
enum Route {
    /// Provider instances, in order: the first is preferred, the others are fallbacks.
    Providers(Vec<Installed>),
    /// Another handler: the gateway, for a model of the tenant's table
    /// ([`service::TableModel`]).
    Through(std::sync::Arc<dyn LlmHandler>),
}

/// The router for one run (or one tenant session).
pub struct Router {
    route: Route,
    budget: Option<u64>,
    spent: Mutex<TokenCount>,
}

impl Router {
    /// Routes to `providers` in order (the first is preferred; the others are fallbacks), with an
    /// optional budget of total tokens.
    pub fn new(providers: Vec<Installed>, budget: Option<u64>) -> Self {
        Router { route: Route::Providers(providers), budget, spent: Mutex::new(TokenCount::default()) }
    }

    /// Routes every completion through `handler`, counting its tokens against `budget`.
    pub fn through(handler: std::sync::Arc<dyn LlmHandler>, budget: Option<u64>) -> Self {
        Router { route: Route::Through(handler), budget, spent: Mutex::new(TokenCount::default()) }
    }

    fn count(&self, completion: &Completion) {
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        spent.prompt += u64::from(completion.usage.prompt_tokens);
        spent.completion += u64::from(completion.usage.completion_tokens);
        spent.calls += 1;
    }

    /// Tokens spent so far.
    pub fn spent(&self) -> TokenCount {
        *self.spent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn over_budget(&self) -> Option<PluginError> {
        let (budget, spent) = (self.budget?, self.spent().total());
        (spent >= budget).then(|| {
            PluginError::InvalidInput(format!("the run's token budget of {budget} is spent ({spent} tokens used)"))
        })
    }

    async fn complete_with(
        &self,
        tenant: &str,
        provider: &Installed,
        request: &CompletionRequest,
    ) -> Result<Completion, CallError> {
        let mut attempt = 0;
        loop {
            let result = match provider.warm_provider(tenant).await {
                Ok(mut instance) => instance.complete(request).await,
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.is_retryable() && attempt < RETRIES => {
                    attempt += 1;
                    let wait = match &e.kind {
                        qlayer_runtime::CallErrorKind::Plugin(PluginError::RateLimited(Some(ms))) => {
                            Duration::from_millis(*ms)
                        }
                        _ => Duration::from_millis(250 * 2u64.pow(attempt)),
                    };
                    let wait = jitter(wait.min(MAX_BACKOFF));
                    tracing::warn!(tenant, plugin = %e.plugin, attempt, wait_ms = wait.as_millis() as u64, "retrying: {e}");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }
}

/// Up to 25% random jitter, so that many callers do not retry in step.
pub(crate) fn jitter(d: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0);
    d + d.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

impl LlmHandler for Router {
    fn complete<'a>(
        &'a self,
        tenant: &'a str,
        request: CompletionRequest,
    ) -> BoxFuture<'a, Result<Completion, PluginError>> {
        Box::pin(async move {
            if let Some(e) = self.over_budget() {
                return Err(e);
            }
            let providers = match &self.route {
                Route::Providers(providers) => providers,
                Route::Through(handler) => {
                    let completion = handler.complete(tenant, request).await?;
                    self.count(&completion);
                    return Ok(completion);
                }
            };
            let mut last = PluginError::Unavailable("no provider is configured".into());
            for provider in providers {
                match self.complete_with(tenant, provider, &request).await {
                    Ok(completion) => {
                        self.count(&completion);
                        return Ok(completion);
                    }
                    Err(e) => {
                        tracing::warn!(tenant, plugin = %e.plugin, "provider failed: {e}");
                        let error = e.to_plugin_error();
                        // Bad input fails the same way everywhere: do not try the next provider.
                        if matches!(error, PluginError::InvalidInput(_)) {
                            return Err(error);
                        }
                        last = error;
                    }
                }
            }
            tracing::warn!(tenant, "every provider failed; last error: {}", describe(&last));
            Err(last)
        })
    }
}

/// A gateway error, rendered in each API's own shape by the service ([`openai::error_body`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayError {
    /// The HTTP status.
    pub status: u16,
    /// A stable code (`model_not_found`, `upstream_rate_limited`...).
    pub code: Option<String>,
    /// For people: names what is wrong.
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// Seconds to wait, for a 429 or 503.
    pub retry_after: Option<u64>,
    /// Headers the answer carries besides (OpenAI's `x-ratelimit-*` on a refusal).
    pub headers: Vec<(&'static str, String)>,
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for GatewayError {}

impl GatewayError {
    /// An error with a status, a code and a message.
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> Self {
        GatewayError {
            status,
            code: Some(code.to_string()),
            message: message.into(),
            param: None,
            retry_after: None,
            headers: Vec::new(),
        }
    }

    /// 400 for a request that cannot be served as sent.
    pub fn invalid(message: impl Into<String>) -> Self {
        GatewayError {
            status: 400,
            code: None,
            message: message.into(),
            param: None,
            retry_after: None,
            headers: Vec::new(),
        }
    }

    /// 500: the cause goes to the log.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "gateway internal error");
        Self::new(500, "internal", "internal error; the server log has the details under this response's x-request-id")
    }

    /// Names the request field at fault.
    pub fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// Sets the code.
    pub fn code(mut self, code: &str) -> Self {
        self.code = Some(code.to_string());
        self
    }

    /// OpenAI's 404 for a model the tenant does not have (another tenant's looks the same).
    pub fn model_not_found(name: &str) -> Self {
        Self::new(
            404,
            "model_not_found",
            format!("The model `{}` does not exist or you do not have access to it.", name.escape_debug()),
        )
        .param("model")
    }

    /// 503 when every deployment of `model` is cooling down: `Retry-After` says when the first
    /// one may be probed.
    pub fn cooling(model: &str, cooling: &[(usize, i64)], now: i64) -> Self {
        let first = cooling.iter().map(|(_, until)| *until).min().unwrap_or(now + 1_000);
        let secs = ((first - now).max(0) as u64).div_ceil(1000).max(1);
        let mut e = Self::new(
            503,
            "no_healthy_deployment",
            format!(
                "every deployment of model `{model}` is cooling down after failures; the first may be tried again in {secs} s"
            ),
        );
        e.retry_after = Some(secs);
        e
    }

    /// 400: `feature` is asked for and deployment `d` of `model` cannot express it.
    pub fn unsupported(feature: openai::Feature, model: &str, d: &table::Deployment) -> Self {
        Self::invalid(format!(
            "{}: model `{model}` is served by plugin `{}`, which speaks contract {} and cannot express {}",
            request::field(feature),
            d.plugin,
            service_contract(),
            feature.describe()
        ))
        .param(request::field(feature))
        .code("unsupported_feature")
    }

    /// 400: no deployment of `model` can express `feature`.
    pub fn unsupported_anywhere(feature: openai::Feature, model: &str, spec: &table::ModelSpec) -> Self {
        let plugins: Vec<String> = spec.deployments.iter().map(|d| format!("`{}`", d.plugin)).collect();
        Self::invalid(format!(
            "{}: model `{model}` is served by plugin {}, which speaks contract {} and cannot express {}",
            request::field(feature),
            plugins.join(", "),
            service_contract(),
            feature.describe()
        ))
        .param(request::field(feature))
        .code("unsupported_feature")
    }

    /// What a failed provider call means for the client.
    /// What an agent's `llm` call gets for it: the contract's error of the same meaning.
    pub fn to_plugin_error(&self) -> PluginError {
        let message = self.message.clone();
        match self.status {
            429 => PluginError::RateLimited(self.retry_after.map(|s| s * 1000)),
            401 | 403 => PluginError::Unauthorized(message),
            400..=499 => PluginError::InvalidInput(message),
            504 => PluginError::Timeout,
            _ => PluginError::Unavailable(message),
        }
    }

    /// What a provider's failure answers.
    pub fn from_call(d: &table::Deployment, e: &CallError) -> Self {
        let at = format!("deployment `{}`", d.key());
        match &e.kind {
            qlayer_runtime::CallErrorKind::Plugin(p) => match p {
                PluginError::InvalidInput(m) => {
                    Self::new(400, "upstream_invalid_request", format!("{at}: the upstream refused the request: {m}"))
                }
                PluginError::Unauthorized(m) => Self::new(
                    502,
                    "upstream_unauthorized",
                    format!("{at}: the upstream refused the plugin's credentials: {m}"),
                ),
                PluginError::RateLimited(ms) => {
                    let mut err =
                        Self::new(429, "upstream_rate_limited", format!("{at}: the upstream is rate limiting"));
                    err.retry_after = Some(ms.map(|ms| ms.div_ceil(1000)).unwrap_or(1).max(1));
                    err
                }
                PluginError::Unavailable(m) => {
                    Self::new(503, "upstream_unavailable", format!("{at}: the upstream is unavailable: {m}"))
                }
                PluginError::Timeout => {
                    Self::new(504, "upstream_timeout", format!("{at}: the upstream did not answer in time"))
                }
                PluginError::Internal(m) => {
                    Self::new(502, "provider_failed", format!("{at}: the provider plugin failed: {m}"))
                }
            },
            qlayer_runtime::CallErrorKind::Timeout(d) => Self::new(
                504,
                "upstream_timeout",
                format!("{at}: no answer within the plugin's {} ms deadline", d.as_millis()),
            ),
            _ => Self::new(502, "provider_failed", format!("{at}: {e}")),
        }
    }
}

/// The one contract version that lacks features a request may ask for.
fn service_contract() -> qlayer_runtime::Contract {
    qlayer_runtime::Contract::V0_1
}
