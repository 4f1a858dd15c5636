//! The exact cache: a model's answers kept for its `cache.ttl_secs`, keyed by the tenant, the
//! model name and the whole normalised request (messages, tools, parameters, as the provider
//! would get them: OpenAI's and Anthropic's wire formats meet there), never across tenants.
//! Streams are kept as their chunks and replayed chunk by chunk. In this node's memory, bounded
//! by `[gateway] cache-bytes`; the oldest entries go first.

use crate::table::Deployment;
use qlayer_runtime::{Completion, CompletionChunk, CompletionRequest};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a request's `Cache-Control` header asks of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Directives {
    /// `no-cache`: do not answer from the cache.
    pub no_cache: bool,
    /// `no-store`: do not keep this answer.
    pub no_store: bool,
}

impl Directives {
    /// From a `Cache-Control` header's value (`no-cache, no-store`; other directives are not
    /// the cache's business).
    pub fn parse(value: &str) -> Directives {
        let mut d = Directives::default();
        for directive in value.split(',').map(|s| s.trim().to_ascii_lowercase()) {
            match directive.as_str() {
                "no-cache" => d.no_cache = true,
                "no-store" => d.no_store = true,
                _ => {}
            }
        }
        d
    }
}

/// What the cache did for a request (the `x-qlayer-cache` header and the usage record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The model keeps no cache.
    Off,
    /// The request said `no-cache`.
    Skip,
    /// Not in the cache: asked upstream (and kept, unless `no-store`).
    Miss,
    /// Answered from the exact cache.
    Hit,
    /// Answered from the semantic cache: a request close enough was answered.
    SemanticHit,
}

impl Outcome {
    /// As headers and usage records say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Off => "off",
            Outcome::Skip => "skip",
            Outcome::Miss => "miss",
            Outcome::Hit => "hit",
            Outcome::SemanticHit => "semantic-hit",
        }
    }

    /// Whether the answer came from a cache (nothing was asked upstream).
    pub fn is_hit(self) -> bool {
        matches!(self, Outcome::Hit | Outcome::SemanticHit)
    }
}

/// A kept answer.
#[derive(Debug, Clone)]
pub enum Kept {
    /// A whole completion.
    Whole(Completion),
    /// A stream's chunks, in order.
    Stream(Vec<CompletionChunk>),
}

/// The key of a request: SHA-256 over the tenant, the model name, whether it streams, and the
/// request as the contract has it (its `user` left out: who asks does not change the answer).
pub fn key(tenant_id: &str, model: &str, stream: bool, request: &CompletionRequest) -> [u8; 32] {
    let mut request = request.clone();
    request.user = None;
    request.model.clear();
    digest(&[tenant_id, model, if stream { "stream" } else { "whole" }], &request)
}

/// SHA-256 over `parts` (each length-prefixed) and `request`. Its Debug text prints every field,
/// so a field the contract adds is part of the digest without anyone remembering to add it.
/// Digests live in this process (and its data dir) only.
pub(crate) fn digest(parts: &[&str], request: &CompletionRequest) -> [u8; 32] {
    struct Hashing(Sha256);
    impl std::fmt::Write for Hashing {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.update(s.as_bytes());
            Ok(())
        }
    }
    let mut h = Hashing(Sha256::new());
    for part in parts {
        h.0.update((part.len() as u64).to_be_bytes());
        h.0.update(part.as_bytes());
    }
    let _ = write!(h, "{request:?}");
    h.0.finalize().into()
}

/// What one answer may weigh to be kept (a larger one is not).
pub const MAX_ENTRY_BYTES: usize = 4 << 20;

/// About what `kept` holds in memory.
pub fn weight(kept: &Kept) -> usize {
    fn completion(c: &Completion) -> usize {
        c.text.len() + c.tool_calls.iter().map(|t| t.id.len() + t.name.len() + t.arguments.len() + 64).sum::<usize>()
    }
    128 + match kept {
        Kept::Whole(c) => completion(c),
        Kept::Stream(chunks) => chunks.iter().map(chunk_weight).sum(),
    }
}

/// About what one chunk holds in memory.
pub fn chunk_weight(c: &CompletionChunk) -> usize {
    64 + c.delta.len()
        + c.tool_calls
            .iter()
            .map(|t| {
                32 + t.id.as_ref().map_or(0, String::len) + t.name.as_ref().map_or(0, String::len) + t.arguments.len()
            })
            .sum::<usize>()
}

struct Entry {
    kept: Kept,
    deployment: Deployment,
    expires: Instant,
    weight: usize,
    seq: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<[u8; 32], Entry>,
    /// Keys in the order they were kept (with the entry's `seq`, so a replaced entry's old
    /// place is skipped).
    order: VecDeque<([u8; 32], u64)>,
    bytes: usize,
    seq: u64,
}

/// The exact cache of one node.
pub struct ExactCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for ExactCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExactCache").field("max_bytes", &self.max_bytes).finish()
    }
}

