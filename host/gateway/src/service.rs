//! The gateway's request path: admission by the scheduler's fair sharing, the tenant's model
//! table, (the cache, in its own issue), routing over the model's deployments with retries and
//! fallback on retryable errors only, the provider plugin call, and metering off the path.

use crate::cache::{self, ExactCache, Kept};
use crate::meter::Meter;
use crate::openai::{ChatRequest, EmbedRequest, Feature};
use crate::qdrant::{Place, QdrantIndex, StoreError};
use crate::quota::{Limit, Quotas, Refusal, Reservation, Scope, Unit, Used, Window};
use crate::route::{Health, Outcome, Plan};
use crate::semantic::SemanticIndex;
use crate::table::{Deployment, ModelSpec};
use crate::{GatewayError, jitter};
use futures::future::BoxFuture;
use qlayer_db::{Db, QuotaLimits, UsageRecord};
use qlayer_runtime::{
    CallError, CallErrorKind, Completion, CompletionChunk, EmbeddingRequest, Embeddings, Installed, OwnedChunkStream,
    PluginError, Usage, WarmProvider,
};
use qlayer_scheduler::breaker::BreakerPolicy;
use qlayer_scheduler::interactive::{Admission, Permit};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Loads a tenant's installed provider plugins (the service implements it over the
/// marketplace; tests over bundled plugins).
pub trait Providers: Send + Sync {
    /// The provider plugin `plugin` installed for the tenant named `tenant`, with its grants;
    /// an error message naming what is wrong when it is not installed or not a provider.
    fn load<'a>(&'a self, tenant: &'a str, plugin: &'a str) -> BoxFuture<'a, Result<Installed, String>>;
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The tenant's id (model tables and usage are keyed by it).
    pub tenant_id: String,
    /// The tenant's name (installs are keyed by it).
    pub tenant_name: String,
    /// The API key's id.
    pub key_id: String,
}

/// How the gateway behaves.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Retries of one deployment on a retryable error before falling back to the next.
    pub retries: u32,
    /// First retry delay; doubles per retry, with jitter, and never shorter than the upstream's
    /// retry-after.
    pub retry_base: Duration,
    /// A retry-after longer than this moves on to the next deployment instead of waiting.
    pub max_retry_wait: Duration,
    /// When a deployment's circuit opens and for how long.
    pub breaker: BreakerPolicy,
    /// How long a node keeps a tenant's model table and loaded plugins before reading them
    /// again (changes made through this node apply at once; through another node, within this).
    pub table_ttl: Duration,
    /// Model entries every tenant has (the server config's); a tenant's own entry of the same
    /// name wins.
    pub defaults: HashMap<String, Arc<ModelSpec>>,
    /// A plugin every tenant can use (the server's upstream) that serves a model name no table
    /// has, asked for as it is.
    pub passthrough: Option<String>,
    /// How long a node draws on quota leased from the store before it gives back what it has
    /// not used (see [`crate::quota`]).
    pub quota_lease: Duration,
    /// Output tokens reserved against token limits for a request that names no `max_tokens`.
    pub reserve_tokens: u32,
    /// The price table's currency (budgets are in it).
    pub currency: String,
    /// What this node's exact cache may hold, in bytes (0: nothing).
    pub cache_bytes: usize,
    /// The most answers this node's semantic cache keeps (0: none).
    pub semantic_entries: usize,
    /// Where the semantic cache is kept between runs (none: only in memory).
    pub semantic_path: Option<std::path::PathBuf>,
    /// A Qdrant (its gRPC URL) that holds the semantic cache instead, shared by the nodes.
    pub qdrant: Option<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            retries: 1,
            retry_base: Duration::from_millis(100),
            max_retry_wait: Duration::from_secs(5),
            breaker: BreakerPolicy { failures: 3, cooldown_ms: 5_000, max_cooldown_ms: 60_000 },
            table_ttl: Duration::from_secs(1),
            defaults: HashMap::new(),
            passthrough: None,
            quota_lease: Duration::from_secs(2),
            reserve_tokens: 4_096,
            currency: "USD".into(),
            cache_bytes: 64 << 20,
            semantic_entries: 10_000,
            semantic_path: None,
            qdrant: None,
        }
    }
}

type Table = Arc<HashMap<String, Arc<ModelSpec>>>;

/// The gateway of one node.
pub struct Gateway {
    db: Db,
    providers: Arc<dyn Providers>,
    admission: Arc<Admission>,
    health: Arc<Health>,
    meter: Meter,
    config: GatewayConfig,
    tables: Mutex<HashMap<String, (Instant, Table)>>,
    quotas: Arc<Quotas>,
    cache: Arc<ExactCache>,
    semantic: SemanticStore,
    limits: Mutex<HashMap<String, (Instant, Arc<TenantLimits>)>>,
    installed: Mutex<HashMap<(String, String), (Instant, Installed)>>,
    /// The passthrough upstream's model list, when it was last asked.
    passthrough_listed: Mutex<Option<(Instant, Vec<String>)>>,
}

/// How long the passthrough upstream's model list is kept before it is asked again.
const PASSTHROUGH_MODELS_TTL: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("config", &self.config).finish()
    }
}

/// A model of a tenant's table as an agent's `llm`: each completion takes the gateway's whole
/// path (admission, the tenant's limits and budgets, the cache, routing over the model's
/// deployments, metering at the table's prices) as `caller`, whose key id names the run.
pub struct TableModel {
    gateway: Arc<Gateway>,
    caller: Caller,
    model: String,
    timeout: Duration,
    /// What its answers cost at the table's prices (cache hits cost nothing).
    cost_nanos: std::sync::atomic::AtomicU64,
}

impl TableModel {
    /// Completions of `model` for `caller`, each given at most `timeout`.
    pub fn new(gateway: Arc<Gateway>, caller: Caller, model: &str, timeout: Duration) -> Self {
        TableModel { gateway, caller, model: model.to_string(), timeout, cost_nanos: Default::default() }
    }

