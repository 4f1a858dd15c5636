//! What the host gives every plugin: logging, and the configuration and secrets its install
//! granted. A plugin has no filesystem, no environment and no network beyond granted hosts; this
//! is how it learns its settings.

use crate::__bindings::quantumlayer::plugin0_2_0::host as imports;
use crate::LogLevel;

/// Writes to the host's log, tagged with the tenant and plugin.
///
/// ```no_run
/// qlayer_sdk::host::log(qlayer_sdk::LogLevel::Info, "starting");
/// ```
pub fn log(level: LogLevel, message: &str) {
    imports::log(level, message);
}

/// Logs at info level.
///
/// ```no_run
/// qlayer_sdk::host::info("hello from the plugin");
/// ```
pub fn info(message: &str) {
    log(LogLevel::Info, message);
}

/// Logs at warn level.
///
/// ```no_run
/// qlayer_sdk::host::warn("upstream was slow");
/// ```
pub fn warn(message: &str) {
    log(LogLevel::Warn, message);
}

/// A configuration value the install granted; `None` if not granted or unset.
///
/// ```no_run
/// let base = qlayer_sdk::host::config("base_url").unwrap_or_else(|| "https://api.openai.com/v1".into());
/// ```
pub fn config(key: &str) -> Option<String> {
    imports::config(key)
}

/// A secret the install granted (an API key, say). The host never logs it; neither should you.
///
/// ```no_run
/// let key = qlayer_sdk::host::secret("api_key");
/// ```
pub fn secret(key: &str) -> Option<String> {
    imports::secret(key)
}
