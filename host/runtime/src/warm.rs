//! Warm provider instances: a provider instance that finished a call cleanly is kept, idle, for
//! the next call of the same tenant through the same install, so the gateway's hot path does not
//! instantiate a provider (and decommit its memory afterwards) per request.
//!
//! What may be reused, and what never is:
//! - an idle instance serves only the tenant it was made for, the same plugin digest, the same
//!   memory and output limits and equal grants (hosts, config and secrets): a grant changed or
//!   revoked never reaches an instance made under the old one;
//! - an instance that trapped, timed out, ran out of memory, or whose call was abandoned midway
//!   (its future dropped: the client left), or that holds a stream not read to its end, is
//!   dropped, never kept;
//! - an instance serves at most [`MAX_USES`] calls and idles at most [`IDLE_TTL`]; at most
//!   [`MAX_IDLE_PER_KEY`] idle instances per tenant and install and a quarter of the runtime's
//!   instance slots (at most [`MAX_IDLE`]) are kept, and an idle instance gives its slot up as soon
//!   as a caller finds none free.
//!
//! Within one tenant, guest memory persists between the calls an instance serves (as in any
//! long-lived server process); the per-call limits (deadline, output, log lines, the memory cap)
//! hold for every call as for a fresh instance.

use super::{CallError, CallErrorKind, Completion, CompletionRequest, EmbeddingRequest, Embeddings, Grants, ModelInfo};
use super::{OwnedChunkStream, ProviderInstance};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Calls one instance serves at most before it is dropped (a guest that leaks a little per call
/// is bounded by it).
pub const MAX_USES: u32 = 256;
/// How long an instance stays idle before it is dropped.
pub const IDLE_TTL: Duration = Duration::from_secs(30);
/// Idle instances kept per tenant and install.
pub const MAX_IDLE_PER_KEY: usize = 32;
/// Idle instances kept in all by default ([`crate::HostPolicy::warm_instances`]; never more than a
/// quarter of the instance slots).
pub const MAX_IDLE: usize = 64;

/// What an idle instance can serve, with its grants compared on top.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    tenant: String,
    digest: String,
    memory_bytes: usize,
    output_bytes: usize,
}

impl Key {
    pub(crate) fn new(tenant: &str, digest: &str, memory_bytes: usize, output_bytes: usize) -> Self {
        Key { tenant: tenant.to_string(), digest: digest.to_string(), memory_bytes, output_bytes }
    }
}

struct Idle {
    instance: ProviderInstance,
    grants: Arc<Grants>,
    uses: u32,
    since: Instant,
}

#[derive(Default)]
struct Idles {
    by_key: HashMap<Key, Vec<Idle>>,
    total: usize,
}

/// Counters of the pool, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WarmStats {
    /// Calls served by an idle instance.
    pub hits: u64,
    /// Calls that found none and instantiated.
    pub misses: u64,
    /// Instances dropped instead of kept (poisoned, abandoned, worn out, over a cap, expired).
    pub dropped: u64,
    /// Idle instances now.
    pub idle: usize,
}

/// The idle provider instances of one runtime.
pub(crate) struct WarmPool {
    idles: Mutex<Idles>,
    cap: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    dropped: AtomicU64,
}