    /// What its answers have cost so far, in billionths of the price table's currency.
    pub fn cost_nanos(&self) -> u64 {
        self.cost_nanos.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The price table's currency.
    pub fn currency(&self) -> &str {
        self.gateway.currency()
    }
}

impl qlayer_runtime::LlmHandler for TableModel {
    fn complete<'a>(
        &'a self,
        _tenant: &'a str,
        request: qlayer_runtime::CompletionRequest,
    ) -> BoxFuture<'a, Result<Completion, PluginError>> {
        Box::pin(async move {
            let chat = ChatRequest {
                endpoint: "agent",
                model: self.model.clone(),
                request,
                stream: false,
                include_usage: false,
                unused: vec![],
                cache: cache::Directives::default(),
            };
            let started = Instant::now();
            match self.gateway.complete(&self.caller, &chat, started, started + self.timeout).await {
                Ok(routed) => {
                    if !matches!(routed.cache, cache::Outcome::Hit | cache::Outcome::SemanticHit) {
                        let usage = routed.value.usage;
                        let nanos =
                            routed.deployment.cost_nanos(usage.prompt_tokens.into(), usage.completion_tokens.into());
                        self.cost_nanos.fetch_add(nanos.max(0) as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(routed.value)
                }
                Err(e) => Err(e.to_plugin_error()),
            }
        })
    }
}

impl Gateway {
    /// Whether `model` names a model `tenant_id` can ask for: in its table, the server's
    /// defaults, or (any valid name) the passthrough upstream's.
    pub async fn has_model(&self, tenant_id: &str, model: &str) -> Result<bool, GatewayError> {
        Ok(self.table(tenant_id).await?.contains_key(model)
            || self.config.defaults.contains_key(model)
            || (self.config.passthrough.is_some() && crate::table::valid_model_name(model)))
    }
}

/// The contract a provider speaks, and what it can express.
fn contract_supports(installed: &Installed, _feature: Feature) -> bool {
    // Every feature a request may need is one 0.2.0 added (see `qlayer_runtime::Unexpressible`).
    installed.plugin().contract() != Some(qlayer_runtime::Contract::V0_1)
}

/// What a routed call produced, and where.
#[derive(Debug)]
pub struct Routed<T> {
    /// The answer.
    pub value: T,
    /// The deployment that gave it.
    pub deployment: Deployment,
    /// Time spent inside the provider call (the rest of a request's time is the host's).
    pub upstream: Duration,
    /// Where the request's time went, stage by stage.
    pub timing: Timing,
    /// OpenAI's `x-ratelimit-*` headers of the limits the request was held to.
    pub rate_headers: Vec<(&'static str, String)>,
    /// What the cache did.
    pub cache: cache::Outcome,
    /// What the answering deployment's own limits hold of the request.
    reservation: Option<Reservation>,
}

/// Where a gateway request's time went (the `Server-Timing` header reports it). Stages of
/// failed attempts before the answering one count in `plugin`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// Waiting for the scheduler's admission (fair share, the tenant's concurrency).
    pub admit: Duration,
    /// Finding the model in the tenant's table.
    pub table: Duration,
    /// Taking a provider instance: a warm one, or instantiating one.
    pub instance: Duration,
    /// The provider call, less the instance and the upstream's wait: the guest's own work, its
    /// request and response crossing into and out of the sandbox, retries and backoff.
    pub plugin: Duration,
    /// The upstream's answer: from sending its request to its response head.
    pub upstream: Duration,
    /// Handing the usage record to the meter.
    pub meter: Duration,
}

/// A provider call's answer with the time it took to get an instance and the time its
/// requests waited for the upstream.
struct Timed<T> {
    value: T,
    instance: Duration,
    upstream: Duration,
}

/// A stream that has produced its first chunk (fallback is over), with its metering: dropping
/// it before the end (the client left) stops the provider and meters what was spent.
pub struct LiveStream {
    source: Source,
    first: Option<CompletionChunk>,
    record: Option<UsageRecord>,
    deployment: Deployment,
    meter: Meter,
    started: Instant,
    prompt_estimate: u32,
    text_bytes: usize,
    usage: Option<Usage>,
    upstream: Duration,
    timing: Timing,
    /// What the caller's and the deployment's limits hold of the stream, settled at its end.
    held: Vec<Reservation>,
    rate_headers: Vec<(&'static str, String)>,
    cache: cache::Outcome,
    /// The chunks so far, to keep when the stream ends cleanly (a miss the model caches).
    recording: Option<Recording>,
    _permit: Permit,
}

/// Where a stream's chunks come from.
enum Source {
    /// A provider instance.
    Live(OwnedChunkStream),
    /// The cache.
    Replay(std::vec::IntoIter<CompletionChunk>),
}

/// A stream being kept for the cache.
struct Recording {
    cache: Arc<ExactCache>,
    key: [u8; 32],
    ttl: Duration,
    chunks: Vec<CompletionChunk>,
    weight: usize,
    /// Where the semantic cache keeps it too.
    semantic: Option<Semantic>,
}

impl std::fmt::Debug for LiveStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStream").field("deployment", &self.deployment.key()).finish()
    }
}

