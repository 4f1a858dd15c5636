//! What a plugin may write to the host's log: a budget per call and one per tenant, lines cut at
//! [`MAX_LINE`] bytes, and control characters escaped so that a guest cannot forge log lines.
//!
//! Guest stdout/stderr and `host.log` share the budget. Past it, lines are dropped and counted;
//! when the call ends, one line says how many were dropped. The tenant's budget is a token bucket
//! shared by every instance of that tenant, so a thousand instances that each stay within their
//! call's budget still cannot flood the log.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Longest line kept, in bytes; longer lines are cut.
pub const MAX_LINE: usize = 4096;
/// Lines one call may write.
pub const CALL_LINES: u64 = 1000;
/// Bytes one call may write.
pub const CALL_BYTES: u64 = 512 * 1024;
/// Lines per second a tenant's plugins may write together, sustained.
pub const TENANT_LINES_PER_SEC: f64 = 200.0;
/// Lines a tenant's plugins may write in a burst.
pub const TENANT_BURST: f64 = 5000.0;
/// Tenants whose buckets are kept; past this, full buckets are forgotten.
const MAX_TENANT_BUCKETS: usize = 10_000;

/// A plugin's text made safe for one log line: control characters (newlines, carriage returns,
/// escape sequences) become `\n`, `\r`, `\u{1b}`; tabs stay.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\t' => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Cuts `text` to at most [`MAX_LINE`] bytes, on a character boundary.
pub fn cut(text: &str) -> &str {
    if text.len() <= MAX_LINE {
        return text;
    }
    let mut end = MAX_LINE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The per-tenant buckets of one runtime.
#[derive(Default)]
pub(crate) struct TenantBudgets {
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

impl TenantBudgets {
    /// Takes one line from `tenant`'s bucket; false when it is empty.
    fn take(&self, tenant: &Arc<str>) -> bool {
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else { return false };
        if buckets.len() >= MAX_TENANT_BUCKETS && !buckets.contains_key(tenant) {
            // Forget buckets that have refilled: they hold nothing a new bucket would not.
            buckets
                .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * TENANT_LINES_PER_SEC < TENANT_BURST);
        }
        let bucket = buckets.entry(tenant.clone()).or_insert(Bucket { tokens: TENANT_BURST, at: now });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * TENANT_LINES_PER_SEC).min(TENANT_BURST);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One instance's log budget, shared by its stdout, stderr and `host.log`.
pub(crate) struct LogMeter {
    pub(crate) tenant: Arc<str>,
    pub(crate) plugin: Arc<str>,
    tenants: Arc<TenantBudgets>,
    lines: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
}

impl LogMeter {
    pub(crate) fn new(tenant: Arc<str>, plugin: Arc<str>, tenants: Arc<TenantBudgets>) -> Self {
        LogMeter {
            tenant,
            plugin,
            tenants,
            lines: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether a line of `len` bytes may be written now; counts it either way.
    pub(crate) fn admit(&self, len: usize) -> bool {
        let lines = self.lines.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = self.bytes.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        if lines <= CALL_LINES && bytes <= CALL_BYTES && self.tenants.take(&self.tenant) {
            return true;
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Writes one message of the plugin's at `level`, within the budget: cut, escaped, with the
    /// tenant and the plugin.
    pub(crate) fn write(&self, level: tracing::Level, message: &str) {
        if !self.admit(message.len()) {
            return;
        }
        let text = escape(cut(message));
        let (tenant, plugin) = (&*self.tenant, &*self.plugin);
        match level {
            tracing::Level::ERROR => tracing::error!(tenant, plugin, "{text}"),
            tracing::Level::WARN => tracing::warn!(tenant, plugin, "{text}"),
            tracing::Level::INFO => tracing::info!(tenant, plugin, "{text}"),
            tracing::Level::DEBUG => tracing::debug!(tenant, plugin, "{text}"),
            tracing::Level::TRACE => tracing::trace!(tenant, plugin, "{text}"),
        }
    }

    /// Ends a call: says how many lines were dropped, if any, and starts the next call's budget.
    pub(crate) fn end_call(&self) {
        self.lines.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                tenant = %self.tenant,
                plugin = %self.plugin,
                dropped,
                "log budget exceeded, {dropped} lines dropped (a call may write {CALL_LINES} lines or {CALL_BYTES} bytes; a tenant {TENANT_LINES_PER_SEC} lines/s)"
            );
        }
    }
}

impl Drop for LogMeter {
    fn drop(&mut self) {
        self.end_call();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_lines_cut() {
        assert_eq!(escape("plain\ttext"), "plain\ttext");
        assert_eq!(escape("a\nlevel=ERROR forged\r\u{1b}[2J"), "a\\nlevel=ERROR forged\\r\\u{1b}[2J");
        let long = "é".repeat(MAX_LINE);
        let cut = cut(&long);
        assert!(cut.len() <= MAX_LINE && cut.len() > MAX_LINE - 2);
    }

    #[test]
    fn a_call_past_its_budget_drops_lines_and_the_next_call_starts_afresh() {
        let meter = LogMeter::new("t".into(), "p".into(), Arc::default());
        let admitted = (0..CALL_LINES + 500).filter(|_| meter.admit(10)).count() as u64;
        assert_eq!(admitted, CALL_LINES);
        assert_eq!(meter.dropped.load(Ordering::Relaxed), 500);
        meter.end_call();
        assert!(meter.admit(10));
        // Bytes count too.
        assert!(!meter.admit(CALL_BYTES as usize));
    }

    #[test]
    fn a_tenant_budget_holds_across_instances() {
        let tenants = Arc::new(TenantBudgets::default());
        let admitted: u64 = (0..20)
            .map(|_| {
                let meter = LogMeter::new("t".into(), "p".into(), tenants.clone());
                (0..CALL_LINES).filter(|_| meter.admit(1)).count() as u64
            })
            .sum();
        // 20 instances within their own call budgets, but the tenant's burst is the bound (plus
        // what refills while the test runs, a few lines).
        assert!((TENANT_BURST as u64..TENANT_BURST as u64 + 2000).contains(&admitted), "{admitted}");
        // Another tenant is not affected.
        let other = LogMeter::new("u".into(), "p".into(), tenants);
        assert!(other.admit(1));
    }
}