impl ExactCache {
    /// A cache of at most `max_bytes` (0 keeps nothing).
    pub fn new(max_bytes: usize) -> ExactCache {
        ExactCache { max_bytes, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer kept under `key` and the deployment that gave it, if it has not expired.
    pub fn get(&self, key: &[u8; 32]) -> Option<(Kept, Deployment)> {
        let mut inner = self.lock();
        let entry = inner.entries.get(key)?;
        if entry.expires > Instant::now() {
            return Some((entry.kept.clone(), entry.deployment.clone()));
        }
        let weight = entry.weight;
        inner.entries.remove(key);
        inner.bytes -= weight;
        None
    }

    /// Keeps `kept` (from `deployment`) under `key` for `ttl`, making room by dropping
    /// expired entries, then the oldest.
    pub fn put(&self, key: [u8; 32], kept: Kept, deployment: Deployment, ttl: Duration) {
        let weight = weight(&kept);
        if weight > MAX_ENTRY_BYTES || weight > self.max_bytes {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        inner.seq += 1;
        let seq = inner.seq;
        if let Some(old) = inner.entries.insert(key, Entry { kept, deployment, expires: now + ttl, weight, seq }) {
            inner.bytes -= old.weight;
        }
        inner.bytes += weight;
        inner.order.push_back((key, seq));
        while inner.bytes > self.max_bytes {
            let Some((oldest, seq)) = inner.order.pop_front() else { break };
            if inner.entries.get(&oldest).is_some_and(|e| e.seq == seq)
                && let Some(gone) = inner.entries.remove(&oldest)
            {
                inner.bytes -= gone.weight;
            }
        }
        // Places of replaced entries pile up in `order` only until it is twice the entries.
        if inner.order.len() > 2 * inner.entries.len() + 64 {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|(k, s)| entries.get(k).is_some_and(|e| e.seq == *s));
        }
        metrics::gauge!("qlayer_gateway_cache_bytes").set(inner.bytes as f64);
    }

    /// What the cache holds, in bytes.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use qlayer_runtime::{FinishReason, Message, Role, Usage};

    fn request(text: &str) -> CompletionRequest {
        CompletionRequest::new("", vec![Message::new(Role::User, text)])
    }

    fn answer(text: &str) -> Kept {
        Kept::Whole(Completion {
            model: "m".into(),
            text: text.into(),
            tool_calls: Vec::new(),
            finish_reason: FinishReason::Stop,
            usage: Usage { prompt_tokens: 1, completion_tokens: 1 },
        })
    }

    #[test]
    fn keys_name_the_tenant_the_model_the_mode_and_the_request_but_not_the_user() {
        let base = key("t1", "m", false, &request("hi"));
        assert_ne!(base, key("t2", "m", false, &request("hi")), "another tenant");
        assert_ne!(base, key("t1", "n", false, &request("hi")), "another model name");
        assert_ne!(base, key("t1", "m", true, &request("hi")), "a stream");
        assert_ne!(base, key("t1", "m", false, &request("hi!")), "another message");
        let mut hot = request("hi");
        hot.temperature = Some(1.5);
        assert_ne!(base, key("t1", "m", false, &hot), "another parameter");
        let mut user = request("hi");
        user.user = Some("u-42".into());
        user.model = "upstream-model".into();
        assert_eq!(base, key("t1", "m", false, &user), "the user and the deployment's model are not the answer's");
    }

    #[test]
    fn entries_expire_and_the_oldest_go_first_when_full() {
        let cache = ExactCache::new(3 * weight(&answer("x")));
        cache.put([1; 32], answer("x"), Deployment::of("p", "m"), Duration::from_secs(60));
        cache.put([2; 32], answer("x"), Deployment::of("p", "m"), Duration::from_secs(60));
        cache.put([3; 32], answer("x"), Deployment::of("p", "m"), Duration::from_millis(0));
        assert!(cache.get(&[3; 32]).is_none(), "expired");
        cache.put([4; 32], answer("x"), Deployment::of("p", "m"), Duration::from_secs(60));
        cache.put([5; 32], answer("x"), Deployment::of("p", "m"), Duration::from_secs(60));
        assert!(cache.get(&[1; 32]).is_none(), "the oldest went");
        assert!(cache.get(&[5; 32]).is_some());
        assert!(cache.bytes() <= 3 * weight(&answer("x")));
        // Replacing an entry keeps one copy of it.
        cache.put([5; 32], answer("y"), Deployment::of("p", "m"), Duration::from_secs(60));
        assert!(matches!(cache.get(&[5; 32]), Some((Kept::Whole(c), _)) if c.text == "y"));
        let big = answer(&"x".repeat(MAX_ENTRY_BYTES));
        cache.put([6; 32], big, Deployment::of("p", "m"), Duration::from_secs(60));
        assert!(cache.get(&[6; 32]).is_none(), "too large to keep");
        assert_eq!(Directives::parse("No-Cache, max-age=0, no-store"), Directives { no_cache: true, no_store: true });
    }
}