impl LiveStream {
    /// Where the time to its first chunk went.
    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// OpenAI's `x-ratelimit-*` headers of the caller's limits.
    pub fn rate_headers(&self) -> &[(&'static str, String)] {
        &self.rate_headers
    }

    /// What the cache did.
    pub fn cache(&self) -> cache::Outcome {
        self.cache
    }

    /// The deployment serving it.
    pub fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    /// Time spent inside provider calls so far.
    pub fn upstream(&self) -> Duration {
        self.upstream
    }

    /// The next chunk; `Ok(None)` at a clean end. An error ends the stream (no end marker).
    pub async fn next(&mut self) -> Result<Option<CompletionChunk>, GatewayError> {
        let chunk = match self.first.take() {
            Some(first) => Ok(Some(first)),
            None => match &mut self.source {
                Source::Live(stream) => {
                    let began = Instant::now();
                    let chunk = stream.next().await;
                    self.upstream += began.elapsed();
                    chunk
                }
                Source::Replay(chunks) => Ok(chunks.next()),
            },
        };
        match chunk {
            Ok(Some(c)) => {
                self.text_bytes += c.delta.len();
                if let Some(u) = c.usage {
                    self.usage = Some(u);
                }
                if let Some(r) = &mut self.recording {
                    r.weight += cache::chunk_weight(&c);
                    if r.weight > cache::MAX_ENTRY_BYTES {
                        self.recording = None;
                    } else {
                        r.chunks.push(c.clone());
                    }
                }
                Ok(Some(c))
            }
            Ok(None) => {
                self.finish("ok");
                Ok(None)
            }
            Err(e) => {
                let error = GatewayError::from_call(&self.deployment, &e);
                self.finish(error.code.as_deref().unwrap_or("error"));
                Err(error)
            }
        }
    }

    fn finish(&mut self, status: &str) {
        let Some(mut record) = self.record.take() else { return };
        if status == "ok"
            && let Some(r) = self.recording.take()
        {
            let kept = Kept::Stream(r.chunks);
            if let Some(semantic) = r.semantic {
                semantic.keep(kept.clone(), self.deployment.clone(), r.ttl);
            }
            r.cache.put(r.key, kept, self.deployment.clone(), r.ttl);
        }
        // What the upstream reported; else an estimate (about 4 bytes a token), so a stream cut
        // short or abandoned is still charged for what it used. A replay from the cache used
        // nothing upstream.
        let usage = if self.cache.is_hit() {
            Usage { prompt_tokens: 0, completion_tokens: 0 }
        } else {
            self.usage.unwrap_or(Usage {
                prompt_tokens: self.prompt_estimate,
                completion_tokens: self.text_bytes.div_ceil(4) as u32,
            })
        };
        record.prompt_tokens = i64::from(usage.prompt_tokens);
        record.completion_tokens = i64::from(usage.completion_tokens);
        let used = used(&self.deployment, usage);
        record.cost_nanos = used.spend as i64;
        record.latency_us = self.started.elapsed().as_micros() as i64;
        record.status = status.to_string();
        self.meter.record(record);
        for held in self.held.drain(..) {
            held.settle(used);
        }
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        self.finish("client_closed");
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// About 4 bytes a token: what a request is charged for when the upstream says nothing.
fn estimate_tokens(text_bytes: usize) -> u32 {
    text_bytes.div_ceil(4).min(u32::MAX as usize) as u32
}

impl Gateway {
    /// A gateway over `db` (model tables, usage), admitting through `admission` (the
    /// scheduler's) and loading plugins from `providers`.
    pub fn new(
        db: Db,
        providers: Arc<dyn Providers>,
        admission: Arc<Admission>,
        config: GatewayConfig,
    ) -> Arc<Gateway> {
        Arc::new(Gateway {
            meter: Meter::start(db.clone()),
            quotas: Quotas::new(db.clone(), config.quota_lease),
            cache: Arc::new(ExactCache::new(config.cache_bytes)),
            semantic: SemanticStore::start(&config),
            limits: Mutex::new(HashMap::new()),
            db,
            providers,
            admission,
            health: Arc::new(Health::new(config.breaker)),
            config,
            tables: Mutex::new(HashMap::new()),
            installed: Mutex::new(HashMap::new()),
            passthrough_listed: Mutex::new(None),
        })
    }

    /// The metering channel.
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// The store.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Writes buffered usage records; for a clean shutdown.
    pub async fn shutdown(&self) {
        self.meter.close().await;
        if let SemanticStore::Embedded(index) = &self.semantic {
            save_semantic(index.clone()).await;
        }
    }

    /// Forgets what this node read of `tenant_id`'s table (after a change through it).
    pub fn invalidate(&self, tenant_id: &str) {
        self.tables.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant_id);
    }

    /// The tenant's model table.
    pub async fn table(&self, tenant_id: &str) -> Result<Table, GatewayError> {
        if let Some((at, table)) = self.tables.lock().unwrap_or_else(|p| p.into_inner()).get(tenant_id)
            && at.elapsed() < self.config.table_ttl
        {
            return Ok(table.clone());
        }
        let rows = self.db.models(tenant_id).await.map_err(GatewayError::internal)?;
        let mut table = HashMap::with_capacity(rows.len());
        for row in rows {
            match serde_json::from_str::<ModelSpec>(&row.spec) {
                Ok(spec) => {
                    table.insert(row.name, Arc::new(spec));
                }
                Err(e) => {
                    tracing::error!(tenant = tenant_id, model = %row.name, "a stored model entry is unreadable: {e}")
                }
            }
        }
        let table = Arc::new(table);
        self.tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant_id.to_string(), (Instant::now(), table.clone()));
        Ok(table)
    }

    /// The models the server's passthrough upstream serves (none without one, or when it does
    /// not answer: the list is a convenience, and its failure is logged).
    pub async fn passthrough_models(&self, caller: &Caller) -> Vec<String> {
        let Some(plugin) = &self.config.passthrough else { return Vec::new() };
        // The list is the same for every tenant (the server's upstream), and SDKs ask for it
        // often: kept for a few seconds; a failure is not kept.
        if let Some((at, models)) = &*self.passthrough_listed.lock().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < PASSTHROUGH_MODELS_TTL
        {
            return models.clone();
        }
        let listed = async {
            let installed = self.installed(&caller.tenant_name, plugin).await.map_err(|e| e.to_string())?;
            let mut instance = installed.warm_provider(&caller.tenant_name).await.map_err(|e| e.to_string())?;
            instance.models().await.map_err(|e| e.to_string())
        };
        match listed.await {
            Ok(models) => {
                let models: Vec<String> =
                    models.into_iter().map(|m| m.id).filter(|id| crate::table::valid_model_name(id)).collect();
                *self.passthrough_listed.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), models.clone()));
                models
            }
            Err(e) => {
                tracing::warn!(plugin = %plugin, "listing the upstream's models failed: {e}");
                Vec::new()
            }
        }
    }

    /// The server's default model entries.
    pub fn defaults(&self) -> &HashMap<String, Arc<ModelSpec>> {
        &self.config.defaults
    }

    /// The entry of model `name`: the tenant's, else the server's default, else the upstream's
    /// model of that name when the server fronts one; else OpenAI's 404.
    async fn spec(&self, caller: &Caller, name: &str) -> Result<Arc<ModelSpec>, GatewayError> {
        if let Some(spec) = self.table(&caller.tenant_id).await?.get(name) {
            return Ok(spec.clone());
        }
        if let Some(spec) = self.config.defaults.get(name) {
            return Ok(spec.clone());
        }
        match &self.config.passthrough {
            Some(plugin) if crate::table::valid_model_name(name) => Ok(Arc::new(ModelSpec {
                strategy: crate::table::Strategy::Priority,
                deployments: vec![Deployment::of(plugin, name)],
                cache: None,
            })),
            _ => Err(GatewayError::model_not_found(name)),
        }
    }

    /// Checks a table entry, and that each deployment's plugin is an installed provider, then
    /// stores it.
    pub async fn put_model(
        &self,
        caller: &Caller,
        name: &str,
        spec: &ModelSpec,
    ) -> Result<qlayer_db::ModelEntry, GatewayError> {
        spec.check(name).map_err(GatewayError::invalid)?;
        for (i, d) in spec.deployments.iter().enumerate() {
            self.providers
                .load(&caller.tenant_name, &d.plugin)
                .await
                .map_err(|e| GatewayError::invalid(format!("deployments[{i}].plugin: {e}")).param("deployments"))?;
        }
        let text = serde_json::to_string(spec).map_err(GatewayError::internal)?;
        let entry = self.db.put_model(&caller.tenant_id, name, &text).await.map_err(GatewayError::internal)?;
        self.invalidate(&caller.tenant_id);
        Ok(entry)
    }

    /// Removes model `name`; 404 when the tenant has none.
    pub async fn delete_model(&self, caller: &Caller, name: &str) -> Result<(), GatewayError> {
        let removed = self.db.delete_model(&caller.tenant_id, name).await.map_err(GatewayError::internal)?;
        self.invalidate(&caller.tenant_id);
        if removed { Ok(()) } else { Err(GatewayError::model_not_found(name)) }
    }

    async fn installed(&self, tenant: &str, plugin: &str) -> Result<Installed, String> {
        let key = (tenant.to_string(), plugin.to_string());
        if let Some((at, installed)) = self.installed.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < self.config.table_ttl
        {
            return Ok(installed.clone());
        }
        let installed = self.providers.load(tenant, plugin).await?;
        let mut cache = self.installed.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 10_000 {
            cache.retain(|_, (at, _)| at.elapsed() < self.config.table_ttl);
        }
        cache.insert(key, (Instant::now(), installed.clone()));
        Ok(installed)
    }

    fn record(&self, caller: &Caller, endpoint: &str, model: &str) -> UsageRecord {
        UsageRecord {
            tenant_id: caller.tenant_id.clone(),
            key_id: caller.key_id.clone(),
            endpoint: endpoint.to_string(),
            model: model.to_string(),
            deployment: String::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_nanos: 0,
            latency_us: 0,
            ttft_us: None,
            cache: "off".to_string(),
            status: "ok".to_string(),
            at: now_ms(),
        }
    }

    fn meter_failure(&self, mut record: UsageRecord, started: Instant, e: &GatewayError) {
        record.latency_us = started.elapsed().as_micros() as i64;
        record.status = e.code.clone().unwrap_or_else(|| format!("http_{}", e.status));
        self.meter.record(record);
    }

    /// Routes one call over the deployments of `spec` that can serve it: in the strategy's
    /// order, skipping cooling ones, retrying a retryable error with backoff, then falling back
    /// to the next; anything else fails at once. `call` makes one attempt on an instance.
    async fn route<T, F, Fut>(
        &self,
        caller: &Caller,
        ask: Ask<'_>,
        deadline: Instant,
        mut call: F,
    ) -> Result<Routed<T>, GatewayError>
    where
        F: FnMut(Installed, String) -> Fut,
        Fut: std::future::Future<Output = Result<Timed<T>, CallError>>,
    {
        let Ask { model, spec, needs, tokens } = ask;
        let routing = Instant::now();
        let plan = self.health.plan(&caller.tenant_id, spec.strategy, &spec.deployments, now_ms());
        let Plan { order, cooling } = plan;
        if order.is_empty() {
            return Err(GatewayError::cooling(model, &cooling, now_ms()));
        }
        let mut last: Option<GatewayError> = None;
        let mut capable = 0;
        for i in order {
            let d = &spec.deployments[i];
            let installed = match self.installed(&caller.tenant_name, &d.plugin).await {
                Ok(installed) => installed,
                Err(e) => {
                    last = Some(GatewayError::new(
                        502,
                        "deployment_unavailable",
                        format!("deployment `{}`: {e}", d.key()),
                    ));
                    continue;
                }
            };
            if let Some(f) = needs.iter().find(|f| !contract_supports(&installed, **f)) {
                last.get_or_insert(GatewayError::unsupported(*f, model, d));
                continue;
            }
            capable += 1;
            let mut attempt = 0;
            loop {
                // The upstream's own quota: a deployment at its limit is passed over like a
                // cooling one.
                let held = match self.reserve_deployment(caller, d, tokens).await {
                    Ok(held) => held,
                    Err(refusal) => {
                        last = Some(self.refused(&refusal, "max_tokens"));
                        break;
                    }
                };
                let in_flight = self.health.start(&caller.tenant_id, d);
                let began = Instant::now();
                let result = call(installed.clone(), d.model.clone()).await;
                let took = began.elapsed();
                drop(in_flight);
                match result {
                    Ok(Timed { value, instance, upstream }) => {
                        self.health.finish(&caller.tenant_id, d, Outcome::Success, took.as_secs_f64() * 1e3, now_ms());
                        let plugin = routing.elapsed().saturating_sub(instance + upstream);
                        let timing = Timing { instance, plugin, upstream, ..Timing::default() };
                        return Ok(Routed {
                            value,
                            deployment: d.clone(),
                            upstream: took,
                            timing,
                            rate_headers: Vec::new(),
                            cache: cache::Outcome::Off,
                            reservation: held,
                        });
                    }
                    Err(e) => {
                        if let Some(held) = held {
                            held.settle(Used::default());
                        }
                        let error = GatewayError::from_call(d, &e);
                        let outcome = if matches!(e.kind, CallErrorKind::Plugin(PluginError::InvalidInput(_))) {
                            Outcome::Neutral
                        } else {
                            Outcome::Failure
                        };
                        self.health.finish(&caller.tenant_id, d, outcome, 0.0, now_ms());
                        if !e.is_retryable() {
                            tracing::info!(tenant = %caller.tenant_name, deployment = %d.key(), "not retried: {e}");
                            return Err(error);
                        }
                        tracing::warn!(tenant = %caller.tenant_name, deployment = %d.key(), attempt, "retryable: {e}");
                        let asked = match &e.kind {
                            CallErrorKind::Plugin(PluginError::RateLimited(Some(ms))) => {
                                Some(Duration::from_millis(*ms))
                            }
                            _ => None,
                        };
                        last = Some(error);
                        if attempt >= self.config.retries {
                            break;
                        }
                        attempt += 1;
                        let wait =
                            jitter(self.config.retry_base * 2u32.pow(attempt - 1)).max(asked.unwrap_or_default());
                        if wait > self.config.max_retry_wait || Instant::now() + wait >= deadline {
                            break;
                        }
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        if capable == 0
            && let Some(f) = needs.iter().copied().next()
        {
            return Err(GatewayError::unsupported_anywhere(f, model, spec));
        }
        Err(last.unwrap_or_else(|| GatewayError::cooling(model, &cooling, now_ms())))
    }

    /// An estimate of the input tokens of `chat` for its model (Anthropic's `count_tokens`,
    /// which Claude Code calls to manage its context): about four bytes of text, tool calls and
    /// tool definitions a token, as every estimate here is. A model the tenant does not have is
    /// 404, as for a completion; nothing is called upstream or metered.
    pub async fn count_tokens(&self, caller: &Caller, chat: &ChatRequest) -> Result<u32, GatewayError> {
        self.spec(caller, &chat.model).await?;
        Ok(estimate_tokens(chat.prompt_bytes()))
    }

    /// The start every request shares: its admission (waiting for its fair turn), its usage
    /// record, its model's entry (a miss is metered and answered 404), and the guard that meters
    /// it if the client leaves before an answer.
    async fn begin(
        &self,
        caller: &Caller,
        endpoint: &str,
        model: &str,
        prompt: Prompt,
        max_out: u32,
        started: Instant,
    ) -> Result<Begun<'_>, GatewayError> {
        let admitting = Instant::now();
        let permit = self.admission.admit(&caller.tenant_id).await;
        let admit = admitting.elapsed();
        let record = self.record(caller, endpoint, model);
        let looking = Instant::now();
        let spec = match self.spec(caller, model).await {
            Ok(spec) => spec,
            Err(e) => {
                self.meter_failure(record, started, &e);
                return Err(e);
            }
        };
        let prompt_estimate = estimate_tokens(prompt.bytes);
        // Limits hold the most the request can use, so that what they admit can never pass
        // them; each settles to what it used.
        let tokens = prompt.bound + u64::from(max_out);
        let reservation = match self.reserve(caller, &spec, 1, prompt.bound, u64::from(max_out)).await {
            Ok(reservation) => reservation,
            Err(e) => {
                self.meter_failure(record, started, &e);
                return Err(e);
            }
        };
        let rate_headers = self.rate_headers(&reservation);
        let guard = AbandonGuard {
            meter: &self.meter,
            record: Some(record.clone()),
            started,
            prompt_estimate,
            reservation: Some(reservation),
        };
        let timing = Timing { admit, table: looking.elapsed(), ..Timing::default() };
        Ok(Begun { permit, record, spec, guard, prompt_estimate, tokens, rate_headers, timing })
    }

    /// Meters an answered request; the time it took.
    fn meter_answer(&self, mut record: UsageRecord, d: &Deployment, usage: Usage, started: Instant) -> Duration {
        let metering = Instant::now();
        record.deployment = d.key();
        record.prompt_tokens = i64::from(usage.prompt_tokens);
        record.completion_tokens = i64::from(usage.completion_tokens);
        record.cost_nanos = d.cost_nanos(u64::from(usage.prompt_tokens), u64::from(usage.completion_tokens));
        record.latency_us = started.elapsed().as_micros() as i64;
        self.meter.record(record);
        metering.elapsed()
    }

    /// A whole chat completion.
    pub async fn complete(
        &self,
        caller: &Caller,
        chat: &ChatRequest,
        started: Instant,
        deadline: Instant,
    ) -> Result<Routed<Completion>, GatewayError> {
        let prompt = Prompt::of(chat);
        let max_out = chat.request.max_tokens.unwrap_or(self.config.reserve_tokens);
        let Begun { permit: _permit, mut record, spec, guard, timing, tokens, rate_headers, .. } =
            self.begin(caller, chat.endpoint, &chat.model, prompt, max_out, started).await?;
        let plan = self.cache_plan(caller, chat, &spec, false);
        let (found, semantic) = self.cached(caller, chat, &spec, &plan, false, deadline).await;
        if let Some((Kept::Whole(value), deployment, outcome)) = found {
            settle([guard.defuse(), None], Used::default());
            record.cache = outcome.as_str().into();
            let meter =
                self.meter_answer(record, &deployment, Usage { prompt_tokens: 0, completion_tokens: 0 }, started);
            return Ok(Routed {
                value,
                deployment,
                upstream: Duration::ZERO,
                timing: Timing { meter, ..timing },
                rate_headers,
                cache: outcome,
                reservation: None,
            });
        }
        record.cache = plan.outcome.as_str().into();
        let routed = self
            .route(
                caller,
                Ask { model: &chat.model, spec: &spec, needs: &chat.needs(), tokens },
                deadline,
                |installed: Installed, model: String| async move {
                    let mut request = chat.request.clone();
                    request.model = model;
                    let (mut provider, instance) = take_instance(&installed, &caller.tenant_name).await?;
                    let value = provider.complete(&request).await?;
                    Ok(Timed { value, instance, upstream: provider.take_outbound_wait() })
                },
            )
            .await;
        let held = guard.defuse();
        match routed {
            Ok(mut routed) => {
                if let Some(ttl) = plan.store {
                    let kept = Kept::Whole(routed.value.clone());
                    if let Some(semantic) = semantic {
                        semantic.keep(kept.clone(), routed.deployment.clone(), ttl);
                    }
                    self.cache.put(plan.key, kept, routed.deployment.clone(), ttl);
                }
                let meter = self.meter_answer(record, &routed.deployment, routed.value.usage, started);
                settle([held, routed.reservation.take()], used(&routed.deployment, routed.value.usage));
                routed.timing = Timing { meter, ..timing.with(routed.timing) };
                routed.rate_headers = rate_headers;
                routed.cache = plan.outcome;
                Ok(routed)
            }
            Err(e) => {
                settle([held, None], Used::default());
                self.meter_failure(record, started, &e);
                Err(e)
            }
        }
    }

    /// A streamed chat completion, once its first chunk has come: until then a failing
    /// deployment falls back to the next; after it, never.
    pub async fn stream(
        &self,
        caller: &Caller,
        chat: &ChatRequest,
        started: Instant,
        deadline: Instant,
    ) -> Result<LiveStream, GatewayError> {
        let prompt = Prompt::of(chat);
        let max_out = chat.request.max_tokens.unwrap_or(self.config.reserve_tokens);
        let Begun { permit, mut record, spec, guard, prompt_estimate, tokens, rate_headers, timing } =
            self.begin(caller, chat.endpoint, &chat.model, prompt, max_out, started).await?;
        let plan = self.cache_plan(caller, chat, &spec, true);
        let (found, semantic) = self.cached(caller, chat, &spec, &plan, true, deadline).await;
        if let Some((Kept::Stream(chunks), deployment, outcome)) = found {
            settle([guard.defuse(), None], Used::default());
            record.cache = outcome.as_str().into();
            record.deployment = deployment.key();
            record.ttft_us = Some(started.elapsed().as_micros() as i64);
            return Ok(LiveStream {
                source: Source::Replay(chunks.into_iter()),
                first: None,
                record: Some(record),
                deployment,
                meter: self.meter.clone(),
                started,
                prompt_estimate,
                text_bytes: 0,
                usage: None,
                upstream: Duration::ZERO,
                timing,
                held: Vec::new(),
                rate_headers,
                cache: outcome,
                recording: None,
                _permit: permit,
            });
        }
        record.cache = plan.outcome.as_str().into();
        let routed = self
            .route(
                caller,
                Ask { model: &chat.model, spec: &spec, needs: &chat.needs(), tokens },
                deadline,
                |installed: Installed, model: String| async move {
                    let mut request = chat.request.clone();
                    request.model = model;
                    let (provider, instance) = take_instance(&installed, &caller.tenant_name).await?;
                    let mut stream = provider.into_stream(&request).await?;
                    // The first chunk decides: an upstream that fails before it can still fall back.
                    let first = stream.next().await?;
                    let upstream = stream.take_outbound_wait();
                    Ok(Timed { value: (stream, first), instance, upstream })
                },
            )
            .await;
        let held = guard.defuse();
        match routed {
            Ok(mut routed) => {
                let held = [held, routed.reservation.take()].into_iter().flatten().collect();
                let (stream, first) = routed.value;
                record.deployment = routed.deployment.key();
                record.ttft_us = Some(started.elapsed().as_micros() as i64);
                Ok(LiveStream {
                    source: Source::Live(stream),
                    first,
                    record: Some(record),
                    deployment: routed.deployment,
                    meter: self.meter.clone(),
                    started,
                    prompt_estimate,
                    text_bytes: 0,
                    usage: None,
                    upstream: routed.upstream,
                    timing: timing.with(routed.timing),
                    held,
                    rate_headers,
                    cache: plan.outcome,
                    recording: plan.store.map(|ttl| Recording {
                        cache: self.cache.clone(),
                        key: plan.key,
                        ttl,
                        chunks: Vec::new(),
                        weight: 0,
                        semantic,
                    }),
                    _permit: permit,
                })
            }
            Err(e) => {
                settle([held, None], Used::default());
                self.meter_failure(record, started, &e);
                Err(e)
            }
        }
    }

    /// Embeddings.
    pub async fn embed(
        &self,
        caller: &Caller,
        embed: &EmbedRequest,
        started: Instant,
        deadline: Instant,
    ) -> Result<Routed<Embeddings>, GatewayError> {
        let bytes = embed.inputs.iter().map(String::len).sum();
        let prompt = Prompt { bytes, bound: crate::request::prompt_bound(bytes, embed.inputs.len(), 0, 0) };
        let Begun { permit: _permit, record, spec, guard, timing, tokens, rate_headers, .. } =
            self.begin(caller, "embeddings", &embed.model, prompt, 0, started).await?;
        let ask = Ask { model: &embed.model, spec: &spec, needs: &[], tokens };
        let routed = self.route_embeddings(caller, ask, &embed.inputs, deadline).await;
        let held = guard.defuse();
        match routed {
            Ok(mut routed) => {
                let usage = Usage { prompt_tokens: routed.value.usage.prompt_tokens, completion_tokens: 0 };
                let meter = self.meter_answer(record, &routed.deployment, usage, started);
                settle([held, routed.reservation.take()], used(&routed.deployment, usage));
                routed.timing = Timing { meter, ..timing.with(routed.timing) };
                routed.rate_headers = rate_headers;
                Ok(routed)
            }
            Err(e) => {
                settle([held, None], Used::default());
                self.meter_failure(record, started, &e);
                Err(e)
            }
        }
    }
}

/// A tenant's limits and its keys', as a node last read them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TenantLimits {
    /// The tenant's own.
    pub tenant: QuotaLimits,
    /// Its keys', by key id.
    pub keys: HashMap<String, QuotaLimits>,
}

/// The limits of `limits` for `scope`, each with what `requests` (1, or 0 for a call the gateway
/// makes on a request's behalf) of `tokens` costing up to `spend` need of it.
fn needs_of(scope: Scope, limits: &QuotaLimits, requests: u64, tokens: u64, spend: u64, needs: &mut Vec<(Limit, u64)>) {
    let max = |v: Option<i64>| v.filter(|v| *v > 0).map(|v| v as u64);
    for (unit, window, limit, need) in [
        (Unit::Requests, Window::Minute, max(limits.rpm), requests),
        (Unit::Tokens, Window::Minute, max(limits.tpm), tokens),
        (Unit::Spend, Window::Day, max(limits.daily_nanos), spend),
        (Unit::Spend, Window::Month, max(limits.monthly_nanos), spend),
    ] {
        if let Some(max) = limit {
            needs.push((Limit { scope: scope.clone(), unit, window, max }, need));
        }
    }
}

/// What a request used of its deployment: tokens and their cost.
fn used(d: &Deployment, usage: Usage) -> Used {
    let (prompt, completion) = (u64::from(usage.prompt_tokens), u64::from(usage.completion_tokens));
    Used { tokens: prompt + completion, spend: d.cost_nanos(prompt, completion).max(0) as u64 }
}

/// Settles what a request holds of its limits.
fn settle(held: [Option<Reservation>; 2], used: Used) {
    for reservation in held.into_iter().flatten() {
        reservation.settle(used);
    }
}

/// A duration as OpenAI writes its resets: `20ms`, `6s`, `1m2s`.
fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}s", ms.div_ceil(1_000)),
        _ => {
            let s = ms.div_ceil(1_000);
            format!("{}m{}s", s / 60, s % 60)
        }
    }
}

