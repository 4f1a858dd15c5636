//! The first-party providers against local test servers that speak each upstream's wire format.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod anthropic;
mod bedrock;
mod provider;

/// The contract error a completion ends in (panics on success or another kind of failure).
pub(crate) async fn plugin_error(
    installed: &qlayer_runtime::Installed,
    request: &qlayer_runtime::CompletionRequest,
) -> qlayer_runtime::PluginError {
    match installed.provider("t").await.unwrap().complete(request).await.unwrap_err().kind {
        qlayer_runtime::CallErrorKind::Plugin(e) => e,
        other => panic!("expected a plugin error, got {other:?}"),
    }
}
