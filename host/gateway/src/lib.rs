//! The gateway: agents' completions routed to the tenant's LLM provider plugins.
//! May depend on: `qlayer-runtime`.
//!
//! Routes agents' `llm.complete` calls to the tenant's providers: a fallback chain, bounded
//! retries of retryable errors (honouring the provider's retry-after), usage accounting, and a
//! token budget so that no run can spend without bound.

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

/// The router for one run (or one tenant session).
pub struct Router {
    providers: Vec<Installed>,
    budget: Option<u64>,
    spent: Mutex<TokenCount>,
}

impl Router {
    /// Routes to `providers` in order (the first is preferred; the others are fallbacks), with an
    /// optional budget of total tokens.
    pub fn new(providers: Vec<Installed>, budget: Option<u64>) -> Self {
        Router { providers, budget, spent: Mutex::new(TokenCount::default()) }
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
            let result = match provider.provider(tenant).await {
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
fn jitter(d: Duration) -> Duration {
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
            let mut last = PluginError::Unavailable("no provider is configured".into());
            for provider in &self.providers {
                match self.complete_with(tenant, provider, &request).await {
                    Ok(completion) => {
                        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
                        spent.prompt += u64::from(completion.usage.prompt_tokens);
                        spent.completion += u64::from(completion.usage.completion_tokens);
                        spent.calls += 1;
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