impl Gateway {
    /// Forgets what this node read of `tenant_id`'s limits (after a change through it).
    pub fn invalidate_limits(&self, tenant_id: &str) {
        self.limits.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant_id);
    }

    /// The tenant's limits and its keys', kept for the table's time.
    pub async fn tenant_limits(&self, tenant_id: &str) -> Result<Arc<TenantLimits>, GatewayError> {
        if let Some((at, limits)) = self.limits.lock().unwrap_or_else(|p| p.into_inner()).get(tenant_id)
            && at.elapsed() < self.config.table_ttl
        {
            return Ok(limits.clone());
        }
        let rows = self.db.quota_limits(tenant_id).await.map_err(GatewayError::internal)?;
        let mut limits = TenantLimits::default();
        for (key_id, row) in rows {
            if key_id.is_empty() {
                limits.tenant = row;
            } else {
                limits.keys.insert(key_id, row);
            }
        }
        let limits = Arc::new(limits);
        self.limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant_id.to_string(), (Instant::now(), limits.clone()));
        Ok(limits)
    }

    /// The price table's currency.
    pub fn currency(&self) -> &str {
        &self.config.currency
    }

    /// Holds `requests` (1, or 0 for a call the gateway makes on a request's behalf) of at most
    /// `prompt` tokens asking for up to `max_out` to the tenant's and the key's limits: all of
    /// them, or a refusal naming the one that is full. Spend is held at the model's dearest
    /// deployment.
    async fn reserve(
        &self,
        caller: &Caller,
        spec: &ModelSpec,
        requests: u64,
        prompt: u64,
        max_out: u64,
    ) -> Result<Reservation, GatewayError> {
        let limits = self.tenant_limits(&caller.tenant_id).await?;
        let key = limits.keys.get(&caller.key_id);
        if limits.tenant.is_empty() && key.is_none_or(QuotaLimits::is_empty) {
            return Ok(Reservation::none(&self.quotas));
        }
        let tokens = prompt + max_out;
        let spend = spec.deployments.iter().map(|d| d.cost_nanos(prompt, max_out).max(0) as u64).max().unwrap_or(0);
        let mut needs = Vec::new();
        needs_of(Scope::Tenant(caller.tenant_id.clone()), &limits.tenant, requests, tokens, spend, &mut needs);
        if let Some(key) = key {
            needs_of(Scope::Key(caller.key_id.clone()), key, requests, tokens, spend, &mut needs);
        }
        self.quotas.reserve(needs).await.map_err(|refusal| self.refused(&refusal, "max_tokens"))
    }

    /// Holds one attempt on deployment `d` to its own limits (`rpm`, `tpm`); `None` when it has
    /// none.
    async fn reserve_deployment(
        &self,
        caller: &Caller,
        d: &Deployment,
        tokens: u64,
    ) -> Result<Option<Reservation>, Refusal> {
        if d.rpm.is_none() && d.tpm.is_none() {
            return Ok(None);
        }
        let scope = Scope::Deployment { tenant: caller.tenant_id.clone(), deployment: d.key() };
        let limits = QuotaLimits { rpm: d.rpm.map(i64::from), tpm: d.tpm.map(i64::from), ..QuotaLimits::default() };
        let mut needs = Vec::new();
        needs_of(scope, &limits, 1, tokens, 0, &mut needs);
        self.quotas.reserve(needs).await.map(Some)
    }

    /// What a refusal means for the client: 429 with `Retry-After` and OpenAI's headers for a
    /// rate limit; 429 `budget_exceeded` saying when the budget resets; 400 `request_too_large`
    /// for a request that could never fit (`field` is what to lower).
    fn refused(&self, r: &Refusal, field: &str) -> GatewayError {
        let what = r.limit.describe(&self.config.currency);
        let kind = match &r.limit.scope {
            Scope::Tenant(_) => "tenant",
            Scope::Key(_) => "key",
            Scope::Deployment { .. } => "deployment",
        };
        let unit = match r.limit.unit {
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
            Unit::Spend => "spend",
        };
        metrics::counter!("qlayer_gateway_limit_refusals_total", "scope" => kind, "unit" => unit).increment(1);
        let Some(wait) = r.retry_after else {
            let needed = match r.limit.unit {
                Unit::Spend => format!("may cost up to {} {}", crate::quota::money(r.needed), self.config.currency),
                _ => format!("may use up to {} tokens", r.needed),
            };
            return GatewayError::invalid(format!(
                "{field}: this request {needed} (its prompt, at most a token a byte, plus {field}), more than {what}; ask for less"
            ))
            .param(field)
            .code("request_too_large");
        };
        let mut e = if r.limit.unit == Unit::Spend {
            let now = now_ms();
            let end = crate::quota::period_end(r.limit.window, now);
            let mut e = GatewayError::new(
                429,
                "budget_exceeded",
                format!("{what} is spent; it resets at {}", crate::quota::rfc3339(end)),
            );
            e.retry_after = Some(((end - now).max(0) as u64).div_ceil(1000).max(1));
            e
        } else {
            let secs = wait.as_millis().div_ceil(1000).max(1) as u64;
            let mut e =
                GatewayError::new(429, "rate_limit_exceeded", format!("{what} is reached; try again in {secs} s"));
            e.retry_after = Some(secs);
            e.headers = vec![
                (limit_header(unit, "limit"), r.limit.max.to_string()),
                (limit_header(unit, "remaining"), "0".into()),
                (limit_header(unit, "reset"), reset_text(wait)),
            ];
            e
        };
        if kind == "deployment" {
            e.code = Some("deployment_rate_limited".into());
        }
        e
    }

    /// OpenAI's `x-ratelimit-*` headers for the tightest per-minute request and token limits
    /// `reservation` holds.
    fn rate_headers(&self, reservation: &Reservation) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        for (unit, name) in [(Unit::Requests, "requests"), (Unit::Tokens, "tokens")] {
            let tightest = reservation
                .limits()
                .filter(|l| l.unit == unit && l.window == Window::Minute)
                .map(|l| self.quotas.standing(l))
                .min_by_key(|s| s.remaining);
            if let Some(s) = tightest {
                headers.push((limit_header(name, "limit"), s.limit.max.to_string()));
                headers.push((limit_header(name, "remaining"), s.remaining.to_string()));
                headers.push((limit_header(name, "reset"), reset_text(s.reset)));
            }
        }
        headers
    }
}