impl WarmPool {
    /// A pool that keeps at most `most` instances idle, and no more than a quarter of `slots`
    /// (none for fewer than 4).
    pub(crate) fn new(slots: usize, most: usize) -> Self {
        WarmPool {
            idles: Mutex::default(),
            cap: (slots / 4).min(most),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether the pool keeps anything.
    pub(crate) fn enabled(&self) -> bool {
        self.cap > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idles> {
        self.idles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle instance for `key` made under grants equal to `grants`, with the calls it has
    /// served; counts a hit or a miss.
    pub(crate) fn take(&self, key: &Key, grants: &Arc<Grants>) -> Option<(ProviderInstance, u32)> {
        let mut expired = Vec::new();
        let found = {
            let mut idles = self.lock();
            let Idles { by_key, total } = &mut *idles;
            let mut found = None;
            if let Some(list) = by_key.get_mut(key) {
                // The most recently used first: its memory is the likeliest to be warm in cache.
                while let Some(i) = list.iter().rposition(|e| Arc::ptr_eq(&e.grants, grants) || *e.grants == **grants) {
                    let entry = list.swap_remove(i);
                    *total -= 1;
                    if entry.since.elapsed() < IDLE_TTL {
                        found = Some((entry.instance, entry.uses));
                        break;
                    }
                    expired.push(entry);
                }
                if list.is_empty() {
                    by_key.remove(key);
                }
            }
            found
        };
        self.dropped.fetch_add(expired.len() as u64, Ordering::Relaxed);
        drop(expired);
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `instance` idle for `key` if it is fit for another call; drops it otherwise, or
    /// drops the oldest idle instance of its key or of the pool to make room.
    pub(crate) fn put(&self, key: Key, grants: Arc<Grants>, instance: ProviderInstance, uses: u32) {
        if !self.enabled() || !instance.reusable() || uses >= MAX_USES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let evicted = {
            let mut idles = self.lock();
            let mut evicted = None;
            if let Some(list) = idles.by_key.get_mut(&key)
                && list.len() >= MAX_IDLE_PER_KEY
            {
                evicted = Some(list.remove(0));
                idles.total -= 1;
            } else if idles.total >= self.cap {
                evicted = Self::oldest(&mut idles);
            }
            idles.by_key.entry(key).or_default().push(Idle { instance, grants, uses, since: Instant::now() });
            idles.total += 1;
            evicted
        };
        if evicted.is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes the instance idle the longest.
    fn oldest(idles: &mut Idles) -> Option<Idle> {
        let key = idles
            .by_key
            .iter()
            .filter_map(|(k, l)| l.first().map(|e| (k, e.since)))
            .min_by_key(|(_, since)| *since)
            .map(|(k, _)| k.clone())?;
        let list = idles.by_key.get_mut(&key)?;
        let entry = list.remove(0);
        if list.is_empty() {
            idles.by_key.remove(&key);
        }
        idles.total -= 1;
        Some(entry)
    }

    /// Drops the instance idle the longest, freeing its slot; false when none is idle.
    pub(crate) fn evict_oldest(&self) -> bool {
        let evicted = Self::oldest(&mut self.lock());
        let any = evicted.is_some();
        if any {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        drop(evicted);
        any
    }

    /// Drops the instances idle past [`IDLE_TTL`].
    pub(crate) fn sweep(&self) {
        let mut expired = Vec::new();
        {
            let mut idles = self.lock();
            let Idles { by_key, total } = &mut *idles;
            by_key.retain(|_, list| {
                // Entries are pushed in time order, so the expired ones lead.
                let n = list.iter().take_while(|e| e.since.elapsed() >= IDLE_TTL).count();
                expired.extend(list.drain(..n));
                !list.is_empty()
            });
            *total -= expired.len();
        }
        self.dropped.fetch_add(expired.len() as u64, Ordering::Relaxed);
    }

    /// The counters now.
    pub(crate) fn stats(&self) -> WarmStats {
        WarmStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            idle: self.lock().total,
        }
    }
}

/// Where a [`WarmProvider`] goes back to.
pub(crate) struct Home {
    pub(crate) pool: Arc<WarmPool>,
    pub(crate) key: Key,
    pub(crate) grants: Arc<Grants>,
    pub(crate) uses: u32,
}

/// A provider instance that goes back to the warm pool when dropped, if it is fit for another
/// call (see the module's documentation). Its calls are a [`ProviderInstance`]'s.
pub struct WarmProvider {
    /// Present until the drop hands it back to the pool.
    instance: Option<ProviderInstance>,
    home: Option<Home>,
    plugin: Arc<str>,
    tenant: Arc<str>,
}

impl WarmProvider {
    pub(crate) fn new(instance: ProviderInstance, home: Option<Home>) -> Self {
        let (plugin, tenant) = (instance.plugin_name(), instance.tenant_name());
        WarmProvider { instance: Some(instance), home, plugin, tenant }
    }

    /// An instance that is dropped after use, never kept.
    pub(crate) fn cold(instance: ProviderInstance) -> Self {
        Self::new(instance, None)
    }

    /// Never keep this instance (its guest holds state a next call must not see).
    pub(crate) fn discard(&mut self) {
        self.home = None;
    }

    /// The instance (always there until the drop).
    pub(crate) fn live(&mut self) -> Result<&mut ProviderInstance, CallError> {
        self.instance.as_mut().ok_or_else(|| CallError {
            plugin: self.plugin.clone(),
            tenant: self.tenant.clone(),
            kind: CallErrorKind::Poisoned,
        })
    }

    /// See [`ProviderInstance::models`].
    pub async fn models(&mut self) -> Result<Vec<ModelInfo>, CallError> {
        self.live()?.models().await
    }

    /// See [`ProviderInstance::complete`].
    pub async fn complete(&mut self, request: &CompletionRequest) -> Result<Completion, CallError> {
        self.live()?.complete(request).await
    }

    /// See [`ProviderInstance::embed`].
    pub async fn embed(&mut self, request: &EmbeddingRequest) -> Result<Embeddings, CallError> {
        self.live()?.embed(request).await
    }

    /// Starts a streamed completion that keeps this instance; read it with
    /// [`OwnedChunkStream::next`]. The instance goes back to the pool only if the stream is read
    /// to its end (or its error).
    pub async fn into_stream(mut self, request: &CompletionRequest) -> Result<OwnedChunkStream, CallError> {
        let handle = self.live()?.start_stream(request).await?;
        Ok(OwnedChunkStream::new(self, handle))
    }

    /// See [`crate::Instance::take_outbound_wait`].
    pub fn take_outbound_wait(&mut self) -> Duration {
        self.instance.as_mut().map(ProviderInstance::take_outbound_wait).unwrap_or_default()
    }

    /// Whether the instance is unusable (see [`crate::Instance::is_poisoned`]).
    pub fn is_poisoned(&self) -> bool {
        self.instance.as_ref().is_none_or(ProviderInstance::is_poisoned)
    }
}

impl Drop for WarmProvider {
    fn drop(&mut self) {
        if let (Some(instance), Some(home)) = (self.instance.take(), self.home.take()) {
            home.pool.put(home.key, home.grants, instance, home.uses);
        }
    }
}