/// `x-ratelimit-{what}-{unit}`.
fn limit_header(unit: &str, what: &str) -> &'static str {
    match (what, unit) {
        ("limit", "requests") => "x-ratelimit-limit-requests",
        ("remaining", "requests") => "x-ratelimit-remaining-requests",
        ("reset", "requests") => "x-ratelimit-reset-requests",
        ("limit", _) => "x-ratelimit-limit-tokens",
        ("remaining", _) => "x-ratelimit-remaining-tokens",
        _ => "x-ratelimit-reset-tokens",
    }
}

impl Timing {
    /// These stages before the call (admission, table) with `call`'s (instance, plugin, upstream).
    fn with(self, call: Timing) -> Timing {
        Timing { instance: call.instance, plugin: call.plugin, upstream: call.upstream, ..self }
    }

    /// The stages as a `Server-Timing` header value (milliseconds), with `before` (the time
    /// before the gateway had the request: authentication, reading and parsing the body) and
    /// `after` (rendering the answer) around them.
    pub fn server_timing(&self, before: Duration, after: Duration) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        format!(
            "auth;dur={:.3}, admit;dur={:.3}, table;dur={:.3}, \
             instance;dur={:.3}, plugin;dur={:.3}, upstream;dur={:.3}, meter;dur={:.3}, render;dur={:.3}",
            ms(before),
            ms(self.admit),
            ms(self.table),
            ms(self.instance),
            ms(self.plugin),
            ms(self.upstream),
            ms(self.meter),
            ms(after)
        )
    }
}

/// A provider instance of `installed` for `tenant` (warm when one is idle), and how long taking
/// it took.
async fn take_instance(installed: &Installed, tenant: &str) -> Result<(WarmProvider, Duration), CallError> {
    let taking = Instant::now();
    let provider = installed.warm_provider(tenant).await?;
    Ok((provider, taking.elapsed()))
}

/// What the exact cache does for one request.
struct CachePlan {
    key: [u8; 32],
    /// Whether it may answer from the cache.
    read: bool,
    /// How long to keep the answer, if it is to be kept.
    store: Option<Duration>,
    /// What the cache did, unless it answers.
    outcome: cache::Outcome,
}

/// Where the semantic cache keeps its index: in the process (saved in the data dir), or in a
/// Qdrant the nodes share.
#[derive(Clone)]
enum SemanticStore {
    Embedded(Arc<SemanticIndex>),
    Qdrant(Arc<QdrantIndex>),
}

impl SemanticStore {
    fn start(config: &GatewayConfig) -> SemanticStore {
        if let Some(url) = &config.qdrant {
            match QdrantIndex::connect(url) {
                Ok(index) => return SemanticStore::Qdrant(Arc::new(index)),
                Err(e) => tracing::error!("the semantic cache stays in this process: {e}"),
            }
        }
        SemanticStore::Embedded(start_semantic(config.semantic_entries, config.semantic_path.clone()))
    }
}

/// Why a semantic store failed, as the metric's `reason` says it.
fn store_reason(e: &StoreError) -> &'static str {
    match e {
        StoreError::Vector(_) => "vector",
        StoreError::Unavailable(_) => "store",
    }
}

/// Where a request's answer goes in the semantic cache: its tenant, embedding model,
/// partition and its conversation's embedding.
struct Semantic {
    store: SemanticStore,
    tenant: String,
    embedding_model: String,
    partition: [u8; 32],
    vector: Vec<f32>,
}

impl Semantic {
    /// Keeps `kept` for `ttl` (on Qdrant, off the request's path); a vector the index cannot
    /// take, or a Qdrant that does not answer, is logged and metered.
    fn keep(self, kept: Kept, deployment: Deployment, ttl: Duration) {
        match self.store {
            SemanticStore::Embedded(index) => {
                if let Err(e) = index.insert(self.partition, &self.vector, kept, deployment, ttl) {
                    semantic_degraded("vector", &e.to_string());
                }
            }
            SemanticStore::Qdrant(index) => {
                tokio::spawn(async move {
                    let at = Place {
                        embedding_model: &self.embedding_model,
                        tenant: &self.tenant,
                        partition: &self.partition,
                    };
                    let kept = index.insert(at, self.vector, &kept, &deployment, ttl).await;
                    if let Err(e) = kept {
                        semantic_degraded(store_reason(&e), &e.to_string());
                    }
                });
            }
        }
    }
}

/// The semantic cache could not be used for a request: it is served without it, and the log
/// and `qlayer_gateway_semantic_cache_errors_total{reason}` say why.
fn semantic_degraded(reason: &'static str, why: &str) {
    metrics::counter!("qlayer_gateway_semantic_cache_errors_total", "reason" => reason).increment(1);
    tracing::warn!(reason, "served without the semantic cache: {why}");
}

/// The node's semantic index, saved every 30 s while it changes.
fn start_semantic(entries: usize, path: Option<std::path::PathBuf>) -> Arc<SemanticIndex> {
    let index = Arc::new(SemanticIndex::new(entries, path));
    let weak = Arc::downgrade(&index);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(index) = weak.upgrade() else { return };
            save_semantic(index).await;
        }
    });
    index
}

async fn save_semantic(index: Arc<SemanticIndex>) {
    match tokio::task::spawn_blocking(move || index.save()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("saving the semantic cache failed: {e}"),
        Err(e) => tracing::warn!("saving the semantic cache failed: {e}"),
    }
}

impl Gateway {
    /// The kept answer for `chat`, if there is one: from the exact cache, else from the
    /// semantic cache when the model has one (embedding the conversation, which is metered and
    /// held to the limits). Also where to keep the answer in the semantic cache.
    async fn cached(
        &self,
        caller: &Caller,
        chat: &ChatRequest,
        spec: &ModelSpec,
        plan: &CachePlan,
        stream: bool,
        deadline: Instant,
    ) -> (Option<(Kept, Deployment, cache::Outcome)>, Option<Semantic>) {
        if plan.read
            && let Some((kept, deployment)) = self.cache.get(&plan.key)
        {
            return (Some((kept, deployment, cache::Outcome::Hit)), None);
        }
        let Some(wanted) = spec.cache.as_ref().and_then(|c| c.semantic.as_ref()) else { return (None, None) };
        if plan.outcome == cache::Outcome::Off
            || self.config.semantic_entries == 0
            || !(plan.read || plan.store.is_some())
        {
            return (None, None);
        }
        let text = crate::semantic::conversation(&chat.request);
        let vector = match self.embed_text(caller, &wanted.embedding_model, text, deadline).await {
            Ok(vector) => vector,
            Err(why) => {
                semantic_degraded("embedding", &format!("model `{}`: {why}", wanted.embedding_model));
                return (None, None);
            }
        };
        let partition =
            crate::semantic::partition(&caller.tenant_id, &chat.model, &wanted.embedding_model, stream, &chat.request);
        let semantic = Semantic {
            store: self.semantic.clone(),
            tenant: caller.tenant_id.clone(),
            embedding_model: wanted.embedding_model.clone(),
            partition,
            vector,
        };
        if plan.read {
            let found = match &self.semantic {
                SemanticStore::Embedded(index) => {
                    index.lookup(&partition, &semantic.vector, wanted.threshold).map_err(|e| ("vector", e.to_string()))
                }
                SemanticStore::Qdrant(index) => {
                    let at = Place {
                        embedding_model: &wanted.embedding_model,
                        tenant: &caller.tenant_id,
                        partition: &partition,
                    };
                    index
                        .lookup(at, &semantic.vector, wanted.threshold)
                        .await
                        .map_err(|e| (store_reason(&e), e.to_string()))
                }
            };
            match found {
                Ok(Some((kept, deployment, similarity))) => {
                    tracing::debug!(similarity, "semantic cache hit");
                    return (Some((kept, deployment, cache::Outcome::SemanticHit)), None);
                }
                Ok(None) => {}
                Err((reason, why)) => {
                    semantic_degraded(reason, &why);
                    return (None, None);
                }
            }
        }
        (None, plan.store.is_some().then_some(semantic))
    }

    /// Embeddings of `inputs` from `ask`'s deployments: one vector per input, or a 502 naming
    /// the deployment that answered otherwise (its own hold is then given back).
    async fn route_embeddings(
        &self,
        caller: &Caller,
        ask: Ask<'_>,
        inputs: &[String],
        deadline: Instant,
    ) -> Result<Routed<Embeddings>, GatewayError> {
        let mut routed = self
            .route(caller, ask, deadline, |installed: Installed, model: String| async move {
                let request = EmbeddingRequest { model, inputs: inputs.to_vec() };
                let (mut provider, instance) = take_instance(&installed, &caller.tenant_name).await?;
                let value = provider.embed(&request).await?;
                Ok(Timed { value, instance, upstream: provider.take_outbound_wait() })
            })
            .await?;
        if routed.value.vectors.len() != inputs.len() {
            settle([routed.reservation.take(), None], Used::default());
            return Err(GatewayError::new(
                502,
                "provider_failed",
                format!(
                    "deployment `{}` returned {} vectors for {} inputs",
                    routed.deployment.key(),
                    routed.value.vectors.len(),
                    inputs.len()
                ),
            ));
        }
        Ok(routed)
    }

    /// One embedding of `text` by the tenant's model `model`, as an embeddings request of its
    /// own: held to the limits, routed, metered (the caller already holds its admission).
    async fn embed_text(
        &self,
        caller: &Caller,
        model: &str,
        text: String,
        deadline: Instant,
    ) -> Result<Vec<f32>, String> {
        let started = Instant::now();
        let record = self.record(caller, "embeddings", model);
        let spec = match self.spec(caller, model).await {
            Ok(spec) => spec,
            Err(e) => {
                self.meter_failure(record, started, &e);
                return Err(e.message);
            }
        };
        let bound = crate::request::prompt_bound(text.len(), 1, 0, 0);
        // Not a request of the tenant's: its tokens and spend count, the request it made does.
        let reservation = match self.reserve(caller, &spec, 0, bound, 0).await {
            Ok(reservation) => reservation,
            Err(e) => {
                self.meter_failure(record, started, &e);
                return Err(e.message);
            }
        };
        let ask = Ask { model, spec: &spec, needs: &[], tokens: bound };
        match self.route_embeddings(caller, ask, &[text], deadline).await {
            Ok(mut routed) => {
                let usage = Usage { prompt_tokens: routed.value.usage.prompt_tokens, completion_tokens: 0 };
                self.meter_answer(record, &routed.deployment, usage, started);
                settle([Some(reservation), routed.reservation.take()], used(&routed.deployment, usage));
                Ok(routed.value.vectors.remove(0))
            }
            Err(e) => {
                settle([Some(reservation), None], Used::default());
                self.meter_failure(record, started, &e);
                Err(e.message)
            }
        }
    }
}

impl Gateway {
    /// What the cache does for `chat`: nothing unless its model keeps answers (the key is not
    /// even computed); `no-cache` skips reading, `no-store` skips keeping.
    fn cache_plan(&self, caller: &Caller, chat: &ChatRequest, spec: &ModelSpec, stream: bool) -> CachePlan {
        let off = CachePlan { key: [0; 32], read: false, store: None, outcome: cache::Outcome::Off };
        let Some(spec) = spec.cache.as_ref().filter(|_| self.config.cache_bytes > 0) else { return off };
        CachePlan {
            key: cache::key(&caller.tenant_id, &chat.model, stream, &chat.request),
            read: !chat.cache.no_cache,
            store: (!chat.cache.no_store).then(|| Duration::from_secs(u64::from(spec.ttl_secs))),
            outcome: if chat.cache.no_cache { cache::Outcome::Skip } else { cache::Outcome::Miss },
        }
    }
}

/// What a request asks of [`Gateway::route`]: the model (its name and entry), the features its
/// providers must express, and the tokens it may use (held to each deployment's own limits).
struct Ask<'a> {
    model: &'a str,
    spec: &'a ModelSpec,
    needs: &'a [Feature],
    tokens: u64,
}

/// A request's prompt: its bytes (for estimates of what it used when nobody says) and the most
/// tokens it can be (for limits).
#[derive(Debug, Clone, Copy)]
struct Prompt {
    bytes: usize,
    bound: u64,
}

impl Prompt {
    /// A chat request's prompt, its messages read once.
    fn of(chat: &ChatRequest) -> Prompt {
        let bytes = chat.prompt_bytes();
        Prompt { bytes, bound: chat.prompt_bound(bytes) }
    }
}

/// What [`Gateway::begin`] gives a request.
struct Begun<'a> {
    permit: Permit,
    record: UsageRecord,
    spec: Arc<ModelSpec>,
    guard: AbandonGuard<'a>,
    prompt_estimate: u32,
    /// The most tokens it may use: its prompt's bound and the output it may ask for.
    tokens: u64,
    /// OpenAI's `x-ratelimit-*` headers of the caller's limits.
    rate_headers: Vec<(&'static str, String)>,
    /// The admission's and the table's times (and, in `admit`, the limits').
    timing: Timing,
}

/// Meters a request whose client left before it was answered (its future dropped mid-call):
/// the provider call is cancelled with it, and the prompt it had sent is still charged.
struct AbandonGuard<'a> {
    meter: &'a Meter,
    record: Option<UsageRecord>,
    started: Instant,
    prompt_estimate: u32,
    /// The caller's limits held for the request: settled to the prompt when the client leaves.
    reservation: Option<Reservation>,
}

impl AbandonGuard<'_> {
    /// The request was answered (or failed) with its client still there: what it holds of
    /// the caller's limits, to settle.
    fn defuse(mut self) -> Option<Reservation> {
        self.record = None;
        self.reservation.take()
    }
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if let Some(reservation) = self.reservation.take() {
            // As metered below: the prompt's tokens, at no cost.
            reservation.settle(Used { tokens: u64::from(self.prompt_estimate), spend: 0 });
        }
        if let Some(mut record) = self.record.take() {
            record.prompt_tokens = i64::from(self.prompt_estimate);
            record.latency_us = self.started.elapsed().as_micros() as i64;
            record.status = "client_closed".into();
            self.meter.record(record);
        }
    }
}
